"""SPT-LoRA: budget, structure choice, untouched entries, save/load, merge, bad input, the two modes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_vit
from torch import nn

import snell
from baselines.lora import LoraLinear
from baselines.spt import MaskedDeltaLinear, SparseDeltaLinear, allocate, sensitivity

BUDGET = 3000
# On the tiny ViT these settings give both LoRA matrices and individually tuned ones.
OPTIONS = {"rank": 4, "budget": BUDGET, "calibration_batches": 4, "dropout": 0.0}


@pytest.fixture
def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)
    ]


def spt_model(calibration, **options) -> nn.Module:
    model = make_tiny_vit()
    return snell.apply_method(model, snell.method_config("spt-lora", **{**OPTIONS, **options}), calibration)


def tuned_entries(model: nn.Module) -> int:
    """Entries SPT tunes outside head and cls token (a masked update counts its selected entries)."""
    masked = [m for m in model.modules() if isinstance(m, MaskedDeltaLinear)]
    total = (
        snell.count_trainable(model)
        - sum(p.numel() for p in model.head.parameters())
        - model.cls_token.numel()
    )
    return total - sum(m.delta.numel() - int(m.mask.sum()) for m in masked)


def train_step(model: nn.Module, calibration) -> None:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    images, labels = calibration[0]
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


def selected(module: nn.Module) -> torch.Tensor:
    """Flat indices an unstructured layer tunes."""
    if isinstance(module, SparseDeltaLinear):
        return module.indices
    return module.mask.flatten().nonzero().flatten()


@pytest.mark.parametrize("mode", ["index", "grad_mask"])
def test_budget_respected(calibration, mode):
    model = spt_model(calibration, mode=mode)
    assert abs(tuned_entries(model) - BUDGET) <= 0.05 * BUDGET


def test_both_structures_occur(calibration):
    model = spt_model(calibration)
    kinds = set(model.tuning_config.plan["matrices"].values())
    assert "lora" in kinds and any(isinstance(k, int) for k in kinds)
    layers = list(model.modules())
    assert any(isinstance(m, LoraLinear) for m in layers) and any(
        isinstance(m, SparseDeltaLinear) for m in layers
    )
    indices = [m.indices for m in layers if isinstance(m, SparseDeltaLinear)]
    assert all(i.dtype == torch.int64 and torch.equal(i, i.sort().values) for i in indices)


@pytest.mark.parametrize("mode", ["index", "grad_mask"])
def test_only_selected_entries_change(calibration, mode):
    original = make_tiny_vit().state_dict()
    model = spt_model(calibration, mode=mode)
    plan = model.tuning_config.plan
    unstructured = {
        f"{n}.weight": selected(model.get_submodule(n)) for n, v in plan["matrices"].items() if v != "lora"
    }
    may_change = {f"{n}.weight" for n, v in plan["matrices"].items() if v == "lora"} | set(plan["vectors"])
    may_change |= {"head.weight", "head.bias", "cls_token"}
    train_step(model, calibration)
    after = snell.merge(copy.deepcopy(model)).state_dict()
    assert set(after) == set(original)
    for name, before in original.items():
        if name in unstructured:
            changed = (after[name] != before).flatten().nonzero().flatten()
            assert changed.numel() > 0 and torch.isin(changed, unstructured[name]).all(), name
        elif name not in may_change:
            assert torch.equal(after[name], before), name


@pytest.mark.parametrize("mode", ["index", "grad_mask"])
def test_save_load_round_trip(calibration, tmp_path, mode):
    model = spt_model(calibration, mode=mode)
    train_step(model, calibration)
    snell.save_adapter(model, tmp_path)
    fresh = snell.load_adapter(make_tiny_vit(), tmp_path)  # no calibration: the plan rebuilds the structure
    assert fresh.tuning_config == model.tuning_config
    images = calibration[1][0]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(images), fresh(images))


def test_merge_keeps_outputs(calibration):
    model = spt_model(calibration)
    train_step(model, calibration)
    model.eval()
    images = calibration[1][0]
    with torch.no_grad():
        before = model(images)
        after = snell.merge(model)(images)
    assert not any(isinstance(m, snell.AdaptedLinear) for m in model.modules())
    assert (before - after).abs().max() < 1e-5


def test_no_calibration_leaves_model_untouched():
    model = make_tiny_vit()
    state = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="spt-lora needs calibration batches"):
        snell.apply_method(model, snell.method_config("spt-lora", **OPTIONS))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert (
        all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        and state.keys() == model.state_dict().keys()
    )


def test_sensitivity_restores_model(calibration):
    model = make_tiny_vit()
    model.train()
    model.blocks[0].eval()
    flags = [p.requires_grad for p in model.parameters()]
    scores = sensitivity(model, {"qkv": model.blocks[0].attn.qkv.weight}, calibration, batches=2)
    assert scores["qkv"].shape == model.blocks[0].attn.qkv.weight.shape and scores["qkv"].sum() > 0
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["index", "grad_mask"])
def test_gradient_size_per_mode(calibration, mode):
    model = spt_model(calibration, mode=mode)
    images, labels = calibration[0]
    nn.functional.cross_entropy(model(images), labels).backward()
    layer_cls = SparseDeltaLinear if mode == "index" else MaskedDeltaLinear
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    assert layers
    for layer in layers:
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        full = [g for g in grads if g.shape == (layer.out_features, layer.in_features)]
        assert all(g is not None for g in grads)
        assert full if mode == "grad_mask" else not full
        assert layer.base.weight.grad is None


def test_fraction_budget(calibration):
    model = spt_model(calibration, budget=0.05)
    backbone = sum(p.numel() for n, p in make_tiny_vit().named_parameters() if not n.startswith("head"))
    assert abs(tuned_entries(model) - 0.05 * backbone) <= 0.05 * 0.05 * backbone


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rank": 0}, "rank=0"),
        ({"budget": 0}, "budget=0"),
        ({"budget": 1.5}, "budget=1.5"),
        ({"mode": "dense"}, "mode='dense'.*index, grad_mask"),
        ({"alpha_threshold": 0.0}, "alpha_threshold=0.0"),
        ({"beta_threshold": -1}, "beta_threshold=-1"),
        ({"calibration_batches": 0}, "calibration_batches=0"),
        ({"plan": {"matrices": {}}}, "plan must be"),
    ],
)
def test_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        snell.method_config("spt-lora", **options)


def test_bad_targets_and_rank(calibration):
    with pytest.raises(ValueError, match="match no nn.Linear"):
        spt_model(calibration, targets=("*nope",))
    with pytest.raises(ValueError, match="rank=64 exceeds"):
        spt_model(calibration, rank=64)


def test_allocate_spends_budget_past_lora_matrices():
    # "a" holds the 10_000 most sensitive entries but its LoRA costs 1600: the ranking must reach past it
    # (beyond 4 x budget entries) to spend the remaining 100 on the best entries of "b".
    scores = {"a": torch.rand(100, 100) + 2, "b": torch.rand(100, 100), "v": torch.rand(100) / 10}
    alloc = allocate(scores, {"a": 1600, "b": 1600}, budget=1700, alpha=10.0, beta=1.0)
    assert alloc.lora == ["a"] and alloc.vectors == [] and list(alloc.sparse) == ["b"]
    assert torch.equal(alloc.sparse["b"], scores["b"].flatten().topk(100).indices.sort().values)


def test_plan_from_another_model_is_rejected():
    plan = {"matrices": {"blocks.5.attn.qkv": "lora"}, "vectors": []}
    with pytest.raises(ValueError, match=r"blocks\.5\.attn\.qkv"):
        snell.apply_method(make_tiny_vit(), snell.method_config("spt-lora", **OPTIONS, plan=plan))
