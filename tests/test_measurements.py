"""Measurement records: the GPU check and the step benchmark write records with provenance, and their
reports render from the records alone (``python -m bench report``), byte for byte."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from bench.cli import main as bench_command
from bench.perf import gpu_check, inference, step_bench
from bench.perf.inference import PRESETS
from bench.report.measurements import perf_ratios, render_folder
from bench.settings import EMBEDDED_BACKBONE
from tests.harness import REPO


@pytest.mark.slow
def test_gpu_check_script_runs_on_a_cpu_and_its_report_renders_from_the_record(tmp_path):
    folder = tmp_path / "gpu"
    bench_command([
        "gpu-check",
        "--device", "cpu", "--model", EMBEDDED_BACKBONE, "--batch-sizes", "2", "--precisions", "fp32",
        "--warmup", "1", "--steps", "2", "--results", str(folder), "--commit", "0123456789abcdef",
        "--llama-model", "llama_tiny", "--llama-batch", "2", "--llama-seq-len", "8",
    ])  # fmt: skip
    record = json.loads((folder / "gpu-check.json").read_text())
    assert record["provenance"]["git_commit"] == "0123456789abcdef"
    rows = record["tables"]["steps"]["data"]
    assert {(r["variant"], r["branch"]) for r in rows} == {(v.name, v.branch) for v in gpu_check.VARIANTS}
    assert all(r["steps"] == 2 and r["step_time_ms"] > 0 for r in rows)
    assert {r["attention"] for r in rows} == {"fused"}  # timm's default, what the memory report compares
    llama = record["tables"]["llama"]["data"]
    assert [(r["variant"], r["model"], r["steps"]) for r in llama] == [
        ("lora-32", "llama_tiny", 2),
        ("snell-32", "llama_tiny", 2),
    ]
    inference = {r["model"]: r for r in record["tables"]["inference"]["data"]}
    assert set(inference) == {"frozen", *(f"{p} {m}" for p in PRESETS for m in ("merged", "unmerged"))}
    assert all(inference[f"{p} merged"]["max_abs_diff"] < 1e-4 for p in PRESETS)
    report = folder / "gpu_check.md"
    first = report.read_bytes()
    assert b"commit 0123456789" in first and b"time snell-8 / reference-8" in first
    assert b"## Inference after merge" in first and b"| snell-8 merged " in first
    assert b"| snell-32 " in first and b"tokens_per_s" in first
    report.unlink()
    bench_command(["report", "--results", str(tmp_path)])
    assert report.read_bytes() == first


@pytest.mark.slow
def test_step_benchmark_compares_like_for_like_and_with_the_floor(tmp_path):
    bench_command([
        "perf-step",
        "--batch-sizes", "2", "--image-sizes", "32", "--threads", "1", "--rounds", "1", "--warmup", "0",
        "--vit-b-batch-sizes", "--llama-model", "llama_tiny", "--llama-seq-len", "8", "--llama-threads", "1",
        "--results", str(tmp_path),
    ])  # fmt: skip
    record = json.loads((tmp_path / "perf-step.json").read_text())
    rows = record["tables"]["steps"]["data"]
    assert {(r["variant"], r["branch"]) for r in rows} == {(v.name, v.branch) for v in step_bench.VARIANTS}
    floor = {r["branch"]: r for r in rows if r["variant"] == "matmul floor"}
    assert floor["off"]["peak_mib"] is None and floor["paper"]["step_s"] > 0
    llama = {r["variant"]: r for r in record["tables"]["llama"]["data"]}
    assert set(llama) == {v.name for v in step_bench.LLAMA_VARIANTS}
    assert (
        llama["snell-32"]["tokens"] == 8
        and llama["snell-32"]["peak_mib"] > llama["lora-32"]["peak_mib"] * 0.5
    )
    text = (tmp_path / "perf_step.md").read_text()
    assert "| time snell-8 / lora-8 " in text and "branch paper" in text
    assert "| time snell-8 / full " in text and "| time snell-8 / matmul floor " in text
    ratios = perf_ratios(pd.DataFrame(rows))
    full = ratios.loc[(slice(None), slice(None), "full"), "time / full"]
    assert len(full) == 1 and full.iloc[0] == 1.0  # the one full row serves both branches
    assert ratios["time / full"].notna().all()
    assert "time / lora-32" in text and "llama_tiny, 8 tokens, 1 thread " in text


def test_merged_models_are_the_frozen_architecture_and_their_throughput_is_recorded(tmp_path):
    models = inference.inference_models(lambda: step_bench.cpu_vit(32))
    layout = [type(m) for m in models["frozen"].modules()]
    for preset in PRESETS:
        assert [type(m) for m in models[f"{preset} merged"].modules()] == layout
        assert [type(m) for m in models[f"{preset} unmerged"].modules()] != layout
    bench_command([
        "perf-inference", "--batch-size", "2", "--image-size", "32", "--rounds", "3",
        "--results", str(tmp_path),
    ])  # fmt: skip
    record = json.loads((tmp_path / "perf-inference.json").read_text())
    rows = {r["model"]: r for r in record["tables"]["inference"]["data"]}
    assert rows["frozen"]["vs_frozen"] == 1.0 and all(
        r["rounds"] == 3 and r["images_per_s"] > 0 for r in rows.values()
    )
    assert all(rows[f"{p} merged"]["max_abs_diff"] < 1e-4 for p in PRESETS)
    assert all(rows[f"{p} unmerged"]["max_abs_diff"] is None for p in PRESETS)
    report = (tmp_path / "perf_inference.md").read_text()
    assert "| snell-8 merged " in report and "within 2%" in report


@pytest.mark.parametrize("folder", ["perf", "memory"])
def test_committed_reports_render_from_their_records_byte_for_byte(tmp_path, folder):
    committed = REPO / "results" / folder
    for record in committed.glob("*.json"):
        shutil.copy(record, tmp_path / record.name)
    written = render_folder(tmp_path)
    assert written, f"no measurement record in {committed}"
    for path in written:
        assert path.read_bytes() == (committed / path.name).read_bytes(), path.name
