"""End to end: the quick preset writes records, summary.csv, Markdown tables and every figure."""

import json

import pandas as pd
import pytest

from bench.records.records import REQUIRED_KEYS
from bench.report.build import build_report, records_frame
from tests.harness import record_files, run_bench

FIGURES = ["memory_vs_accuracy.png", "kernels.png", "sparsity_per_kernel.png", "rank.png", "step_time.png"]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("quick")
    done = run_bench(
        "sweep", "bench/presets/quick.yaml", "--results", str(results), "--workers", "2", timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return results


@pytest.mark.slow
def test_every_run_recorded_with_the_schema(quick_results):
    records = [json.loads(p.read_text()) for p in record_files(quick_results)]
    assert len(records) == 9 * 2  # 9 method configs x 2 tasks x 1 seed
    for r in records:
        assert set(REQUIRED_KEYS) <= set(r)
        assert r["status"] == "ok", r["error"]
        m = r["metrics"]
        assert 0 <= m["test_acc"] <= 100 and 0 <= m["val_acc"] <= 100
        assert m["trainable_params"] > 0 and m["adapter_bytes"] > 0
        assert m["peak_memory_mib"] > 0 and set(m["memory_breakdown_mib"]) >= {
            "params",
            "grads",
            "activations",
        }
        assert m["step_time_s"] > 0 and m["images_per_s"] > 0
        prov = r["provenance"]
        assert prov["git_commit"] and prov["device"].startswith("CPU") and prov["versions"]["torch"]
        assert r["config"]["train"]["epochs"] == 1


@pytest.mark.slow
def test_tables_and_figures_exist(quick_results):
    summary = pd.read_csv(quick_results / "summary.csv")
    assert {"label", "task", "test_mean", "test_std", "trainable_params", "peak_memory_mib"} <= set(summary)
    assert len(summary) == 9 * 2
    tables = (quick_results / "tables" / "results.md").read_text()
    for title in ("Methods x tasks", "Kernels", "Sparsity per kernel", "Rank", "Validation top-1"):
        assert f"## {title}" in tables
    assert "| full " in tables and "| linear " in tables and "spt-lora" in tables
    validation = tables.split("## Validation top-1")[1]
    assert sum(line.startswith("| ") for line in validation.splitlines()) == 1 + 9  # header + every method
    for name in FIGURES:
        path = quick_results / "figures" / name
        assert path.exists() and path.stat().st_size > 10_000, name


@pytest.mark.slow
def test_rerun_reuses_records_and_report_rebuilds(quick_results):
    before = {p.name: p.stat().st_mtime_ns for p in record_files(quick_results)}
    done = run_bench("sweep", "bench/presets/quick.yaml", "--results", str(quick_results), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "18 already recorded, 0 to run" in done.stdout
    assert {p.name: p.stat().st_mtime_ns for p in record_files(quick_results)} == before
    (quick_results / "summary.csv").unlink()
    build_report(quick_results)
    assert (quick_results / "summary.csv").exists()


@pytest.mark.slow
def test_runs_that_differ_only_in_training_settings_get_separate_rows(quick_results):
    records = [json.loads(p.read_text()) for p in record_files(quick_results)]
    lora = [r for r in records if r["label"] == "lora-8"]
    lora[0]["config"]["train"]["lr"] = 0.01  # as if an lr sweep had run it
    labels = set(records_frame(records).label)
    assert {"lora-8 lr=0.01", "lora-8 lr=0.001"} <= labels and "lora-8" not in labels
    assert "full" in labels  # labels whose runs agree keep their name
