"""``bench sweep --executor submitit``: one SLURM array task per unfinished run, same runner code.

Each job calls ``bench.run.execute.claim_and_execute`` and writes its record into the shared results
folder, so resume, ``--retry-failed``, failure statuses and the report work as with the local runner,
and a run with a finished record is never submitted. submitit's files (pickled calls, each job's stdout and
stderr) go to ``<results>/slurm_logs``. ``--cluster local`` runs the jobs as local processes instead.

Claims: a claim is recognised as stale only on its own host (dead pid), so a job killed on a compute
node leaves a claim that blocks its run. Claimed runs are not submitted (the submitter says how many);
``--steal-claims`` deletes the claims of the runs to submit first: use it only when no other sweep or
job is working on the same results folder.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.records.records import read_record, record_path, release_claim, try_claim
from bench.run.config import RunConfig
from bench.run.execute import claim_and_execute, pending, print_failures
from bench.run.sweep import Sweep
from bench.settings import SLURM_KEYS

DEFAULTS = {"gpus_per_node": 1, "cpus_per_task": 4, "timeout_min": 240}
"""Job settings unless the sweep file's ``slurm:`` or the CLI say otherwise (submitit's time is 5 min)."""
GENERIC = ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")
"""Settings submitit translates for every cluster; the other SLURM_KEYS are passed as ``slurm_<key>``."""
POLL_S = {"local": 1.0, "slurm": 30.0}
MISSING = "no record"
"""What ``summarize`` reports for a run whose job ended without writing its record."""


def run(sweep: Sweep, args: argparse.Namespace) -> bool:
    """Submit, then wait with a progress bar; True once the jobs are over, False with ``--no-wait``."""
    run_ids = [r.run_id for r in sweep.runs]
    if args.watch:
        print("Ctrl-C stops watching; the jobs keep running")
        show_progress(run_ids, args.results, before={}, jobs=None, poll_s=POLL_S[args.cluster])
        return True
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        sys.exit("no SLURM here (sbatch not found); --cluster local runs the jobs as local processes")
    cli = {k: getattr(args, k) for k in SLURM_KEYS if getattr(args, k, None) is not None}
    settings = {**DEFAULTS, **sweep.slurm, **cli}
    before = record_stamps(run_ids, args.results)
    jobs = submit(
        sweep.runs,
        args.results,
        settings,
        cluster=args.cluster,
        retry_failed=args.retry_failed,
        steal=args.steal_claims,
    )
    if args.no_wait:
        if jobs:
            ids = sorted({job.job_id.split("_")[0] for job in jobs.values()})
            logs = Path(args.results, "slurm_logs")
            print(f"submitted {len(jobs)} job(s) as {', '.join(ids)}; logs in {logs}")
        return False
    show_progress(
        list(jobs), args.results, before=before, jobs=list(jobs.values()), poll_s=POLL_S[args.cluster]
    )
    summarize(jobs, args.results, before)
    return True


def submit(
    runs: list[RunConfig],
    results: str | Path,
    settings: dict[str, Any],
    *,
    cluster: str,
    retry_failed: bool,
    steal: bool,
) -> dict[str, Any]:
    """Submit one job (array task) per run to do and not claimed elsewhere; returns run_id -> job."""
    import submitit

    todo = pending(runs, results, retry_failed)
    if steal:
        for run in todo:
            release_claim(results, run.run_id)
    free = [r for r in todo if claimable(results, r.run_id)]
    if len(free) < len(todo):
        print(
            f"{len(todo) - len(free)} run(s) not submitted: claimed by a running sweep or job, or by a job "
            f"killed on another host (if nothing else uses {results}, resubmit with --steal-claims)"
        )
    if not free:
        return {}
    executor = submitit.AutoExecutor(folder=Path(results) / "slurm_logs", cluster=cluster)
    executor.update_parameters(
        name="bench", **{k if k in GENERIC else f"slurm_{k}": v for k, v in settings.items()}
    )
    threads = 1 if cluster == "local" else settings["cpus_per_task"]
    work = functools.partial(
        claim_and_execute,
        results=str(Path(results).resolve()),
        threads=threads,
        progress=False,
        retry_failed=retry_failed,
    )
    jobs = executor.map_array(work, [r.to_dict() for r in free])
    return {r.run_id: job for r, job in zip(free, jobs, strict=True)}


def claimable(results: str | Path, run_id: str) -> bool:
    """Whether no live process holds the run (a stale same-host claim is cleared on the way)."""
    if not try_claim(results, run_id):
        return False
    release_claim(results, run_id)
    return True


def record_stamps(run_ids: list[str], results: str | Path) -> dict[str, int | None]:
    """run_id -> mtime (ns) of its record, None without one: tells a new record from an old one."""
    stamps: dict[str, int | None] = {}
    for run_id in run_ids:
        try:
            stamps[run_id] = record_path(results, run_id).stat().st_mtime_ns
        except FileNotFoundError:
            stamps[run_id] = None
    return stamps


def new_records(run_ids: list[str], results: str | Path, before: dict[str, int | None]) -> list[str]:
    """The runs among ``run_ids`` whose record was written after ``before`` was taken."""
    now = record_stamps(run_ids, results)
    return [r for r in run_ids if now[r] is not None and now[r] != before.get(r)]


def show_progress(
    run_ids: list[str],
    results: str | Path,
    *,
    before: dict[str, int | None],
    jobs: list | None,
    poll_s: float,
) -> None:
    """A bar over the records written since ``before``, until all are written or every job has ended."""
    with tqdm(total=len(run_ids), desc="records", unit="run") as bar:
        while True:
            ended = jobs is not None and all(job.done() for job in jobs)
            written = len(new_records(run_ids, results, before))
            if written > bar.n:
                bar.update(written - bar.n)
            if ended or written == len(run_ids):
                return
            time.sleep(poll_s)


def summarize(jobs: dict[str, Any], results: str | Path, before: dict[str, int | None]) -> dict[str, str]:
    """run_id -> status of each submitted run, from its new record (MISSING if none); prints the failures."""
    written = new_records(list(jobs), results, before)
    statuses = {
        run_id: read_record(record_path(results, run_id))["status"] if run_id in written else MISSING
        for run_id in jobs
    }
    print_failures({k: v for k, v in statuses.items() if v != MISSING})
    missing = [jobs[k] for k, v in statuses.items() if v == MISSING]
    if missing:
        logs = ", ".join(str(job.paths.stderr) for job in missing[:3])
        print(
            f"{len(missing)} job(s) ended without a record (killed, timed out or crashed, or the run was "
            f"claimed by another process), e.g. {logs}"
        )
        print("rerun the same command to submit only the runs without a record")
    return statuses
