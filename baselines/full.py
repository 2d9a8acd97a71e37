"""Full fine-tuning: every parameter trainable (the reference row of every table)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from snell.core.registry import Calibration, TuningConfig, register_method


@dataclass(frozen=True)
class FullConfig(TuningConfig):
    """No options: everything trains."""


@register_method("full", FullConfig, "full fine-tuning: all parameters trainable")
def apply_full(model: nn.Module, cfg: FullConfig, calibration: Calibration = None) -> FullConfig:
    model.requires_grad_(True)
    return cfg
