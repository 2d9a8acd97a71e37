"""Peak memory of one training step at any model size, estimated on the CPU without allocating it.

The model is built on the meta device and materialised as fake tensors (shapes and dtypes, no data);
one training step then runs under torch's ``MemTracker``, which follows every tensor storage and
reports the peak with its breakdown (parameters, buffers, gradients, optimizer state, activations,
temporaries). Attention runs as timm's fused kernel or, with ``attention="explicit"``, as the public SNELL
and GPS code computes it (``bench.backbones.set_attention``), which keeps each block's attention matrix.
``step_memory(..., measure_on="cpu" | "cuda")`` runs the same step on real tensors
(CPU: torch.profiler's allocation events; CUDA: ``torch.cuda.max_memory_allocated``) to check it.

A causal LM name of ``bench.llm.models`` (``llama2_7b``, ...) goes through the same code: the model is
built from its config (transformers' ``sdpa`` attention for "fused", ``eager`` for "explicit", no KV
cache), the batch is ``seq_len`` random token ids per sample, labels the same ids, and the loss the
next-token loss (``bench.step.next_token_loss``); ``gradient_checkpointing`` recomputes each decoder
layer in backward (transformers' activation checkpointing, non-reentrant). ``frozen_dtype="bf16"``
stores the frozen weights in bf16 and the trainable ones in float32: mixed-precision training with fp32
master weights of what trains (all weights, for full fine-tuning) over a 16-bit frozen base.

The step is training's own (``bench.step.train_step``): ``model.train()``, AdamW over the trainable
parameters (``bench.step.build_optimizer``, one group, ``foreach=True``, the CUDA default),
cross-entropy (a causal LM's: next-token), backward, ``optimizer.step()``,
``zero_grad(set_to_none=True)``.
It is measured after optimizer state exists (created by one optimizer step on zero gradients, which
leaves what a first training step leaves). Counted: tensor bytes only; no CUDA context, allocator
cache or fragmentation. On the GPU's code path (the default) a plain ``nn.Dropout`` (PEFT's branch
dropout) runs as ``torch.native_dropout``, CUDA's kernel, which keeps a bool mask where a CPU's
``nn.Dropout`` keeps a mask of the input's dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple
from unittest import mock

import timm
import torch
from torch import nn
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import snell
from bench import step
from bench.backbones import check_attention, create_backbone, set_attention
from bench.llm.models import (
    CAUSAL_LM_CONFIGS,
    create_causal_lm,
    enable_gradient_checkpointing,
    is_causal_lm_name,
)
from bench.run.measure import MIB, StepMemoryTracker, peak_breakdown
from snell.core.families import is_causal_lm
from snell.core.wrap import BranchDropout
from snell.tuners.snell.layer import code_path

ESTIMATE_DEVICE = "estimate: fake tensors on CPU"
OPTIMIZER = {"lr": 1e-3, "weight_decay": 1e-4, "foreach": True}
"""``bench.step.build_optimizer``'s settings here: AdamW in one group over the trainable parameters."""
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``frozen_dtype``'s torch dtypes (``bench.settings.FROZEN_DTYPES``): storage of the frozen weights;
whatever trains is float32 either way (mixed precision's master weights)."""
LM_ATTENTION = {"fused": "sdpa", "explicit": "eager"}
"""A causal LM's transformers ``attn_implementation`` for each of ``bench.settings.ATTENTIONS``."""


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
    seq_len: int | None = None
    """Tokens per sample of a causal LM (None: an image model)."""
    gradient_checkpointing: bool = False
    frozen_dtype: str = "fp32"

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
    input_size: tuple[int, ...]
    """(channels, height, width) of an image, or (seq_len,) of a causal LM's token ids."""
    params_total: int


def _backbone(
    model_name: str, img_size: int | None, num_classes: int, device: str, attention: str
) -> nn.Module:
    """The model with random float32 weights on ``device`` ("meta" for estimates: built outside the fake
    mode, where timm's drop-path schedule calls ``.item()``, then materialised inside it with ``to_empty``):
    a timm model, or a causal LM of ``bench.llm.models`` (without KV cache, as in training)."""
    if is_causal_lm_name(model_name):
        with torch.device(device):
            return create_causal_lm(model_name, attention=LM_ATTENTION[attention], use_cache=False)
    kwargs = {"img_size": img_size} if img_size else {}
    with torch.device(device):
        return set_attention(create_backbone(model_name, num_classes, pretrained=False, **kwargs), attention)


def _store_weights(model: nn.Module, frozen_dtype: str) -> None:
    """Frozen floating parameters in ``frozen_dtype``, trainable ones in float32 (mixed precision's master
    weights), in place (the parameter objects, and what methods marked on them, stay). Done after the
    method is applied to the float32 model, so methods and PEFT build their layers as on float32 (the end
    state is a 16-bit base loaded first and then adapted with float32 adapters: PEFT's default); buffers
    stay as built (a method's buffers copied from weights, GPS's pretrained entries, are float32)."""
    frozen = WEIGHT_DTYPES[frozen_dtype]
    for p in model.parameters():
        dtype = torch.float32 if p.requires_grad else frozen
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _dropout_as_on_cuda(model: nn.Module) -> None:
    """Replace every plain ``nn.Dropout`` (p > 0) by ``snell.core.wrap.BranchDropout``, the same dropout as
    ``torch.native_dropout`` (CUDA's kernel: a bool mask for backward) on any device."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout and module.p > 0:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, BranchDropout(module.p))


@contextmanager
def _one_sequence_per_sample() -> Iterator[None]:
    """transformers looks for packed sequences in the position ids; on fake tensors it cannot read them and
    so builds a batch x seq x seq causal mask, where a real step (whose batch holds one sequence per
    sample, as ours do) finds none and passes ``is_causal`` to SDPA. Inside, its check answers as on a
    real step of our batches: no packed sequences."""
    with mock.patch("transformers.masking_utils.find_packed_sequence_indices", return_value=None):
        yield


def _setup(
    model: nn.Module,
    config: snell.TuningConfig,
    img_size: int | None,
    seq_len: int | None = None,
    gradient_checkpointing: bool = False,
    frozen_dtype: str = "fp32",
) -> _Setup:
    """Apply the method, store frozen weights in ``frozen_dtype`` and what trains in float32, switch to
    train mode (with gradient checkpointing if asked) and create AdamW's state (one step on zero
    gradients)."""
    if is_causal_lm(model):
        input_size: tuple[int, ...] = (seq_len,)
    else:
        channels, *size = timm.data.resolve_model_data_config(model)["input_size"]
        input_size = (channels, img_size, img_size) if img_size else (channels, *size)
    params_total = sum(p.numel() for p in model.parameters())
    snell.apply_method(model, config.without_data(model))
    _store_weights(model, frozen_dtype)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = step.build_optimizer(model, decay_groups=False, **OPTIMIZER)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _Setup(model, optimizer, input_size, params_total)


def _train_step(setup: _Setup, batch_size: int, precision: str) -> None:
    """One training step on a random batch, made inside the step (so it counts as activation memory):
    images and class labels, or token ids that are their own next-token labels."""
    model = setup.model
    device = next(model.parameters()).device
    if is_causal_lm(model):
        tokens = torch.randint(model.config.vocab_size, (batch_size, *setup.input_size), device=device)
        step.train_step(
            model, setup.optimizer, tokens, tokens, precision=precision, loss_fn=step.next_token_loss
        )
        return
    images = torch.randn(batch_size, *setup.input_size, device=device)
    labels = torch.randint(model.num_classes, (batch_size,), device=device)
    step.train_step(model, setup.optimizer, images, labels, precision=precision)


def _result(
    setup: _Setup,
    model_name: str,
    batch_size: int,
    precision: str,
    attention: str,
    peak: int,
    breakdown: dict[str, int],
    device: str,
    *,
    gradient_checkpointing: bool,
    frozen_dtype: str,
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
        seq_len=setup.input_size[0] if is_causal_lm(setup.model) else None,
        gradient_checkpointing=gradient_checkpointing,
        frozen_dtype=frozen_dtype,
    )


def _check_args(
    model_name: str,
    precision: str,
    batch_size: int,
    attention: str,
    seq_len: int | None,
    gradient_checkpointing: bool,
    frozen_dtype: str,
) -> None:
    """ValueError naming the bad value: an unknown model, a causal LM without a positive ``seq_len`` or an
    image model with one, gradient checkpointing of an image model, an unknown precision, attention or
    frozen dtype, a batch size below 1."""
    step.check_precision(precision)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    check_attention(attention)
    if frozen_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"frozen_dtype={frozen_dtype!r}; allowed: {', '.join(WEIGHT_DTYPES)}")
    if is_causal_lm_name(model_name):
        if seq_len is None or seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1 for the causal LM {model_name!r}")
        return
    if not timm.is_model(model_name):
        raise ValueError(
            f"unknown model {model_name!r}: neither a causal LM ({', '.join(CAUSAL_LM_CONFIGS)}) "
            "nor a timm model"
        )
    if seq_len is not None:
        raise ValueError(f"seq_len={seq_len} is for causal LMs; {model_name!r} is a timm image model")
    if gradient_checkpointing:
        raise ValueError(f"gradient_checkpointing is for causal LMs; {model_name!r} is a timm image model")


def step_memory(
    model_name: str,
    config: snell.TuningConfig,
    batch_size: int,
    precision: str = "fp32",
    *,
    img_size: int | None = None,
    num_classes: int = 100,
    seq_len: int | None = None,
    gradient_checkpointing: bool = False,
    frozen_dtype: str = "fp32",
    measure_on: str | None = None,
    code_path_of: str = "cuda",
    attention: str = "fused",
    tracker: StepMemoryTracker | None = None,
) -> MemoryEstimate:
    """Peak memory of one training step of ``model_name`` tuned by ``config``: a timm model, or a causal
    LM of ``bench.llm.models`` on ``seq_len`` tokens per sample (with ``gradient_checkpointing`` if asked).

    By default an estimate that allocates no tensor data (a ViT-B/16 or a LLaMA-2-7B estimate needs well
    under 1 GB of real memory) of the step as it runs on ``code_path_of`` (SNELL's layer follows that
    device type's code: ``snell.tuners.snell.layer.code_path``; "cuda" also runs plain dropout as CUDA's
    kernel).
    ``measure_on="cpu"`` or ``"cuda"`` runs the same step on real tensors instead and returns the
    allocator's peak tensor bytes (CPU: from torch.profiler's allocation events, plus what was live
    before; CUDA: ``torch.cuda.max_memory_allocated``): for small models, or on a GPU.
    ``img_size`` overrides an image model's input size; ``attention`` is ``bench.backbones.set_attention``'s
    (a causal LM: "fused" = transformers' sdpa, "explicit" = its eager attention); ``frozen_dtype`` stores
    the model's weights (what trains stays float32). An estimate runs under ``tracker`` (default: a new
    ``StepMemoryTracker``; ``bench.memory.timeline`` passes one that also records the bytes after every op).
    ValueError names a bad value (``_check_args``).
    """
    _check_args(model_name, precision, batch_size, attention, seq_len, gradient_checkpointing, frozen_dtype)
    if tracker is not None and measure_on is not None:
        raise ValueError(f"tracker is for estimates; measure_on={measure_on!r} measures instead")
    shape = (img_size, num_classes)
    kind = {"gradient_checkpointing": gradient_checkpointing, "frozen_dtype": frozen_dtype}
    if measure_on is not None:
        backbone = _backbone(model_name, *shape, measure_on, attention)
        setup = _setup(backbone, config, img_size, seq_len, gradient_checkpointing, frozen_dtype)
        peak = _measured_peak(setup, lambda: _train_step(setup, batch_size, precision))
        cuda = torch.device(measure_on).type == "cuda"
        name = torch.cuda.get_device_name(measure_on) if cuda else "measured: CPU"
        return _result(setup, model_name, batch_size, precision, attention, peak, {}, name, **kind)
    model = _backbone(model_name, *shape, "meta", attention)
    # the meta-device model is the fake mode's only real input
    with FakeTensorMode(allow_non_fake_inputs=True), code_path(code_path_of), _one_sequence_per_sample():
        model = model.to_empty(device="cpu")
        setup = _setup(model, config, img_size, seq_len, gradient_checkpointing, frozen_dtype)
        if code_path_of == "cuda":
            _dropout_as_on_cuda(setup.model)
        tracker = StepMemoryTracker() if tracker is None else tracker
        tracker.track_external(setup.model, setup.optimizer)
        with tracker:
            _train_step(setup, batch_size, precision)
    peak, breakdown = peak_breakdown(tracker)
    return _result(
        setup, model_name, batch_size, precision, attention, peak, breakdown, ESTIMATE_DEVICE, **kind
    )


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
    tokens = f" x {estimate.seq_len} tokens" if estimate.seq_len is not None else ""
    checkpointing = "  gradient checkpointing" if estimate.gradient_checkpointing else ""
    lines = [
        f"{estimate.model}  {estimate.config['method']}  batch {estimate.batch_size}{tokens}"
        f"  {estimate.precision}  {estimate.attention} attention{checkpointing}"
        f"  frozen weights {estimate.frozen_dtype}  ({estimate.device})",
        f"  trainable {estimate.trainable_params:,} of {estimate.params_total:,} backbone parameters",
        f"  peak        {estimate.peak_bytes / MIB:10.1f} MiB",
    ]
    lines += [f"  {name:<11} {size / MIB:10.1f} MiB" for name, size in estimate.breakdown.items() if size]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    config = snell.method_config(args.method, **args.options)
    shape = {
        "img_size": args.img_size,
        "num_classes": args.num_classes,
        "attention": args.attention,
        "seq_len": args.seq_len,
        "gradient_checkpointing": args.gradient_checkpointing,
        "frozen_dtype": args.frozen_dtype,
    }
    estimate = step_memory(args.model, config, args.batch_size, args.precision, **shape)
    print(format_estimate(estimate))
    if args.measure:
        measured = step_memory(
            args.model, config, args.batch_size, args.precision, **shape, measure_on=args.measure
        )
        print(format_estimate(measured))
        print(f"measured / estimate: {measured.peak_bytes / estimate.peak_bytes:.4f}")
