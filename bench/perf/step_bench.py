"""Step benchmark: training-step time and peak memory of SNELL-8 against LoRA-8 and the reference SNELL.

One process, one CPU-sized timm ViT (embed 384, depth 6, 6 heads, patch 8, 64x64 images: 65 tokens per
image), qkv/proj/fc1/fc2 adapted in every block, rank 8, s = 0.9, AdamW. Every variant is warmed up,
then the variants take turns step by step, so that the machine's drift hits all of them alike; times
are medians. Peak memory is the tensor-level peak of one real step under torch's MemTracker
(``bench.run.measure``), deterministic; ViT-B/16 rows come from the fake-tensor simulator
(``bench.memory.estimate``).

LoRA and SNELL run with dropout 0 and drop-path 0 (like for like; SNELL then uses its merged layer);
SNELL's defaults (dropout and drop-path 0.1, which need the parallel branch form) are an extra row.
Writes ``step.csv``, ``vit_b16_memory.csv`` and ``perf_step.md`` (the tables, device and command).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import snell
from bench import step
from bench.arguments import parse
from bench.memory.estimate import step_memory
from bench.methods import preset_config
from bench.perf.reference_snell import to_reference
from bench.run.measure import tracked_step_memory
from bench.run.provenance import device_name

GOALS = {
    "time snell / lora": 1.15,
    "memory snell / lora": 1.03,
    "time snell / reference": 1 / 1.3,
    "memory snell / reference": 1.0,
}
"""The issue's goals as upper bounds on ratios (snell at least 1.3x faster than the reference)."""
IMG_SIZE, PATCH_SIZE = 64, 8
TOKENS_PER_IMAGE = (IMG_SIZE // PATCH_SIZE) ** 2 + 1  # patches + cls token


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method config, optionally converted to the reference SNELL."""

    name: str
    preset: str
    """A label of ``bench.methods.METHOD_PRESETS``."""
    reference: bool = False
    note: str = ""


VARIANTS = (
    Variant("lora-8", "lora-8 (no branch dropout)", note="dropout 0"),
    Variant("snell-8", "snell-8 (no branch dropout)", note="dropout 0, drop-path 0: merged layer"),
    Variant("reference-8", "snell-8 (no branch dropout)", True, "public code's layout, same factors"),
    Variant("snell-8 default", "snell-8", note="dropout 0.1, drop-path 0.1: branch form"),
)


@dataclass
class Setup:
    variant: Variant
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]


def cpu_vit(seed: int = 0) -> VisionTransformer:
    """The CPU-sized ViT of the step benchmark (random frozen weights: values do not change the cost)."""
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=IMG_SIZE,
        patch_size=PATCH_SIZE,
        embed_dim=384,
        depth=6,
        num_heads=6,
        num_classes=10,
        drop_path_rate=0.0,
    )


def build(variant: Variant, images: torch.Tensor, labels: torch.Tensor) -> Setup:
    """The model tuned by ``variant`` (same backbone and, for SNELL, same factors in every variant)."""
    model = cpu_vit()
    torch.manual_seed(1)
    snell.apply_method(model, preset_config(variant.preset))
    if variant.reference:
        to_reference(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    return Setup(variant, model, optimizer, lambda: step.train_step(model, optimizer, images, labels))


def time_steps(setups: list[Setup], warmup: int, rounds: int, budget_s: float) -> dict[str, dict[str, list]]:
    """Seconds per step, wall-clock and process CPU time: ``warmup`` steps each, then up to ``rounds``
    rounds in which every variant takes one step in turn, stopping early (after 3 rounds) once
    ``budget_s`` is spent. CPU time is the steadier of the two on a shared machine with one thread."""
    for setup in setups:
        for _ in range(warmup):
            setup.step()
    times = {s.variant.name: {"wall": [], "cpu": []} for s in setups}
    start = time.perf_counter()
    for done in range(rounds):
        if done >= 3 and time.perf_counter() - start > budget_s:
            break
        for setup in setups:
            wall, cpu = time.perf_counter(), time.process_time()
            setup.step()
            times[setup.variant.name]["wall"].append(time.perf_counter() - wall)
            times[setup.variant.name]["cpu"].append(time.process_time() - cpu)
    return times


def step_table(setups: list[Setup], times: dict[str, dict[str, list]]) -> pd.DataFrame:
    """Median step times and MemTracker peak per variant, with their ratios to LoRA and the reference."""
    rows = []
    for setup in setups:
        name = setup.variant.name
        memory = tracked_step_memory(setup.model, setup.optimizer, setup.step)
        rows.append({
            "variant": name,
            "note": setup.variant.note,
            "steps": len(times[name]["wall"]),
            "step_s": statistics.median(times[name]["wall"]),
            "cpu_s": statistics.median(times[name]["cpu"]),
            "peak_mib": memory["peak_mib"],
        })  # fmt: skip
    table = pd.DataFrame(rows).set_index("variant")
    for base in ("lora-8", "reference-8"):
        table[f"time / {base}"] = table["step_s"] / table.loc[base, "step_s"]
        table[f"cpu time / {base}"] = table["cpu_s"] / table.loc[base, "cpu_s"]
        table[f"memory / {base}"] = table["peak_mib"] / table.loc[base, "peak_mib"]
    return table


def vit_b16_memory(batches: tuple[int, ...]) -> pd.DataFrame:
    """Simulated ViT-B/16 step peaks (fake tensors) of LoRA-8 and SNELL-8, like for like."""
    rows = []
    for batch in batches:
        row = {"batch": batch}
        for variant in VARIANTS[:2]:  # lora-8 and snell-8, like for like
            estimate = step_memory("vit_base_patch16_224", preset_config(variant.preset), batch)
            row[f"{variant.name}_mib"] = estimate.peak_bytes / 2**20
        row["snell / lora"] = row["snell-8_mib"] / row["lora-8_mib"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("batch")


def goal_lines(step: pd.DataFrame, vit_b: pd.DataFrame | None) -> list[str]:
    """One line per goal: the measured ratio, its bound, met or missed (and by how much)."""
    snell_row = step.loc["snell-8"]
    measured = {
        f"time snell / {base}": [
            ("CPU ViT, wall-clock", snell_row[f"time / {base}-8"]),
            ("CPU ViT, CPU time", snell_row[f"cpu time / {base}-8"]),
        ]
        for base in ("lora", "reference")
    }
    for base in ("lora", "reference"):
        measured[f"memory snell / {base}"] = [("CPU ViT", snell_row[f"memory / {base}-8"])]
    if vit_b is not None:
        measured["memory snell / lora"] += [
            (f"ViT-B/16 batch {b}", r) for b, r in vit_b["snell / lora"].items()
        ]
    lines = []
    for goal, bound in GOALS.items():
        for where, ratio in measured[goal]:
            verdict = "met" if ratio <= bound else f"MISSED by {ratio / bound - 1:.1%}"
            lines.append(f"- {goal} ({where}): {ratio:.3f} (goal <= {bound:.3f}): {verdict}")
    return lines


def markdown(step: pd.DataFrame, vit_b: pd.DataFrame | None, args: argparse.Namespace) -> str:
    tokens = args.batch_size * TOKENS_PER_IMAGE
    lines = [
        "# SNELL step benchmark",
        "",
        f"Device: {device_name(torch.device('cpu'))}; torch {torch.__version__}.",
        f"Command: `python -m bench perf-step {' '.join(args.argv)}`",
        "",
        f"CPU ViT (embed 384, depth 6, patch {PATCH_SIZE}, {IMG_SIZE}x{IMG_SIZE} images), "
        f"batch {args.batch_size} ({tokens} tokens), "
        "qkv/proj/fc1/fc2 adapted, rank 8, s = 0.9, AdamW. Time: median step (wall-clock, and process CPU "
        "time), variants taking turns; memory: tensor peak of one step (MemTracker).",
        "",
        step.to_markdown(floatfmt=".3f"),
        "",
    ]
    if vit_b is not None:
        lines += ["ViT-B/16 at 224x224, simulated peak (fake tensors, `bench.memory.estimate`), MiB:", ""]
        lines += [vit_b.to_markdown(floatfmt=".3f"), ""]
    lines += ["Goals:", "", *goal_lines(step, vit_b), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run(parse("perf-step", argv))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, IMG_SIZE, IMG_SIZE, generator=generator)
    labels = torch.randint(10, (args.batch_size,), generator=generator)
    setups = [build(variant, images, labels) for variant in VARIANTS]
    steps = step_table(setups, time_steps(setups, args.warmup, args.rounds, args.budget))
    vit_b = vit_b16_memory(tuple(args.vit_b_batch_sizes)) if args.vit_b_batch_sizes else None
    args.results.mkdir(parents=True, exist_ok=True)
    steps.to_csv(args.results / "step.csv")
    if vit_b is not None:
        vit_b.to_csv(args.results / "vit_b16_memory.csv")
    report = markdown(steps, vit_b, args)
    (args.results / "perf_step.md").write_text(report)
    print(report)
