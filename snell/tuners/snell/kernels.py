"""Kernels that turn low-rank factors into a full-size update: dW[j, i] = kappa(A[i], B[j]).

A kernel is a small ``nn.Module`` mapping factors ``a`` (in x r) and ``b`` (out x r) to ``dW`` (out x in).
Nonlinear kernels are the point of SNELL: their dW has rank well above r, so a sparse mask on it still
leaves a rich update. Adding a kernel means writing one class and decorating it with ``@register_kernel``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

_KERNELS: dict[str, type[Kernel]] = {}


class Kernel(nn.Module):
    """Base class: ``forward(a, b) -> dW`` with a: (..., in, r), b: (..., out, r), dW: (..., out, in).

    Leading dimensions broadcast: the three q, k, v factor sets of a fused qkv are one call.
    ``pieces``: the number of r-slices the factors are cut into (the public code's P; 1 for most).
    ``whole_columns``: an entry also depends on the other entries of its column (a softmax over the
    output rows), so dW can only be computed in blocks of whole columns.
    """

    name: str = ""
    pieces: int = 1
    whole_columns: bool = False

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, a: Tensor, b: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    has_pairs = False
    """Whether ``pairs`` evaluates the kernel on gathered pairs of rows (SNELL's CPU backward then works on
    the kept entries alone)."""

    def pairs(self, a: Tensor, b: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, Tensor]]]:
        """kappa(a[n], b[n]) for pairs of rows a, b (n, r), and its vjp: grad (n,) -> grads of a and b."""
        raise NotImplementedError(f"kernel {self.name!r} has no pairwise form")

    def closed_form(self, a: Tensor, b: Tensor) -> tuple[Tensor, VJP] | None:
        """dW and a function mapping grad (the gradient reaching dW) to the gradients of ``a``, ``b`` and
        the kernel's parameters (in ``named_parameters`` order), without autograd; None for kernels that
        have no closed form (their backward differentiates ``forward`` with autograd)."""
        return None


VJP = Callable[[Tensor], tuple[Tensor, Tensor, list[Tensor]]]
"""A kernel's vector-Jacobian product: grad of dW -> (grad of a, grad of b, grads of its parameters)."""


def register_kernel(name: str) -> Callable[[type[Kernel]], type[Kernel]]:
    """Class decorator: make a kernel available by ``name`` in configs and ``build_kernel``."""

    def deco(cls: type[Kernel]) -> type[Kernel]:
        if name in _KERNELS:
            raise ValueError(f"kernel {name!r} is already registered")
        cls.name = name
        _KERNELS[name] = cls
        return cls

    return deco


def list_kernels() -> list[str]:
    """Names of all registered kernels."""
    return sorted(_KERNELS)


def kernel_options(name: str) -> list[str]:
    """The keyword options a kernel accepts (its constructor arguments besides ``rank``)."""
    check_kernel_name(name)
    params = inspect.signature(_KERNELS[name].__init__).parameters
    return [p for p in params if p not in ("self", "rank")]


def check_kernel_name(name: str) -> None:
    if name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; allowed: {', '.join(list_kernels())}")


def check_kernel_options(name: str, options: dict, rank: int | None = None) -> None:
    """Raise ValueError for options the kernel does not take, naming the allowed ones, and (given the
    ``rank``) for values it rejects: the kernel is built once, on the CPU, as a run would build it."""
    allowed = kernel_options(name)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(
            f"unknown option(s) {bad} for kernel {name!r}; allowed: {', '.join(allowed) or '(none)'}"
        )
    if rank is not None:
        try:
            _KERNELS[name](rank, **options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"kernel {name!r} with options {options}: {err}") from err


def build_kernel(name: str, rank: int, **options) -> Kernel:
    """Instantiate a registered kernel for factors of the given rank."""
    check_kernel_options(name, options)
    return _KERNELS[name](rank, **options)


@torch.no_grad()
def init_factor_(factor: Tensor, kernel: Kernel) -> Tensor:
    """Initialise factors of shape (..., rows, r) as the public code does: kaiming-uniform (a = sqrt(5))
    of its (P, rows, r/P) tensors, whose fan-in is rows * r / P, i.e. uniform in +-1 / sqrt(rows r / P).

    Small factors, so dW starts small (for ViT-B/16 qkv: +-0.018, where a per-row fan-in of r gives +-0.35).
    """
    rows, rank = factor.shape[-2:]
    bound = 1.0 / math.sqrt(rows * rank / kernel.pieces)
    return factor.uniform_(-bound, bound)


def _coefficient(values: Sequence[float] | float, learnable: bool) -> Tensor | nn.Parameter:
    t = torch.as_tensor(values, dtype=torch.float32)
    return nn.Parameter(t) if learnable else t


class _ScaledKernel(Kernel):
    """kappa = alpha * f(a, b) + gamma, with alpha/gamma fixed buffers or learnable parameters.

    The defaults are the RBF and Laplacian kernels' (which keep this constructor); others override them.
    """

    def __init__(
        self, rank: int, alpha: float = 0.1, beta: float = 1.0, gamma: float = 0.0, learnable: bool = False
    ) -> None:
        super().__init__(rank)
        self.beta = beta
        for key, value in (("alpha", alpha), ("gamma", gamma)):
            coef = _coefficient(value, learnable)
            if learnable:
                self.register_parameter(key, coef)
            else:
                self.register_buffer(key, coef, persistent=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.alpha * self.shape(a, b) + self.gamma

    def shape(self, a: Tensor, b: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@register_kernel("linear")
class LinearKernel(Kernel):
    """kappa(a, b) = a.b: plain LoRA, rank(dW) <= r."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return b @ a.mT


@register_kernel("piecewise_linear")
class PiecewiseLinearKernel(Kernel):
    """kappa(a, b) = sum_p c_p ||a_p - b_p||_2 over P equal slices of the r dims (SNELL's default).

    Coefficients default to (+0.1, -0.1, +0.1, ...) and are fixed, as in the public code;
    ``learnable=True`` makes them trainable parameters.
    """

    def __init__(
        self, rank: int, pieces: int = 2, coefficients: Sequence[float] | None = None, learnable: bool = False
    ) -> None:
        super().__init__(rank)
        if pieces < 1 or rank % pieces:
            raise ValueError(f"pieces={pieces} must be >= 1 and divide rank={rank}")
        coefficients = coefficients or [0.1 * (-1) ** p for p in range(pieces)]
        if len(coefficients) != pieces:
            raise ValueError(f"coefficients has {len(coefficients)} values; pieces={pieces} needs that many")
        self.pieces = pieces
        coef = _coefficient(list(coefficients), learnable)
        if learnable:
            self.coefficients = coef
        else:
            self.register_buffer("coefficients", coef, persistent=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a_p, b_p = self._pieces(a), self._pieces(b)
        dist = torch.cdist(b_p, a_p)  # (P, ..., out, in)
        return torch.tensordot(self.coefficients.to(dist.dtype), dist, dims=1)

    has_pairs = True

    def pairs(self, a: Tensor, b: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, Tensor]]]:
        """``Kernel.pairs``: sum_p c_p ||a_p - b_p|| per pair, the distances computed directly (cdist's
        matmul form, which ``forward`` may take, rounds differently in the last bits); d/da_p =
        c_p (a_p - b_p) / D_p (0 where D_p = 0, cdist's subgradient), d/db_p its negative."""
        diff = (a - b).unflatten(-1, (self.pieces, -1))
        dist = diff.square().sum(-1).sqrt()
        coef = self.coefficients.to(dist.dtype)

        def vjp(grad: Tensor) -> tuple[Tensor, Tensor]:
            h = (grad[:, None] * coef / dist).masked_fill_(dist == 0, 0)
            grad_a = (h[..., None] * diff).flatten(1)
            return grad_a, -grad_a

        return dist @ coef, vjp

    def _pieces(self, factor: Tensor) -> Tensor:
        """(..., rows, r) -> (P, ..., rows, r/P): the slices whose distances the kernel sums."""
        return factor.unflatten(-1, (self.pieces, -1)).movedim(-2, 0)

    def closed_form(self, a: Tensor, b: Tensor) -> tuple[Tensor, VJP]:
        """With D_p[j, i] = ||a_p[i] - b_p[j]|| and H_p = c_p grad / D_p (0 where D_p = 0, cdist's
        subgradient): grad a_p[i] = a_p[i] sum_j H_p[j, i] - sum_j H_p[j, i] b_p[j], grad b_p likewise,
        grad c_p = sum(grad D_p). dW is ``forward``'s to the bit (same cdist, same sum)."""
        a_p, b_p = self._pieces(a), self._pieces(b)
        dist = torch.cdist(b_p, a_p)
        coef = self.coefficients.to(dist.dtype)
        dw = torch.tensordot(coef, dist, dims=1)

        def vjp(grad: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
            h = (grad * coef.view(-1, *(1,) * grad.dim())).div_(dist).masked_fill_(dist == 0, 0)
            grad_a = a_p * h.sum(-2).unsqueeze(-1) - h.mT @ b_p
            grad_b = b_p * h.sum(-1).unsqueeze(-1) - h @ a_p
            params = [(dist * grad).flatten(1).sum(1)] if isinstance(self.coefficients, nn.Parameter) else []
            return grad_a.movedim(0, -2).flatten(-2), grad_b.movedim(0, -2).flatten(-2), params

        return dw, vjp


@register_kernel("polynomial")
class PolynomialKernel(_ScaledKernel):
    """kappa(a, b) = alpha * ((a.b + c)^d - c^d) + gamma: rank grows like r^d, zero for orthogonal a, b."""

    def __init__(
        self,
        rank: int,
        degree: int = 2,
        offset: float = 1.0,
        alpha: float = 0.1,
        gamma: float = 0.0,
        learnable: bool = False,
    ) -> None:
        super().__init__(rank, alpha, 1.0, gamma, learnable)
        if degree < 1:
            raise ValueError(f"degree={degree} must be >= 1")
        self.degree, self.offset = degree, offset

    def shape(self, a: Tensor, b: Tensor) -> Tensor:
        return (b @ a.mT + self.offset) ** self.degree - self.offset**self.degree


@register_kernel("sigmoid")
class SigmoidKernel(_ScaledKernel):
    """kappa(a, b) = alpha * sigmoid(beta * a.b) + gamma; gamma = -alpha/2 centres it at 0."""

    def __init__(
        self, rank: int, alpha: float = 0.1, beta: float = 1.0, gamma: float = -0.05, learnable: bool = False
    ) -> None:
        super().__init__(rank, alpha, beta, gamma, learnable)

    def shape(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.sigmoid(self.beta * (b @ a.mT))


@register_kernel("rbf")
class RBFKernel(_ScaledKernel):
    """kappa(a, b) = alpha * exp(-beta * ||a - b||_2^2) + gamma (Gaussian kernel)."""

    def shape(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-self.beta * torch.cdist(b, a).square())


@register_kernel("laplacian")
class LaplacianKernel(_ScaledKernel):
    """kappa(a, b) = alpha * exp(-beta * ||a - b||_1) + gamma (as sklearn's laplacian_kernel)."""

    def shape(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-self.beta * torch.cdist(b, a, p=1.0))


@register_kernel("mixture")
class MixtureKernel(Kernel):
    """A learnable convex mixture of other kernels: kappa = sum_k softmax(w)_k kappa_k (w starts uniform)."""

    def __init__(
        self, rank: int, components: Sequence[str] = ("linear", "piecewise_linear", "polynomial", "rbf")
    ) -> None:
        super().__init__(rank)
        for name in components:
            check_kernel_name(name)
            if name == "mixture":
                raise ValueError("a mixture cannot contain 'mixture'")
        self.components = nn.ModuleList(build_kernel(name, rank) for name in components)
        self.logits = nn.Parameter(torch.zeros(len(components)))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        weights = torch.softmax(self.logits, 0)
        return sum(w * k(a, b) for w, k in zip(weights, self.components, strict=True))
