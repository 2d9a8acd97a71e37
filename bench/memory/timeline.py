"""Tensor bytes live through one training step (the SNELL paper's Fig. 3b), estimated on fake tensors.

``step_timeline`` runs the memory estimate's own step (``bench.memory.estimate.step_memory``: the model on
fake tensors, AdamW's state created by a first step, then forward with the loss, backward, AdamW's step,
``zero_grad``) under ``TimelineTracker``, which records the bytes the estimate counts after every op (aten's
and SNELL's custom ops; not the bookkeeping ops ``BOOKKEEPING``) and the phase it ran in: "forward" (with
the loss), "backward" (inside autograd's engine) or "optimizer" (from AdamW's first op to the end of the
step). A point before the first op (the resident memory: weights,
buffers, optimizer state) starts the curve, one after the step ends it; its maximum is the estimate's peak.

``python -m bench memory-timeline`` writes the record ``memory-timeline.json`` of full fine-tuning,
LoRA-8, SNELL-8 and GPS (``bench.methods`` presets) at ViT-B/16, batch 8, fp32, with at most
``MAX_POINTS`` points per method (``keep_indices``); ``bench.report.memory`` renders the figure
``memory_timeline.png`` and ``memory_timeline.md`` from it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.memory.estimate import MemoryEstimate, step_memory
from bench.methods import preset_config
from bench.records.measurements import write_measurement
from bench.run.measure import MIB, StepMemoryTracker

PHASES = ("forward", "backward", "optimizer")
TIMELINE_PRESETS = {"full": "full", "lora": "lora-8", "snell": "snell-8", "gps": "gps"}
"""``--methods`` names -> their presets of ``bench.methods`` (the memory sweep's configs)."""
BOOKKEEPING = frozenset({"prim", "profiler"})
"""Namespaces of ops that compute and allocate nothing (device queries, profiler ranges such as the one
``optimizer.step`` opens before its hooks run): no point of their own."""
MAX_POINTS = 600
"""Points per method kept in the record (of one per aten op)."""


class TimelineTracker(StepMemoryTracker):
    """``StepMemoryTracker`` that also records, after every op but the bookkeeping ones, the bytes live
    (``live``) and the phase (``phases``); a point on entry (resident memory) and one on exit (after the
    step). Bytes only grow where an op returns tensors, so its points hold the tracker's peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: list[int] = []
        self.phases: list[str] = []
        self._optimizer_started = False

    def _phase(self) -> str:
        """The step's phase now: optimizer from its first op on, backward inside autograd's engine."""
        self._optimizer_started |= self._in_opt
        if self._optimizer_started:
            return "optimizer"
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def _record(self) -> None:
        self.live.append(sum(snap.get("Total", 0) for snap in self._curr_mem_snap.values()))
        self.phases.append(self._phase())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func.namespace not in BOOKKEEPING:
            self._record()
        return out

    def __enter__(self) -> TimelineTracker:
        super().__enter__()
        if self._depth == 1:
            self._record()
        return self

    def __exit__(self, *args: Any) -> None:
        if self._depth == 1:
            self._record()
        super().__exit__(*args)


@dataclass(frozen=True)
class Timeline:
    """One method's step: the estimate, and the bytes live and phase at every point (op 0: before the
    step, op i: after its i-th op, last: after the step)."""

    method: str
    estimate: MemoryEstimate
    live: list[int]
    phases: list[str]

    def summary(self) -> dict[str, Any]:
        """One row of the methods table: sizes in MiB, where the peak is (phase, share of the ops)."""
        live = np.asarray(self.live)
        peak = int(live.argmax())
        forward = [i for i, phase in enumerate(self.phases) if phase == "forward"]
        return {
            "method": self.method,
            "config": json.dumps(self.estimate.config, sort_keys=True, default=str),
            "trainable_params": self.estimate.trainable_params,
            "ops": len(live) - 2,
            "start_mib": live[0] / MIB,
            "end_forward_mib": live[forward[-1]] / MIB,
            "peak_mib": live[peak] / MIB,
            "peak_phase": self.phases[peak],
            "peak_progress": peak / (len(live) - 1),
            "end_mib": live[-1] / MIB,
            "estimate_peak_mib": self.estimate.peak_bytes / MIB,
        }


def step_timeline(
    model_name: str, method: str, batch_size: int, precision: str = "fp32", *, attention: str = "fused"
) -> Timeline:
    """The timeline of one training step of ``model_name`` tuned by the preset ``method`` (a name of
    ``bench.methods.METHOD_PRESETS``), estimated on fake tensors following a GPU's code path."""
    tracker = TimelineTracker()
    config = preset_config(method)
    estimate = step_memory(model_name, config, batch_size, precision, attention=attention, tracker=tracker)
    return Timeline(method, estimate, tracker.live, tracker.phases)


def keep_indices(live: Sequence[int], phases: Sequence[str], limit: int = MAX_POINTS) -> list[int]:
    """Indices of at most ``limit`` points that keep the curve's shape: the first and last point of each
    phase and, in equal buckets of the rest, each bucket's lowest and highest (so the peak stays exactly)."""
    n = len(live)
    if n <= limit:
        return list(range(n))
    ends = {0, n - 1} | {i for i in range(1, n) if phases[i] != phases[i - 1]}
    keep = ends | {i - 1 for i in ends if i}
    values = np.asarray(live)
    bounds = np.linspace(0, n, (limit - len(keep)) // 2 + 1).astype(int)
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        if high > low:
            keep |= {low + int(values[low:high].argmin()), low + int(values[low:high].argmax())}
    return sorted(keep)


def points_table(timeline: Timeline, limit: int = MAX_POINTS) -> pd.DataFrame:
    """The kept points of one timeline: op index (0: before the step, ops + 1: after it), MiB, phase."""
    kept = keep_indices(timeline.live, timeline.phases, limit)
    return pd.DataFrame({
        "method": timeline.method,
        "op": kept,
        "mib": [timeline.live[i] / MIB for i in kept],
        "phase": [timeline.phases[i] for i in kept],
    })  # fmt: skip


def run(args: argparse.Namespace) -> None:
    timelines = []
    for name in args.methods:
        start = time.perf_counter()
        timelines.append(
            step_timeline(
                args.backbone,
                TIMELINE_PRESETS[name],
                args.batch_size,
                args.precision,
                attention=args.attention,
            )
        )
        peak = timelines[-1].summary()
        print(
            f"{peak['method']}: peak {peak['peak_mib']:,.1f} MiB in {peak['peak_phase']}, "
            f"{peak['ops']} ops ({time.perf_counter() - start:.1f} s)"
        )
    settings = {
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "attention": args.attention,
        "max_points": MAX_POINTS,
    }
    tables = {
        "methods": pd.DataFrame([t.summary() for t in timelines]),
        "points": pd.concat([points_table(t) for t in timelines], ignore_index=True),
    }
    write_measurement(
        args.results,
        kind="memory-timeline",
        argv=args.argv,
        settings=settings,
        tables=tables,
        device=torch.device("cpu"),
    )
