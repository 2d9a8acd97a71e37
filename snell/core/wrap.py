"""Find target linear layers by name pattern, wrap them with an adapter, and merge adapters back.

Shared by every method that adapts ``nn.Linear`` layers (LoRA, SNELL, SPT's structured part).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .families import head_module, trains_head
from .registry import end_tuning
from .validation import check_rank_fits

VISION_TARGETS = ("*attn.qkv", "*attn.q", "*attn.k", "*attn.v", "*attn.proj", "*mlp.fc1", "*mlp.fc2")
"""A timm ViT block's q, k, v (timm fuses them into ``qkv``), attention proj, fc1 and fc2."""

CAUSAL_LM_TARGETS = ("*q_proj", "*k_proj", "*v_proj", "*o_proj", "*gate_proj", "*up_proj", "*down_proj")
"""A LLaMA-family decoder layer's q, k, v, o projections and its MLP's gate, up and down projections (the
LLM-Adapters / DoRA convention; Mistral and Qwen2 use the same names)."""

DEFAULT_TARGETS = VISION_TARGETS + CAUSAL_LM_TARGETS
"""The standard targets of both families (``snell.core.families``): a model matches one family's names, and a
default pattern that matches nothing is no error."""


NO_DROPOUT_TARGETS = ("*attn.proj",)
"""Targets whose branch input is not dropped: the public code's blocks drop the input of the q, k, v,
fc1 and fc2 branches but feed attn.proj's branch its input as it is."""

QKV_LAYOUTS = {
    "separate": "q, k and v each get their own factors, threshold and drop-path (the public code's layout)",
    "shared_a": "one A for q, k and v; B, threshold and drop-path per q, k, v (timm's fused qkv as it is)",
    "fused": "qkv adapted as one matrix: one A, one B, one threshold, one drop-path",
}
"""How an adapter treats timm's fused ``qkv`` projection (other layers are always one adapter)."""


def check_qkv_layout(layout: str, allowed: Sequence[str] = tuple(QKV_LAYOUTS)) -> None:
    if layout not in allowed:
        raise ValueError(f"qkv={layout!r}; allowed: {', '.join(allowed)}")


def qkv_groups(name: str, layer: nn.Linear, layout: str) -> int:
    """3 for a fused qkv projection adapted as q, k and v (any layout but 'fused'), else 1."""
    fused_qkv = name.endswith("qkv") and layer.out_features % 3 == 0
    return 3 if fused_qkv and layout != "fused" else 1


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches any of the glob patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` (``self.base``) plus a trainable update defined by ``delta_weight``."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> Tensor:
        """The update added to ``base.weight`` at inference (out x in)."""
        raise NotImplementedError

    def tuned_entries(self) -> int:
        """Entries of this layer that training changes: its trainable parameters' (GPS: the selected
        entries of a weight that trains in place, plus the bias)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def adapter_tensors(self) -> dict[str, Tensor]:
        """What an adapter file holds for this layer (names relative to it): its trainable parameters and
        its own persistent buffers. Layers that train ``base.weight`` in place save less (GPS)."""
        state = self.state_dict()
        own = {n for n, _ in self.named_buffers() if not n.startswith("base.")}
        keys = {n for n, p in self.named_parameters() if p.requires_grad} | (own & set(state))
        return {k: state[k] for k in keys}

    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        """The inverse of ``adapter_tensors`` (shapes checked by the caller)."""
        self.load_state_dict(tensors, strict=False)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded in: no inference overhead."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        out.to(device=base.weight.device, dtype=base.weight.dtype).requires_grad_(base.weight.requires_grad)
        out.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out


class BranchDropout(nn.Dropout):
    """Dropout on an adapter branch's input that keeps a 1-byte mask for backward on every device.

    ``nn.Dropout`` on a CPU multiplies by a float noise tensor and keeps it (4 bytes per element), while
    CUDA's fused kernel keeps a bool mask; ``torch.native_dropout`` is that fused op on every device, so
    CPU runs and the CPU memory estimates save what a GPU run saves.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.native_dropout(x, self.p, True)[0] if self.training else x


def branch_dropout(p: float) -> nn.Module:
    """``BranchDropout(p)``, or an identity for p = 0 (so that code can test for 'no dropout')."""
    return BranchDropout(p) if p > 0 else nn.Identity()


class BranchDropPath(nn.Module):
    """Per-sample drop-path on an adapter branch's output (timm's ``drop_path``), with one draw per sample
    for each of ``groups`` equal blocks of the output features: q, k and v of a fused qkv are dropped
    independently, as the public code's three separate adapters are (masks drawn in q, k, v order).
    """

    def __init__(self, p: float, groups: int = 1) -> None:
        super().__init__()
        self.p, self.groups = p, groups

    def draw(self, samples: int) -> Tensor:
        """(samples, groups) draws, 1 = keep, on the CPU (where a batch split reads them without a device
        sync), in q, k, v order."""
        return torch.stack([torch.empty(samples).bernoulli_(1.0 - self.p) for _ in range(self.groups)], 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        scale = self.draw(x.shape[0]).to(x.device, x.dtype).div_(1.0 - self.p)
        return (
            x.unflatten(-1, (self.groups, -1)) * scale.view(x.shape[0], *[1] * (x.ndim - 2), self.groups, 1)
        ).flatten(-2)

    def extra_repr(self) -> str:
        return f"p={self.p}, groups={self.groups}"


def branch_drop_path(p: float, groups: int = 1) -> nn.Module:
    """``BranchDropPath(p, groups)``, or an identity for p = 0."""
    return BranchDropPath(p, groups) if p > 0 else nn.Identity()


def find_linear_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of ``nn.Linear`` modules matching any glob in ``patterns``.

    A default pattern may match nothing (timm models name q/k/v differently); a pattern the user gave
    that matches nothing is almost always a typo, so ``apply`` functions check that via
    ``check_patterns_match``.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n in linears if matches(n, patterns)]


def check_patterns_match(model: nn.Module, patterns: Sequence[str], *, defaults_may_miss: bool) -> list[str]:
    """Targets for ``patterns``; ValueError if none match, or if a non-default pattern matches nothing."""
    names = find_linear_targets(model, patterns)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [p for p in patterns if not any(matches(n, (p,)) for n in linears)]
    if not names or (unmatched and not defaults_may_miss):
        shown = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
        raise ValueError(
            f"target pattern(s) {unmatched or list(patterns)} match no nn.Linear module; "
            f"linear modules of this model include: {shown or '(none)'}"
        )
    return names


def targets_except_head(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The ``nn.Linear`` targets of ``patterns`` (``check_patterns_match``: a default pattern may match
    nothing), never the classifier head: what methods that choose among targets adapt (SPT, PEFT's)."""
    names = check_patterns_match(model, patterns, defaults_may_miss=tuple(patterns) == DEFAULT_TARGETS)
    head = head_module(model)
    return [n for n in names if model.get_submodule(n) is not head]


def replace_modules(model: nn.Module, names: Sequence[str], factory: Callable[[str, nn.Module], nn.Module]):
    """Replace each named submodule by ``factory(name, module)``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(name, getattr(parent, child)))


def is_foreign_adapter(module: nn.Module) -> bool:
    """A layer of another adapter library that folds itself in: ``merge()`` adds its update to its base
    layer's weight and ``get_base_layer()`` returns that layer (PEFT's ``BaseTunerLayer``; duck-typed, so
    snell does not import peft)."""
    return (
        not isinstance(module, AdaptedLinear)
        and callable(getattr(module, "merge", None))
        and callable(getattr(module, "get_base_layer", None))
    )


def merged_foreign(layer: nn.Module) -> nn.Module:
    """``layer``'s base layer with ``layer``'s update folded into its weight (in place)."""
    layer.merge()
    return layer.get_base_layer()


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its frozen weight, replacing it by a plain ``nn.Linear``. In place.

    Adapters are ours (``AdaptedLinear``) or another library's (``is_foreign_adapter``: PEFT's layers,
    replaced by their base layer after their own ``merge()``; a PEFT tuner that cannot merge raises
    PEFT's error). A model with no tuning method applied (or merged already) is an error; a method that
    trains the model's own weights (full, linear, bitfit) has nothing to fold, which a warning says.
    The result is a plain model (``end_tuning``): no tuning config, ``requires_grad`` as before tuning.
    """
    foreign = [n for n, m in model.named_modules() if n and is_foreign_adapter(m)]
    foreign = [n for n in foreign if not any(n.startswith(f"{outer}.") for outer in foreign)]  # outermost
    names = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    config = getattr(model, "tuning_config", None)
    if not names and not foreign and config is None:
        raise ValueError(
            "model has no adapter to merge: apply a method (snell.apply_method) or load one first"
        )
    if not names and not foreign:
        warnings.warn(
            f"nothing to merge: method {config.method!r} trains the model's own weights (or is merged)",
            stacklevel=2,
        )
    replace_modules(model, names, lambda _, m: m.merged())
    replace_modules(model, foreign, lambda _, m: merged_foreign(m))
    end_tuning(model)
    return model


def freeze_all_but_head(model: nn.Module, train_head: bool | None) -> None:
    """Freeze every parameter, then unfreeze the head if ``train_head`` (None: the family's default,
    ``snell.core.families.trains_head``) asks for it."""
    head = classifier(model) if trains_head(model, train_head) else None
    model.requires_grad_(False)
    if head is not None:
        head.requires_grad_(True)


def classifier(model: nn.Module) -> nn.Module:
    """The model's head (``snell.core.families.head_module``: timm's classifier or a causal LM's lm_head)."""
    head = head_module(model)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has neither get_classifier() (timm) nor an lm_head "
            "(get_output_embeddings(), transformers); pass train_head=False"
        )
    return head


def set_cls_token_trainable(model: nn.Module, train: bool) -> None:
    """Train the model's cls token too (the public SNELL code does), if asked and if it has one."""
    token = getattr(model, "cls_token", None)
    if train and isinstance(token, nn.Parameter):
        token.requires_grad_(True)


def adapt_linears(
    model: nn.Module, cfg: Any, make_layer: Callable[[str, nn.Linear, float], nn.Module]
) -> list[str]:
    """The apply step every low-rank adapter method shares, for a config with ``targets``, ``rank``,
    ``dropout``, ``no_dropout_targets``, ``train_head`` and ``train_cls_token``: find the target linear
    layers (a default pattern may match nothing), check that the rank fits each, freeze everything but
    the head (and the cls token if asked), then wrap each target with ``make_layer(name, layer,
    dropout)``, its branch dropout being 0 on ``no_dropout_targets``. Returns the names."""
    names = check_patterns_match(model, cfg.targets, defaults_may_miss=tuple(cfg.targets) == DEFAULT_TARGETS)
    check_rank_fits(model, names, cfg.rank)
    freeze_all_but_head(model, cfg.train_head)
    set_cls_token_trainable(model, cfg.train_cls_token)

    def wrap(name: str, layer: nn.Linear) -> nn.Module:
        return make_layer(name, layer, 0.0 if matches(name, cfg.no_dropout_targets) else cfg.dropout)

    replace_modules(model, names, wrap)
    return names
