"""Apply SNELL to a model: find the target linear layers and wrap them with ``SnellLinear``."""

from __future__ import annotations

from torch import nn

from .config import SnellConfig
from .kernels import build_kernel
from .layer import SnellLinear
from .registry import Calibration, register_method
from .wrap import (
    DEFAULT_TARGETS,
    check_patterns_match,
    freeze_all_but_head,
    matches,
    qkv_groups,
    replace_modules,
)


def check_rank_fits(model: nn.Module, names: list[str], rank: int) -> None:
    """A rank above min(in, out) of a target gives no low-rank saving: reject it, naming the layer."""
    for name in names:
        layer = model.get_submodule(name)
        limit = min(layer.in_features, layer.out_features)
        if rank > limit:
            raise ValueError(
                f"rank={rank} exceeds min(in, out)={limit} of layer {name!r}; use rank <= {limit}"
            )


def set_cls_token_trainable(model: nn.Module, train: bool) -> None:
    token = getattr(model, "cls_token", None)
    if train and isinstance(token, nn.Parameter):
        token.requires_grad_(True)


@register_method("snell", SnellConfig, "SNELL: sparse tuning with kernelized LoRA")
def apply_snell(model: nn.Module, cfg: SnellConfig, calibration: Calibration = None) -> SnellConfig:
    """Freeze the backbone and wrap every target linear layer with a SNELL update."""
    names = check_patterns_match(model, cfg.targets, defaults_may_miss=cfg.targets == DEFAULT_TARGETS)
    check_rank_fits(model, names, cfg.rank)
    build_kernel(cfg.kernel, cfg.rank, **cfg.kernel_options)  # kernel-level checks (e.g. pieces | rank)
    freeze_all_but_head(model, cfg.train_head)
    set_cls_token_trainable(model, cfg.train_cls_token)
    replace_modules(
        model,
        names,
        lambda name, layer: SnellLinear(
            layer,
            cfg.rank,
            build_kernel(cfg.kernel, cfg.rank, **cfg.kernel_options),
            cfg.sparsity,
            cfg.rule,
            groups=qkv_groups(name, layer, cfg.qkv),
            shared_a=cfg.qkv == "shared_a",
            dropout=0.0 if matches(name, cfg.no_dropout_targets) else cfg.dropout,
            drop_path=cfg.drop_path,
            recompute=cfg.recompute,
        ),
    )
    return cfg
