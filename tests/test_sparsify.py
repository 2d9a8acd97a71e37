import pytest
import torch

from snell.sparsify import apply_rule, sparsify, threshold


@pytest.mark.parametrize("s", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("rule", ["public", "eq5", "hard"])
def test_zero_fraction_matches_sparsity(s, rule):
    dw = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    zero_fraction = (sparsify(dw, s, rule) == 0).float().mean().item()
    assert abs(zero_fraction - s) <= 1 / dw.numel() + 1e-9


@pytest.mark.parametrize("s", [0.0, 0.3, 0.9, 0.995])
def test_kthvalue_threshold_keeps_what_quantile_keeps(s):
    dw = torch.randn(100, 37, generator=torch.Generator().manual_seed(1))
    t = threshold(dw, s)
    t_quantile = torch.quantile(dw.abs().flatten(), s) if s else torch.tensor(0.0)
    assert torch.equal(dw.abs() > t, dw.abs() > t_quantile)


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
