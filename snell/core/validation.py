"""Checks shared by every tuning method's config and apply function (neutral: no method imports here).

Each raises ValueError naming the bad value and what is allowed, before a model is touched.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
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


_KIND_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
}


def _simple_kinds(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows (bool, int, float, str, None and unions of them), or None
    for anything richer (containers, Any), which is left to the config's own checks."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
    return tuple(args) if all(a in _KIND_WORDS for a in args) else None


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def field_type_problems(config: Any) -> list[str]:
    """One line per dataclass field of ``config`` whose value is not of its declared plain type (``"no"``
    for a bool, ``true`` for an int, ``"sixteen"`` for a float) or is a NaN or infinite number."""
    try:
        hints = typing.get_type_hints(type(config))
    except NameError:  # an annotation only importable for type checkers: nothing to check against
        return []
    problems = []
    for field in dataclasses.fields(config):
        kinds = _simple_kinds(hints.get(field.name))
        value = getattr(config, field.name)
        if kinds is None:
            continue
        if not any(_is_kind(value, kind) for kind in kinds):
            problems.append(f"{field.name}={value!r} must be {' or '.join(_KIND_WORDS[k] for k in kinds)}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{field.name}={value!r} must be a finite number")
    return problems
