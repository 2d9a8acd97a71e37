"""Measurements of a training step: tensor-level peak memory with its breakdown, and step time."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

MIB = 2**20
# MemTracker's reference types -> our column names.
BREAKDOWN = {
    "Parameter": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "other",
}


class StepMemoryTracker(MemTracker):
    """torch's MemTracker, with two changes that PEFT models and paper-size models need.

    Gradient hooks go on trainable parameters only (MemTracker hooks every parameter, and
    ``register_hook`` raises on a frozen one). Only the global peak is kept: MemTracker's per-module
    peaks walk every module after every op, which makes a step ten times slower.
    """

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if install_grad_hooks and trainable:
            super()._track_module_params_and_buffers(nn.ParameterList(trainable), install_grad_hooks=True)
        return sizes

    def _update_peak_stats(self, peak_state) -> None:
        for device, snap in self._curr_mem_snap.items():
            if snap["Total"] > self._peak_mem.get(device, 0):
                self._peak_mem[device] = snap["Total"]
                self._peak_mem_snap[device] = dict(snap)


def peak_breakdown(tracker: MemTracker) -> tuple[int, dict[str, int]]:
    """(peak bytes, bytes per kind at the peak) from a tracker that has run."""
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return peak["Total"], {name: peak.get(kind, 0) for kind, name in BREAKDOWN.items()}


def tracked_step_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], object]
) -> dict:
    """Run ``step()`` under torch's MemTracker; return the peak (MiB) and its breakdown by kind.

    Counts tensor bytes only (no allocator cache, no CUDA context); the same numbers a fake-tensor
    estimate gives (``bench.memory.estimate``), so real and simulated peaks are comparable.
    """
    tracker = StepMemoryTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    total, breakdown = peak_breakdown(tracker)
    return {"peak_mib": total / MIB, "breakdown_mib": {k: v / MIB for k, v in breakdown.items()}}


def median_step_time(times: list[float], warmup: int = 3) -> float | None:
    """Median step time, skipping the first ``warmup`` steps (allocation, caches) when there are more."""
    usable = times[warmup:] if len(times) > warmup else times
    return statistics.median(usable) if usable else None
