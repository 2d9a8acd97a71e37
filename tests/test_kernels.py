import pytest
import torch

import snell
from snell.tuners.snell.kernels import build_kernel, kernel_options

KERNELS = snell.list_kernels()


def test_required_kernels_registered():
    required = {"linear", "piecewise_linear", "polynomial", "sigmoid", "rbf", "laplacian", "mixture"}
    assert required <= set(KERNELS)


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_shape_finite_and_gradients(name):
    torch.manual_seed(0)
    a = torch.randn(24, 8, requires_grad=True)  # in x r
    b = torch.randn(40, 8, requires_grad=True)  # out x r
    dw = build_kernel(name, 8)(a, b)
    assert dw.shape == (40, 24)
    assert torch.isfinite(dw).all()
    dw.square().sum().backward()
    for factor in (a, b):
        assert factor.grad is not None and factor.grad.abs().sum() > 0


def numerical_rank(m: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(m))  # tolerance from the fp32 eps


def test_linear_kernel_is_low_rank_and_piecewise_is_not():
    torch.manual_seed(0)
    a, b = torch.randn(64, 8), torch.randn(64, 8)
    linear_rank = numerical_rank(build_kernel("linear", 8)(a, b))
    piecewise_rank = numerical_rank(build_kernel("piecewise_linear", 8)(a, b))
    print(f"numerical rank of dW (64x64, r=8): linear {linear_rank}, piecewise_linear {piecewise_rank}")
    assert linear_rank <= 8
    assert piecewise_rank > 8


def test_piecewise_matches_definition():
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(3, 4)
    dw = build_kernel("piecewise_linear", 4, pieces=2, coefficients=[0.3, -0.2])(a, b)
    expected = torch.empty(3, 5)
    for j in range(3):
        for i in range(5):
            expected[j, i] = 0.3 * (a[i, :2] - b[j, :2]).norm() - 0.2 * (a[i, 2:] - b[j, 2:]).norm()
    torch.testing.assert_close(dw, expected)


def test_learnable_coefficients_are_parameters():
    fixed = build_kernel("piecewise_linear", 8)
    learnable = build_kernel("piecewise_linear", 8, learnable=True)
    assert not list(fixed.parameters())
    assert [n for n, _ in learnable.named_parameters()] == ["coefficients"]


def test_mixture_weights_learn():
    kernel = build_kernel("mixture", 8)
    a, b = torch.randn(10, 8), torch.randn(12, 8)
    kernel(a, b).sum().backward()
    assert kernel.logits.grad is not None and kernel.logits.grad.abs().sum() > 0


def test_bad_kernel_options():
    with pytest.raises(ValueError, match="unknown option.*'nope'.*allowed: pieces"):
        build_kernel("piecewise_linear", 8, nope=1)
    with pytest.raises(ValueError, match="pieces=3 must .* divide rank=8"):
        build_kernel("piecewise_linear", 8, pieces=3)
    with pytest.raises(ValueError, match="unknown kernel 'gauss'; allowed: .*rbf"):
        kernel_options("gauss")


@pytest.mark.parametrize("pieces", [1, 2, 4])
@pytest.mark.parametrize("leading", [(), (3,)])
def test_piecewise_closed_form_vjp_equals_autograd(pieces, leading):
    """The closed-form backward of the piecewise-linear kernel against autograd through cdist (float64),
    including the coefficients' gradient and an entry at distance 0 (cdist's subgradient there is 0)."""
    generator = torch.Generator().manual_seed(pieces)
    kernel = build_kernel("piecewise_linear", 8, pieces=pieces, learnable=True).double()
    a = torch.randn(*leading, 7, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(*leading, 5, 8, dtype=torch.float64, generator=generator)
    b[..., 0, :] = a.detach()[..., 0, :]  # D = 0 for (row 0, column 0) in every piece
    b.requires_grad_(True)
    grad = torch.randn(*leading, 5, 7, dtype=torch.float64, generator=generator)
    dw, vjp = kernel.closed_form(a.detach(), b.detach())
    expected_dw = kernel(a, b)
    expected = torch.autograd.grad(expected_dw, [a, b, kernel.coefficients], grad)
    assert torch.equal(dw, expected_dw.detach())
    grad_a, grad_b, (grad_c,) = vjp(grad)
    for got, want in zip((grad_a, grad_b, grad_c), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
