"""Sweeps survive kills, divergence, OOM, errors, bad configs and each other; CPU runs are deterministic."""

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest
import torch

import bench.run.train
import snell
from bench.records.records import load_records
from bench.report.build import build_report
from bench.run.config import RunConfig, TrainConfig
from bench.run.runner import run_sweep
from bench.run.sweep import parse_sweep
from snell.core import registry
from tests.harness import FAST_TRAIN, REPO, bench_cmd, comparable, record_files, run_bench, write_sweep

GRID = [{"method": ["linear", "lora"]}, {"method": "snell", "rank": 4}]


@pytest.fixture(scope="module")
def sweep_and_reference(tmp_path_factory):
    """A 6-run sweep file and its uninterrupted results."""
    folder = tmp_path_factory.mktemp("reference")
    sweep = write_sweep(folder / "s.yaml", GRID, seeds=[0, 1])
    done = run_bench(
        "sweep", str(sweep), "--results", str(folder / "results"), "--workers", "1", "--no-report"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return sweep, folder / "results"


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, workers",
    [(signal.SIGKILL, 1), (signal.SIGINT, 1), (signal.SIGINT, 2)],
    ids=["kill", "ctrl-c", "ctrl-c 2"],
)
def test_a_stopped_sweep_resumes_to_the_uninterrupted_results(tmp_path, sweep_and_reference, sig, workers):
    sweep, reference = sweep_and_reference
    stopped = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = bench_cmd("sweep", str(sweep), "--results", str(stopped), "--workers", str(workers), "--no-report")
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while len(record_files(stopped)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere inside the next run
    proc.send_signal(sig)
    stderr = proc.communicate()[1]
    partial = len(record_files(stopped))
    assert 2 <= partial < 6, "the signal should land mid-sweep"
    if sig == signal.SIGINT:  # Ctrl-C: one line, no traceback from the sweep or its workers
        assert proc.returncode == 130 and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == "stopped; rerun the same command to resume"

    resumed = run_bench("sweep", str(sweep), "--results", str(stopped), "--workers", "1", "--no-report")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{partial} already recorded" in resumed.stdout
    assert comparable(stopped) == comparable(reference)
    assert len(load_records(stopped)) == 6  # all parse, none duplicated
    assert not list((stopped / "records").glob("*.tmp")) and not list((stopped / "records").glob("*.claim"))


def run_quick(tmp_path, grid, **train):
    runs = parse_sweep({"train": {**FAST_TRAIN, **train}, "tasks": ["digits"], "grid": grid}).runs
    statuses = run_sweep(runs, tmp_path, workers=1, progress=False)
    return runs, statuses


def test_divergence_is_recorded_and_shown(tmp_path):
    _, statuses = run_quick(tmp_path, [{"method": "full"}], lr=1e3)
    assert list(statuses.values()) == ["diverged"]
    (record,) = load_records(tmp_path)
    assert "DivergedError: training loss reached" in record["error"]
    build_report(tmp_path)
    assert "diverged" in (tmp_path / "tables" / "results.md").read_text()


def test_error_in_a_method_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    @dataclass(frozen=True)
    class ExplodingConfig(snell.TuningConfig):
        pass

    def explode(model, cfg, calibration=None):
        raise RuntimeError("boom: this method always fails")

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    snell.register_method("exploding", ExplodingConfig)(explode)
    runs, statuses = run_quick(tmp_path, [{"method": ["exploding", "linear"]}])
    by_method = {r.method: statuses[r.run_id] for r in runs}
    assert by_method == {"exploding": "error", "linear": "ok"}
    failed = next(r for r in load_records(tmp_path) if r["status"] == "error")
    assert "boom: this method always fails" in failed["error"] and failed["traceback"]
    build_report(tmp_path)
    table = (tmp_path / "tables" / "results.md").read_text()
    assert "| exploding " in table and "error" in table


def test_out_of_memory_is_recorded_as_oom(tmp_path, monkeypatch):
    build = bench.run.train.build_model

    def build_with_oom_hook(run):
        model = build(run)

        def raise_oom(module, args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

        model.net.register_forward_pre_hook(raise_oom)
        return model

    monkeypatch.setattr(bench.run.train, "build_model", build_with_oom_hook)
    _, statuses = run_quick(tmp_path, [{"method": "lora"}])
    assert list(statuses.values()) == ["oom"]
    build_report(tmp_path)
    assert "OOM" in (tmp_path / "tables" / "results.md").read_text()


@pytest.mark.slow
def test_same_seed_gives_bit_identical_losses_and_accuracy():
    run = RunConfig("digits", "snell", 0, {"rank": 4}, TrainConfig(**{**FAST_TRAIN, "epochs": 2}))
    first = bench.run.train.train_run(run, progress=False)["metrics"]
    second = bench.run.train.train_run(run, progress=False)["metrics"]
    assert first["loss_curve"] == second["loss_curve"]
    assert first["test_acc"] == second["test_acc"] and first["val_acc"] == second["val_acc"]
    other_seed = bench.run.train.train_run(
        RunConfig("digits", "snell", 1, {"rank": 4}, run.train), progress=False
    )
    assert other_seed["metrics"]["loss_curve"] != first["loss_curve"]


@pytest.mark.slow
def test_two_sweeps_on_one_folder_split_the_work(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", GRID, seeds=[0, 1])
    results = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = bench_cmd("sweep", str(sweep), "--results", str(results), "--workers", "1", "--no-report")
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ran = [int(re.search(r"^ran (\d+) run", out, re.MULTILINE).group(1)) for out in outputs]
    assert sum(ran) == 6, outputs  # every run executed exactly once across both sweeps
    records = load_records(results)
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)


@pytest.mark.slow
def test_corrupt_record_stops_the_resume_with_the_file_name(tmp_path):
    run_quick(tmp_path, [{"method": "linear"}])
    (path,) = record_files(tmp_path)
    path.write_text(json.dumps({"schema": 1})[:8])
    done = run_bench("report", "--results", str(tmp_path))
    assert done.returncode != 0 and path.name in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["rank: 0", "kernel: gauss"])
def test_bad_config_fails_before_any_run(tmp_path, bad):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(f"tasks: [digits]\ngrid:\n  - {{method: snell, {bad}}}\n")
    done = run_bench("sweep", str(sweep), "--results", str(tmp_path / "r"))
    assert done.returncode != 0 and "nothing was run" in done.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_corrupt_and_incomplete_records_are_all_named_before_any_run(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", [{"method": "linear"}], seeds=[0, 1, 2, 3])
    results = tmp_path / "r"
    assert run_bench("sweep", str(sweep), "--results", str(results), "--no-report").returncode == 0
    paths = record_files(results)
    for path in paths[:2]:  # truncated mid-write by hand, say
        path.write_text(path.read_text()[:500])
    paths[2].write_text("{}")
    paths[3].unlink()  # one run still to do: it must not start either
    done = run_bench("sweep", str(sweep), "--results", str(results), "--no-report")
    assert done.returncode != 0 and "nothing was run" in done.stderr
    assert all(path.name in done.stderr for path in paths[:3]), done.stderr
    assert done.stderr.count("delete it to rerun") == 3 and "lacks key(s)" in done.stderr
    assert not paths[3].exists()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_results_folder_fails_at_once_with_one_line(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", [{"method": "linear"}])
    results = tmp_path / "r"
    results.mkdir()
    results.chmod(0o500)
    start = time.perf_counter()
    done = run_bench("sweep", str(sweep), "--results", str(results))
    assert done.returncode != 0 and time.perf_counter() - start < 5
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"results folder {results / 'records'} is not writable: no write permission")


@pytest.mark.slow
def test_results_folder_that_cannot_be_written_fails_at_once_with_one_line(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", [{"method": "linear"}])
    blocker = tmp_path / "file"
    blocker.write_text("a file where the results folder should be")
    start = time.perf_counter()
    done = run_bench("sweep", str(sweep), "--results", str(blocker), "--workers", "2")
    assert done.returncode != 0 and time.perf_counter() - start < 5
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"results folder {blocker / 'records'} is not writable")


@pytest.mark.slow
def test_workers_below_one_are_rejected_naming_the_value(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", [{"method": "linear"}])
    done = run_bench("sweep", str(sweep), "--workers", "0")
    assert done.returncode != 0 and "'0': give 1 (run in this process) or more" in done.stderr
