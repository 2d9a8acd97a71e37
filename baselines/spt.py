"""SPT-LoRA (He et al., ICCV 2023): tune where the loss is sensitive, structured where it pays.

1. Sensitivity of every tunable entry: sum over calibration batches of grad**2 of the cross-entropy loss.
2. Global ranking of the entries against a parameter budget (see ``allocate``).
3. A target matrix with many selected entries (>= LoRA params / alpha) gets a rank-r LoRA; one with few
   gets exactly its selected entries tuned (``SparseDeltaLinear``, or ``MaskedDeltaLinear`` for the
   memory ablation). A bias / norm vector with >= dim / beta selected entries is tuned fully.

The resolved selection is recorded in the config's ``plan`` (which matrix is LoRA, how many entries the
others tune, which vectors train); the indices themselves are persistent buffers saved with the adapter,
so ``load_adapter`` rebuilds the model without calibration data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snell.core.calibration import gradient_sums
from snell.core.families import head_module
from snell.core.registry import Calibration, TuningConfig, register_method
from snell.core.validation import check_probability, check_rank, check_rank_fits, check_targets
from snell.core.wrap import (
    DEFAULT_TARGETS,
    AdaptedLinear,
    freeze_all_but_head,
    replace_modules,
    set_cls_token_trainable,
    targets_except_head,
)

from .lora import LoraLinear

MODES = ("index", "grad_mask")
EMBEDDINGS = ("cls_token", "reg_token", "pos_embed", "patch_embed")
"""Parameter-name parts SPT never tunes (besides the head, which trains anyway)."""


def _scatter(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """A zero matrix shaped like ``weight`` with ``values`` at the flat ``indices``."""
    return values.new_zeros(weight.numel()).scatter(0, indices, values).view_as(weight)


class _SparseDeltaLinearFn(torch.autograd.Function):
    """y = x (W0 + dW)^T + b with dW = scatter(values); backward rebuilds dW instead of saving it, so
    the unstructured layers keep no weight-sized tensor alive between forward and backward."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, values: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, weight, indices, values)
        return F.linear(x, weight + _scatter(weight, indices, values), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, indices, values = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            full = weight + _scatter(weight, indices, values)
            grad_x = (grad @ full.to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.flatten(0, -2).sum(0)
        if ctx.needs_input_grad[4]:
            grad_weight = grad.flatten(0, -2).T @ x.flatten(0, -2).to(grad.dtype)
            grad_values = grad_weight.flatten()[indices].to(values.dtype)
        return grad_x, None, grad_bias, None, grad_values


class SparseDeltaLinear(AdaptedLinear):
    """A frozen linear layer whose selected weight entries are tuned: a sorted int64 index buffer (flat
    positions in the out x in weight) and a trainable value vector, zero at init."""

    def __init__(self, base: nn.Linear, indices: Tensor) -> None:
        super().__init__(base)
        self.register_buffer("indices", indices.to(base.weight.device, torch.int64))
        self.values = nn.Parameter(
            torch.zeros(indices.numel(), device=base.weight.device, dtype=base.weight.dtype)
        )

    def delta_weight(self) -> Tensor:
        return _scatter(self.base.weight, self.indices, self.values)

    def forward(self, x: Tensor) -> Tensor:
        return _SparseDeltaLinearFn.apply(x, self.base.weight, self.base.bias, self.indices, self.values)


class MaskedDeltaLinear(AdaptedLinear):
    """The masked-gradient form of ``SparseDeltaLinear`` (SPT's other implementation, for the memory
    ablation): a full-size trainable update, multiplied by a boolean mask buffer in forward so that
    only the selected entries get gradient. It costs full-size gradients and optimizer state.

    The update lives in its own zero-initialised parameter rather than in the base weight: unselected
    entries get zero gradient, so AdamW leaves them at exactly zero (its weight decay only rescales a
    zero), and the effective weight stays bit-identical there. Decay on the base weight itself would
    move every entry. Selected entries decay towards the pretrained value, as in index mode.
    """

    def __init__(self, base: nn.Linear, indices: Tensor) -> None:
        super().__init__(base)
        mask = torch.zeros(base.weight.numel(), dtype=torch.bool, device=base.weight.device)
        mask[indices.to(mask.device)] = True
        self.register_buffer("mask", mask.view_as(base.weight))
        self.delta = nn.Parameter(torch.zeros_like(base.weight))

    def delta_weight(self) -> Tensor:
        return self.delta * self.mask

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)


@dataclass(frozen=True)
class SptConfig(TuningConfig):
    """SPT-LoRA options.

    rank: r of the LoRA parts (scaling 1). budget: trainable entries outside head and cls token, an int,
    or a float in (0, 1) for that fraction of the backbone's parameters. alpha_threshold: a matrix gets a
    LoRA when its selected entries >= r (in + out) / alpha. beta_threshold: a vector is tuned fully when
    its selected entries >= dim / beta. calibration_batches: batches used for sensitivity. mode: 'index'
    (index + value vectors) or 'grad_mask' (full-size masked update). targets: globs over nn.Linear names.
    dropout: on the LoRA branch input. plan: filled in by apply (do not set by hand); with a plan, apply
    rebuilds that structure and needs no calibration (what ``load_adapter`` does).
    """

    ablation_axes: ClassVar[tuple[str, ...]] = ("rank",)
    label_hidden: ClassVar[frozenset[str]] = TuningConfig.label_hidden | {"calibration_batches"}

    rank: int = 8
    budget: int | float = 400_000
    alpha_threshold: float = 10.0
    beta_threshold: float = 5.0
    calibration_batches: int = 16
    mode: str = "index"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.1
    train_cls_token: bool = True
    plan: dict[str, Any] = field(default_factory=dict)

    def without_data(self, model: nn.Module) -> SptConfig:
        """With no plan: one that tunes an equal share of the budget in every target matrix, unstructured.

        A real plan comes from sensitivity on data, which a shapes-only estimate does not have. This one
        is the memory-heaviest plan of SPT's unstructured modes (no matrix gets a LoRA part, which would
        cost LoRA's memory instead).
        """
        if self.plan:
            return self
        names = targets_except_head(model, self.targets)
        share = max(1, budget_entries(model, self.budget) // len(names))
        return dataclasses.replace(self, plan={"matrices": dict.fromkeys(names, share), "vectors": []})

    def validate(self) -> None:
        check_rank(self.rank)
        if isinstance(self.budget, bool) or not (
            (isinstance(self.budget, int) and self.budget >= 1)
            or (isinstance(self.budget, float) and 0.0 < self.budget < 1.0)
        ):
            raise ValueError(
                f"budget={self.budget!r} must be an int >= 1 (trainable entries) "
                "or a float in (0, 1) (fraction of the backbone's parameters)"
            )
        for name in ("alpha_threshold", "beta_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{name}={value!r} must be a finite number > 0")
        if isinstance(self.calibration_batches, bool) or not (
            isinstance(self.calibration_batches, int) and self.calibration_batches >= 1
        ):
            raise ValueError(f"calibration_batches={self.calibration_batches!r} must be an integer >= 1")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        check_probability("dropout", self.dropout)
        check_targets(self.targets)
        if self.plan and not _is_plan(self.plan):
            raise ValueError(
                "plan must be {'matrices': {name: 'lora' | entry count >= 1}, 'vectors': [names]} "
                f"as apply records it; got keys {sorted(self.plan)}"
            )


def _is_plan(plan: dict[str, Any]) -> bool:
    return (
        set(plan) == {"matrices", "vectors"}
        and isinstance(plan["matrices"], dict)
        and all(v == "lora" or (isinstance(v, int) and v >= 1) for v in plan["matrices"].values())
        and all(isinstance(v, str) for v in plan["vectors"])
    )


def sensitivity(
    model: nn.Module, params: dict[str, nn.Parameter], calibration: Calibration, batches: int
) -> dict[str, Tensor]:
    """Per entry of each of ``params``: the sum over up to ``batches`` (images, labels) batches of the
    squared gradient of the cross-entropy loss (float32; model modes and flags restored)."""
    return gradient_sums(model, params, calibration, batches, square=True, method="spt-lora")


class Allocation(NamedTuple):
    lora: list[str]
    sparse: dict[str, Tensor]
    vectors: list[str]


def allocate(
    scores: dict[str, Tensor], lora_costs: dict[str, int], budget: int, *, alpha: float, beta: float
) -> Allocation:
    """Choose LoRA matrices, individually tuned entries and fully tuned vectors under ``budget``.

    ``scores`` holds the sensitivity of matrices (keys in ``lora_costs``, their LoRA's parameter count)
    and of vectors (the other keys). Taking the top-k entries fixes a structure: matrices with >= LoRA
    cost / alpha of them become LoRA (costing the LoRA), vectors with >= dim / beta are tuned fully
    (costing dim), the other matrices tune their top entries (costing their count), the other vectors
    nothing. SPT's plain top-budget selection overspends, since a LoRA costs up to alpha times the
    entries that chose it; so k is the largest (by binary search) whose structure costs at most the
    budget. What is left (about one LoRA's or vector's cost) is filled with the next most sensitive
    entries of the non-LoRA matrices, whose structure stays as fixed: the total is the budget exactly,
    unless the structure at k = all entries costs less (then that is all SPT can tune).
    """
    units = _Units.of(scores, lora_costs, alpha=alpha, beta=beta)
    chosen, structured = _choose(units, budget)
    names, ends, sizes = units.names, units.ends, units.sizes
    per_unit = torch.bincount(torch.searchsorted(ends, chosen, right=True), minlength=len(names))
    starts = (ends - sizes).tolist()
    sparse = {
        names[i]: idx - starts[i] for i, idx in enumerate(chosen.split(per_unit.tolist())) if idx.numel()
    }
    picked = [(n, bool(s), bool(m)) for n, s, m in zip(names, structured, units.is_matrix, strict=True)]
    return Allocation(
        lora=[n for n, s, m in picked if s and m],
        sparse=sparse,
        vectors=[n for n, s, m in picked if s and not m],
    )


@dataclass(frozen=True, eq=False)
class _Units:
    """``allocate``'s matrices and vectors (units), their scores laid end to end in ``flat``: each one's
    size, where it ends in ``flat``, whether it is a matrix, what its structure costs (its LoRA's
    parameters, a vector's size) and how many selected entries make it structured."""

    names: list[str]
    flat: Tensor
    sizes: Tensor
    ends: Tensor
    is_matrix: Tensor
    structured_cost: Tensor
    threshold: Tensor

    @classmethod
    def of(
        cls, scores: dict[str, Tensor], lora_costs: dict[str, int], *, alpha: float, beta: float
    ) -> _Units:
        names = list(scores)
        flat = torch.cat([s.flatten() for s in scores.values()])
        device = flat.device
        sizes = torch.tensor([s.numel() for s in scores.values()], device=device)
        is_matrix = torch.tensor([n in lora_costs for n in names], device=device)
        structured_cost = torch.tensor(
            [lora_costs.get(n, s.numel()) for n, s in scores.items()], device=device
        )
        threshold = torch.where(is_matrix, structured_cost / alpha, sizes / beta)
        return cls(names, flat, sizes, sizes.cumsum(0), is_matrix, structured_cost, threshold)

    def structure(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Per unit: its count among the top ``k`` ranked entries (``unit``: the unit of each), structured."""
        counts = torch.bincount(unit[:k], minlength=len(self.names))
        return counts, counts >= self.threshold

    def cost(self, unit: Tensor, k: int) -> int:
        counts, structured = self.structure(unit, k)
        return int(torch.where(structured, self.structured_cost, counts * self.is_matrix).sum())

    def limit(self, unit: Tensor, ranked: int, budget: int) -> int:
        """The largest k <= ``ranked`` whose structure costs at most ``budget`` (binary search)."""
        low, high = 0, ranked
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.cost(unit, mid) <= budget else (low, mid - 1)
        return low


def _choose(units: _Units, budget: int) -> tuple[Tensor, Tensor]:
    """The entries tuned individually (flat indices, sorted: the structure's limit k's in non-LoRA
    matrices, then the fill) and which units are structured at k.

    Ranks only a prefix of the entries (a full sort of a ViT-B is slow on CPU), growing it until it
    holds both the structure's limit k and the fill."""
    total, ranked = units.flat.numel(), min(units.flat.numel(), 4 * budget)
    while True:
        order = units.flat.topk(ranked).indices  # most sensitive first
        unit = torch.searchsorted(units.ends, order, right=True)  # the matrix / vector of each ranked entry
        low = units.limit(unit, ranked, budget)
        _, structured = units.structure(unit, low)
        free = units.is_matrix & ~structured
        left = budget - units.cost(unit, low)
        rest = order[low:][free[unit[low:]]][:left]
        if ranked == total or (low < ranked and rest.numel() == left):
            return torch.cat([order[:low][free[unit[:low]]], rest]).sort().values, structured
        ranked = min(total, 4 * ranked)


def _tunable_vectors(model: nn.Module) -> dict[str, nn.Parameter]:
    """1-D parameters SPT may tune fully (biases, norms, layer scales): not the head's or embeddings'."""
    head = {id(p) for p in _head(model).parameters()}
    return {
        n: p
        for n, p in model.named_parameters()
        if p.ndim == 1 and id(p) not in head and not any(e in n for e in EMBEDDINGS)
    }


def _head(model: nn.Module) -> nn.Module:
    head = head_module(model)
    return nn.Identity() if head is None else head


def budget_entries(model: nn.Module, budget: int | float) -> int:
    if isinstance(budget, int):
        return budget
    head = {id(p) for p in _head(model).parameters()}
    return round(budget * sum(p.numel() for p in model.parameters() if id(p) not in head))


def _select(
    model: nn.Module,
    cfg: SptConfig,
    names: list[str],
    vectors: dict[str, nn.Parameter],
    calibration: Calibration,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Measure sensitivity and allocate the budget: the plan and each unstructured matrix's indices."""
    layers = {n: model.get_submodule(n) for n in names}
    params = {**{n: layer.weight for n, layer in layers.items()}, **vectors}
    scores = sensitivity(model, params, calibration, cfg.calibration_batches)
    lora_costs = {n: cfg.rank * (layer.in_features + layer.out_features) for n, layer in layers.items()}
    budget = budget_entries(model, cfg.budget)
    alloc = allocate(scores, lora_costs, budget, alpha=cfg.alpha_threshold, beta=cfg.beta_threshold)
    matrices = {
        n: "lora" if n in alloc.lora else alloc.sparse[n].numel()
        for n in names
        if n in alloc.lora or n in alloc.sparse
    }
    return {"matrices": matrices, "vectors": alloc.vectors}, alloc.sparse


def _check_plan(plan: dict[str, Any], names: list[str], vectors: dict[str, nn.Parameter]) -> None:
    unknown = sorted(set(plan["matrices"]) - set(names)) + sorted(set(plan["vectors"]) - set(vectors))
    if unknown:
        raise ValueError(
            f"spt-lora plan names {unknown[:5]} that are not tunable in this model (other model?)"
        )


@register_method("spt-lora", SptConfig, "SPT-LoRA: sensitivity-aware LoRA and sparse tuning")
def apply_spt(model: nn.Module, cfg: SptConfig, calibration: Calibration = None) -> SptConfig:
    """Select by sensitivity on ``calibration`` (or rebuild ``cfg.plan``); return the config with the plan."""
    names = targets_except_head(model, cfg.targets)
    check_rank_fits(model, names, cfg.rank)
    vectors = _tunable_vectors(model)
    if cfg.plan:
        _check_plan(cfg.plan, names, vectors)
        plan, indices = cfg.plan, {}
    elif calibration is None:
        raise ValueError(
            "spt-lora needs calibration batches (an iterable of (images, labels)) to measure sensitivity: "
            "pass calibration=... to apply_method, or a config with a recorded plan"
        )
    else:
        plan, indices = _select(model, cfg, names, vectors, calibration)

    def wrap(name: str, layer: nn.Linear) -> AdaptedLinear:
        spec = plan["matrices"][name]
        if spec == "lora":
            return LoraLinear(layer, cfg.rank, float(cfg.rank), cfg.dropout)
        # Without a fresh selection the indices are placeholders of the right size for load_state_dict.
        idx = indices.get(name, torch.zeros(spec, dtype=torch.int64))
        return (SparseDeltaLinear if cfg.mode == "index" else MaskedDeltaLinear)(layer, idx)

    freeze_all_but_head(model, cfg.train_head)
    set_cls_token_trainable(model, cfg.train_cls_token)
    tuned = [vectors[n] for n in plan["vectors"]]  # resolved before wrapping renames them
    replace_modules(model, list(plan["matrices"]), wrap)
    for p in tuned:
        p.requires_grad_(True)
    return dataclasses.replace(cfg, plan=plan)
