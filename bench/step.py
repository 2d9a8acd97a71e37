"""The one training step every measurement of the suite runs: training runs, memory estimates and
measurements, the GPU check and the perf benchmark all call ``train_step`` (tested), so the step whose
memory is estimated is the step that is trained and timed; and they all make its optimizer with
``build_optimizer`` (tested too).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import Tensor, nn

import snell
from bench.settings import PRECISIONS
from snell.core.callbacks import training_callbacks
from snell.core.families import causal_lm_loss, output_logits


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")


def autocast(device_type: str, precision: str) -> AbstractContextManager:
    """bf16 autocast for precision 'bf16', full precision for 'fp32'."""
    check_precision(precision)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    decay_groups: bool = True,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW (timm's ``create_optimizer_v2``: ``torch.optim.AdamW``) over the trainable parameters of
    ``model``: the optimizer that ``train_step`` steps, wherever it runs.

    ``decay_groups`` (training's): timm's two parameter groups, no weight decay on biases, norms and tokens
    (1-d parameters and ``model.no_weight_decay()``) nor on what the method excludes
    (``snell.no_weight_decay``: GPS's unselected entries must stay pretrained). False: one group of every
    trainable parameter, all decayed, as plain ``torch.optim.AdamW(trainable, ...)`` makes it (the memory
    estimate, the perf benchmark and the GPU check measure that optimizer). ``foreach``: torch's
    multi-tensor implementation (None: torch's default, on for CUDA tensors)."""
    if decay_groups:
        model_exclusions = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        excluded = set(model_exclusions) | snell.no_weight_decay(model)
        params = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=excluded)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    return create_optimizer_v2(params, "adamw", lr=lr, weight_decay=weight_decay, foreach=foreach)


def next_token_loss(output: object, labels: Tensor) -> Tensor:
    """A causal LM's training loss (``loss_fn`` of ``train_step``): the next-token cross-entropy of its
    output's logits (``snell.core.families.causal_lm_loss``; labels -100 ignored)."""
    return causal_lm_loss(output_logits(output), labels)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    precision: str = "fp32",
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Tensor:
    """Forward (under ``precision``), loss, backward, optimizer step, the method's training callbacks
    (``snell.training_callbacks``: e.g. SNELLA's importance scores, which read the gradients), gradients
    cleared; the loss."""
    with autocast(images.device.type, precision):
        loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()
    for callback in training_callbacks(model):
        callback.after_optimizer_step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
