"""Apply SNELLA (SNELL layers with the piecewise-softmax kernel and the sparsity allocator) or MixK."""

from __future__ import annotations

from torch import nn

from snell.core.registry import Calibration, register_method
from snell.tuners.snell.model import wrap_snell

from .allocator import SparsityAllocator
from .config import MixkConfig, SnellaConfig

ALLOCATOR = "snella_allocator"
"""The name of the allocator module added to the model (a ``snell.TrainingCallback``)."""


@register_method("snella", SnellaConfig, "SNELLA: kernelized sparse tuning with bi-level competition")
def apply_snella(model: nn.Module, cfg: SnellaConfig, calibration: Calibration = None) -> SnellaConfig:
    """SNELL layers with ``cfg.kernel``; with a target sparsity, an allocator that the training loop
    calls (``snell.training_callbacks``) to move sparsity between matrices at every epoch."""
    layers = wrap_snell(model, cfg)
    if cfg.target_sparsity is None:  # fixed ratios, thresholded even at 0 (as the public SNELLA)
        for layer in layers.values():
            layer.sparsity = (cfg.sparsity,) * layer.groups
    else:
        allocator = SparsityAllocator(layers, cfg.sparsity, cfg.target_sparsity, cfg.beta1, cfg.beta2)
        model.add_module(ALLOCATOR, allocator)
    return cfg


@register_method("mixk", MixkConfig, "MixK: SNELLA's kernel, no sparsification")
def apply_mixk(model: nn.Module, cfg: MixkConfig, calibration: Calibration = None) -> MixkConfig:
    """SNELL layers with the piecewise-softmax kernel at the config's (default 0) sparsity."""
    wrap_snell(model, cfg)
    return cfg
