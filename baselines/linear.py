"""Linear probing: only the classification head trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from snell.core.registry import Calibration, TuningConfig, register_method
from snell.core.wrap import freeze_all_but_head


@dataclass(frozen=True)
class LinearProbeConfig(TuningConfig):
    """No options: the backbone is frozen, the head trains."""

    changes_backbone: ClassVar[bool] = False

    def validate(self) -> None:
        if self.train_head is False:
            raise ValueError(
                "train_head=False leaves a linear probe with nothing to train; allowed: True or None"
            )


@register_method("linear", LinearProbeConfig, "linear probe: head only")
def apply_linear(
    model: nn.Module, cfg: LinearProbeConfig, calibration: Calibration = None
) -> LinearProbeConfig:
    freeze_all_but_head(model, True)
    return cfg
