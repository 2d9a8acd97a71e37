import pytest
import torch

from snell.tuners.snell.analysis import (
    RANK_RTOL,
    fit_kernel_factors,
    numerical_rank,
    random_target,
    relative_error,
)


def test_numerical_rank_counts_singular_values_above_tolerance():
    torch.manual_seed(0)
    low = torch.randn(40, 3) @ torch.randn(3, 30)
    assert numerical_rank(low) == 3
    scaled = torch.diag(torch.tensor([1.0, 1e-2, 1e-6]))
    assert numerical_rank(scaled) == 2  # 1e-6 < RANK_RTOL
    assert numerical_rank(scaled, rtol=1e-8) == 3
    assert pytest.approx(1e-4) == RANK_RTOL


def test_random_target_is_seeded_and_full_rank():
    a, b = random_target(32, 24, seed=3), random_target(32, 24, seed=3)
    assert a.shape == (32, 24)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, random_target(32, 24, seed=4))
    assert numerical_rank(a) == 24
    assert relative_error(a, a) == 0.0
    assert relative_error(torch.zeros_like(a), a) == pytest.approx(1.0)


def test_linear_kernel_recovers_a_rank_r_target():
    torch.manual_seed(1)
    target = 0.1 * torch.randn(24, 2) @ torch.randn(2, 16)
    fit = fit_kernel_factors(target, "linear", rank=2, steps=150, lr=5e-2)
    assert fit.dw.shape == (24, 16) and not fit.dw.requires_grad
    assert len(fit.losses) == 150 and fit.losses[-1] < fit.losses[0]
    assert fit.relative_error < 0.05
    assert numerical_rank(fit.dw) == 2


def test_nonlinear_kernel_fit_is_seeded_and_above_rank_r():
    target = random_target(32, 32, seed=0)
    first = fit_kernel_factors(target, "piecewise_linear", rank=4, steps=30, seed=5)
    again = fit_kernel_factors(target, "piecewise_linear", rank=4, steps=30, seed=5)
    torch.testing.assert_close(first.dw, again.dw)
    assert first.losses[-1] < first.losses[0]
    assert numerical_rank(first.dw) > 4


def test_kernel_with_learnable_parameters_fits():
    # The mixture's weights are parameters of the kernel itself; they go to Adam with the factors.
    target = random_target(16, 16, seed=0)
    fit = fit_kernel_factors(target, "mixture", rank=4, steps=30)
    assert fit.losses[-1] < fit.losses[0]


def test_fit_rejects_bad_kernel_options():
    with pytest.raises(ValueError, match="unknown option"):
        fit_kernel_factors(random_target(8, 8), "linear", rank=2, steps=1, degree=3)
