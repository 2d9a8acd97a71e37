import random

import pytest
import torch

from snell.tuners.snell.sparsify import apply_rule, sparsify, threshold


@pytest.mark.parametrize("s", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("rule", ["public", "eq5", "hard"])
def test_zero_fraction_matches_sparsity(s, rule):
    dw = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    zero_fraction = (sparsify(dw, s, rule) == 0).float().mean().item()
    assert abs(zero_fraction - s) <= 1 / dw.numel() + 1e-9


def random_threshold_cases(count: int = 240):
    """(rows, sparsity) pairs of varied shapes and ratios, with the two known float32 edge cases."""
    generator = torch.Generator().manual_seed(7)
    rng = random.Random(7)
    yield torch.randn(1, 11, generator=generator), 0.9  # float32(0.9) * 10 < 9: quantile keeps 2, not 1
    yield torch.randn(1, 4096 * 1024, generator=generator), 0.99
    for _ in range(count):
        groups = rng.choice([1, 1, 3])
        n = rng.choice([rng.randint(2, 64), rng.randint(64, 5000), rng.randint(5000, 120_000)])
        s = rng.choice([0.1, 0.3, 0.37, 0.5, 0.74, 0.88, 0.9, 0.99, 0.995, rng.random()])
        values = torch.randn(groups, n, generator=generator)
        if rng.random() < 0.2:
            values = values.round(decimals=1)  # ties
        yield values, s


@pytest.mark.slow
def test_threshold_is_torch_quantile_bit_for_bit():
    cases = 0
    for rows, s in random_threshold_cases():
        expected = torch.quantile(rows.abs(), s, dim=1)
        t = threshold(rows, s, groups=rows.shape[0])
        assert torch.equal(t, expected), (rows.shape, s)
        assert torch.equal(rows.abs() > t[:, None], rows.abs() > expected[:, None])
        cases += 1
    assert cases >= 200


@pytest.mark.parametrize("rule", ["public", "eq5", "hard"])
def test_sparsity_zero_is_no_sparsification(rule):
    dw = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    assert threshold(dw, 0.0) is None
    assert torch.equal(sparsify(dw, 0.0, rule), dw)


def test_threshold_has_no_size_limit():
    # torch.quantile raises above 2**24 elements; a 4096 x 11008 LLaMA MLP matrix must work.
    dw = torch.randn(4096, 11008, generator=torch.Generator().manual_seed(0))
    t = threshold(dw, 0.9)
    kept = (dw.abs() > t).float().mean().item()
    assert abs(kept - 0.1) < 1e-6


def test_groups_get_their_own_threshold():
    dw = torch.cat([torch.randn(8, 16), 100 * torch.randn(8, 16), 0.01 * torch.randn(8, 16)])
    s = sparsify(dw, 0.75, "hard", groups=3)
    for block in s.reshape(3, 8, 16):
        assert (block != 0).float().mean().item() == pytest.approx(0.25, abs=1 / 128)


def test_zeroed_entries_pass_no_gradient():
    dw = torch.randn(20, 30, requires_grad=True)
    t = threshold(dw, 0.9)
    for rule in ("public", "eq5", "hard"):
        dw.grad = None
        out = apply_rule(dw, t, rule)
        out.sum().backward()
        zeroed = out.detach() == 0
        assert torch.all(dw.grad[zeroed] == 0)
        assert torch.all(dw.grad[~zeroed] != 0)


def test_rules_match_their_formulas():
    dw = torch.randn(10, 10)
    t = threshold(dw, 0.5)
    kept = dw.abs() > t
    torch.testing.assert_close(apply_rule(dw, t, "public"), dw * dw.abs() * kept)
    torch.testing.assert_close(apply_rule(dw, t, "eq5"), dw * torch.clamp(dw.abs() - t, min=0))
    torch.testing.assert_close(apply_rule(dw, t, "hard"), dw * kept)


def random_float64_cases(count: int = 240):
    """(rows, sparsity) pairs in float64: varied shapes and ratios, half of them with many ties (values
    drawn from a small integer set), and the ratios whose float32 rounding differs from float64's."""
    generator = torch.Generator().manual_seed(64)
    rng = random.Random(64)
    yield torch.randn(1, 11, generator=generator, dtype=torch.float64), 0.9  # float64(0.9) * 10 = 9: keeps 1
    yield torch.randint(-3, 4, (1, 1024 * 1024), generator=generator).double(), 0.99  # large, all ties
    for _ in range(count):
        groups = rng.choice([1, 1, 3])
        n = rng.choice([rng.randint(2, 64), rng.randint(64, 5000), rng.randint(5000, 60_000)])
        s = rng.choice([0.1, 0.3, 0.37, 0.5, 0.74, 0.88, 0.9, 0.99, 0.995, rng.random()])
        if rng.random() < 0.5:
            values = torch.randint(-rng.randint(1, 20), 21, (groups, n), generator=generator).double()
        else:
            values = torch.randn(groups, n, generator=generator, dtype=torch.float64)
        yield values, s


@pytest.mark.parametrize("route", ["cpu", "cuda"], ids=["numpy select", "topk (the CUDA route)"])
def test_float64_threshold_keeps_exactly_torch_quantiles_entries(route):
    # In float64 the threshold is computed in float64 (s not rounded to float32), as torch.quantile on
    # float64 input: rounding |dW| and s to float32 kept other entries in about half of these cases.
    cases = 0
    for rows, s in random_float64_cases():
        expected = torch.quantile(rows.abs(), s, dim=1)
        t = threshold(rows, s, groups=rows.shape[0], device_type=route)
        assert t.dtype == torch.float64
        assert torch.equal(t, expected), (rows.shape, s)
        assert torch.equal(rows.abs() > t[:, None], rows.abs() > expected[:, None]), (rows.shape, s)
        cases += 1
    assert cases >= 200


def test_float64_per_group_ratios_match_torch_quantile():
    generator = torch.Generator().manual_seed(5)
    rows = torch.randint(0, 9, (3, 777), generator=generator).double()
    ratios = (0.0, 0.9, 0.37)
    t = threshold(rows, ratios, groups=3)
    expected = torch.stack([torch.quantile(rows[g].abs(), s) for g, s in enumerate(ratios)])
    assert torch.equal(t, expected)
