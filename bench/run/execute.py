"""One run, start to end: claim it, train, record whatever happens (ok or a failure status).

Shared by the local executor (``bench.run.runner``) and the SLURM one (``bench.run.slurm``): both skip what is
recorded, and both read every existing record of a sweep first.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

from bench.records.provenance import load_average, provenance
from bench.records.records import (
    SCHEMA_VERSION,
    RecordError,
    read_record,
    record_path,
    release_claim,
    try_claim,
    write_record,
)
from bench.run.config import RunConfig
from bench.run.sweep import SweepError
from bench.run.train import DivergedError, resolve_device, train_run


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


def recorded_statuses(runs: list[RunConfig], results: str | Path) -> dict[str, str]:
    """run_id -> status of every existing record of these runs. SweepError listing every corrupt or
    incomplete one, before any run starts: a record that cannot be read would otherwise count as done
    and fail only at report time."""
    statuses, problems = {}, []
    for run in runs:
        path = record_path(results, run.run_id)
        if path.exists():
            try:
                statuses[run.run_id] = read_record(path)["status"]
            except RecordError as err:
                problems.append(str(err))
    if problems:
        problems.append(
            "delete (or move away) the file(s) above, then run the sweep again to redo those runs"
        )
        raise SweepError(str(results), problems)
    return statuses


def pending(runs: list[RunConfig], results: str | Path, retry_failed: bool) -> list[RunConfig]:
    """The runs still to do (no record, or a failed one with ``retry_failed``); prints the tally.

    Every existing record of the sweep is read first: corrupt ones are all reported at once."""
    recorded = recorded_statuses(runs, results)
    todo = [r for r in runs if r.run_id not in recorded or (retry_failed and recorded[r.run_id] != "ok")]
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
    run_data: dict, results: str, *, threads: int, progress: bool, retry_failed: bool = False
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
