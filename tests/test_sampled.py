"""SNELL's CPU backward on the kept entries (``snell.tuners.snell.sampled``, ``SnellLinear.gathers``):
the sampled
product g^T x equals the dense product at the kept entries, and a layer's outputs and gradients equal
those of the dense backward (the whole dW recomputed, the dense weight gradient) in every layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snell.tuners.snell.layer as layer_module
import snell.tuners.snell.sampled as sampled_module
from bench.run.measure import tracked_step_memory
from snell.tuners.snell.kernels import build_kernel
from snell.tuners.snell.layer import SnellLinear
from snell.tuners.snell.sampled import Entries, masked_product


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_product_is_the_dense_product_at_the_kept_entries_and_zero_elsewhere(dtype):
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(50, 37, generator=generator, dtype=dtype).T  # a transposed view, as backward has
    right = torch.randn(50, 23, generator=generator, dtype=dtype)[:, 2:21]  # a column slice
    kept = torch.rand(37, 19, generator=generator) > 0.8
    kept[3] = False  # an empty row
    got = masked_product(kept, left, right)
    expected = (left.double() @ right.double()) * kept
    assert got.dtype == dtype and got.shape == kept.shape
    assert (got[~kept] == 0).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < tolerance


def test_entries_of_a_block_are_those_of_the_whole_matrix_inside_it():
    kept = torch.rand(12, 10, generator=torch.Generator().manual_seed(1)) > 0.6
    index = kept.view(-1).nonzero().squeeze(1).int()
    block = Entries.from_index(index, 10, (4, 9), (3, 7))
    expected = Entries.from_mask(kept[4:9, 3:7])
    for got, wanted in zip(
        (block.rows, block.cols, block.crow), (expected.rows, expected.cols, expected.crow), strict=True
    ):
        assert torch.equal(got, wanted)


def _layer(sparsity: float, groups: int, rule: str, shared_a: bool, drop_path: float, dropout: float):
    torch.manual_seed(0)
    made = SnellLinear(
        nn.Linear(96, 48 * groups), 8, build_kernel("piecewise_linear", 8), sparsity, rule=rule,
        groups=groups, shared_a=shared_a, drop_path=drop_path, dropout=dropout,
    )  # fmt: skip
    with torch.no_grad():
        made.lora_A.normal_(0, 0.3), made.lora_B.normal_(0, 0.3)
    return made.train()


def _run(made: SnellLinear, x: torch.Tensor, on_kept: bool, monkeypatch) -> list[torch.Tensor]:
    """Outputs and gradients of one step; ``on_kept``: backward on the kept entries, else dense."""
    monkeypatch.setattr(layer_module, "SAMPLED_MIN_SPARSITY", 0.75 if on_kept else 2.0)
    calls = []
    real = sampled_module.sampled_mm
    monkeypatch.setattr(sampled_module, "sampled_mm", lambda *args: calls.append(1) or real(*args))
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout and drop-path draws in both runs
    y = made(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    found = [y.detach(), x.grad, made.lora_A.grad, made.lora_B.grad]
    made.zero_grad(set_to_none=True)
    assert bool(calls) == on_kept
    return found


LAYOUTS = [
    # sparsity, groups, rule, shared A, drop-path, dropout, CPU block entries (small: several blocks)
    (0.9, 1, "public", False, 0.0, 0.0, 2**19),
    (0.9, 3, "public", False, 0.0, 0.0, 2**19),
    (0.9, 3, "eq5", True, 0.0, 0.0, 2**19),
    (0.8, 3, "hard", False, 0.3, 0.0, 2**19),
    (0.9, 3, "public", False, 0.3, 0.1, 2**19),
    (0.9, 3, "public", False, 0.0, 0.0, 1000),  # row blocks inside each group
    (0.9, 1, "eq5", False, 0.3, 0.0, 1500),
]


@pytest.mark.parametrize(("sparsity", "groups", "rule", "shared_a", "drop_path", "dropout", "block"), LAYOUTS)
def test_backward_on_the_kept_entries_equals_the_dense_backward(
    sparsity, groups, rule, shared_a, drop_path, dropout, block, monkeypatch
):
    monkeypatch.setitem(layer_module.BLOCK_ENTRIES, "cpu", block)
    monkeypatch.setattr(layer_module, "SAMPLED_MIN_TOKENS_PER_RANK", 0)  # 28 tokens: small and quick
    if block < 2**19:  # the backward on kept entries in blocks too
        monkeypatch.setattr(layer_module, "GATHERED_WHOLE_FLOATS", 0)
    made = _layer(sparsity, groups, rule, shared_a, drop_path, dropout)
    assert made.gathers(made.lora_B, 28)
    x = torch.randn(4, 7, 96, generator=torch.Generator().manual_seed(2))
    dense = _run(made, x, on_kept=False, monkeypatch=monkeypatch)
    on_kept = _run(made, x, on_kept=True, monkeypatch=monkeypatch)
    for got, expected in zip(on_kept, dense, strict=True):
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_low_sparsity_few_tokens_per_rank_and_learnable_kernels_keep_the_dense_backward():
    low = _layer(0.5, 1, "public", False, 0.0, 0.0)
    assert not low.samples_gradient(low.lora_B, 10**6)
    high = _layer(0.9, 1, "public", False, 0.0, 0.0)
    assert high.gathers(high.lora_B, 512) and not high.gathers(high.lora_B, 511)  # 64 tokens per rank
    learnable = SnellLinear(nn.Linear(16, 8), 8, build_kernel("piecewise_linear", 8, learnable=True), 0.9)
    assert learnable.samples_gradient(learnable.lora_B, 10**6)
    assert not learnable.gathers(learnable.lora_B, 10**6)


def test_the_step_memory_tracker_runs_through_the_backward_on_kept_entries(monkeypatch):
    monkeypatch.setattr(layer_module, "SAMPLED_MIN_TOKENS_PER_RANK", 0)
    made = _layer(0.9, 3, "public", False, 0.0, 0.0)
    optimizer = torch.optim.AdamW([made.lora_A, made.lora_B])
    x = torch.randn(4, 7, 96)
    found = tracked_step_memory(made, optimizer, lambda: made(x).sum().backward())
    assert made.lora_A.grad is not None and found["peak_mib"] > 0
