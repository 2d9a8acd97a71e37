"""Run a sweep: skip what is recorded, claim, train, record every outcome (ok or failure), go on."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.arguments import parse
from bench.config import RunConfig
from bench.provenance import load_average, provenance
from bench.records import (
    SCHEMA_VERSION,
    RecordError,
    ResultsFolderError,
    check_results_folder,
    read_record,
    record_path,
    release_claim,
    try_claim,
    write_record,
)
from bench.sweep import SweepError, load_sweep
from bench.train import DivergedError, resolve_device, train_run


def failure_status(err: BaseException) -> str:
    """Map an exception to a record status: diverged, oom or error."""
    if isinstance(err, DivergedError):
        return "diverged"
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return "oom"
    return "error"


def execute_run(run: RunConfig, results: str | Path, progress: bool = True) -> dict:
    """Train one run and write its record, whatever happens; returns the record."""
    record = {
        "schema": SCHEMA_VERSION,
        "run_id": run.run_id,
        "label": run.label,
        "config": run.to_dict(),
        "provenance": provenance(resolve_device_or_cpu(run)),
        "status": "ok",
        "error": None,
        "metrics": {},
        "method_config": None,
    }
    try:
        record.update(train_run(run, progress=progress))
    except Exception as err:  # noqa: BLE001 - every failure is recorded, then the sweep goes on
        record["status"] = failure_status(err)
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=-6)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["provenance"]["load_avg_end"] = load_average()
    write_record(record_path(results, run.run_id), record)
    return record


def resolve_device_or_cpu(run: RunConfig) -> torch.device:
    try:
        return resolve_device(run.train.device)
    except ValueError:
        return torch.device("cpu")


def is_finished(run: RunConfig, results: str | Path, retry_failed: bool) -> bool:
    path = record_path(results, run.run_id)
    if not path.exists():
        return False
    return not retry_failed or read_record(path)["status"] == "ok"


def check_existing_records(runs: list[RunConfig], results: str | Path) -> None:
    """SweepError listing every corrupt or incomplete record of this sweep, before any run starts: a
    record that cannot be read would otherwise count as done and fail only at report time."""
    problems = []
    for run in runs:
        path = record_path(results, run.run_id)
        if path.exists():
            try:
                read_record(path)
            except RecordError as err:
                problems.append(str(err))
    if problems:
        problems.append(
            "delete (or move away) the file(s) above, then run the sweep again to redo those runs"
        )
        raise SweepError(str(results), problems)


def pending(runs: list[RunConfig], results: str | Path, retry_failed: bool) -> list[RunConfig]:
    """The runs still to do (no record, or a failed one with ``retry_failed``); prints the tally.

    Every existing record of the sweep is read first: corrupt ones are all reported at once."""
    check_existing_records(runs, results)
    todo = [r for r in runs if not is_finished(r, results, retry_failed)]
    print(f"{len(runs)} runs in the sweep, {len(runs) - len(todo)} already recorded, {len(todo)} to run")
    return todo


def print_failures(statuses: dict[str, str]) -> None:
    """Tally of ``statuses`` (run_id -> status): how many ran, were skipped, and which failures."""
    skipped = sum(s == "skipped" for s in statuses.values())
    failed = sorted({s for s in statuses.values() if s not in ("ok", "skipped")})
    if not statuses:
        print("nothing to run: every run of the sweep has a record")
        return
    print(f"ran {len(statuses) - skipped} run(s)")
    if skipped:
        print(f"{skipped} run(s) left to another process that holds or has just recorded them")
    if failed:
        n_failed = sum(s in failed for s in statuses.values())
        print(f"{n_failed} run(s) failed and were recorded as such: {', '.join(failed)}")


def claim_and_execute(
    run_data: dict, results: str, threads: int, progress: bool, retry_failed: bool = False
) -> tuple[str, str]:
    """Worker entry point: (run_id, status); 'skipped' if another process holds the run or has just
    recorded it (checked again after claiming, so a run queued twice executes once)."""
    torch.set_num_threads(threads)
    run = RunConfig.from_dict(run_data)
    if not try_claim(results, run.run_id):
        return run.run_id, "skipped"
    try:
        if is_finished(run, results, retry_failed):
            return run.run_id, "skipped"
        return run.run_id, execute_run(run, results, progress)["status"]
    finally:
        release_claim(results, run.run_id)


def run_sweep(
    runs: list[RunConfig],
    results: str | Path,
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
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    statuses: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress)
    if workers <= 1:
        for run in todo:
            run_id, status = claim_and_execute(run.to_dict(), str(results), threads, progress, retry_failed)
            statuses[run_id] = status
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [
                pool.submit(claim_and_execute, r.to_dict(), str(results), threads, False, retry_failed)
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
    from bench import slurm

    try:
        sweep = load_sweep(args.sweep)
    except SweepError as err:
        sys.exit(str(err))
    if args.dry_run:
        for run_config in sweep.runs:
            print(run_config.run_id)
        print(f"{len(sweep.runs)} runs")
        return
    if args.executor == "local":
        try:
            run_sweep(sweep.runs, args.results, args.workers, args.retry_failed)
        except (SweepError, ResultsFolderError) as err:
            sys.exit(str(err))
    elif not slurm.run(sweep, args):
        return  # submitted without waiting: nothing to report yet
    if not args.no_report:
        from bench.report import build_report

        build_report(args.results)
