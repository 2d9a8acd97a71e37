"""The sampled weight gradient of SNELL's CPU backward (``snell.sampled``): g^T x at the kept entries only
equals the dense product there, and a layer's gradients equal those of the dense backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snell.layer as layer_module
from bench.run.measure import tracked_step_memory
from snell.kernels import build_kernel
from snell.layer import SnellLinear
from snell.sampled import masked_product


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_product_is_the_dense_product_at_the_kept_entries_and_zero_elsewhere(dtype):
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(50, 37, generator=generator, dtype=dtype).T  # a transposed view, as backward passes
    right = torch.randn(50, 23, generator=generator, dtype=dtype)[:, 2:21]  # a column slice
    kept = torch.rand(37, 19, generator=generator) > 0.8
    kept[3] = False  # an empty row
    got = masked_product(kept, left, right)
    expected = (left.double() @ right.double()) * kept
    assert got.dtype == dtype and got.shape == kept.shape
    assert (got[~kept] == 0).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < tolerance


def _layer(sparsity: float, groups: int, drop_path: float) -> SnellLinear:
    torch.manual_seed(0)
    made = SnellLinear(
        nn.Linear(96, 48 * groups), 8, build_kernel("piecewise_linear", 8), sparsity, groups=groups,
        drop_path=drop_path,
    )  # fmt: skip
    with torch.no_grad():
        made.lora_A.normal_(0, 0.3), made.lora_B.normal_(0, 0.3)
    return made.train()


def _gradients(made: SnellLinear, x: torch.Tensor, sampled: bool, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setattr(layer_module, "SAMPLED_MIN_SPARSITY", 0.75 if sampled else 2.0)
    calls = []
    monkeypatch.setattr(
        layer_module, "masked_product", lambda *args: calls.append(1) or masked_product(*args)
    )
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # the same drop-path draws in both runs
    y = made(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    grads = [y.detach(), x.grad, made.lora_A.grad, made.lora_B.grad]
    made.zero_grad(set_to_none=True)
    assert bool(calls) == sampled
    return grads


@pytest.mark.parametrize(("sparsity", "groups", "drop_path"), [(0.9, 1, 0.0), (0.9, 3, 0.0), (0.8, 3, 0.3)])
def test_sampled_backward_equals_the_dense_backward(sparsity, groups, drop_path, monkeypatch):
    made = _layer(sparsity, groups, drop_path)
    assert made.samples_gradient(torch.ones(groups), made.lora_B)
    x = torch.randn(4, 7, 96, generator=torch.Generator().manual_seed(2))
    dense = _gradients(made, x, sampled=False, monkeypatch=monkeypatch)
    sampled = _gradients(made, x, sampled=True, monkeypatch=monkeypatch)
    for got, expected in zip(sampled, dense, strict=True):
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_the_dense_backward_serves_low_sparsity():
    made = _layer(0.5, 1, 0.0)
    assert not made.samples_gradient(torch.ones(1), made.lora_B)


def test_the_step_memory_tracker_runs_through_the_sampled_backward():
    made = _layer(0.9, 3, 0.0)
    optimizer = torch.optim.AdamW([made.lora_A, made.lora_B])
    x = torch.randn(4, 7, 96)
    found = tracked_step_memory(made, optimizer, lambda: made(x).sum().backward())
    assert made.lora_A.grad is not None and found["peak_mib"] > 0
