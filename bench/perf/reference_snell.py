"""The straightforward SNELL of the public code, written only as the baseline of the performance comparison.

Layout of the public implementation (github ssfgunner/SNELL): one parallel branch per adapted matrix,
``y = x W0^T + drop_path(dropout(x) S(dW)^T)``; q, k and v are separate layers, each with its own branch,
threshold and drop-path, fed one dropped copy of the shared input. The threshold comes from
``torch.quantile`` (a full sort), the public sparsification rule applies for s > 0 and s = 0 is plain
kernelized LoRA (the update is dW), and each branch is wrapped in activation checkpointing so that dW is
not kept for backward (recomputed there, with the branch's matmul). Checkpointing is non-reentrant: the
reentrant default passes no gradient to the factors when the branch input does not require grad.

The layer holds the same ``base``, ``lora_A``, ``lora_B`` and kernel module as
``snell.tuners.snell.layer.SnellLinear``, so ``to_reference`` turns a SNELL model into this one sharing
its factors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from snell.core.wrap import AdaptedLinear, replace_modules
from snell.tuners.snell.layer import SnellLinear


class ReferenceSnellLinear(AdaptedLinear):
    """A frozen linear layer plus the public code's checkpointed SNELL branches (rule 'public' only)."""

    def __init__(self, layer: SnellLinear) -> None:
        if layer.rule != "public":
            raise ValueError(f"the reference implements the public rule only, not {layer.rule!r}")
        super().__init__(layer.base)
        # The SNELL layer's own factors, kernel and regularisers, under the same names.
        self.lora_A, self.lora_B, self.kernel = layer.lora_A, layer.lora_B, layer.kernel
        self.dropout, self.drop_path = layer.dropout, layer.drop_path
        self.sparsity, self.groups, self.factor_groups = layer.sparsity, layer.groups, layer.factor_groups

    def group_update(self, group: int) -> Tensor:
        """S(dW_k) of one q / k / v group (or of the whole matrix): dW_k * |dW_k| * 1[|dW_k| > t_k]."""
        a = self.lora_A.view(self.factor_groups, self.in_features, -1)[min(group, self.factor_groups - 1)]
        b = self.lora_B.view(self.groups, -1, self.lora_B.shape[1])[group]
        dw = self.kernel(a, b)
        if self.sparsity == 0:  # the public code's kernelized LoRA
            return dw
        magnitude = dw.detach().abs()
        t = torch.quantile(magnitude.flatten().float(), self.sparsity)
        return dw * magnitude * (magnitude > t)

    def delta_weight(self) -> Tensor:
        return torch.cat([self.group_update(k) for k in range(self.groups)])

    def _branch(self, x: Tensor, group: int) -> Tensor:
        return F.linear(x, self.group_update(group))

    def forward(self, x: Tensor) -> Tensor:
        dropped = self.dropout(x)
        branches = [checkpoint(self._branch, dropped, k, use_reentrant=False) for k in range(self.groups)]
        return self.base(x) + self.drop_path(torch.cat(branches, -1))


def to_reference(model: nn.Module) -> nn.Module:
    """Replace every ``SnellLinear`` of ``model`` by its reference form, in place (factors shared)."""
    names = [name for name, module in model.named_modules() if isinstance(module, SnellLinear)]
    replace_modules(model, names, lambda _, layer: ReferenceSnellLinear(layer))
    return model
