"""Checks shared by every tuning method's config and apply function (neutral: no method imports here).

Each raises ValueError naming the bad value and what is allowed, before a model is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


def check_rank(rank: Any) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an integer >= 1")


def check_probability(name: str, value: Any) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
        raise ValueError(f"{name}={value!r} must be a number in [0, 1)")


def check_targets(targets: Sequence[str]) -> None:
    if not targets:
        raise ValueError("targets must name at least one module pattern")


def check_rank_fits(model: nn.Module, names: list[str], rank: int) -> None:
    """A rank above min(in, out) of a target gives no low-rank saving: reject it, naming the layer."""
    for name in names:
        layer = model.get_submodule(name)
        limit = min(layer.in_features, layer.out_features)
        if rank > limit:
            raise ValueError(
                f"rank={rank} exceeds min(in, out)={limit} of layer {name!r}; use rank <= {limit}"
            )
