"""SNELL's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from snell.core.registry import TuningConfig
from snell.core.validation import check_probability, check_rank, check_targets
from snell.core.wrap import DEFAULT_TARGETS, NO_DROPOUT_TARGETS, check_qkv_layout

from .kernels import check_kernel_name, check_kernel_options
from .sparsify import check_rule, check_sparsity


@dataclass(frozen=True)
class SnellConfig(TuningConfig):
    """Sparse tuning with kernelized LoRA (Shen et al., NeurIPS 2024).

    rank: r of the factors A (in x r), B (out x r). kernel: a name from ``snell.list_kernels()``;
    kernel_options go to its constructor. sparsity: fraction of dW's entries zeroed, in [0, 1)
    (0 = kernelized LoRA without sparsification: the update is dW itself, as the public code's KLoRA).
    rule: 'public' (default, as the published numbers), 'eq5' or 'hard'. targets: globs over module
    names. qkv: how a fused ``qkv`` is adapted (``snell.core.wrap.QKV_LAYOUTS``): 'separate' (default: own
    factors, threshold and drop-path for q, k and v, as the public code's separate layers), 'shared_a'
    (one A; this suite's earlier layout) or 'fused' (one matrix, one threshold).
    dropout / drop_path: on the branch input / output, as the public code; no_dropout_targets: targets
    whose branch input is not dropped (the public code's attn.proj). train_cls_token: the public code
    trains the cls token too (ignored if the model has none). recompute: True (default) keeps no
    out x in tensor for backward; False runs plain autograd on W0 + S(dW), which keeps dW and its
    intermediates alive (the ablation that shows what the trick saves).
    """

    ablation_axes: ClassVar[tuple[str, ...]] = ("kernel", "rank", "sparsity")
    label_hidden: ClassVar[frozenset[str]] = TuningConfig.label_hidden | {"kernel", "sparsity"}
    """Kernel and sparsity are in the label's head (``snell-8 piecewise_linear s=0.9``)."""

    rank: int = 8
    kernel: str = "piecewise_linear"
    kernel_options: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.9
    rule: str = "public"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    qkv: str = "separate"
    dropout: float = 0.1
    no_dropout_targets: tuple[str, ...] = NO_DROPOUT_TARGETS
    drop_path: float = 0.1
    train_cls_token: bool = True
    recompute: bool = True

    def validate(self) -> None:
        check_rank(self.rank)
        check_kernel_name(self.kernel)
        check_kernel_options(self.kernel, self.kernel_options, self.rank)
        check_sparsity(self.sparsity)
        check_rule(self.rule)
        check_qkv_layout(self.qkv)
        check_probability("dropout", self.dropout)
        check_probability("drop_path", self.drop_path)
        check_targets(self.targets)

    def label_head(self) -> str:
        return f"{super().label_head()} {self.kernel} s={self.sparsity}"
