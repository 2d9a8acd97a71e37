"""Memory estimates: equal to a real CPU step, cheap at paper scale, attributed, ordered as expected."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pandas as pd
import pytest
import timm
import torch

import snell
from bench.backbones import set_attention
from bench.cli import main as bench_command
from bench.memory.estimate import MemoryEstimate, step_memory
from bench.memory.paper import METHODS, MODELS, PAPER_MB
from bench.records.measurements import write_measurement
from bench.report.measurements import render_folder
from bench.report.memory import attention_table, claims_table
from bench.report.memory_plots import plot_breakdown, plot_memory_vs_model_size

SMALL = "vit_mnist_patch7_28"  # 6 blocks, width 128: a real step takes well under a second
CONFIGS = {
    "full": snell.method_config("full"),
    "lora": snell.method_config("lora", rank=8),
    "snell": snell.method_config("snell", rank=8),
    "snell no recompute": snell.method_config("snell", rank=8, recompute=False),
    "spt grad mask": snell.method_config("spt-lora", mode="grad_mask"),
}
_cache: dict[tuple, MemoryEstimate] = {}


def estimate(name: str, precision: str = "fp32") -> MemoryEstimate:
    """Estimates of one batch-16 step of SMALL on the CPU's code path (to compare with a real CPU step),
    each made once per test session."""
    if (name, precision) not in _cache:
        _cache[name, precision] = step_memory(SMALL, CONFIGS[name], 16, precision, code_path_of="cpu")
    return _cache[name, precision]


@pytest.mark.parametrize(
    ("name", "precision"), [("full", "fp32"), ("lora", "fp32"), ("snell", "fp32"), ("snell", "bf16")]
)
def test_estimate_equals_real_cpu_peak_within_2_percent(name, precision):
    estimated = estimate(name, precision=precision)
    measured = step_memory(SMALL, CONFIGS[name], 16, precision, measure_on="cpu")
    assert measured.device == "measured: CPU" and estimated.device.startswith("estimate")
    assert measured.peak_bytes == pytest.approx(estimated.peak_bytes, rel=0.02)
    assert measured.trainable_params == estimated.trainable_params


def test_breakdown_sums_to_peak_and_counts_optimizer_state_exactly():
    est = estimate("full")
    assert sum(est.breakdown.values()) == est.peak_bytes
    tensors = len(list(timm.create_model(SMALL, num_classes=100).parameters()))
    assert est.trainable_params == est.params_total
    assert est.breakdown["params"] == 4 * est.params_total
    # AdamW (fp32): exp_avg and exp_avg_sq per trainable entry, plus one fp32 step counter per tensor.
    assert est.breakdown["optimizer"] == 8 * est.trainable_params + 4 * tensors
    assert est.breakdown["activations"] > 0


def test_ordering_on_a_small_model():
    peak = {name: estimate(name).peak_bytes for name in CONFIGS}
    assert peak["lora"] < peak["full"] < peak["spt grad mask"]
    assert peak["snell"] < peak["snell no recompute"]


def test_explicit_attention_keeps_each_blocks_attention_matrix():
    """Explicit attention (the public code's) keeps each block's batch x heads x N x N fp32 attention matrix
    where timm's fused kernel keeps its batch x heads x N log-sum-exp: the estimate differs by exactly that,
    and a real CPU step agrees with the estimate."""
    model = timm.create_model(SMALL)
    blocks, heads, tokens = (
        len(model.blocks),
        model.blocks[0].attn.num_heads,
        model.patch_embed.num_patches + 1,
    )
    explicit = step_memory(SMALL, CONFIGS["lora"], 16, code_path_of="cpu", attention="explicit")
    assert explicit.attention == "explicit" and estimate("lora").attention == "fused"
    added = explicit.peak_bytes - estimate("lora").peak_bytes
    assert added == blocks * 16 * heads * (tokens**2 - tokens) * 4
    measured = step_memory(SMALL, CONFIGS["lora"], 16, measure_on="cpu", attention="explicit")
    assert measured.peak_bytes == pytest.approx(explicit.peak_bytes, rel=0.02)


def test_bad_attention_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"attention='flash'.*'fused', 'explicit'"):
        step_memory(SMALL, CONFIGS["lora"], 16, attention="flash")
    with pytest.raises(ValueError, match="needs timm attention modules.*Linear"):
        set_attention(torch.nn.Linear(2, 2), "explicit")
    model = set_attention(timm.create_model(SMALL), "explicit")
    assert not any(block.attn.fused_attn for block in model.blocks)


@pytest.mark.slow
def test_vit_b16_estimate_allocates_under_1_gb():
    """The estimate itself (not the torch/timm imports before it) stays under 1 GiB of real memory."""
    code = (
        "import json, resource, timm, snell\n"
        "from bench.memory.estimate import step_memory\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "e = step_memory('vit_base_patch16_224', snell.method_config('full'), 64)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'peak': e.peak_bytes, 'before_kib': before, 'after_kib': after}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["peak"] > 8 * 2**30  # what the step would need: 8 GiB and more
    grown = (result["after_kib"] - result["before_kib"]) * 1024  # high-water mark growth during the estimate
    assert grown < 2**30, f"estimating grew the process by {grown / 2**20:.0f} MiB"


def test_uniform_spt_plan_spreads_the_budget_over_every_target():
    model = timm.create_model(SMALL, num_classes=10)
    cfg = snell.method_config("spt-lora", budget=1000).without_data(model)
    matrices = cfg.plan["matrices"]
    assert len(matrices) == 6 * 4 and set(matrices.values()) == {1000 // 24}


FAKE_PEAKS = {"lora-8": 1000, "snell-8": 1050, "full": 3000, "spt-lora (grad mask)": 2500}


def fake_sweep() -> pd.DataFrame:
    """A sweep's estimates with made-up round numbers: LoRA-8 = 1000 * model index with fused attention,
    SNELL-8 5% more; explicit attention adds 10% to every peak."""
    rows = []
    for i, (arch, name) in enumerate(MODELS.items(), start=1):
        for batch, attention, method in itertools.product((8, 64), ("explicit", "fused"), METHODS):
            peak = {"lora-8": 1000, "snell-8": 1050, "full": 3000, "spt-lora (grad mask)": 2500}.get(
                method, 2000
            )
            peak *= 1.1 if attention == "explicit" else 1
            rows.append({
                "arch": arch, "method": method, "model": name, "batch_size": batch, "precision": "fp32",
                "attention": attention, "params_total": i * 100e6, "peak_mib": peak * i,
                "params_mib": 100 * i, "buffers_mib": 0, "grads_mib": 0, "optimizer_mib": 10,
                "activations_mib": peak * i - 110 * i, "temporaries_mib": 0, "other_mib": 0,
                "device": "estimate: fake tensors on CPU",
            })  # fmt: skip
    return pd.DataFrame(rows)


def render_sweep(folder, gpu_steps: pd.DataFrame | None = None) -> str:
    """The memory report of a fake sweep's record (and of a GPU check record beside it)."""
    gpu = folder / "gpu" / "gpu-check.json"
    if gpu_steps is not None:
        write_measurement(gpu.parent, kind="gpu-check", argv=[], settings={}, tables={"steps": gpu_steps},
                          device=torch.device("cpu"))  # fmt: skip
    write_measurement(folder, kind="memory-sweep", argv=["--results", "x"], settings={"gpu_check": str(gpu)},
                      tables={"points": fake_sweep()}, device=torch.device("cpu"))  # fmt: skip
    render_folder(folder)
    return (folder / "memory_vs_paper.md").read_text()


def test_markdown_puts_our_figures_beside_the_paper(tmp_path):
    text = render_sweep(tmp_path)
    assert "`python -m bench memory-sweep --results x`" in text
    for arch, paper in PAPER_MB.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {arch}"))
        assert f"{paper['lora-8']:,}" in row and f"{paper['gps']:,}" in row
        assert "1.05" in row  # our SNELL/LoRA ratio
    table = claims_table(fake_sweep())
    assert set(table["SNELL-8 / LoRA-8"]) == {"1.05"}
    assert set(table["LoRA-8, SNELL-8 below both"]) == {"yes"}
    added = attention_table(fake_sweep()).set_index(["arch", "batch_size"]).loc["ViT-H/14", 64]
    assert added.iloc[0] == "600" and added.iloc[2] == "1.10"  # 10% of most methods' 2000 MiB, x3
    assert added.iloc[1] == "full 900, lora-8 300, spt-lora (grad mask) 750, snell-8 315"
    assert "| ViT-H/14 |           64 |" in text.split("## What timm's fused attention saves")[1]
    assert (tmp_path / "memory.csv").is_file() and (tmp_path / "memory_vs_model_size.png").is_file()


def test_markdown_puts_gpu_peaks_beside_the_estimates(tmp_path):
    gpu = pd.DataFrame([
        {"model": "vit_base_patch16_224", "variant": "lora-8", "method": "lora-8", "batch_size": 8,
         "precision": "fp32", "attention": "fused", "cuda_max_allocated_mib": 1100.0,
         "device": "NVIDIA H200"},
        {"model": "vit_base_patch16_224", "variant": "lora-8", "method": "lora-8", "batch_size": 8,
         "precision": "bf16", "attention": "fused", "cuda_max_allocated_mib": 900.0,
         "device": "NVIDIA H200"},  # no bf16 estimate
        {"model": "vit_base_patch16_224", "variant": "reference-8", "method": "snell-8", "batch_size": 8,
         "precision": "fp32", "attention": "fused", "cuda_max_allocated_mib": 1500.0,
         "device": "NVIDIA H200"},  # no estimate
    ])  # fmt: skip
    section = render_sweep(tmp_path, gpu).split("## Real measurements beside the estimates")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ViT")]
    assert rows == [next(r for r in rows if "lora-8" in r and "NVIDIA H200" in r and "1.100" in r)]


def test_figures_are_written(tmp_path):
    frame = fake_sweep().query("attention == 'explicit'")
    plot_memory_vs_model_size(frame, tmp_path / "size.png", list(METHODS))
    plot_breakdown(frame, tmp_path / "breakdown.png", arch="ViT-B/16", batch_size=64, methods=list(METHODS))
    for name in ("size.png", "breakdown.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_memory_command_prints_the_estimate_beside_a_real_measurement(capsys):
    bench_command(
        ["memory", SMALL, "--method=lora", '--options={"rank": 4}', "--batch-size=4", "--measure=cpu"]
    )
    out = capsys.readouterr().out
    assert "lora" in out and "activations" in out and "measured: CPU" in out
    ratio = float(out.rsplit("measured / estimate:", 1)[1])
    assert ratio == pytest.approx(1.0, abs=0.02)
