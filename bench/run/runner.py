"""Run a sweep locally: the unfinished runs, in this process or in worker processes, then the report."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from bench.arguments import parse
from bench.run.config import RunConfig
from bench.run.execute import claim_and_execute, pending, print_failures
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
    statuses: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress)
    if workers == 1:
        for run in todo:
            run_id, status = claim_and_execute(
                run.to_dict(), str(results), threads=threads, progress=progress, retry_failed=retry_failed
            )
            statuses[run_id] = status
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [
                pool.submit(
                    claim_and_execute,
                    r.to_dict(),
                    str(results),
                    threads=threads,
                    progress=False,
                    retry_failed=retry_failed,
                )
                for r in todo
            ]
            for future in as_completed(futures):
                run_id, status = future.result()
                statuses[run_id] = status
                bar.update()
                bar.set_postfix_str(f"last: {status}")
    bar.close()
    print_failures(statuses)
    return statuses


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
