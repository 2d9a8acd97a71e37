"""The GPU check: step time, kernel launches and CUDA peak memory of LoRA-8, SNELL-8, the public code's
layout and full fine-tuning on ViT-B/16, in one prepared call for a lent GPU.

It also times LoRA-32 and SNELL-32 on LLaMA-2-7B-shaped decoder layers in bf16 (``--llama-model``, weights
in bf16, q/k/v/o/gate/up/down adapted, the commonsense recipe's batch 16 x 256 tokens), the same way.

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
from typing import Any

import pandas as pd
import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

import snell
from bench import step
from bench.backbones import attention_of, create_backbone
from bench.perf.inference import images_per_second, inference_models
from bench.perf.variants import Variant, apply_variant
from bench.records.measurements import write_measurement
from bench.records.provenance import device_name

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


LLAMA_VARIANTS = (
    Variant("lora-32", "lora-32 (no branch dropout)", "off"),
    Variant("snell-32", "snell-32 (no branch dropout)", "off"),
)


@dataclass
class Setup:
    variant: Variant
    model: nn.Module
    step: Callable[[], torch.Tensor]
    """One training step; its loss."""


def stepper(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, precision: str, device: str, **kwargs
) -> Callable[[], torch.Tensor]:
    """One training step of ``model`` (AdamW over its trainable parameters), synchronised on CUDA; it
    returns the loss."""
    optimizer = step.build_optimizer(model, lr=1e-3, weight_decay=1e-4, decay_groups=False)

    def run() -> torch.Tensor:
        loss = step.train_step(model, optimizer, inputs, labels, precision=precision, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return loss

    return run


def build(
    variant: Variant, batch: int, precision: str, *, model_name: str, device: str, **backbone: Any
) -> Setup:
    """``variant`` on a fresh backbone (random weights, same seed; ``backbone``: timm options of its
    shape), with its optimizer and a batch."""
    torch.manual_seed(0)
    model = apply_variant(create_backbone(model_name, 100, pretrained=False, **backbone), variant)
    model.to(device).train()
    input_size = timm.data.resolve_model_data_config(model)["input_size"]
    images = torch.randn(batch, *input_size, device=device)
    labels = torch.randint(100, (batch,), device=device)
    return Setup(variant, model, stepper(model, images, labels, precision=precision, device=device))


def build_llama(variant: Variant, args: argparse.Namespace) -> Setup:
    """``variant`` on a LLaMA of ``args.llama_model``'s shape in bf16 (random weights, same seed), with a
    batch of random token ids as their own next-token labels."""
    from bench.llm.models import create_causal_lm

    torch.manual_seed(0)
    with torch.device(args.device):
        model = apply_variant(create_causal_lm(args.llama_model, dtype=torch.bfloat16), variant).train()
    ids = torch.randint(model.config.vocab_size, (args.llama_batch, args.llama_seq_len), device=args.device)
    run = stepper(model, ids, ids, precision="bf16", device=args.device, loss_fn=step.next_token_loss)
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


def measured(
    variants: tuple[Variant, ...], make: Callable[[Variant], Setup], args: argparse.Namespace
) -> tuple[list[dict], list[Setup], list[list[float]]]:
    """Each variant alone (peak, launches), then all of them taking turns: rows, setups and times."""
    on_cuda = args.device.startswith("cuda")
    rows = []
    for variant in variants:
        setup = make(variant)
        rows.append(alone(setup, args.warmup, on_cuda))
        del setup
        if on_cuda:
            torch.cuda.empty_cache()
    setups = [make(variant) for variant in variants]
    return rows, setups, interleaved(setups, args.warmup, args.steps)


def check(batch: int, precision: str, args: argparse.Namespace) -> list[dict]:
    """Every variant's row at one batch size and precision."""
    options = {"model_name": args.model, "device": args.device}
    rows, setups, times = measured(VARIANTS, lambda v: build(v, batch, precision, **options), args)
    for row, setup, seconds in zip(rows, setups, times, strict=True):
        median, variant = statistics.median(seconds), setup.variant
        row.update({
            "model": args.model, "variant": variant.name, "branch": variant.branch, "method": variant.preset,
            "batch_size": batch, "precision": precision, "attention": attention_of(setup.model),
            "steps": len(seconds), "step_time_ms": 1e3 * median, "images_per_s": batch / median,
            "device": device_name(torch.device(args.device)),
        })  # fmt: skip
    return rows


def check_llama(args: argparse.Namespace) -> list[dict]:
    """LoRA-32 and SNELL-32 rows on the LLaMA shape, bf16."""
    rows, setups, times = measured(LLAMA_VARIANTS, lambda v: build_llama(v, args), args)
    tokens = args.llama_batch * args.llama_seq_len
    for row, setup, seconds in zip(rows, setups, times, strict=True):
        median = statistics.median(seconds)
        row.update({
            "model": args.llama_model, "variant": setup.variant.name, "method": setup.variant.preset,
            "batch_size": args.llama_batch, "seq_len": args.llama_seq_len, "precision": "bf16 weights",
            "steps": len(seconds), "step_time_ms": 1e3 * median, "tokens_per_s": tokens / median,
            "device": device_name(torch.device(args.device)),
        })  # fmt: skip
    return rows


def check_inference(batch: int, args: argparse.Namespace) -> pd.DataFrame:
    """Images per second of the frozen backbone, the unmerged and the merged adapters (fp32)."""

    def backbone() -> nn.Module:
        torch.manual_seed(0)
        return create_backbone(args.model, 100, pretrained=False).to(args.device)

    models = inference_models(backbone)
    input_size = timm.data.resolve_model_data_config(models["frozen"])["input_size"]
    images = torch.randn(batch, *input_size, device=args.device)
    table = images_per_second(models, images, args.warmup, args.steps)
    table.insert(0, "batch", batch)
    return table


def require_device(command: str, device: str) -> None:
    """Exit with a hint when ``device`` is CUDA and there is none; print the device's name."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench {command} needs a CUDA device (or --device cpu, for a try on a small model)")
    print(device_name(torch.device(device)))


def run(args: argparse.Namespace) -> None:
    require_device("gpu-check", args.device)
    groups = [(batch, precision) for batch in args.batch_sizes for precision in args.precisions]
    rows = []
    for batch, precision in tqdm(groups, desc="gpu check"):
        rows += check(batch, precision, args)
    tables = {"steps": pd.DataFrame(rows)}
    tables["inference"] = check_inference(max(args.batch_sizes), args)
    if args.llama_model:
        tables["llama"] = pd.DataFrame(check_llama(args))
    write_measurement(
        args.results,
        kind="gpu-check",
        argv=args.argv,
        settings={"model": args.model, "warmup": args.warmup, "steps": args.steps},
        tables=tables,
        device=torch.device(args.device),
        commit=args.commit,
    )
