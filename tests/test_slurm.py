"""`--executor submitit` on submitit's local executor: real subprocess jobs, same records, resubmission."""

import json
import os
import signal
import time

import pytest

from bench.cli import main as bench_command
from bench.run import runner, slurm
from bench.run.sweep import SweepError, load_sweep, parse_sweep
from tests.harness import comparable, record_files, write_sweep

GRID = [{"method": ["linear", "lora"]}]
JOBS = {"timeout_min": 10, "array_parallelism": 2, "partition": "ignored-by-local"}
SUBMITIT = ["--executor", "submitit", "--cluster", "local"]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    return write_sweep(tmp_path_factory.mktemp("sweep") / "s.yaml", GRID, slurm=JOBS)


@pytest.fixture(scope="module")
def reference(sweep_file, tmp_path_factory):
    """The records of the local runner (in this process) for the same sweep."""
    results = tmp_path_factory.mktemp("reference")
    runner.run_sweep(load_sweep(sweep_file).runs, results, workers=1, progress=False)
    return comparable(results)


def submitit_sweep(sweep_file, results, *extra: str) -> None:
    bench_command(
        ["sweep", str(sweep_file), "--results", str(results), "--no-report"] + SUBMITIT + list(extra)
    )


def submitted(results) -> int:
    return len(list((results / "slurm_logs").glob("*_submitted.pkl")))


@pytest.mark.slow
def test_submitit_jobs_write_the_same_records_as_the_local_runner(sweep_file, reference, tmp_path, capsys):
    submitit_sweep(sweep_file, tmp_path)
    assert submitted(tmp_path) == 2
    assert comparable(tmp_path) == reference
    assert all(status == "ok" for status, *_ in reference.values())
    assert not list((tmp_path / "records").glob("*.claim"))

    capsys.readouterr()
    submitit_sweep(sweep_file, tmp_path)  # everything recorded: nothing is submitted again
    assert "2 already recorded, 0 to run" in capsys.readouterr().out
    assert submitted(tmp_path) == 2
    submitit_sweep(sweep_file, tmp_path, "--watch")  # returns at once: every record is there
    assert "2/2" in capsys.readouterr().err


def wait_for_claim(path, timeout_s: float = 240) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
    raise TimeoutError(f"no claim {path} after {timeout_s} s")


@pytest.mark.slow
def test_killed_job_is_resubmitted_alone(sweep_file, reference, tmp_path, capsys):
    runs = load_sweep(sweep_file).runs
    linear, lora = sorted(runs, key=lambda r: r.method)
    jobs = slurm.submit(
        runs, tmp_path, {**slurm.DEFAULTS, **JOBS}, cluster="local", retry_failed=False, steal=False
    )
    before = slurm.record_stamps(list(jobs), tmp_path)
    claim = tmp_path / "records" / f"{lora.run_id}.claim"
    os.kill(wait_for_claim(claim)["pid"], signal.SIGKILL)  # the job's worker dies mid-run
    slurm.show_progress(list(jobs), tmp_path, before=before, jobs=list(jobs.values()), poll_s=0.2)
    assert slurm.summarize(jobs, tmp_path, before) == {linear.run_id: "ok", lora.run_id: slurm.MISSING}
    assert [p.stem for p in record_files(tmp_path)] == [linear.run_id]
    linear_written = (tmp_path / "records" / f"{linear.run_id}.json").stat().st_mtime_ns

    # As if the job had died on a compute node: its claim names another host, so it is never stale here.
    claim.write_text(json.dumps({"host": "gpu-node-7", "pid": 1, "since": "2026-01-01T00:00:00"}))
    capsys.readouterr()
    submitit_sweep(sweep_file, tmp_path)
    assert "1 run(s) not submitted" in capsys.readouterr().out and submitted(tmp_path) == 2

    submitit_sweep(sweep_file, tmp_path, "--steal-claims")
    assert "1 already recorded, 1 to run" in capsys.readouterr().out
    assert submitted(tmp_path) == 3  # only the killed run went out again
    assert comparable(tmp_path) == reference
    assert (tmp_path / "records" / f"{linear.run_id}.json").stat().st_mtime_ns == linear_written
    assert not list((tmp_path / "records").glob("*.claim"))


def test_slurm_settings_in_a_sweep_file_are_validated():
    base = {"tasks": ["digits"], "grid": [{"method": "linear"}]}
    good = {"partition": "gpu", "gpus_per_node": 1, "mem_gb": 32.5, "setup": ["module load cuda"]}
    assert parse_sweep({**base, "slurm": good}).slurm == good
    with pytest.raises(SweepError) as err:
        parse_sweep({**base, "slurm": {"partiton": "gpu", "timeout_min": "1h", "setup": "module load x"}})
    message = str(err.value)
    assert "unknown key 'partiton' (did you mean 'partition'?)" in message
    assert "slurm.timeout_min='1h' must be an integer >= 0" in message
    assert "slurm.setup='module load x' must be a list of shell lines" in message
