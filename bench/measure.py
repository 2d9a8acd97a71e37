"""Measurements of a training step: tensor-level peak memory with its breakdown, and step time."""

from __future__ import annotations

import collections
import statistics
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.hooks import RemovableHandle

_NO_HOOKS = RemovableHandle(collections.OrderedDict())  # remove() on it does nothing

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


def tracked_step_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], object]
) -> dict:
    """Run ``step()`` under torch's MemTracker; return the peak (MiB) and its breakdown by kind.

    Counts tensor bytes only (no allocator cache, no CUDA context); the same numbers a fake-tensor
    estimate gives, so real and simulated peaks are comparable.
    """
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    skip_frozen_parameters(tracker, model)
    with tracker:
        step()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    breakdown = {name: peak.get(kind, 0) / MIB for kind, name in BREAKDOWN.items()}
    return {"peak_mib": peak["Total"] / MIB, "breakdown_mib": breakdown}


def skip_frozen_parameters(tracker: MemTracker, model: nn.Module) -> None:
    """Let MemTracker run on partly frozen models (every PEFT method).

    torch 2.14's MemTracker registers a gradient hook on every parameter it meets, which raises for
    parameters that do not require grad. Marking frozen ones as already hooked (with no-op handles)
    skips that; their memory is still counted as parameters.
    """
    for param in model.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NO_HOOKS, _NO_HOOKS)


def median_step_time(times: list[float], warmup: int = 3) -> float | None:
    """Median step time, skipping the first ``warmup`` steps (allocation, caches) when there are more."""
    usable = times[warmup:] if len(times) > warmup else times
    return statistics.median(usable) if usable else None
