"""SNELLA's kernel: SNELL's piecewise-linear kernel plus a learnable softmax term (the public code's MixK)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from snell.core.registry import exclude_from_weight_decay
from snell.tuners.snell.kernels import Kernel, PiecewiseLinearKernel, register_kernel


@register_kernel("piecewise_softmax")
class PiecewiseSoftmaxKernel(Kernel):
    """kappa = M + alpha * softmax(M / gamma over the output rows) + beta, M the piecewise-linear kernel
    (``PiecewiseLinearKernel``, fixed coefficients); alpha, gamma, beta learnable scalars initialised to
    1, 1, 0 (``learnable=False`` fixes them).

    ``groups``: independent sets of scalars for factor groups stacked in one layer (q, k and v of a fused
    qkv get their own, as the public code's separate layers); the softmax runs over each group's rows.
    The learnable scalars are exempt from weight decay (``snell.exclude_from_weight_decay``): the public
    code's are 1-d tensors of shape (1,), which its optimizer's rule (no decay below 2 dimensions)
    skips; here they are (groups, 1, 1), which that rule would decay.
    """

    whole_columns = True

    def __init__(
        self,
        rank: int,
        pieces: int = 2,
        coefficients: Sequence[float] | None = None,
        alpha: float = 1.0,
        gamma: float = 1.0,
        beta: float = 0.0,
        learnable: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__(rank)
        self.distance = PiecewiseLinearKernel(rank, pieces, coefficients)
        self.pieces = pieces
        for key, value in (("alpha", alpha), ("gamma", gamma), ("beta", beta)):
            scalar = torch.full((groups, 1, 1), float(value))
            if learnable:
                param = nn.Parameter(scalar)
                exclude_from_weight_decay(param)
                self.register_parameter(key, param)
            else:
                self.register_buffer(key, scalar, persistent=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        m = self.distance(a, b)  # (..., out, in): the groups' rows apart when a and b have a group dim
        shaped = m if m.dim() == 3 else m.unsqueeze(0)
        out = shaped + self.alpha * torch.softmax(shaped / self.gamma, dim=-2) + self.beta
        return out.view_as(m)
