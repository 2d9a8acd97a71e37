"""The merged weight W0 + S(kappa(A, B)) of one forward pass, per kernel, size and rank."""

from __future__ import annotations

import pytest
import torch

import snell
from snell.tuners.snell.sparsify import apply_rule, threshold

SHAPES = [(768, 768), (768, 3072)]  # out x in


@pytest.mark.parametrize("rank", [8, 16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kernel", snell.list_kernels())
def test_merged_weight(measure, benchmark, kernel, shape, rank):
    benchmark.group = f"merge {shape[0]}x{shape[1]} r={rank}"
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(in_features, rank, generator=generator) - 0.5
    b = torch.rand(out_features, rank, generator=generator) - 0.5
    weight = torch.randn(out_features, in_features, generator=generator)
    kappa = snell.build_kernel(kernel, rank)

    @torch.no_grad()
    def merge() -> torch.Tensor:
        dw = kappa(a, b)
        return apply_rule(dw, threshold(dw, 0.9), "public", inplace=True).add_(weight)

    assert merge().shape == shape
    measure(merge)
