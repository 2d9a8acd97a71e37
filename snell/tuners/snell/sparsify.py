"""Competition-based sparsification: keep the largest-magnitude entries of dW, recomputed every step.

No index or mask is stored anywhere: the threshold is re-derived from |dW| on each forward pass, so
entries "compete" for the kept slots as training moves them. Ratio ``s`` is the fraction ZEROED.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

RULES = ("public", "eq5", "hard")
"""public: dW * |dW|.detach() on kept entries (the public code; gradient only through kept entries).
eq5:    dW * max(|dW| - t, 0) (the paper's Eq. 5).
hard:   dW on kept entries, zero elsewhere (a plain mask)."""


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown sparsification rule {rule!r}; allowed: {', '.join(RULES)}")


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, int | float) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1) (fraction of entries zeroed)")


@torch.no_grad()
def threshold(
    dw: Tensor,
    sparsity: float | Sequence[float],
    groups: int = 1,
    *,
    magnitude: bool = False,
    device_type: str | None = None,
) -> Tensor | None:
    """Per-group magnitude threshold t: entries with |dW| > t are kept. Shape (groups,); None at s = 0.

    ``groups`` splits dW's rows into equal blocks with their own threshold (q, k, v of a fused qkv).
    t is the value ``torch.quantile(|dW|, s)`` returns, computed as quantile does, in the input's
    precision: for float32 (and half-precision) input s rounded to float32, the rank s (N - 1) in double
    precision, the two order statistics around it and ``torch.lerp`` between them in float32; for
    float64 input the same in float64 with s as it is. So t, and the kept entries, are bit-identical to
    quantile's (tested on hundreds of random shapes in both precisions, with ties; 11 float32 entries at
    s = 0.9 keep 2, since float32(0.9) * 10 < 9), at any size (quantile refuses more than 2**24
    entries; the same formula applies there) and without a sort.
    s = 0 means no sparsification: no threshold (None). A sequence gives each group its own ratio
    (SNELLA's allocator); there 0 is a ratio like any other (t = the smallest |dW|, as the public SNELLA
    thresholds at every ratio). ``magnitude``: ``dw`` holds |dW| already (it may be reordered in place).
    ``device_type`` picks the selection route (default: the tensor's device).
    """
    if not isinstance(sparsity, int | float):
        if len(sparsity) != groups:
            raise ValueError(f"{len(sparsity)} sparsity ratios for {groups} groups")
        values = dw.detach().reshape(groups, -1)
        found = [_quantile(values[g : g + 1], s, magnitude, device_type) for g, s in enumerate(sparsity)]
        return torch.cat(found).to(dw.dtype)
    if sparsity == 0:
        return None
    return _quantile(dw.detach().reshape(groups, -1), sparsity, magnitude, device_type).to(dw.dtype)


def _quantile(values: Tensor, sparsity: float, magnitude: bool, device_type: str | None) -> Tensor:
    """torch.quantile's value at ``sparsity`` of each row of |values| (see ``threshold``): in float64 for
    float64 input (s unrounded, as quantile takes it in the input's dtype), in float32 otherwise (s
    rounded to float32; half-precision input is compared in float32, which quantile does not take)."""
    double = values.dtype == torch.float64
    if not magnitude:
        values = values.abs()
    if not double:
        values = values.float()
    last = values.shape[1] - 1
    rank = (float(sparsity) if double else float(np.float32(sparsity))) * last
    below, above = math.floor(rank), min(math.ceil(rank), last)
    lower, upper = order_statistics_(values, (below, above), device_type=device_type)
    return torch.lerp(lower, upper, rank - below)


def order_statistics_(
    rows: Tensor, indices: tuple[int, int], *, device_type: str | None = None
) -> tuple[Tensor, Tensor]:
    """The values of each row of a 2-D tensor at two 0-based positions ``(k, k)`` or ``(k, k + 1)`` of
    its sorted order: what a quantile interpolates between.

    ``rows`` may be reordered in place. On a CPU numpy's in-place introselect at k, then the smallest
    value above it: 0.9 ms for 590K entries, where a partition at both positions takes 9 ms and
    ``torch.kthvalue`` 12 ms (one thread, measured). On CUDA ``torch.topk(N - k, sorted=False)``, a
    multi-block radix select without a sort's index payload (``torch.kthvalue`` gives each row one thread
    block there). Tensor subclasses such as the fake tensors of memory estimates use the same topk, and
    so does ``device_type="cuda"`` on CPU tensors (the CUDA route, tested on a CPU).
    """
    low, high = indices
    if high - low not in (0, 1):
        raise ValueError(f"order statistics at {indices}: the second must equal the first or follow it")
    if type(rows) is Tensor and rows.device.type == "cpu" and device_type in (None, "cpu"):
        values = rows.numpy()
        values.partition(low, axis=1)
        lower = torch.from_numpy(values[:, low].copy())
        upper = torch.from_numpy(values[:, high:].min(axis=1)) if high > low else lower
        return lower, upper
    top = rows.topk(rows.shape[1] - low, dim=1, sorted=False).values  # the N - k largest: k-th is their min
    if high == low:
        lower = top.amin(dim=1)
        return lower, lower
    two = top.topk(2, dim=1, largest=False).values  # sorted ascending: the k-th and (k + 1)-th
    return two[:, 0], two[:, 1]


def apply_rule(dw: Tensor, t: Tensor | None, rule: str, *, inplace: bool = False) -> Tensor:
    """Sparsify dW (out x in, rows split into ``len(t)`` groups) given per-group thresholds t.

    t = None (sparsity 0) returns dW itself for every rule: the public code's kernelized LoRA ("KLoRA").
    ``inplace`` overwrites ``dw`` with the result (no autograd): the forward pass's merged weight.
    """
    if t is None:
        return dw
    groups = t.numel()
    grouped = dw.reshape(groups, -1)
    t = t.reshape(groups, 1)
    magnitude = grouped.abs()
    if inplace and rule != "eq5":  # two passes over dW and one temporary fewer than the factor below
        if rule == "public":
            grouped.mul_(magnitude)
        return grouped.masked_fill_(magnitude <= t, 0).reshape(dw.shape)
    if rule == "public":
        factor = magnitude.detach() * (magnitude > t)
    elif rule == "eq5":  # relu, not clamp: no gradient at |dW| = t, where clamp passes one in some versions
        factor = torch.relu(magnitude - t)
    else:
        factor = magnitude > t
    out = grouped.mul_(factor) if inplace else grouped * factor
    return out.reshape(dw.shape)


def kept_mask(dw: Tensor, t: Tensor) -> Tensor:
    """The entries of dW (rows split into ``len(t)`` groups) that every rule keeps: |dW| > t."""
    groups = t.numel()
    return (dw.reshape(groups, -1).abs() > t.reshape(groups, 1)).reshape(dw.shape)


def rule_at(dw: Tensor, t: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """S and dS/ddW at kept entries (``dw`` their values, ``t`` their groups' thresholds): what
    ``apply_rule`` and ``rule_vjp`` give there, without the full matrix."""
    magnitude = dw.abs()
    if rule == "public":
        return dw * magnitude, magnitude
    if rule == "eq5":
        excess = magnitude - t
        return dw * excess, excess + magnitude
    return dw.clone(), torch.ones_like(dw)


def rule_vjp(dw: Tensor, t: Tensor | None, rule: str, grad: Tensor) -> Tensor:
    """The gradient reaching dW from ``grad``, the gradient of ``apply_rule(dw, t, rule)``: what autograd
    computes through it, in closed form (t is a constant, as in the public code)."""
    if t is None:
        return grad
    groups = t.numel()
    magnitude = dw.reshape(groups, -1).abs()
    kept = magnitude > t.reshape(groups, 1)
    if rule == "public":  # S = dW |dW| (detached) on kept entries
        factor = magnitude.mul_(kept)
    elif rule == "eq5":  # S = dW relu(|dW| - t): relu(|dW| - t) + |dW| on kept entries
        factor = torch.relu(magnitude - t.reshape(groups, 1)).add_(magnitude.mul_(kept))
    else:
        factor = kept
    return (grad.reshape(groups, -1) * factor).reshape(grad.shape)


def sparsify(dw: Tensor, sparsity: float, rule: str = "public", groups: int = 1) -> Tensor:
    """S(dW): threshold and sparsify in one call (the plain-autograd form, used for merging and checks)."""
    return apply_rule(dw, threshold(dw, sparsity, groups), rule)
