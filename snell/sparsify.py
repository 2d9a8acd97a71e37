"""Competition-based sparsification: keep the largest-magnitude entries of dW, recomputed every step.

No index or mask is stored anywhere: the threshold is re-derived from |dW| on each forward pass, so
entries "compete" for the kept slots as training moves them. Ratio ``s`` is the fraction ZEROED.
"""

from __future__ import annotations

import math

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
def threshold(dw: Tensor, sparsity: float, groups: int = 1) -> Tensor:
    """Per-group magnitude threshold t: entries with |dW| > t are kept. Shape (groups,).

    ``groups`` splits dW's rows into equal blocks with their own threshold (q, k, v of a fused qkv).
    Uses ``kthvalue`` with k = floor(s (N - 1)) + 1, which keeps exactly the entries that
    ``torch.quantile(s)`` would, at any size (quantile fails above 2**24 elements) and faster.
    """
    if sparsity == 0:
        return dw.new_zeros(groups)
    flat = dw.detach().reshape(groups, -1).abs()
    k = math.floor(sparsity * (flat.shape[1] - 1)) + 1
    return flat.float().kthvalue(k, dim=1).values.to(dw.dtype)


def apply_rule(dw: Tensor, t: Tensor, rule: str) -> Tensor:
    """Sparsify dW (out x in, rows split into ``len(t)`` groups) given per-group thresholds t."""
    groups = t.numel()
    grouped = dw.reshape(groups, -1)
    t = t.reshape(groups, 1)
    magnitude = grouped.abs()
    if rule == "public":
        out = grouped * (magnitude.detach() * (magnitude > t))
    elif rule == "eq5":
        out = grouped * torch.clamp(magnitude - t, min=0)
    else:
        out = grouped * (magnitude > t)
    return out.reshape(dw.shape)


def sparsify(dw: Tensor, sparsity: float, rule: str = "public", groups: int = 1) -> Tensor:
    """S(dW): threshold and sparsify in one call (the plain-autograd form, used for merging and checks)."""
    return apply_rule(dw, threshold(dw, sparsity, groups), rule)
