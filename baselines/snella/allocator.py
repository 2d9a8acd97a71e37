"""SNELLA's layer-level competition: a global budget of kept entries, shrinking on a cubic schedule,
shared out among the adapted matrices by importance at every epoch.

Importance (every step, after the optimizer step): ipt = |theta * grad| for every entry of A and B,
smoothed I <- beta1 I + (1 - beta1) ipt and its uncertainty U <- beta2 U + (1 - beta2) |ipt - I|.
Budget of epoch e of E: V(e) = V_T + (V_0 - V_T) (1 - e / E)^3, V_0 = sum (1 - init) n_l, V_T =
sum (1 - target) n_l (truncated to an integer, as the public code). Each matrix (q, k and v apart) scores
S_l = mean(I U) over its A + the same over its B; it gets a share of V in proportion to S_l, at most its
n_l entries, and its sparsity becomes 1 - share / n_l. Reallocation happens at the end of every epoch
but the last, for the next one (the public code: at the start of every epoch but the first).

Deliberate difference: shares are integers summing to V exactly (capped proportional shares, then largest
remainders), where the public code truncates each share after a float redistribution (its total falls
short by up to one per matrix).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from snell.core.callbacks import TrainingCallback
from snell.tuners.snell.layer import SnellLinear


def cubic_budget(epoch: int, epochs: int, initial: float, target: float) -> int:
    """V(e) = V_T + (V_0 - V_T) (1 - e / E)^3, truncated (``initial`` = V_0, ``target`` = V_T)."""
    return int(target + (initial - target) * (1.0 - epoch / epochs) ** 3)


def share_budget(scores: Tensor, budget: int, capacity: Tensor) -> Tensor:
    """Integer shares of ``budget`` in proportion to ``scores`` (uniform if they sum to 0), each at most
    its ``capacity``, summing to ``budget`` exactly. Shares that proportion would push over capacity are
    capped and what they cannot take goes to the others in proportion (repeated until none is over);
    the rest get the floors of their proportional shares, and the units left one each, largest
    remainder first (ties: the earlier matrix)."""
    capacity = capacity.to(torch.int64)
    if not 0 <= budget <= int(capacity.sum()):
        raise ValueError(f"budget {budget} outside 0 ... {int(capacity.sum())} (the entries available)")
    weights = scores.double().clamp(min=0)
    shares = torch.zeros_like(capacity)
    active = torch.ones_like(capacity, dtype=torch.bool)
    while True:
        left = budget - int(shares.sum())
        if left == 0 or not active.any():
            return shares
        w = torch.where(active, weights, 0.0)
        w = w / w.sum() if w.sum() > 0 else active.double() / active.sum()
        exact = left * w
        over = active & (exact >= capacity - shares)
        if not over.any():
            break
        shares = torch.where(over, capacity, shares)
        active &= ~over
    floors = exact.floor().to(torch.int64)
    shares += floors
    remainder = torch.where(active, exact - floors, -1.0)
    order = torch.argsort(remainder, descending=True, stable=True)[: budget - int(shares.sum())]
    return shares.index_add_(0, order, torch.ones_like(order))


class SparsityAllocator(TrainingCallback):
    """Reallocates the sparsity of SNELL layers' matrices (each q, k, v group apart) during training.

    ``layers``: name -> SnellLinear, whose ``sparsity`` becomes a tuple of per-group ratios. Importance
    state lives in non-persistent buffers (moved with the model, counted in memory estimates); the
    ratios themselves in the persistent buffer ``ratios``, which adapters save (``snell.save_adapter``
    keeps callbacks' persistent buffers) and loading gives back to the layers.
    """

    def __init__(
        self,
        layers: dict[str, SnellLinear],
        init_sparsity: float,
        target_sparsity: float,
        beta1: float,
        beta2: float,
    ) -> None:
        super().__init__()
        self.layers = list(layers.values())  # plain list: the model owns the layers
        self.beta1, self.beta2 = beta1, beta2
        self.units = [f"{name}.{'qkv'[g]}" if layer.groups == 3 else name
                      for name, layer in layers.items() for g in range(layer.groups)]  # fmt: skip
        self.capacity = [layer.out_features // layer.groups * layer.in_features
                         for layer in self.layers for _ in range(layer.groups)]  # fmt: skip
        self.initial = (1 - init_sparsity) * sum(self.capacity)
        self.target = (1 - target_sparsity) * sum(self.capacity)
        self.history: list[dict[str, float]] = []
        self.budgets: list[int] = []
        for i, layer in enumerate(self.layers):
            for kind, factor in (("a", layer.lora_A), ("b", layer.lora_B)):
                for stat in ("importance", "uncertainty"):
                    self.register_buffer(f"{stat}_{kind}{i}", torch.zeros_like(factor), persistent=False)
        self.register_buffer(
            "ratios", torch.full((len(self.units),), float(init_sparsity), dtype=torch.float64)
        )
        self.register_load_state_dict_post_hook(lambda module, _: module._set_ratios(module.ratios.tolist()))
        self._set_ratios([float(init_sparsity)] * len(self.units))  # not from the buffer: fake in estimates
        self._remember(int(self.initial))

    def _set_ratios(self, ratios: list[float]) -> None:
        """Give each layer its groups' ratios (``ratios`` in unit order)."""
        start = 0
        for layer in self.layers:
            layer.sparsity = tuple(ratios[start : start + layer.groups])
            start += layer.groups

    def _remember(self, budget: int) -> None:
        self.budgets.append(budget)
        self.history.append(
            dict(zip(self.units, (s for layer in self.layers for s in layer.sparsity), strict=True))
        )

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for i, layer in enumerate(self.layers):
            for kind, factor in (("a", layer.lora_A), ("b", layer.lora_B)):
                if factor.grad is None:
                    continue
                ipt = (factor * factor.grad).abs().nan_to_num_(nan=0.0)
                importance = getattr(self, f"importance_{kind}{i}")
                importance.mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
                getattr(self, f"uncertainty_{kind}{i}").mul_(self.beta2).add_(
                    ipt.sub_(importance).abs_(), alpha=1 - self.beta2
                )

    @torch.no_grad()
    def scores(self) -> Tensor:
        """S_l per matrix (q, k, v apart): mean(I U) over its rows of A plus the same over B."""
        found = []
        for i, layer in enumerate(self.layers):
            per_group = []
            for kind in ("a", "b"):
                score = getattr(self, f"importance_{kind}{i}") * getattr(self, f"uncertainty_{kind}{i}")
                groups = layer.factor_groups if kind == "a" else layer.groups
                per_group.append(score.view(groups, -1).mean(1).expand(layer.groups))
            found.append(per_group[0] + per_group[1])
        return torch.cat(found).float().cpu()

    def allocate(self, epoch: int, epochs: int) -> None:
        """Share out V(epoch) and set every layer's per-group sparsity for the epochs that follow."""
        budget = cubic_budget(epoch, epochs, self.initial, self.target)
        capacity = torch.tensor(self.capacity)
        shares = share_budget(self.scores(), budget, capacity)
        ratios = (1 - shares.double() / capacity.double()).clamp(0, 1)
        self.ratios.copy_(ratios)
        self._set_ratios(ratios.tolist())
        self._remember(budget)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        if epoch + 1 < epochs:
            self.allocate(epoch + 1, epochs)

    def record(self) -> dict[str, Any]:
        return {"snella_budget_by_epoch": self.budgets, "snella_sparsity_by_epoch": self.history}
