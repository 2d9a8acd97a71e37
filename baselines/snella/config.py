"""SNELLA's and MixK's configurations: SNELL's options with SNELLA's kernel and allocator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from snell.core.registry import TuningConfig
from snell.core.validation import check_probability
from snell.tuners.snell.config import SnellConfig


@dataclass(frozen=True)
class SnellaConfig(SnellConfig):
    """SNELLA (Shen et al., 2025, "Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition").

    SNELL's options (``snell.tuners.snell.config.SnellConfig``) with the piecewise-softmax kernel, plus the
    layer-level allocator (``baselines.snella.allocator``): ``sparsity`` is the initial ratio of every
    matrix (the code's init_thres; released 0.01 on VTAB, 0 on FGVC), ``target_sparsity`` the overall
    ratio the cubic schedule reaches (the code's target_ratio; None: no allocator, every matrix keeps
    ``sparsity``), ``beta1`` / ``beta2`` the smoothing of importance and uncertainty. Unlike SNELL, a
    ratio of 0 still thresholds (at the smallest |dW|), as the public SNELLA does.
    """

    ablation_axes: ClassVar[tuple[str, ...]] = ("rank",)
    """Its kernel is the method's own and its sparsity only where the allocator starts: its rows are no
    point of SNELL's kernel or sparsity ablations."""
    label_head = TuningConfig.label_head
    """``snella-32 target_sparsity=0.8``: the rank alone heads the label (kernel and sparsity, hidden as in
    SNELL's, are not spelled: the kernel is the method's own, the sparsity the allocator's start)."""

    kernel: str = "piecewise_softmax"
    sparsity: float = 0.01
    target_sparsity: float | None = 0.8
    beta1: float = 0.85
    beta2: float = 0.85

    def validate(self) -> None:
        super().validate()
        target = self.target_sparsity
        if target is not None and not (isinstance(target, int | float) and 0.0 <= target < 1.0):
            raise ValueError(f"target_sparsity={target!r} must be None or a number in [0, 1)")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check_probability(name, value)
            if value == 0:
                raise ValueError(f"{name}=0 must be in (0, 1) (the allocator's smoothing)")
        if self.qkv == "shared_a":
            raise ValueError("qkv='shared_a' is not supported by snella; allowed: separate, fused")


@dataclass(frozen=True)
class MixkConfig(SnellConfig):
    """MixK: the SNELLA kernel with no sparsification (the public code's ``tuning_model=mixk``, used on
    caltech101 and svhn); SNELL's options otherwise."""

    ablation_axes: ClassVar[tuple[str, ...]] = ("rank",)
    label_head = TuningConfig.label_head

    kernel: str = "piecewise_softmax"
    sparsity: float = 0.0
