"""Peak training memory of every method at paper scale (ViT-B/16, ViT-L/16, ViT-H/14), on a CPU.

Estimates every (model, batch size, method, attention) with fake tensors (``bench.memory.estimate``), in
parallel worker processes, and writes them as the record ``memory-sweep.json``; ``bench.report.memory``
renders ``memory.csv``, the two figures and ``memory_vs_paper.md`` (beside the paper's figures) from it. With
``--measure`` and a GPU, each point is also run for real and its ``torch.cuda.max_memory_allocated``
recorded, to check the estimates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, NamedTuple, TypeVar

import pandas as pd
import torch
from tqdm import tqdm

from bench.memory.estimate import step_memory
from bench.memory.paper import METHODS, MODELS
from bench.methods import preset_config
from bench.records.measurements import write_measurement
from bench.settings import ATTENTIONS


class Point(NamedTuple):
    arch: str
    method: str
    batch_size: int
    precision: str
    attention: str


def _row(point: Point, device: str | None = None) -> dict[str, Any]:
    """One CSV row: the estimate of ``point`` (``device=None``) or its real measurement on ``device``,
    with the seconds it took."""
    step = (MODELS[point.arch], preset_config(point.method), point.batch_size, point.precision)
    start = time.perf_counter()
    result = step_memory(*step, measure_on=device, attention=point.attention)
    seconds = time.perf_counter() - start
    return {"arch": point.arch, "method": point.method, **result.to_dict(), "seconds": seconds}


T = TypeVar("T")


def in_workers(row: Callable[[T], dict[str, Any]], items: list[T], workers: int) -> list[dict[str, Any]]:
    """``row(item)`` of every item, in ``workers`` spawned processes of one torch thread each (fake-tensor
    steps are Python-bound), submitted in the order given (largest models first: less waiting at the
    end); rows in the order they finish. ``row`` must be a module-level function (it is pickled)."""
    spawn = multiprocessing.get_context("spawn")  # a fork of a process that has run torch ops can hang
    with ProcessPoolExecutor(workers, spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = [pool.submit(row, item) for item in items]
        return [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc="memory estimates")]


def estimate_all(points: list[Point], workers: int) -> pd.DataFrame:
    """Estimates of all ``points`` in ``workers`` processes."""
    by_size = sorted(points, key=lambda p: (list(MODELS).index(p.arch), p.method), reverse=True)
    return pd.DataFrame(in_workers(_row, by_size, workers))


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
    keys = {"arch": list(MODELS), "method": list(METHODS), "attention": list(ATTENTIONS)}
    return frame.sort_values(
        ["arch", "batch_size", "precision", "attention", "method", "device"],
        key=lambda col: col.map(keys[col.name].index) if col.name in keys else col,
    ).reset_index(drop=True)


def run(args: argparse.Namespace) -> None:
    if args.measure and not torch.cuda.is_available():
        sys.exit("--measure needs a CUDA device; none is available")
    points = [
        Point(arch, method, batch, args.precision, attention)
        for arch in args.models
        for batch in args.batch_sizes
        for attention in args.attention
        for method in METHODS
    ]
    start = time.perf_counter()
    frame = estimate_all(points, args.workers)
    minutes = (time.perf_counter() - start) / 60
    print(f"{len(points)} estimates in {minutes:.1f} min with {args.workers} worker processes")
    if args.measure:
        frame = pd.concat([frame, measure_all(points, "cuda")], ignore_index=True)
    write_measurement(
        args.results,
        kind="memory-sweep",
        argv=args.argv,
        settings={"gpu_check": str(args.gpu_check)},
        tables={"points": _order(frame)},
        device=torch.device("cuda" if args.measure else "cpu"),
    )
