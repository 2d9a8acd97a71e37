"""LLM memory estimates: equal to a real CPU step of a small LLaMA, cheap at 7B width, recorded and rendered,
and refused with the bad value named."""

from __future__ import annotations

import re
import resource

import pandas as pd
import pytest
import torch

from bench.arguments import parse
from bench.cli import main as bench_command
from bench.memory import llm_sweep
from bench.memory.estimate import MemoryEstimate, step_memory
from bench.memory.paper import LLM_METHOD_NAMES
from bench.methods import preset_config
from bench.records.measurements import write_measurement
from bench.settings import LLM_MEMORY_METHODS

TINY = "llama_tiny"  # 2 decoder layers, width 64, vocabulary 512: a real step takes about a second
BATCH, SEQ = 16, 128  # activations (about 20 MiB) outweigh the weights (1 MiB)
RECIPE = {"seq_len": SEQ, "precision": "bf16", "frozen_dtype": "bf16"}


_cache: dict[tuple[str, bool], MemoryEstimate] = {}


def estimate(preset: str, checkpointing: bool) -> MemoryEstimate:
    """The estimate of one recipe step of TINY on the CPU's code path (to compare with a real CPU step),
    each made once per test session."""
    if (preset, checkpointing) not in _cache:
        _cache[preset, checkpointing] = step_memory(
            TINY,
            preset_config(preset),
            BATCH,
            code_path_of="cpu",
            gradient_checkpointing=checkpointing,
            **RECIPE,
        )
    return _cache[preset, checkpointing]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
@pytest.mark.parametrize("preset", ["full", "lora-32 (commonsense)", "snell-32 (commonsense)"])
def test_estimate_equals_real_cpu_step_within_2_percent(preset, checkpointing):
    estimated = estimate(preset, checkpointing)
    measured = step_memory(
        TINY, preset_config(preset), BATCH, measure_on="cpu", gradient_checkpointing=checkpointing, **RECIPE
    )
    assert measured.device == "measured: CPU" and estimated.device.startswith("estimate")
    assert measured.peak_bytes == pytest.approx(estimated.peak_bytes, rel=0.02)
    assert measured.trainable_params == estimated.trainable_params
    assert sum(estimated.breakdown.values()) == estimated.peak_bytes
    # frozen weights in bf16, trainable ones in float32 (all of them in full fine-tuning)
    frozen = estimated.params_total - (estimated.trainable_params if preset == "full" else 0)
    assert estimated.breakdown["params"] == 2 * frozen + 4 * estimated.trainable_params
    assert (estimated.seq_len, estimated.gradient_checkpointing) == (SEQ, checkpointing)
    if checkpointing:  # the decoder layers' activations are recomputed, not kept
        kept = estimate(preset, False).breakdown["activations"]
        assert estimated.breakdown["activations"] < 0.5 * kept


def test_estimate_at_7b_width_allocates_no_tensor_data():
    """Two decoder layers at LLaMA-2-7B's width with its 32k vocabulary: the step needs over 4 GiB, and
    estimating it raises this process's high-water mark by far less (estimating the whole LLaMA-2-7B step
    grows a fresh process by about 40 MiB, in 20-40 s)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lora = preset_config("lora-32 (commonsense)")
    result = step_memory("llama_7b_width", lora, 16, "bf16", seq_len=256, frozen_dtype="bf16")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert result.peak_bytes > 4 * 2**30
    assert grown < 2**30, f"estimating grew the process by {grown / 2**20:.0f} MiB"


def test_bad_values_are_refused_naming_them(capsys):
    config = preset_config("lora-32 (commonsense)")
    with pytest.raises(ValueError, match=r"unknown model 'llama3_70b'.*llama2_7b"):
        step_memory("llama3_70b", config, 16, seq_len=256)
    with pytest.raises(ValueError, match=r"seq_len=0 must be >= 1.*llama_tiny"):
        step_memory(TINY, config, 16, seq_len=0)
    with pytest.raises(ValueError, match=r"seq_len=None"):
        step_memory(TINY, config, 16)
    with pytest.raises(ValueError, match=r"seq_len=256 is for causal LMs"):
        step_memory("vit_mnist_patch7_28", config, 16, seq_len=256)
    with pytest.raises(ValueError, match=r"gradient_checkpointing is for causal LMs"):
        step_memory("vit_mnist_patch7_28", config, 16, gradient_checkpointing=True)
    with pytest.raises(ValueError, match=r"frozen_dtype='fp16'.*bf16"):
        step_memory(TINY, config, 16, seq_len=8, frozen_dtype="fp16")
    with pytest.raises(SystemExit):
        parse("llm-memory", ["--seq-len", "0"])
    assert "argument --seq-len: '0': give an integer >= 1" in capsys.readouterr().err


def test_a_failed_estimate_is_recorded_with_its_error(monkeypatch):
    monkeypatch.setitem(llm_sweep.LLM_MODELS, "LLaMA-2-7B", "no_such_model")
    point = llm_sweep.LlmPoint("LLaMA-2-7B", "gps", 16, 256, True, "bf16", "bf16", "fused")
    row = llm_sweep._row(point)
    assert row["error"].startswith("ValueError: unknown model 'no_such_model'")
    assert row["gradient_checkpointing"] is True and "peak_mib" not in row


def fake_points() -> pd.DataFrame:
    """Made-up estimates of two models, rows as the sweep writes them: peak = 10 GiB x method index (LoRA-32
    at 20 GiB) for 7B, and every 13B estimate with checkpointing failed."""
    rows = []
    for arch, name in (("LLaMA-2-7B", "llama2_7b"), ("LLaMA-2-13B", "llama2_13b")):
        for checkpointing in (False, True):
            for i, method in enumerate(LLM_MEMORY_METHODS, start=1):
                point = {"arch": arch, "method": method, "seconds": 1.0}
                if arch == "LLaMA-2-13B" and checkpointing:
                    rows.append({**point, "model": name, "gradient_checkpointing": True, "error": "boom"})
                    continue
                peak = i * 10 * 2**30 // (2 if checkpointing else 1)
                breakdown = {"params": 13 * 2**30, "activations": peak - 13 * 2**30}
                estimate = MemoryEstimate(
                    name, preset_config(method).to_dict(), 16, "bf16", "fused", peak, breakdown,
                    6_700_000_000, 80_000_000, "estimate: fake tensors on CPU", 256, checkpointing, "bf16",
                )  # fmt: skip
                rows.append({**point, **estimate.to_dict(), "error": ""})
    return pd.DataFrame(rows)


def test_report_renders_the_table_from_the_record(tmp_path):
    folder = tmp_path / "memory"
    settings = {"batch_size": 16, "seq_len": 256, "precision": "bf16", "frozen_dtype": "bf16",
                "attention": "fused", "checkpointing": ["off", "on"], "minutes": 1.5}  # fmt: skip
    write_measurement(folder, kind="llm-memory", argv=["--workers", "2"], settings=settings,
                      tables={"points": fake_points()}, device=torch.device("cpu"))  # fmt: skip
    bench_command(["report", "--results", str(tmp_path)])  # finds the record in a folder below the results
    text = (folder / "llm_memory.md").read_text()
    assert "`python -m bench llm-memory --workers 2`" in text and "batch 16" in text
    summary = text.split("## Peak GiB")[1].split("##")[0]
    row = next(line for line in summary.splitlines() if re.match(r"\| LLaMA-2-7B\s+\| on\s", line))
    assert "| 5.00 (0.50) | 10.00 (1.00) | 15.00 (1.50) |" in re.sub(r" +", " ", row)  # full, LoRA, SNELL
    failed = next(line for line in summary.splitlines() if re.match(r"\| LLaMA-2-13B\s+\| on\s", line))
    assert failed.count("failed") == len(LLM_MEMORY_METHODS)
    breakdown = text.split("## What is live at the peak")[1]
    snell_row = next(line for line in breakdown.splitlines() if "| SNELL-32" in line and "| off" in line)
    assert "30.00" in snell_row and "13.00" in snell_row and "17.00" in snell_row and "1.50" in snell_row
    assert "boom" in text.split("## Estimates that failed")[1]
    assert "rank 32, alpha 64.0, dropout 0.05" in text and "lora_alpha 64, lora_dropout 0.05" in text
    assert set(LLM_METHOD_NAMES.values()) <= set(text.split())
    csv = pd.read_csv(folder / "llm_memory.csv")
    assert (
        len(csv) == 4 * len(LLM_MEMORY_METHODS) and (folder / "llm_memory.png").read_bytes()[:4] == b"\x89PNG"
    )
