"""The memory timeline of one training step: its maximum is the peak estimate, its phases run in order, it
starts at the resident memory, and its command writes a record whose report re-renders byte for byte."""

from __future__ import annotations

import json

import pytest

from bench.cli import main as bench_command
from bench.memory.estimate import step_memory
from bench.memory.timeline import PHASES, Timeline, keep_indices, points_table, step_timeline
from bench.methods import preset_config
from bench.run.measure import MIB

SMALL = "vit_mnist_patch7_28"  # 6 blocks, width 128: a fake step takes well under a second
_cache: dict[str, Timeline] = {}


def timeline(method: str) -> Timeline:
    """The timeline of one batch-2 step of SMALL (explicit attention), made once per test session."""
    if method not in _cache:
        _cache[method] = step_timeline(SMALL, method, 2, "fp32", attention="explicit")
    return _cache[method]


@pytest.mark.parametrize("method", ["full", "lora-8"])
def test_timeline_maximum_is_the_peak_estimate_of_the_same_step(method):
    estimate = step_memory(SMALL, preset_config(method), 2, attention="explicit")
    live = timeline(method).live
    assert abs(max(live) - estimate.peak_bytes) / MIB < 0.1
    kept = points_table(timeline(method), limit=100)  # downsampled hard, the peak stays exactly
    assert len(kept) <= 100 < len(live)
    assert kept.mib.max() * MIB == pytest.approx(max(live), abs=1)


def test_phases_run_in_order_from_the_resident_memory_back_to_it():
    for method in ("full", "lora-8"):
        phases = timeline(method).phases
        order = [PHASES.index(phase) for phase in phases]
        assert order == sorted(order) and set(phases) == set(PHASES)
        live = timeline(method).live
        assert live[0] == live[-1]  # after zero_grad: weights, buffers and AdamW state, as before the step
        assert max(live) > live[0]


def test_full_fine_tuning_starts_above_lora_with_adamw_state_of_every_weight():
    full, lora = timeline("full"), timeline("lora-8")
    assert full.live[0] > 2 * lora.live[0]
    # float32 weights and AdamW's two moments of every trainable entry: every weight, for full fine-tuning
    assert full.estimate.trainable_params == full.estimate.params_total
    assert full.live[0] >= 12 * full.estimate.params_total
    assert lora.live[0] < 4 * lora.estimate.params_total + 12 * 2 * lora.estimate.trainable_params


def test_downsampling_keeps_the_peak_and_the_phase_ends():
    live = [i % 7 for i in range(1000)]
    live[613] = 50
    phases = ["forward"] * 400 + ["backward"] * 500 + ["optimizer"] * 100
    kept = keep_indices(live, phases, limit=60)
    assert len(kept) <= 60 and kept == sorted(set(kept))
    assert {0, 399, 400, 899, 900, 999, 613} <= set(kept)
    assert keep_indices(live[:50], phases[:50], limit=60) == list(range(50))


def test_command_writes_the_record_and_figure_and_the_report_re_renders_byte_for_byte(tmp_path):
    folder = tmp_path / "memory"
    bench_command([
        "memory-timeline", "--results", str(folder), "--backbone", SMALL, "--batch-size", "2",
        "--methods", "full", "lora",
    ])  # fmt: skip
    record = json.loads((folder / "memory-timeline.json").read_text())
    assert record["kind"] == "memory-timeline" and record["provenance"]["git_commit"]
    assert record["settings"]["backbone"] == SMALL and record["settings"]["batch_size"] == 2
    methods = {row["method"]: row for row in record["tables"]["methods"]["data"]}
    assert list(methods) == ["full", "lora-8"]
    assert methods["full"]["peak_mib"] == pytest.approx(methods["full"]["estimate_peak_mib"], abs=0.1)
    assert methods["full"]["start_mib"] > methods["lora-8"]["start_mib"]
    points = record["tables"]["points"]["data"]
    assert {p["phase"] for p in points} == set(PHASES)
    assert max(p["op"] for p in points if p["method"] == "full") == methods["full"]["ops"] + 1
    figure, report = folder / "memory_timeline.png", folder / "memory_timeline.md"
    assert figure.read_bytes()[:4] == b"\x89PNG"
    first = report.read_bytes()
    assert b"| full fine-tuning " in first and b"| LoRA-8 " in first and b"memory_timeline.png" in first
    report.unlink()
    figure.unlink()
    bench_command(["report", "--results", str(tmp_path)])
    assert report.read_bytes() == first and figure.is_file()
