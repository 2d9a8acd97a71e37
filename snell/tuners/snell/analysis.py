"""Analysis helpers for kernel ablations: fit factors to a target under a kernel, and numerical rank.

``fit_kernel_factors`` is the setup of the paper's Fig. 4a: approximate a random full-rank matrix T with
dW = kappa(A, B) from rank-r factors A (in x r), B (out x r), minimising the mean squared error with
Adam. Factors start as in ``SnellLinear`` (the public code's init); the kernel's own learnable
parameters (e.g. a mixture's weights) are fitted too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kernels import build_kernel, init_factor_

RANK_RTOL = 1e-4
"""Default relative tolerance of ``numerical_rank``: singular values above RANK_RTOL * sigma_max count
(for a 768 x 768 float32 matrix this is about torch's own default, max(m, n) * eps)."""


@dataclass(frozen=True)
class KernelFit:
    """The outcome of one fit: the final dW (detached) and the loss after each step."""

    kernel: str
    rank: int
    seed: int
    dw: Tensor
    losses: list[float]
    relative_error: float


def random_target(out_features: int, in_features: int, seed: int = 0, std: float = 0.02) -> Tensor:
    """A Gaussian matrix (full rank almost surely) with entries of ViT-weight scale (std 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * std


def relative_error(approx: Tensor, target: Tensor) -> float:
    """||approx - target||_F / ||target||_F."""
    return float(torch.linalg.matrix_norm(approx - target) / torch.linalg.matrix_norm(target))


def numerical_rank(matrix: Tensor, rtol: float = RANK_RTOL) -> int:
    """Number of singular values above ``rtol`` times the largest (``torch.linalg.matrix_rank``)."""
    return int(torch.linalg.matrix_rank(matrix.detach().float(), rtol=rtol))


def fit_kernel_factors(
    target: Tensor,
    kernel: str,
    rank: int,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
    **kernel_options,
) -> KernelFit:
    """Fit dW = kappa(A, B) to ``target`` (out x in) by Adam on the mean squared error.

    ``kernel`` and ``kernel_options`` are as in ``snell.build_kernel``; ``seed`` fixes the factors' init.
    """
    out_features, in_features = target.shape
    torch.manual_seed(seed)
    module = build_kernel(kernel, rank, **kernel_options)
    a = nn.Parameter(torch.empty(in_features, rank))
    b = nn.Parameter(torch.empty(out_features, rank))
    for factor in (a, b):
        init_factor_(factor, module)
    optimizer = torch.optim.Adam([a, b, *module.parameters()], lr=lr)
    losses = []
    for _ in range(steps):
        loss = (module(a, b) - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        dw = module(a, b)
    return KernelFit(kernel, rank, seed, dw, losses, relative_error(dw, target))
