"""An independent torch implementation of the fused ops of ``snell.tuners.snell.fused``, and one
comparison against it.

The distances are computed directly, the sparsification rules written out and gradients taken by autograd
in float64, sharing no code with the kernels or with ``snell.tuners.snell.sparsify`` beyond the threshold
under test.
``tests/test_fused_ops.py`` compares many small cases (on CPU tensors in Triton's interpreter, and on a
GPU); ``python -m bench gpu-smoke`` a few on the device it checks. One copy of the reference serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from snell.tuners.snell import fused
from snell.tuners.snell.sparsify import threshold

TOLERANCE = 1e-5
"""Largest relative error (max |error| / max |reference|) allowed of the fused magnitude, merge and vjp."""


@dataclass(frozen=True)
class Case:
    """One comparison: factors a (F, in, r) and b (out, r), P kernel pieces, a sparsification rule id
    (``snell.tuners.snell.fused.RULE_IDS``), a threshold at s = 0.5 per group (``sparse``) and a frozen
    weight."""

    factors: int
    groups: int
    rank: int
    pieces: int
    rule: int
    sparse: bool
    weight: bool
    in_features: int = 20
    out_features: int = 24

    @property
    def label(self) -> str:
        return (
            f"F={self.factors} G={self.groups} r={self.rank} P={self.pieces} rule={self.rule} "
            f"t={self.sparse} weight={self.weight} {self.out_features}x{self.in_features}"
        )


def reference_dw(a: Tensor, b: Tensor, coef: Tensor) -> Tensor:
    """dW[j, i] = sum_p coef[p] |a_p[i] - b_p[j]| over the P pieces of the rank, per factor group."""
    factors, n_in, rank = a.shape
    pieces = coef.numel()
    rows = b.shape[0] // factors
    out = []
    for f in range(factors):
        ap = a[f].view(n_in, pieces, rank // pieces)
        bp = b[f * rows : (f + 1) * rows].view(rows, pieces, rank // pieces)
        dist = ((ap[None] - bp[:, None]) ** 2).sum(-1).sqrt()
        out.append((dist * coef.to(dist.dtype)).sum(-1))
    return torch.cat(out)


def reference_rule(dw: Tensor, t: Tensor | None, rule: int) -> Tensor:
    """S(dW) by rule id: 0 public (dW |dW| on kept entries), 1 Eq. 5 (dW relu(|dW| - t)), 2 hard mask."""
    if t is None:
        return dw
    groups = t.numel()
    grouped = dw.view(groups, -1)
    magnitude = grouped.abs()
    kept = magnitude > t.view(groups, 1)
    if rule == 0:
        out = grouped * magnitude.detach() * kept
    elif rule == 1:
        out = grouped * torch.relu(magnitude - t.view(groups, 1))
    else:
        out = grouped * kept
    return out.view(dw.shape)


def relative_error(x: Tensor, y: Tensor) -> float:
    """max |x - y| / max |y|."""
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()


def _largest_difference(x: Tensor | None, y: Tensor | None) -> float:
    """max |x - y| (0 for two Nones): 0 means equal to the bit."""
    return 0.0 if x is None and y is None else (x - y).abs().max().item()


def compare(case: Case, device: str, generator: torch.Generator) -> dict:
    """The fused ops on ``device`` against the reference (random factors from ``generator``, on the CPU):
    relative errors of |dW|, the merge and the gradients of a and b; the largest difference between the
    threshold of the fused |dW| and ``torch.quantile``'s, and between two runs of the vjp (0: bitwise)."""
    n_in, out = case.in_features, case.out_features
    a = torch.randn(case.factors, n_in, case.rank, generator=generator) * 0.5
    b = torch.randn(out, case.rank, generator=generator) * 0.5
    coef = torch.tensor([0.1 * (-1) ** p for p in range(case.pieces)])
    dw = reference_dw(a.double(), b.double(), coef).float()

    def on(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.to(device)

    magnitude = fused.update(on(a), on(b), on(coef), None, None, 1.0, case.rule, True)
    t = threshold(magnitude.clone(), 0.5, case.groups, magnitude=True) if case.sparse else None
    magnitude, t = magnitude.cpu(), None if t is None else t.cpu()
    t_reference = torch.quantile(magnitude.view(case.groups, -1), 0.5, dim=1) if case.sparse else None
    weight = torch.randn(out, n_in, generator=generator) if case.weight else None
    merged = fused.update(on(a), on(b), on(coef), on(t), on(weight), 1.5, case.rule, False).cpu()
    expected = 1.5 * reference_rule(dw.double(), None if t is None else t.double(), case.rule)
    expected = expected + (0 if weight is None else weight.double())
    grad = torch.randn(out, n_in, generator=generator)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    s64 = reference_rule(reference_dw(a64, b64, coef.double()), None if t is None else t.double(), case.rule)
    grad_a, grad_b = torch.autograd.grad(s64, [a64, b64], grad.double())
    got_a, got_b = (g.cpu() for g in fused.vjp(on(a), on(b), on(coef), on(t), on(grad), case.rule))
    again_a, again_b = (g.cpu() for g in fused.vjp(on(a), on(b), on(coef), on(t), on(grad), case.rule))
    return {
        "case": case.label,
        "magnitude": relative_error(magnitude.double(), dw.abs().double()),
        "threshold_difference": _largest_difference(t, t_reference),
        "merged": relative_error(merged.double(), expected),
        "grad_a": relative_error(got_a.double(), grad_a),
        "grad_b": relative_error(got_b.double(), grad_b),
        "rerun_difference": max(_largest_difference(got_a, again_a), _largest_difference(got_b, again_b)),
    }
