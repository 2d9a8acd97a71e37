"""Run a sweep locally: the unfinished runs, in this process or in worker processes, then the report."""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from bench.arguments import parse
from bench.run.config import RunConfig
from bench.run.execute import claim_and_execute, pending, print_failures, recorded_statuses
from bench.run.records import ResultsFolderError, check_results_folder
from bench.run.sweep import SweepError, load_sweep


def run_sweep(
    runs: list[RunConfig],
    results: str | Path,
    *,
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Run every unfinished run; returns run_id -> status for those attempted in this call.

    ``workers`` > 1 runs that many processes with ``cpu_count // workers`` torch threads each;
    ``workers`` = 1 runs in this process (what tests use to inject failures).
    The results folder and the sweep's existing records are checked before anything starts.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: give 1 (run in this process) or more (worker processes)")
    check_results_folder(results)
    todo = pending(runs, results, retry_failed)
    threads = max(1, (os.cpu_count() or 1) // workers)
    options = {"results": str(results), "threads": threads, "retry_failed": retry_failed}
    statuses: dict[str, str] = {}
    with tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress) as bar:
        if workers == 1:
            done = (claim_and_execute(r.to_dict(), progress=progress, **options) for r in todo)
        else:
            done = _in_workers(functools.partial(claim_and_execute, progress=False, **options), todo, workers)
        for run_id, status in done:
            statuses[run_id] = status
            bar.update()
            bar.set_postfix_str(f"last: {status}")
    print_failures(statuses)
    return statuses


def _in_workers(execute: Callable, runs: list[RunConfig], workers: int) -> Iterator[tuple[str, str]]:
    """(run_id, status) of each run as ``workers`` spawned processes finish them; on any exception here
    (Ctrl-C included) the workers are ended: their runs in flight stop and their claims go stale."""
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_leave_interrupts_to_the_parent)
    try:
        yield from pool.imap_unordered(execute, [r.to_dict() for r in runs])
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _leave_interrupts_to_the_parent() -> None:
    """Worker initializer: Ctrl-C reaches every process of the terminal; the sweep process alone answers
    it and ends the workers (SIGTERM), which then exit quietly, their finalizers run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def main(argv: list[str] | None = None) -> None:
    run(parse("sweep", argv))


def run(args: argparse.Namespace) -> None:
    from bench.run import slurm

    try:
        sweep = load_sweep(args.sweep)
    except SweepError as err:
        sys.exit(str(err))
    for line in sweep.merged:
        print(f"merged: {line}")
    if args.dry_run:
        for run_config in sweep.runs:
            print(run_config.run_id)
        print(f"{len(sweep.runs)} runs")
        return
    if args.executor == "local":
        try:
            run_sweep(sweep.runs, args.results, workers=args.workers, retry_failed=args.retry_failed)
        except (SweepError, ResultsFolderError) as err:
            sys.exit(str(err))
    elif not slurm.run(sweep, args):
        return  # submitted without waiting: nothing to report yet
    if not args.no_report:
        from bench.report.build import build_report

        build_report(args.results)
    failed = sorted({s for s in recorded_statuses(sweep.runs, args.results).values() if s != "ok"})
    if failed:
        sys.exit(f"the sweep has failed runs ({', '.join(failed)}): the report and their records say why")
