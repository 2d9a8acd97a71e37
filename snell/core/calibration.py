"""Gradients over calibration batches: what data-driven selections (SPT's sensitivity, GPS's top-K
connections) are computed from. ``calibration`` is an iterable of (images, labels) batches."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .families import task_loss
from .registry import Calibration

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""(model, images, labels) -> scalar loss."""


def cross_entropy(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the model's logits (a causal LM's next-token loss:
    ``snell.core.families.task_loss``)."""
    return task_loss(model, images, labels)


def supervised_contrastive(
    model: nn.Module, images: Tensor, labels: Tensor, temperature: float = 0.07
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of the normalised pre-logits features, head-free,
    with one view per image: each image's positives are the other images of its class in the batch
    (images with none are left out; 0 if no image has one). GPS's code uses two augmented views."""
    features = F.normalize(model.forward_head(model.forward_features(images), pre_logits=True), dim=1)
    logits = features @ features.T / temperature
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    anchors = counts > 0
    if not anchors.any():
        return features.sum() * 0.0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[anchors] / counts[anchors]
    return -mean_log_prob.mean()


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "supcon": supervised_contrastive}


def gradient_sums(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    calibration: Calibration,
    batches: int | None,
    *,
    square: bool,
    loss_fn: LossFn = cross_entropy,
    method: str,
) -> dict[str, Tensor]:
    """Per entry of each of ``params``: the sum over up to ``batches`` batches (all if None) of the
    gradient of ``loss_fn`` (``square``: of its square), float32.

    Runs in eval mode (no dropout / drop-path noise) with only ``params`` requiring grad; every
    module's mode and every parameter's ``requires_grad`` are restored and no ``.grad`` is left behind.
    ValueError naming ``method`` if the iterable is empty.
    """
    tensors = list(params.values())
    device = tensors[0].device
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    seen = 0
    try:
        model.eval()
        model.requires_grad_(False)
        for p in tensors:
            p.requires_grad_(True)
        for images, labels in itertools.islice(calibration, batches):
            loss = loss_fn(model, images.to(device), labels.to(device))
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for total, grad in zip(sums, grads, strict=True):
                if grad is not None:
                    total.add_(grad.float().square() if square else grad.float())
            seen += 1
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
    if not seen:
        raise ValueError(f"{method} got an empty calibration iterable; it needs (images, labels) batches")
    return dict(zip(params, sums, strict=True))
