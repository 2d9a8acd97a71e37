"""Apply SNELL to a model: find the target linear layers and wrap them with ``SnellLinear``."""

from __future__ import annotations

from torch import nn

from snell.core.registry import Calibration, register_method
from snell.core.wrap import adapt_linears, qkv_groups

from .config import SnellConfig
from .kernels import Kernel, build_kernel, kernel_options
from .layer import SnellLinear


def layer_kernel(cfg: SnellConfig, factor_groups: int) -> Kernel:
    """The config's kernel for one layer; kernels with per-group parameters (a ``groups`` option) get one
    set for each of the layer's ``factor_groups`` (q, k and v apart)."""
    options = dict(cfg.kernel_options)
    if "groups" in kernel_options(cfg.kernel):
        options["groups"] = factor_groups
    return build_kernel(cfg.kernel, cfg.rank, **options)


def wrap_snell(model: nn.Module, cfg: SnellConfig) -> dict[str, SnellLinear]:
    """Freeze the backbone and wrap every target linear layer with a SNELL update; the wrapped layers."""
    layer_kernel(cfg, 1)  # kernel-level checks (e.g. pieces | rank) before anything changes

    def make(name: str, layer: nn.Linear, dropout: float) -> SnellLinear:
        groups = qkv_groups(name, layer, cfg.qkv)
        shared_a = cfg.qkv == "shared_a"
        return SnellLinear(
            layer,
            cfg.rank,
            layer_kernel(cfg, 1 if shared_a else groups),
            cfg.sparsity,
            cfg.rule,
            groups=groups,
            shared_a=shared_a,
            dropout=dropout,
            drop_path=cfg.drop_path,
            recompute=cfg.recompute,
        )

    return {name: model.get_submodule(name) for name in adapt_linears(model, cfg, make)}


@register_method("snell", SnellConfig, "SNELL: sparse tuning with kernelized LoRA")
def apply_snell(model: nn.Module, cfg: SnellConfig, calibration: Calibration = None) -> SnellConfig:
    """Freeze the backbone and wrap every target linear layer with a SNELL update."""
    wrap_snell(model, cfg)
    return cfg
