"""Peak training memory of LLaMA-2-7B and -13B under the commonsense recipe, estimated on a CPU.

The recipe is NVlabs/DoRA's ``commonsense_reasoning`` (``llama2_7B_DoRA.sh`` and ``finetune.py``), which
the SNELL paper's LLaMA appendix follows: micro batch 16 without accumulation, 256 tokens per sample
(``cutoff_len``), AdamW, fp16 mixed precision over a base model loaded in 16 bits, gradient checkpointing.
Here: frozen weights in bf16 (the bytes of fp16), trainable parameters in float32 (mixed precision's
master weights; for full fine-tuning and GPS every trained weight), bf16 autocast for the step,
transformers' SDPA attention, no KV cache. Each (model, method, checkpointing) is one fake-tensor step
(``bench.memory.estimate.step_memory``: shapes from the model's config, nothing allocated), in worker
processes; an estimate that fails is recorded with its error and the sweep goes on. The record
``llm-memory.json`` is rendered by ``bench.report.llm_memory`` (``python -m bench report``).
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Any, NamedTuple

import pandas as pd
import torch

from bench.memory.estimate import ESTIMATE_DEVICE, step_memory
from bench.memory.paper import LLM_MODELS
from bench.memory.sweep import in_workers
from bench.methods import preset_config
from bench.records.measurements import write_measurement
from bench.settings import CHECKPOINTING


class LlmPoint(NamedTuple):
    arch: str
    method: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    precision: str
    frozen_dtype: str
    attention: str


def _row(point: LlmPoint) -> dict[str, Any]:
    """One CSV row: the estimate of ``point`` and the seconds it took, or, if it failed, the point with
    its error (``error`` is empty for an estimate)."""
    start = time.perf_counter()
    try:
        result = step_memory(
            LLM_MODELS[point.arch],
            preset_config(point.method),
            point.batch_size,
            point.precision,
            seq_len=point.seq_len,
            gradient_checkpointing=point.gradient_checkpointing,
            frozen_dtype=point.frozen_dtype,
            attention=point.attention,
        )
    except Exception as err:  # recorded, not raised: the other estimates of the sweep still count
        failed = {**point._asdict(), "model": LLM_MODELS[point.arch], "device": ESTIMATE_DEVICE}
        error = "".join(traceback.format_exception_only(err)).strip()
        return {**failed, "error": error, "seconds": time.perf_counter() - start}
    row = {"arch": point.arch, "method": point.method, **result.to_dict()}
    return {**row, "error": "", "seconds": time.perf_counter() - start}


def points(args: argparse.Namespace) -> list[LlmPoint]:
    """The sweep's points, largest model first (less waiting at the end)."""
    return [
        LlmPoint(
            arch,
            method,
            args.batch_size,
            args.seq_len,
            checkpointing == "on",
            args.precision,
            args.frozen_dtype,
            args.attention,
        )  # fmt: skip
        for arch in sorted(args.models, key=list(LLM_MODELS).index, reverse=True)
        for method in args.methods
        for checkpointing in args.checkpointing
    ]


def order(frame: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Rows by model (size order), checkpointing (off first) and method (in the order of ``methods``)."""
    keys = {"arch": list(LLM_MODELS), "method": list(methods)}
    return frame.sort_values(
        ["arch", "gradient_checkpointing", "method"],
        key=lambda col: col.map(keys[col.name].index) if col.name in keys else col,
    ).reset_index(drop=True)


def run(args: argparse.Namespace) -> None:
    todo = points(args)
    start = time.perf_counter()
    frame = pd.DataFrame(in_workers(_row, todo, args.workers))
    minutes = (time.perf_counter() - start) / 60
    failed = frame[frame.error != ""]
    print(f"{len(todo)} estimates in {minutes:.1f} min with {args.workers} workers; {len(failed)} failed")
    for row in failed.itertuples():
        print(f"  failed: {row.arch} {row.method} checkpointing {row.gradient_checkpointing}: {row.error}")
    frame = order(frame, args.methods)
    write_measurement(
        args.results,
        kind="llm-memory",
        argv=args.argv,
        settings={
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "precision": args.precision,
            "frozen_dtype": args.frozen_dtype,
            "attention": args.attention,
            "checkpointing": [c for c in CHECKPOINTING if c in args.checkpointing],
            "minutes": round(minutes, 2),
        },
        tables={"points": frame},
        device=torch.device("cpu"),
    )
