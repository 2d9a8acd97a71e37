"""Run a sweep locally: the unfinished runs, in this process or in worker processes (``bench.cli`` then
builds the report)."""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from tqdm.auto import tqdm

from bench.records.records import ResultsFolderError, check_results_folder
from bench.run.config import RunConfig
from bench.run.execute import claim_and_execute, pending, print_failures, recorded_statuses
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
    (Ctrl-C included, and SIGTERM to the sweep, which this turns into one) the workers are ended: their
    runs in flight stop and their claims go stale, so no worker outlives the sweep."""
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_leave_interrupts_to_the_parent)
    terminated = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield from pool.imap_unordered(execute, [r.to_dict() for r in runs])
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        signal.signal(signal.SIGTERM, terminated)


def _refuse(err: Exception) -> NoReturn:
    """A sweep that cannot start (its file, its results folder): the problems, exit code 2, nothing run."""
    print(err, file=sys.stderr)
    sys.exit(2)


def _leave_interrupts_to_the_parent() -> None:
    """Worker initializer: Ctrl-C reaches every process of the terminal; the sweep process alone answers
    it and ends the workers (SIGTERM), which then exit quietly, their finalizers run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def run(args: argparse.Namespace) -> dict[str, str] | None:
    """Run (or submit) the sweep's unfinished runs; returns the recorded status of each of its runs
    (run_id -> status, for ``bench.cli`` to report and exit on), or None when there is nothing to report
    yet: a dry run, or jobs submitted without waiting."""
    from bench.run import slurm

    try:
        sweep = load_sweep(args.sweep, local=args.executor == "local")
    except SweepError as err:
        _refuse(err)
    for line in sweep.merged:
        print(f"merged: {line}")
    if args.dry_run:
        for run_config in sweep.runs:
            print(run_config.run_id)
        print(f"{len(sweep.runs)} runs")
        return None
    if args.executor == "local":
        try:
            run_sweep(sweep.runs, args.results, workers=args.workers, retry_failed=args.retry_failed)
        except (SweepError, ResultsFolderError) as err:
            _refuse(err)
    elif not slurm.run(sweep, args):
        return None  # submitted without waiting: nothing to report yet
    return recorded_statuses(sweep.runs, args.results)
