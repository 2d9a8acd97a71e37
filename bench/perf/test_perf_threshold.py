"""Threshold selection (the k-th smallest |dW|) from 768x768 to a 4096x11008 LLaMA MLP matrix."""

from __future__ import annotations

import math

import pytest
import torch

from snell.tuners.snell.sparsify import threshold

SHAPES = [(768, 768), (768, 3072), (3072, 3072), (4096, 4096), (4096, 11008)]
SPARSITY = 0.9


def select(method: str, dw: torch.Tensor) -> torch.Tensor:
    magnitude = dw.abs().flatten()
    k = math.floor(SPARSITY * (magnitude.numel() - 1)) + 1
    if method == "quantile":  # the public code: a full sort
        return torch.quantile(magnitude, SPARSITY)
    if method == "kthvalue":
        return magnitude.kthvalue(k).values
    if method == "topk":  # the largest N - k + 1 values; their minimum is the k-th smallest
        return magnitude.topk(magnitude.numel() - k + 1, sorted=False).values.min()
    return threshold(dw, SPARSITY)[0]  # snell: numpy's in-place introselect on a CPU


@pytest.mark.parametrize("method", ["quantile", "kthvalue", "topk", "snell"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_threshold(measure, benchmark, method, shape):
    benchmark.group = f"threshold {shape[0]}x{shape[1]}"
    dw = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kept = (dw.abs() > select(method, dw)).float().mean().item()
    assert abs(kept - (1 - SPARSITY)) < 1e-4  # exactness against torch.quantile: tests/test_sparsify.py
    measure(lambda: select(method, dw), rounds=3 if dw.numel() > 2**24 else 5)
