"""The variants that the step benchmark and the GPU check time side by side: a named method preset,
optionally in the public code's layout, with its branch regularisation named for the tables."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import snell
from bench.methods import preset_config
from bench.perf.reference_snell import to_reference


@dataclass(frozen=True)
class Variant:
    """One row of a speed table."""

    name: str
    preset: str
    """A label of ``bench.methods.METHOD_PRESETS``."""
    branch: str
    """The branch regularisation: 'off' or 'paper' (dropout 0.1, SNELL drop-path 0.1)."""
    reference: bool = False
    """Run SNELL in the public code's layout (``bench.perf.reference_snell``), same factors."""
    floor: str | None = None
    """The step benchmark's matmul floor: the preset (LoRA) step plus the extra dense matmuls an exact
    SNELL step of this preset needs."""


def apply_variant(model: nn.Module, variant: Variant) -> nn.Module:
    """Tune ``model`` in place by the variant's preset (converted to the public code's layout if asked)."""
    snell.apply_method(model, preset_config(variant.preset))
    if variant.reference:
        to_reference(model)
    return model
