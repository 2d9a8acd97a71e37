"""``python -m bench <command>``: one entry point, each command implemented by its own module.

Arguments are parsed before the command's module (and torch) is imported: ``--help`` answers at once.
The command measures and writes records; then the report its ``Command`` names is rendered here, from the
records alone (as ``python -m bench report`` renders it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from bench.arguments import ACCURACY_REPORT, COMMANDS, Command, parse


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    return "usage: python -m bench <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"unknown command {name!r}; allowed: {', '.join(COMMANDS)}\n\n{usage()}")
    command = COMMANDS[name]
    args = parse(name, rest)
    try:
        failure = report(command, args, importlib.import_module(command.module).run(args))
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    if failure:
        sys.exit(failure)


def report(command: Command, args: argparse.Namespace, outcome: Any) -> str | None:
    """Render and print the report ``command.report`` names from ``args.results``, after the command
    returned ``outcome``; returns the failure to exit with, if any (``Command`` says what each returns)."""
    if command.report == (ACCURACY_REPORT,):
        return sweep_report(args, outcome)
    if command.report:
        from bench.report.measurements import render_folder

        for path in render_folder(args.results, kinds=command.report):
            print(path.read_text())
            print(f"report: {path}")
    return outcome


def sweep_report(args: argparse.Namespace, statuses: dict[str, str] | None) -> str | None:
    """The accuracy report unless ``--no-report``; then the failure, if any of the sweep's runs failed."""
    if statuses is None:  # a dry run, or jobs submitted without waiting: nothing to report yet
        return None
    if not args.no_report:
        from bench.report.build import build_report

        build_report(args.results)
    failed = sorted({status for status in statuses.values() if status != "ok"})
    if failed:
        return f"the sweep has failed runs ({', '.join(failed)}): the report and their records say why"
    return None


INTERRUPTED = "stopped; rerun the same command to resume"
"""All that Ctrl-C prints (exit code 130, as for any process Ctrl-C ends): finished runs keep their
records, and a rerun of the same command goes on from them."""
