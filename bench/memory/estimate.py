"""Peak memory of one training step at any model size, estimated on the CPU without allocating it.

The model is built on the meta device and materialised as fake tensors (shapes and dtypes, no data);
one training step then runs under torch's ``MemTracker``, which follows every tensor storage and
reports the peak with its breakdown (parameters, buffers, gradients, optimizer state, activations,
temporaries). Attention runs as timm's fused kernel or, with ``attention="explicit"``, as the public SNELL
and GPS code computes it (``bench.backbones.set_attention``), which keeps each block's attention matrix.
``step_memory(..., measure_on="cpu" | "cuda")`` runs the same step on real tensors
(CPU: torch.profiler's allocation events; CUDA: ``torch.cuda.max_memory_allocated``) to check it.

The step is training's own (``bench.step.train_step``): ``model.train()``, AdamW over the trainable
parameters (``foreach=True``, the CUDA default), cross-entropy, backward, ``optimizer.step()``,
``zero_grad(set_to_none=True)``.
It is measured after optimizer state exists (created by one optimizer step on zero gradients, which
leaves what a first training step leaves). Counted: tensor bytes only; no CUDA context, allocator
cache or fragmentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import timm
import torch
from torch import nn
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import snell
from bench import step
from bench.arguments import parse
from bench.backbones import check_attention, create_backbone, set_attention
from bench.run.measure import MIB, StepMemoryTracker, peak_breakdown
from snell.layer import code_path

ESTIMATE_DEVICE = "estimate: fake tensors on CPU"
OPTIMIZER = {"lr": 1e-3, "weight_decay": 1e-4, "foreach": True}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one training step; ``breakdown`` (bytes by category at the peak) sums to it.

    A real measurement has an empty breakdown: the allocator reports totals only.
    """

    model: str
    config: dict[str, Any]
    batch_size: int
    precision: str
    attention: str
    peak_bytes: int
    breakdown: dict[str, int]
    params_total: int
    trainable_params: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        """One flat, CSV-ready row: sizes in MiB, the config as JSON."""
        row = dataclasses.asdict(self)
        row["config"] = json.dumps(self.config, sort_keys=True, default=str)
        row["peak_mib"] = row.pop("peak_bytes") / MIB
        for name, size in row.pop("breakdown").items():
            row[f"{name}_mib"] = size / MIB
        row["torch"] = torch.__version__
        return row


class _Setup(NamedTuple):
    model: nn.Module
    optimizer: torch.optim.Optimizer
    input_size: tuple[int, int, int]
    params_total: int


def _backbone(
    model_name: str, img_size: int | None, num_classes: int, device: str, attention: str
) -> nn.Module:
    """The timm model with random weights on ``device`` ("meta" for estimates: built outside the fake mode,
    where timm's drop-path schedule calls ``.item()``, then materialised inside it with ``to_empty``)."""
    kwargs = {"img_size": img_size} if img_size else {}
    with torch.device(device):
        return set_attention(create_backbone(model_name, num_classes, pretrained=False, **kwargs), attention)


def _setup(model: nn.Module, config: snell.TuningConfig, img_size: int | None) -> _Setup:
    """Apply the method, switch to train mode and create AdamW's state (one step on zero gradients)."""
    channels, *size = timm.data.resolve_model_data_config(model)["input_size"]
    input_size = (channels, img_size, img_size) if img_size else (channels, *size)
    params_total = sum(p.numel() for p in model.parameters())
    snell.apply_method(model, config.without_data(model))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **OPTIMIZER)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _Setup(model, optimizer, input_size, params_total)


def _train_step(setup: _Setup, batch_size: int, precision: str) -> None:
    """One training step on a random batch, made inside the step (so it counts as activation memory)."""
    device = next(setup.model.parameters()).device
    images = torch.randn(batch_size, *setup.input_size, device=device)
    labels = torch.randint(setup.model.num_classes, (batch_size,), device=device)
    step.train_step(setup.model, setup.optimizer, images, labels, precision=precision)


def _result(
    setup: _Setup,
    model_name: str,
    batch_size: int,
    precision: str,
    attention: str,
    peak: int,
    breakdown: dict[str, int],
    device: str,
) -> MemoryEstimate:
    """The MemoryEstimate of a step of ``setup``'s model (estimated or measured on ``device``)."""
    config = setup.model.tuning_config.to_dict()
    trainable = snell.count_trainable(setup.model)
    return MemoryEstimate(
        model_name,
        config,
        batch_size,
        precision,
        attention,
        peak,
        breakdown,
        setup.params_total,
        trainable,
        device,
    )


def _check_args(precision: str, batch_size: int, attention: str) -> None:
    step.check_precision(precision)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    check_attention(attention)


def step_memory(
    model_name: str,
    config: snell.TuningConfig,
    batch_size: int,
    precision: str = "fp32",
    *,
    img_size: int | None = None,
    num_classes: int = 100,
    measure_on: str | None = None,
    code_path_of: str = "cuda",
    attention: str = "fused",
) -> MemoryEstimate:
    """Peak memory of one training step of timm ``model_name`` tuned by ``config``.

    By default an estimate that allocates no tensor data (a ViT-B/16 estimate needs well under 1 GB of
    real memory) of the step as it runs on ``code_path_of`` (SNELL's layer follows that device type's
    code: ``snell.layer.code_path``). ``measure_on="cpu"`` or ``"cuda"`` runs the same step on real tensors
    instead and returns the allocator's peak tensor bytes (CPU: from torch.profiler's allocation events,
    plus what was live before; CUDA: ``torch.cuda.max_memory_allocated``): for small models, or on a GPU.
    ``img_size`` overrides the model's input size; ``attention`` is ``bench.backbones.set_attention``'s.
    """
    _check_args(precision, batch_size, attention)
    if measure_on is not None:
        backbone = _backbone(model_name, img_size, num_classes, measure_on, attention)
        setup = _setup(backbone, config, img_size)
        peak = _measured_peak(setup, lambda: _train_step(setup, batch_size, precision))
        cuda = torch.device(measure_on).type == "cuda"
        name = torch.cuda.get_device_name(measure_on) if cuda else "measured: CPU"
        return _result(setup, model_name, batch_size, precision, attention, peak, {}, name)
    model = _backbone(model_name, img_size, num_classes, "meta", attention)
    # the meta-device model is the fake mode's only real input
    with FakeTensorMode(allow_non_fake_inputs=True), code_path(code_path_of):
        setup = _setup(model.to_empty(device="cpu"), config, img_size)
        tracker = StepMemoryTracker()
        tracker.track_external(setup.model, setup.optimizer)
        with tracker:
            _train_step(setup, batch_size, precision)
    peak, breakdown = peak_breakdown(tracker)
    return _result(setup, model_name, batch_size, precision, attention, peak, breakdown, ESTIMATE_DEVICE)


def _allocations(nodes: list, device: torch.device) -> Iterator:
    """The allocation events on ``device`` of a profiler event tree."""
    for node in nodes:
        if node.tag == _EventType.Allocation and node.extra_fields.device == device:
            yield node.extra_fields
        yield from _allocations(node.children, device)


def _measured_peak(setup: _Setup, step: Callable[[], None]) -> int:
    """Peak bytes of tensors allocated on the model's device while ``step`` runs, counting what was live
    before. CUDA: ``max_memory_allocated``. CPU: the bytes live before (parameters, buffers, optimizer
    state) plus the rise of the CPU allocator's running total (``total_allocated`` of the profiler's
    allocation events) from its level before the step to its highest."""
    device = next(setup.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    state = [v for s in setup.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    live = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*setup.model.parameters(), *setup.model.buffers(), *state]
    }
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(_allocations(prof.profiler.kineto_results.experimental_event_tree(), device))
    before = min((e.total_allocated - e.alloc_size for e in events), default=0)
    return sum(live.values()) + max((e.total_allocated for e in events), default=before) - before


def format_estimate(estimate: MemoryEstimate) -> str:
    """A short human-readable report: peak and breakdown in MiB."""
    lines = [
        f"{estimate.model}  {estimate.config['method']}  batch {estimate.batch_size}  {estimate.precision}"
        f"  {estimate.attention} attention  ({estimate.device})",
        f"  trainable {estimate.trainable_params:,} of {estimate.params_total:,} backbone parameters",
        f"  peak        {estimate.peak_bytes / MIB:10.1f} MiB",
    ]
    lines += [f"  {name:<11} {size / MIB:10.1f} MiB" for name, size in estimate.breakdown.items() if size]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run(parse("memory", argv))


def run(args: argparse.Namespace) -> None:
    config = snell.method_config(args.method, **args.options)
    shape = {"img_size": args.img_size, "num_classes": args.num_classes, "attention": args.attention}
    estimate = step_memory(args.model, config, args.batch_size, args.precision, **shape)
    print(format_estimate(estimate))
    if args.measure:
        measured = step_memory(
            args.model, config, args.batch_size, args.precision, **shape, measure_on=args.measure
        )
        print(format_estimate(measured))
        print(f"measured / estimate: {measured.peak_bytes / estimate.peak_bytes:.4f}")
