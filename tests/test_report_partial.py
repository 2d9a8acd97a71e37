"""The report renders whatever succeeded: one method only, or one method beside failed runs."""

from __future__ import annotations

from pathlib import Path

import pytest

import snell
from bench.records.records import SCHEMA_VERSION, record_path, write_record
from bench.report.build import build_report
from bench.run.config import RunConfig, TrainConfig


def write_run(
    results: Path,
    task: str,
    seed: int,
    method: str,
    status: str = "ok",
    retention: float | None = None,
    **options,
) -> None:
    run = RunConfig(task, method, seed, options, TrainConfig(epochs=1))
    ok = status == "ok"
    write_record(record_path(results, run.run_id), {
        "schema": SCHEMA_VERSION,
        "run_id": run.run_id,
        "label": run.label,
        "config": run.to_dict(),
        "method_config": snell.method_config(method, **options).to_dict() if ok else None,
        "provenance": {"device": "synthetic", "git_commit": "0" * 40},
        "status": status,
        "error": None if ok else "ValueError: rank 200 does not fit",
        "metrics": {} if not ok else {
            "val_acc": 50.0 + seed, "test_acc": 40.0 + seed, "peak_memory_mib": 30.0,
            "retention_acc": retention,
        },
    })  # fmt: skip


@pytest.mark.parametrize("failed", [False, True], ids=["lora only", "only lora succeeded"])
def test_report_of_one_successful_method(tmp_path: Path, failed: bool) -> None:
    for task in ("digits", "texture"):
        for seed in (0, 1):
            write_run(tmp_path, task, seed, "lora")
            if failed:
                write_run(tmp_path, task, seed, "snell", status="error", rank=200)
    summary = build_report(tmp_path)
    assert set(summary.label) == ({"lora-8", "snell-200 piecewise_linear s=0.9"} if failed else {"lora-8"})
    tables = (tmp_path / "tables" / "results.md").read_text()
    assert "| lora-8 " in tables and "40.5 ± 0.7" in tables
    assert ("| snell-200 piecewise_linear s=0.9 " in tables and "| error " in tables) == failed
    assert "No paired differences: fewer than two methods have a successful run." in tables
    assert (tmp_path / "figures" / "memory_vs_accuracy.png").stat().st_size > 0
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "runs.csv").is_file()


def test_paired_differences_fall_back_to_the_method_with_most_runs(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path, "digits", seed, "full")
        write_run(tmp_path, "digits", seed, "linear")
        write_run(tmp_path, "digits", seed, "lora", status="oom")
    write_run(tmp_path, "digits", 2, "linear")
    build_report(tmp_path)
    tables = (tmp_path / "tables" / "results.md").read_text()
    assert "Paired differences are from linear (lora-8 has no successful run)." in tables
    assert "## Difference from linear in test top-1" in tables and "| OOM " in tables


def test_retention_column_and_figure(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path, "digits", seed, "linear", retention=96.0)
        write_run(tmp_path, "digits", seed, "full", retention=80.0 + 2 * seed)
    build_report(tmp_path)
    tables = (tmp_path / "tables" / "results.md").read_text()
    methods = tables.split("## Methods x tasks", 1)[1].split("\n## ", 1)[0].splitlines()
    assert "retention (%)" in next(line for line in methods if line.startswith("| method"))
    rows = {line.split("|")[1].strip(): line for line in methods if line.startswith("| ")}
    assert "| 81.0 " in rows["full"] and "| 96.0 " in rows["linear"]
    assert (tmp_path / "figures" / "retention.png").stat().st_size > 0
