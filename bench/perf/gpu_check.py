"""The GPU check: step time, kernel launches and CUDA peak memory of LoRA-8, SNELL-8, the public code's
layout and full fine-tuning on ViT-B/16, in one prepared call for a lent GPU.

For each (batch, precision) every variant first runs alone (3 warm-up steps, then one step for the CUDA
peak, ``torch.cuda.max_memory_allocated``, and one under the profiler, counting kernel launches); then all
variants are built together and take turns step by step (warm-up, then ``--steps`` timed rounds,
synchronised; median), so that clocks and drift hit them alike. Writes the record ``gpu-check.json``
(pass ``--commit``: a device machine's copy of the repository has no git metadata);
``bench.report.measurements`` renders ``gpu_check.md`` from it.

    python -m bench gpu-check --commit "$(git rev-parse HEAD)"
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

import snell
from bench import step
from bench.arguments import parse
from bench.backbones import attention_of, create_backbone
from bench.perf.variants import Variant, apply_variant
from bench.report.measurements import render_folder
from bench.run.measurements import write_measurement
from bench.run.provenance import device_name

MODEL = "vit_base_patch16_224"
MIB = 2**20
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
"""Profiler events of host-side kernel launches (the runtime API and the driver API, which Triton uses)."""


VARIANTS = (
    Variant("full", "full", "off"),
    Variant("lora-8", "lora-8", "paper"),
    Variant("snell-8", "snell-8", "paper"),
    Variant("reference-8", "snell-8", "paper", reference=True),
    Variant("lora-8", "lora-8 (no branch dropout)", "off"),
    Variant("snell-8", "snell-8 (no branch dropout)", "off"),
    Variant("reference-8", "snell-8 (no branch dropout)", "off", reference=True),
)


@dataclass
class Setup:
    variant: Variant
    model: nn.Module
    step: Callable[[], None]


def build(variant: Variant, batch: int, precision: str, *, model_name: str, device: str) -> Setup:
    """``variant`` on a fresh backbone (random weights, same seed), with its optimizer and a batch."""
    torch.manual_seed(0)
    model = apply_variant(create_backbone(model_name, 100, pretrained=False), variant)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4
    )
    input_size = timm.data.resolve_model_data_config(model)["input_size"]
    images = torch.randn(batch, *input_size, device=device)
    labels = torch.randint(100, (batch,), device=device)

    def run() -> None:
        step.train_step(model, optimizer, images, labels, precision=precision)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return Setup(variant, model, run)


def alone(setup: Setup, warmup: int, on_cuda: bool) -> dict:
    """Peak memory and kernel launches of one step, with no other model on the device."""
    for _ in range(warmup):
        setup.step()
    row = {"trainable_params": snell.count_trainable(setup.model)}
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        setup.step()
        row["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        row["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    with profile(activities=activities) as prof:
        setup.step()
    row["launches_per_step"] = sum(e.count for e in prof.key_averages() if e.key in LAUNCHES)
    return row


def interleaved(setups: list[Setup], warmup: int, steps: int) -> list[list[float]]:
    """Seconds per step of each setup, the setups taking turns (after ``warmup`` steps each)."""
    for setup in setups:
        for _ in range(warmup):
            setup.step()
    times = [[] for _ in setups]
    for _ in range(steps):
        for i, setup in enumerate(setups):
            tic = time.perf_counter()
            setup.step()
            times[i].append(time.perf_counter() - tic)
    return times


def check(batch: int, precision: str, args: argparse.Namespace) -> list[dict]:
    """Every variant's row at one batch size and precision."""
    on_cuda = args.device.startswith("cuda")
    options = {"model_name": args.model, "device": args.device}
    rows = []
    for variant in VARIANTS:
        setup = build(variant, batch, precision, **options)
        rows.append(alone(setup, args.warmup, on_cuda))
        del setup
        if on_cuda:
            torch.cuda.empty_cache()
    setups = [build(variant, batch, precision, **options) for variant in VARIANTS]
    times = interleaved(setups, args.warmup, args.steps)
    for row, setup, seconds in zip(rows, setups, times, strict=True):
        median, variant = statistics.median(seconds), setup.variant
        row.update({
            "model": args.model, "variant": variant.name, "branch": variant.branch, "method": variant.preset,
            "batch_size": batch, "precision": precision, "attention": attention_of(setup.model),
            "steps": len(seconds), "step_time_ms": 1e3 * median, "images_per_s": batch / median,
            "device": device_name(torch.device(args.device)),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    run(parse("gpu-check", argv))


def run(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench gpu-check needs a CUDA device (or --device cpu, for a try on a small model)")
    print(device_name(torch.device(args.device)))
    groups = [(batch, precision) for batch in args.batch_sizes for precision in args.precisions]
    rows = []
    for batch, precision in tqdm(groups, desc="gpu check"):
        rows += check(batch, precision, args)
    write_measurement(
        args.results,
        kind="gpu-check",
        argv=args.argv,
        settings={"model": args.model, "warmup": args.warmup, "steps": args.steps},
        tables={"steps": pd.DataFrame(rows)},
        device=torch.device(args.device),
        commit=args.commit,
    )
    for path in render_folder(args.results):
        print(path.read_text())
