"""GPS (Zhang et al., CVPR 2024): gradient-based parameter selection, the SNELL paper's sparse-tuning
baseline of its memory figure.

1. Selection: the gradients of every target weight matrix summed (signed) over the calibration batches;
   for each output neuron (row of W, out x in) the ``k`` input connections of largest |sum| are selected.
2. Training: the weight matrices themselves are trained, full size, with their gradients masked to the
   selected entries (``GpsLinear``). So every adapted matrix keeps a full-size gradient and full-size
   optimizer state: the memory cost the SNELL paper compares against. Biases and the head train fully;
   norms, position embedding and cls token stay frozen. The weights are excluded from weight decay
   (the public scripts use Adam with decay 0), so unselected entries stay exactly pretrained.

Deliberate differences from the public code (FightingFighting/GPS), each an option where it matters:
selection in eval mode (the code's train mode with drop-path 0 is the same on a ViT), cross-entropy by
default (``loss="supcon"``: its supervised-contrastive loss, one view per image instead of two), only
``nn.Linear`` targets (the code also selects in the patch-embedding convolution), and ``mask``: a bool
mask of every weight ("bool", the default: one byte per entry, masked by one ``torch.where``), where the
code keeps a float32 mask ("float32": 4 bytes per entry, the layout whose memory the SNELL paper reports)
or only the selected indices ("indices": no mask; a gather and a scatter into a fresh zero gradient per
step). All three train the same entries to the same values; only memory and kernels differ. The default
is ours, as SNELL's is (``snell/tuners/snell/layer.py``): each method in its leanest standard layout by
default, the
public code's layout as an option, so that memory comparisons are not skewed by one method's overheads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snell.core.calibration import LOSSES, gradient_sums
from snell.core.families import trains_head
from snell.core.registry import Calibration, TuningConfig, exclude_from_weight_decay, register_method
from snell.core.validation import check_targets
from snell.core.wrap import (
    DEFAULT_TARGETS,
    AdaptedLinear,
    check_patterns_match,
    classifier,
    freeze_all_but_head,
    replace_modules,
)

MASKS = ("float32", "bool", "indices")


class _MaskedGradient(torch.autograd.Function):
    """The weight itself in forward; in backward its gradient zeroed outside the selected entries."""

    @staticmethod
    def forward(ctx, weight: Tensor, layer: GpsLinear) -> Tensor:
        ctx.layer = layer
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.layer.mask_gradient(grad), None


class GpsLinear(AdaptedLinear):
    """A linear layer whose weight trains in place, its gradient masked to ``indices`` ((out, k) input
    positions per row, a persistent buffer) by a mask of ``mask`` kind. ``pretrained`` holds the selected
    entries' pretrained values (out x k): the update is their difference, and the adapter file holds
    only the selected entries."""

    def __init__(self, base: nn.Linear, indices: Tensor, mask: str = "bool") -> None:
        super().__init__(base)
        base.weight.requires_grad_(True)
        exclude_from_weight_decay(base.weight)
        self.mask_kind = mask
        self.register_buffer("indices", indices.to(base.weight.device, torch.int64))
        self.register_buffer("pretrained", base.weight.detach().gather(1, self.indices))
        self.register_buffer("mask", None, persistent=False)
        self._build_mask()

    def _build_mask(self) -> None:
        if self.mask_kind == "indices":
            return
        dtype = torch.bool if self.mask_kind == "bool" else torch.float32
        mask = torch.zeros_like(self.base.weight, dtype=dtype)
        self.mask = mask.scatter_(1, self.indices, torch.ones_like(self.indices, dtype=dtype))

    def mask_gradient(self, grad: Tensor) -> Tensor:
        """``grad`` with every entry outside the selection zeroed (a fresh tensor)."""
        if self.mask is None:
            return torch.zeros_like(grad).scatter_(1, self.indices, grad.gather(1, self.indices))
        keep = self.mask if self.mask.dtype == torch.bool else self.mask != 0
        return torch.where(keep, grad, 0)

    def values(self) -> Tensor:
        """The selected entries of the weight (out x k)."""
        return self.base.weight.detach().gather(1, self.indices)

    def delta_weight(self) -> Tensor:
        delta = self.values() - self.pretrained
        return torch.zeros_like(self.base.weight).scatter_(1, self.indices, delta)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The trained layer as a plain ``nn.Linear`` (its weight already holds the update)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        out.to(device=base.weight.device, dtype=base.weight.dtype)
        out.load_state_dict(base.state_dict())
        return out

    def tuned_entries(self) -> int:
        bias = self.base.bias is not None and self.base.bias.requires_grad
        return self.indices.numel() + (self.base.bias.numel() if bias else 0)

    def adapter_tensors(self) -> dict[str, Tensor]:
        tensors = {"indices": self.indices, "pretrained": self.pretrained, "values": self.values()}
        if self.base.bias is not None and self.base.bias.requires_grad:
            tensors["base.bias"] = self.base.bias
        return tensors

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.indices.copy_(tensors["indices"])
        self.pretrained.copy_(tensors["pretrained"])
        self.base.weight.scatter_(1, self.indices, tensors["values"].to(self.base.weight.dtype))
        if "base.bias" in tensors:
            self.base.bias.copy_(tensors["base.bias"])
        self._build_mask()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _MaskedGradient.apply(self.base.weight, self), self.base.bias)

    def extra_repr(self) -> str:
        return f"k={self.indices.shape[1]}, mask={self.mask_kind}"


@dataclass(frozen=True)
class GpsConfig(TuningConfig):
    """GPS options.

    k: input connections selected per output neuron (the public scripts: 1 on most VTAB tasks, 2 on
    patch_camelyon; FGVC cub 2, nabirds 20, flowers 1, cars 15, dogs 1). loss: of the selection pass,
    'cross_entropy' or 'supcon' (the code's supervised-contrastive variant, see ``snell.core.calibration``).
    calibration_batches: batches summed for selection (None: every batch given, as the code's one pass
    over the training set). targets: globs over nn.Linear names. train_bias: every bias outside the norms
    trains. mask: 'bool' (1 byte per weight entry), 'float32' (the code's, 4 bytes) or 'indices' (module doc).
    selected: set by apply (do not set by hand); with it, apply rebuilds the layout with placeholder
    selections, which ``load_adapter`` then fills in, and needs no calibration.
    """

    label_hidden: ClassVar[frozenset[str]] = TuningConfig.label_hidden | {"calibration_batches"}

    k: int = 1
    loss: str = "cross_entropy"
    calibration_batches: int | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    train_bias: bool = True
    mask: str = "bool"
    selected: bool = False

    def validate(self) -> None:
        if isinstance(self.k, bool) or not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"k={self.k!r} must be an integer >= 1 (connections per output neuron)")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; allowed: {', '.join(LOSSES)}")
        if self.calibration_batches is not None and (
            isinstance(self.calibration_batches, bool)
            or not (isinstance(self.calibration_batches, int) and self.calibration_batches >= 1)
        ):
            raise ValueError(
                f"calibration_batches={self.calibration_batches!r} must be None or an integer >= 1"
            )
        if self.mask not in MASKS:
            raise ValueError(f"mask={self.mask!r}; allowed: {', '.join(MASKS)}")
        check_targets(self.targets)

    def without_data(self, model: nn.Module) -> GpsConfig:
        """Placeholder selections: the same shapes, so the same memory, as selected ones."""
        return dataclasses.replace(self, selected=True)


def select(scores: Tensor, k: int) -> Tensor:
    """Per row, the positions of the ``k`` largest |scores| in ascending order: (rows, k) int64."""
    return scores.abs().topk(k, dim=1).indices.sort(dim=1).values


def trains_as_bias(name: str, param: nn.Parameter) -> bool:
    """Biases outside the norms (GPS trains them fully; the norms stay frozen)."""
    return param.ndim == 1 and name.endswith("bias") and "norm" not in name


@register_method("gps", GpsConfig, "GPS: gradient-based parameter selection (top-k inputs per neuron)")
def apply_gps(model: nn.Module, cfg: GpsConfig, calibration: Calibration = None) -> GpsConfig:
    """Select on ``calibration`` (or, with ``cfg.selected``, lay out placeholders for loading)."""
    head = classifier(model) if trains_head(model, cfg.train_head) else None
    targets = check_patterns_match(model, cfg.targets, defaults_may_miss=cfg.targets == DEFAULT_TARGETS)
    layers = {n: model.get_submodule(n) for n in targets if model.get_submodule(n) is not head}
    narrow = {n: m.in_features for n, m in layers.items() if m.in_features < cfg.k}
    if narrow:
        name, width = next(iter(narrow.items()))
        raise ValueError(
            f"k={cfg.k} exceeds the {width} inputs of {name}; allowed: 1 ... {min(narrow.values())}"
        )
    if cfg.selected:
        indices = {n: torch.zeros(m.out_features, cfg.k, dtype=torch.int64) for n, m in layers.items()}
    elif calibration is None:
        raise ValueError(
            "gps needs calibration batches (an iterable of (images, labels)) to select its entries: pass "
            "calibration=... to apply_method, or a config with selected=True (what load_adapter does)"
        )
    else:
        weights = {n: m.weight for n, m in layers.items()}
        sums = gradient_sums(
            model, weights, calibration, cfg.calibration_batches, square=False,
            loss_fn=LOSSES[cfg.loss], method="gps",
        )  # fmt: skip
        indices = {n: select(s, cfg.k) for n, s in sums.items()}
    freeze_all_but_head(model, cfg.train_head)
    replace_modules(model, list(layers), lambda name, layer: GpsLinear(layer, indices[name], cfg.mask))
    if cfg.train_bias:
        for name, param in model.named_parameters():
            if trains_as_bias(name, param):
                param.requires_grad_(True)
    return dataclasses.replace(cfg, selected=True)
