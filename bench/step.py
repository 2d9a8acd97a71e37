"""The one training step every measurement of the suite runs: training runs, memory estimates and
measurements, the GPU check and the perf benchmark all call ``train_step`` (tested), so the step whose
memory is estimated is the step that is trained and timed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.arguments import PRECISIONS
from snell.core.callbacks import training_callbacks
from snell.core.families import causal_lm_loss, output_logits


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")


def autocast(device_type: str, precision: str) -> AbstractContextManager:
    """bf16 autocast for precision 'bf16', full precision for 'fp32'."""
    check_precision(precision)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
