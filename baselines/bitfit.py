"""BitFit: tune only the bias terms (and the head)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from snell.core.registry import Calibration, TuningConfig, register_method
from snell.core.wrap import freeze_all_but_head


@dataclass(frozen=True)
class BitFitConfig(TuningConfig):
    """No options: every bias vector and the head train."""


@register_method("bitfit", BitFitConfig, "BitFit: biases and head")
def apply_bitfit(model: nn.Module, cfg: BitFitConfig, calibration: Calibration = None) -> BitFitConfig:
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if not biases:
        raise ValueError(f"{type(model).__name__} has no bias parameters; BitFit has nothing to tune")
    freeze_all_but_head(model, cfg.train_head)
    for p in biases:
        p.requires_grad_(True)
    return cfg
