"""The straightforward SNELL of the public code, written only as the baseline of the performance comparison.

Layout of the public implementation (github ssfgunner/SNELL): a parallel branch
``y = x W0^T + drop_path(dropout(x) S(dW)^T)``, the threshold from ``torch.quantile`` (a full sort),
the public sparsification rule, and the branch wrapped in activation checkpointing so that dW is not kept
for backward (recomputed there, with the branch's matmul). Checkpointing is non-reentrant: the reentrant
default passes no gradient to the factors when the branch input does not require grad.

The layer holds the same ``base``, ``lora_A`` (in x r), ``lora_B`` (out x r) and kernel module as
``snell.layer.SnellLinear``, so ``to_reference`` turns a SNELL model into this one sharing its factors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from snell.kernels import Kernel
from snell.layer import SnellLinear
from snell.wrap import AdaptedLinear, replace_modules


class ReferenceSnellLinear(AdaptedLinear):
    """A frozen linear layer plus the public code's checkpointed SNELL branch (rule 'public' only)."""

    def __init__(
        self,
        base: nn.Linear,
        lora_A: nn.Parameter,
        lora_B: nn.Parameter,
        kernel: Kernel,
        sparsity: float,
        groups: int = 1,
        dropout: nn.Module | None = None,
        drop_path: nn.Module | None = None,
    ) -> None:
        super().__init__(base)
        self.lora_A, self.lora_B, self.kernel = lora_A, lora_B, kernel
        self.sparsity, self.groups = sparsity, groups
        self.dropout = dropout or nn.Identity()
        self.drop_path = drop_path or nn.Identity()

    @classmethod
    def from_snell(cls, layer: SnellLinear) -> ReferenceSnellLinear:
        """The reference form of a SNELL layer, sharing its frozen layer, factors, kernel and regularisers."""
        if layer.rule != "public":
            raise ValueError(f"the reference implements the public rule only, not {layer.rule!r}")
        return cls(
            layer.base,
            layer.lora_A,
            layer.lora_B,
            layer.kernel,
            layer.sparsity,
            layer.groups,
            layer.dropout,
            layer.drop_path,
        )

    def delta_weight(self) -> Tensor:
        """S(dW) = dW * |dW|.detach() * 1[|dW| > t], t the per-group ``sparsity`` quantile of |dW|."""
        dw = self.kernel(self.lora_A, self.lora_B)
        grouped = dw.reshape(self.groups, -1)
        magnitude = grouped.abs()
        if self.sparsity > 0:
            t = torch.quantile(magnitude.detach().float(), self.sparsity, dim=1, keepdim=True)
        else:
            t = torch.zeros_like(magnitude[:, :1])
        return (grouped * magnitude.detach() * (magnitude > t)).reshape(dw.shape)

    def _branch(self, x: Tensor) -> Tensor:
        return F.linear(x, self.delta_weight())

    def forward(self, x: Tensor) -> Tensor:
        branch = checkpoint(self._branch, self.dropout(x), use_reentrant=False)
        return self.base(x) + self.drop_path(branch)


def to_reference(model: nn.Module) -> nn.Module:
    """Replace every ``SnellLinear`` of ``model`` by its reference form, in place (factors shared)."""
    names = [name for name, module in model.named_modules() if isinstance(module, SnellLinear)]
    replace_modules(model, names, lambda _, layer: ReferenceSnellLinear.from_snell(layer))
    return model
