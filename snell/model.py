"""Apply SNELL to a model: find the target linear layers and wrap them with ``SnellLinear``."""

from __future__ import annotations

from torch import nn

from .config import SnellConfig
from .kernels import build_kernel
from .layer import SnellLinear
from .registry import Calibration, register_method
from .wrap import adapt_linears, qkv_groups


@register_method("snell", SnellConfig, "SNELL: sparse tuning with kernelized LoRA")
def apply_snell(model: nn.Module, cfg: SnellConfig, calibration: Calibration = None) -> SnellConfig:
    """Freeze the backbone and wrap every target linear layer with a SNELL update."""
    build_kernel(cfg.kernel, cfg.rank, **cfg.kernel_options)  # kernel-level checks (e.g. pieces | rank)
    adapt_linears(
        model,
        cfg,
        lambda name, layer, dropout: SnellLinear(
            layer,
            cfg.rank,
            build_kernel(cfg.kernel, cfg.rank, **cfg.kernel_options),
            cfg.sparsity,
            cfg.rule,
            groups=qkv_groups(name, layer, cfg.qkv),
            shared_a=cfg.qkv == "shared_a",
            dropout=dropout,
            drop_path=cfg.drop_path,
            recompute=cfg.recompute,
        ),
    )
    return cfg
