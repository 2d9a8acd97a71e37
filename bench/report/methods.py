"""What reports ask the tuning methods about themselves (``snell.TuningConfig``'s class attributes and
hooks), by method name: a run's family, the ablation axes a method exposes, whether it changes the
backbone. Tables, figures and the results page share these; none compares a method's name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

import snell


def _described(method: str) -> type[snell.TuningConfig] | None:
    """The config class that describes ``method``; None for one no longer registered (records outlive
    methods), which is a family of its own, exposes no ablation axes and changes the backbone."""
    return snell.config_class(method) if method in snell.list_methods() else None


def method_family(method: str, options: Mapping[str, Any]) -> str:
    """A run's family for colours and legends, from its method config's options: the config's
    (``snell.TuningConfig.family``: its method, and for PEFT its tuner, ``peft-dora``)."""
    described = _described(method)
    return method if described is None else described.family(options)


def exposes(methods: pd.Series, axes: Iterable[str]) -> pd.Series:
    """Whether each of ``methods`` exposes every one of ``axes`` (``snell.TuningConfig.ablation_axes``):
    the runs an ablation over them compares."""
    axes = set(axes)
    return methods.map(lambda m: axes <= set(ablation_axes(m))).astype(bool)


def ablation_axes(method: str) -> tuple[str, ...]:
    """The options along which reports compare runs of ``method`` (``snell.TuningConfig.ablation_axes``)."""
    described = _described(method)
    return () if described is None else described.ablation_axes


def keeps_backbone(methods: pd.Series) -> pd.Series:
    """Whether each of ``methods`` leaves the backbone's features as pretrained
    (``snell.TuningConfig.changes_backbone`` False: the linear probe)."""
    return methods.map(lambda m: (d := _described(m)) is not None and not d.changes_backbone).astype(bool)


ABLATION_AXES = ("kernel", "rank", "sparsity")
"""The options that the kernel, sparsity and rank figures (and tables) vary or fix: they show the runs of
the methods that expose all three (``exposes``: SNELL)."""
