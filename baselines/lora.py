"""LoRA (Hu et al., 2021): y = x W0^T + drop_path((alpha / r) * dropout(x) A^T B^T), A kaiming-uniform,
B zeros; drop-path on the branch (per sample, per q/k/v) is the public SNELL code's LoRA (``TuningModule
('lora')``), off by default."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from snell.core.registry import Calibration, TuningConfig, register_method
from snell.core.validation import check_probability, check_rank, check_targets
from snell.core.wrap import (
    DEFAULT_TARGETS,
    NO_DROPOUT_TARGETS,
    AdaptedLinear,
    adapt_linears,
    branch_drop_path,
    branch_dropout,
    check_qkv_layout,
    qkv_groups,
)


class LoraLinear(AdaptedLinear):
    """A frozen linear layer plus a low-rank parallel branch (PEFT's layout: A is r x in, B is out x r).

    ``groups`` > 1 splits the output rows into blocks with their own A (q, k and v of a fused qkv, as
    the public SNELL code's separate layers): ``lora_A`` stacks them (groups r x in), and block k of the
    output is B_k A_k x. With one group this is PEFT's LoRA exactly.

    ``drop_path`` > 0 drops the branch's output per sample (``snell.core.wrap.BranchDropPath``, scaled by
    1 / (1 - p) when kept), with one draw per sample for each of ``drop_path_groups`` blocks of output
    rows (default ``groups``; 3 on a fused qkv: q, k and v apart), after the branch's input dropout: the
    public code's ``drop_path(lora(dropout(x)))``, draws in the same order.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float,
        groups: int = 1,
        drop_path: float = 0.0,
        drop_path_groups: int | None = None,
    ) -> None:
        super().__init__(base)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.groups = groups
        self.lora_A = nn.Parameter(torch.empty(groups * rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan-in = in_features, per group too
        self.scaling = alpha / rank
        self.dropout = branch_dropout(dropout)
        self.drop_path = branch_drop_path(drop_path, groups if drop_path_groups is None else drop_path_groups)

    def _b_matrix(self) -> Tensor:
        """B as one (out x groups r) matrix: block diagonal over the groups, so that one matmul maps the
        stacked A's hidden units to the output (exact: the off-diagonal zeros add nothing)."""
        if self.groups == 1:
            return self.lora_B
        return torch.block_diag(*self.lora_B.view(self.groups, -1, self.lora_B.shape[1]).unbind())

    def delta_weight(self) -> Tensor:
        return (self._b_matrix() @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        frozen = self.base(x)  # first, as before drop-path existed: the step's peak depends on the order
        return frozen + self.drop_path((self.dropout(x) @ self.lora_A.T @ self._b_matrix().T) * self.scaling)


@dataclass(frozen=True)
class LoraConfig(TuningConfig):
    """rank r, alpha (scaling alpha / r; alpha = r gives scaling 1), branch dropout and drop-path, target
    globs.

    qkv: 'separate' (own A for q, k and v, as SNELL's default and the public code's layers) or
    'shared_a' (one A on timm's fused qkv: PEFT's LoRA on a timm ViT). Dropout, the targets whose input
    is not dropped and cls-token training default to SNELL's settings so that comparisons are like for
    like. ``drop_path``: per-sample drop-path on the branch's output (q, k and v drawn apart, as SNELL's);
    the public code's LoRA uses 0.1 (what the paper presets and the paper-setting method presets set),
    the default is 0 (PEFT's LoRA has none, and the default benchmark's records were run without).
    """

    ablation_axes: ClassVar[tuple[str, ...]] = ("rank",)

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.1
    drop_path: float = 0.0
    no_dropout_targets: tuple[str, ...] = NO_DROPOUT_TARGETS
    targets: tuple[str, ...] = DEFAULT_TARGETS
    qkv: str = "separate"
    train_cls_token: bool = True

    def validate(self) -> None:
        check_rank(self.rank)
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} must be > 0 (the update is scaled by alpha / rank)")
        check_probability("dropout", self.dropout)
        check_probability("drop_path", self.drop_path)
        check_qkv_layout(self.qkv, ("separate", "shared_a"))
        check_targets(self.targets)


@register_method("lora", LoraConfig, "LoRA: low-rank parallel branch")
def apply_lora(model: nn.Module, cfg: LoraConfig, calibration: Calibration = None) -> LoraConfig:
    one_a = cfg.qkv == "shared_a"  # one A on the fused qkv: plain LoRA on it
    adapt_linears(
        model,
        cfg,
        lambda name, layer, dropout: LoraLinear(
            layer,
            cfg.rank,
            cfg.alpha,
            dropout,
            groups=1 if one_a else qkv_groups(name, layer, cfg.qkv),
            drop_path=cfg.drop_path,
            drop_path_groups=qkv_groups(name, layer, cfg.qkv),  # q, k and v apart in both layouts
        ),
    )
    return cfg
