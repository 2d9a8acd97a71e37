"""``python -m bench <command>``: one entry point, each command implemented by its own module.

Arguments are parsed before the command's module (and torch) is imported: ``--help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys

from bench.arguments import COMMANDS, parse


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
    args = parse(name, rest)
    try:
        importlib.import_module(COMMANDS[name].module).run(args)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)


INTERRUPTED = "stopped; rerun the same command to resume"
"""All that Ctrl-C prints (exit code 130, as for any process Ctrl-C ends): finished runs keep their
records, and a rerun of the same command goes on from them."""
