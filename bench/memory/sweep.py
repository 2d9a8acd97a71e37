"""Peak training memory of every method at paper scale (ViT-B/16, ViT-L/16, ViT-H/14), on a CPU.

Estimates every (model, batch size, method) with fake tensors (``bench.memory.estimate``), in parallel worker
processes, and writes ``memory.csv``, the two figures and ``memory_vs_paper.md`` beside the paper's
figures. With ``--measure`` and a GPU, each point is also run for real and its
``torch.cuda.max_memory_allocated`` recorded, to check the estimates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from tqdm import tqdm

from bench.arguments import GPU_CHECK_CSV, MEMORY_MODELS, parse
from bench.memory.estimate import ESTIMATE_DEVICE, step_memory
from bench.memory.plots import plot_breakdown, plot_memory_vs_model_size
from bench.methods import preset_config

MODELS = MEMORY_MODELS
METHODS = (
    "full",
    "linear",
    "lora-8",
    "lora-32",
    "spt-lora (index)",
    "spt-lora (grad mask)",
    "snell-8",
    "snell-32",
    "snell-8 (no recompute)",
)
"""The swept presets of ``bench.methods.METHOD_PRESETS``, in table order."""
PAPER_MB = {
    "ViT-B/16": {"gps": 2428, "lora-8": 1546, "snell-8": 1673},
    "ViT-L/16": {"gps": 7522, "lora-8": 4325, "snell-8": 4519},
    "ViT-H/14": {"gps": 16119, "lora-8": 9325, "snell-8": 9692},
}
"""Peak training memory in the SNELL paper's tables (batch 8; GPS is its sparse-tuning baseline)."""
PAPER_BATCH = 8
CSV_NAME, MD_NAME = "memory.csv", "memory_vs_paper.md"


class Point(NamedTuple):
    arch: str
    method: str
    batch_size: int
    precision: str


def _row(point: Point, device: str | None = None) -> dict[str, Any]:
    """One CSV row: the estimate of ``point`` (``device=None``) or its real measurement on ``device``,
    with the seconds it took."""
    step = (MODELS[point.arch], preset_config(point.method), point.batch_size, point.precision)
    start = time.perf_counter()
    result = step_memory(*step, measure_on=device)
    seconds = time.perf_counter() - start
    return {"arch": point.arch, "method": point.method, **result.to_dict(), "seconds": seconds}


def estimate_all(points: list[Point], workers: int) -> pd.DataFrame:
    """Estimates of all ``points`` in ``workers`` processes (fake-tensor steps are Python-bound)."""
    by_size = sorted(points, key=lambda p: (list(MODELS).index(p.arch), p.method), reverse=True)
    spawn = multiprocessing.get_context("spawn")  # a fork of a process that has run torch ops can hang
    with ProcessPoolExecutor(workers, spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = [pool.submit(_row, p) for p in by_size]  # largest models first: less waiting at the end
        rows = [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc="memory estimates")]
    return pd.DataFrame(rows)


def measure_all(points: list[Point], device: str) -> pd.DataFrame:
    """Real measurements on ``device`` of the points that fit in its memory (the others are skipped)."""
    rows = []
    for point in tqdm(points, desc=f"measuring on {device}"):
        try:
            rows.append(_row(point, device))
        except torch.OutOfMemoryError:
            tqdm.write(f"out of memory, skipped: {point}")
        torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    keys = {"arch": list(MODELS), "method": list(METHODS)}
    return frame.sort_values(
        ["arch", "batch_size", "precision", "method", "device"],
        key=lambda col: col.map(keys[col.name].index) if col.name in keys else col,
    ).reset_index(drop=True)


def _mib(value: float) -> str:
    return f"{value:,.0f}"


def _peaks(estimates: pd.DataFrame) -> pd.DataFrame:
    """Peak MiB by (model, batch size) and method, models in size order, methods in ``METHODS`` order."""
    peak = estimates.pivot(index=["arch", "batch_size"], columns="method", values="peak_mib")
    rows = sorted(peak.index, key=lambda row: (list(MODELS).index(row[0]), row[1]))
    return peak.loc[rows, [m for m in METHODS if m in peak.columns]]


def paper_table(estimates: pd.DataFrame) -> pd.DataFrame:
    """Ours beside the paper's figures at the paper's batch size, one row per model."""
    peak = _peaks(estimates).xs(PAPER_BATCH, level="batch_size")
    rows = []
    for arch in peak.index:
        paper, ours = PAPER_MB[arch], peak.loc[arch]
        rows.append({
            "model": arch,
            "LoRA-8 paper (MB)": _mib(paper["lora-8"]),
            "LoRA-8 ours (MiB)": _mib(ours["lora-8"]),
            "SNELL-8 paper": _mib(paper["snell-8"]),
            "SNELL-8 ours": _mib(ours["snell-8"]),
            "SNELL/LoRA paper": f"{paper['snell-8'] / paper['lora-8']:.2f}",
            "SNELL/LoRA ours": f"{ours['snell-8'] / ours['lora-8']:.2f}",
            "GPS paper": _mib(paper["gps"]),
            "SPT grad mask ours": _mib(ours["spt-lora (grad mask)"]),
            "SPT index ours": _mib(ours["spt-lora (index)"]),
            "full ours": _mib(ours["full"]),
            "SNELL-8 without trick ours": _mib(ours["snell-8 (no recompute)"]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def claims_table(estimates: pd.DataFrame) -> pd.DataFrame:
    """The paper's memory claims as ratios of peaks, at every model size and batch."""
    peak = _peaks(estimates)
    snell8, lora8, heavy = peak["snell-8"], peak["lora-8"], peak["spt-lora (grad mask)"]
    table = pd.DataFrame({
        "LoRA-8 / full": lora8 / peak["full"],
        "SNELL-8 / full": snell8 / peak["full"],
        "LoRA-8 / SPT grad mask": lora8 / heavy,
        "SNELL-8 / SPT grad mask": snell8 / heavy,
        "SNELL-8 / LoRA-8": snell8 / lora8,
        "SNELL-8 without trick / SNELL-8": peak["snell-8 (no recompute)"] / snell8,
    })  # fmt: skip
    return table.map("{:.2f}".format)


def _claims_summary(estimates: pd.DataFrame) -> str:
    """Where LoRA-8 or SNELL-8 does not stay below both full fine-tuning and the gradient-mask variant."""
    peak = _peaks(estimates)
    low = peak[["lora-8", "snell-8"]].max(axis=1)
    heavy = peak[["full", "spt-lora (grad mask)"]].min(axis=1)
    misses = [f"{arch} at batch {batch}" for (arch, batch), ok in (low < heavy).items() if not ok]
    if not misses:
        return "LoRA-8 and SNELL-8 stay below full fine-tuning and the gradient-mask variant everywhere."
    return (
        "LoRA-8 or SNELL-8 is NOT below both full fine-tuning and the gradient-mask variant at: "
        f"{', '.join(misses)}. Their saving is the static memory (gradients and AdamW state of the whole "
        "backbone), which grows with model size; activations grow with batch and are about the same for "
        "every method that backpropagates through the backbone, plus, for the branch dropout (0.1 by "
        "default), a dropped copy of each adapted layer's input and its 1-byte mask."
    )


def _measured_table(measured: pd.DataFrame, estimates: pd.DataFrame) -> str:
    """Real peaks (``peak_mib``, ``device``) beside the estimates of the same model, method, batch and
    precision: this sweep's ``--measure`` rows, or ``bench gpu-check``'s. A measurement of another
    adapter layout (other trainable parameters: an earlier commit) is listed, not compared."""
    keys = ["model", "method", "batch_size", "precision"]
    both = measured.merge(estimates, on=keys, suffixes=("", "_estimate"))
    parts = []
    if "trainable_params" in measured:
        other = both[both.trainable_params != both.trainable_params_estimate]
        both = both[both.trainable_params == both.trainable_params_estimate]
        if not other.empty:
            parts.append(
                f"Not compared: {', '.join(sorted(set(other.method)))}, measured with another adapter "
                "layout than this sweep's (trainable parameters differ: an earlier commit); rerun "
                "`bench gpu-check` to compare them."
            )
    if not both.empty:
        both = both.assign(
            **{
                "measured / estimate": both.peak_mib / both.peak_mib_estimate,
                "measured (MiB)": both.peak_mib.map(_mib),
                "estimate (MiB)": both.peak_mib_estimate.map(_mib),
            }
        )
        columns = ["arch", *keys[1:], "device", "estimate (MiB)", "measured (MiB)", "measured / estimate"]
        parts.insert(0, both[columns].to_markdown(index=False, floatfmt=".3f"))
    return "\n\n".join(parts) or "(none of the measured configurations is in this sweep)"


def write_markdown(
    frame: pd.DataFrame, path: Path, command: str, gpu_check: pd.DataFrame | None = None
) -> None:
    """``memory_vs_paper.md``: our estimates beside the paper's tables, and what differs."""
    estimates = frame[frame.device == ESTIMATE_DEVICE]
    precision = ", ".join(sorted(estimates.precision.unique()))
    lines = [
        "# Peak training memory: our CPU estimates beside the SNELL paper",
        "",
        f"Generated by `{command}` (torch {torch.__version__}; device: {ESTIMATE_DEVICE}); "
        "do not edit by hand.",
        "",
        f"One training step of timm models with random weights, 224 px, 100 classes, {precision}, AdamW "
        "(foreach) over the trainable parameters, measured after optimizer state exists. Each method runs "
        "with its default config except the rank named (as the paper's runs: dropout and drop-path 0.1 on "
        "the branches, SNELL sparsity 0.9, SPT budget 400k entries). SPT's selection needs data, so its "
        "rows use a uniform plan: every target matrix tunes an equal share of the budget unstructured "
        "(the memory-heaviest SPT plan, and the layout of GPS).",
        "",
        f"## Beside the paper (batch {PAPER_BATCH})",
        "",
        paper_table(estimates).to_markdown(index=False)
        if PAPER_BATCH in set(estimates.batch_size)
        else f"(no batch-{PAPER_BATCH} estimates in this sweep)",
        "",
        "## The paper's claims, checked (ratios of peaks)",
        "",
        claims_table(estimates).reset_index().to_markdown(index=False),
        "",
        "Paper: SNELL-8 / LoRA-8 1.04 to 1.08, GPS / LoRA-8 1.57 to 1.74, SNELL on ViT-H/14 about half of "
        "full fine-tuning's memory (all at batch 8).",
        "",
        _claims_summary(estimates),
        "",
        "What differs from the paper's figures:",
        "- Ours count tensor bytes only (what `torch.cuda.max_memory_allocated` reports). A GPU process also "
        "holds the CUDA context (several hundred MB) and the caching allocator's reserve and fragmentation, "
        "which tools like nvidia-smi include; the paper does not say which it reports, nor its precision.",
        "- Ours are MiB (2^20 bytes); the paper writes MB.",
        "- The attention kernel differs by device: the CPU's fused attention here, the paper's GPU kernels "
        "there; activation memory depends on which one saves what for backward.",
        "- GPS (the paper's sparse-tuning row) is not implemented here; the gradient-mask SPT variant has "
        "its layout (full-size gradients and optimizer state, masked), the index variant is SPT's own.",
        "",
        "## Every method (peak MiB)",
        "",
        _peaks(estimates).map(_mib).reset_index().to_markdown(index=False),
    ]
    measured = frame[frame.device != ESTIMATE_DEVICE]
    if not measured.empty:
        lines += ["", "## Real measurements beside the estimates", "", _measured_table(measured, estimates)]
    if gpu_check is not None:
        gpu_peaks = gpu_check.rename(columns={"cuda_max_allocated_mib": "peak_mib"})
        lines += [
            "",
            f"## Checked on a GPU ({', '.join(sorted(gpu_check.device.unique()))}, `{GPU_CHECK_CSV}`)",
            "",
            "`torch.cuda.max_memory_allocated` of the same steps, from `python -m bench gpu-check`:",
            "",
            _measured_table(gpu_peaks, estimates),
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    run(parse("memory-sweep", argv))


def run(args: argparse.Namespace) -> None:
    if args.measure and not torch.cuda.is_available():
        sys.exit("--measure needs a CUDA device; none is available")
    if args.replot:
        frame = pd.read_csv(args.results / CSV_NAME)
    else:
        points = [
            Point(arch, method, batch, args.precision)
            for arch in args.models
            for batch in args.batch_sizes
            for method in METHODS
        ]
        start = time.perf_counter()
        frame = estimate_all(points, args.workers)
        minutes = (time.perf_counter() - start) / 60
        print(f"{len(points)} estimates in {minutes:.1f} min with {args.workers} worker processes")
        if args.measure:
            frame = pd.concat([frame, measure_all(points, "cuda")], ignore_index=True)
        frame = _order(frame)
        args.results.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.results / CSV_NAME, index=False)
    estimates = frame[frame.device == ESTIMATE_DEVICE]
    plot_memory_vs_model_size(estimates, args.results / "memory_vs_model_size.png", list(METHODS))
    arch, batch = args.models[0], max(args.batch_sizes)
    slug = arch.lower().replace("-", "_").replace("/", "")
    plot_breakdown(
        estimates, args.results / f"memory_breakdown_{slug}_b{batch}.png", arch, batch, list(METHODS)
    )
    command = shlex.join(["python", "-m", "bench", "memory-sweep", *args.argv])
    gpu_check = pd.read_csv(args.gpu_check) if args.gpu_check.is_file() else None
    write_markdown(frame, args.results / MD_NAME, command, gpu_check)
    print(f"wrote {args.results / CSV_NAME}, the figures and {args.results / MD_NAME}")
