"""LoRA (Hu et al., 2021): y = x W0^T + (alpha / r) * dropout(x) A^T B^T, A kaiming-uniform, B zeros."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from snell.config import check_probability, check_rank
from snell.model import check_rank_fits, set_cls_token_trainable
from snell.registry import Calibration, TuningConfig, register_method
from snell.wrap import (
    DEFAULT_TARGETS,
    AdaptedLinear,
    branch_dropout,
    check_patterns_match,
    freeze_all_but_head,
    replace_modules,
)


class LoraLinear(AdaptedLinear):
    """A frozen linear layer plus a low-rank parallel branch (PEFT's layout: A is r x in, B is out x r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = branch_dropout(dropout)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


@dataclass(frozen=True)
class LoraConfig(TuningConfig):
    """rank r, alpha (scaling alpha / r; alpha = r gives scaling 1), branch dropout, target globs.

    Dropout and cls-token training default to SNELL's settings so that comparisons are like for like.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    train_cls_token: bool = True

    def validate(self) -> None:
        check_rank(self.rank)
        check_probability("dropout", self.dropout)
        if not self.targets:
            raise ValueError("targets must name at least one module pattern")


@register_method("lora", LoraConfig, "LoRA: low-rank parallel branch")
def apply_lora(model: nn.Module, cfg: LoraConfig, calibration: Calibration = None) -> LoraConfig:
    names = check_patterns_match(model, cfg.targets, defaults_may_miss=cfg.targets == DEFAULT_TARGETS)
    check_rank_fits(model, names, cfg.rank)
    freeze_all_but_head(model, cfg.train_head)
    set_cls_token_trainable(model, cfg.train_cls_token)
    replace_modules(model, names, lambda _, layer: LoraLinear(layer, cfg.rank, cfg.alpha, cfg.dropout))
    return cfg
