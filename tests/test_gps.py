"""GPS: top-k selection per neuron (vs plain autograd), untouched entries under AdamW with decay,
save/load, merge, mask kinds, supcon, bad input, shapes-only configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_vit
from torch import nn

import snell
from baselines.gps import GpsLinear
from bench.run.train import make_optimizer
from bench.step import train_step
from tests.harness import assert_unchanged, model_snapshot


@pytest.fixture
def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 16, 16, generator=g), torch.randint(5, (8,), generator=g)) for _ in range(3)]


def gps_model(calibration, **options) -> nn.Module:
    return snell.apply_method(make_tiny_vit(), snell.method_config("gps", **options), calibration)


def gps_layers(model: nn.Module) -> dict[str, GpsLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GpsLinear)}


def selection_mask(layer: GpsLinear) -> torch.Tensor:
    mask = torch.zeros_like(layer.base.weight, dtype=torch.bool)
    return mask.scatter_(1, layer.indices, True)


def train(model: nn.Module, steps: int = 4) -> torch.optim.Optimizer:
    optimizer, _ = make_optimizer(
        model, lr=1e-2, weight_decay=0.05, total_steps=10, warmup_steps=0, warmup_lr=1e-5
    )
    g = torch.Generator().manual_seed(7)
    model.train()
    for _ in range(steps):
        train_step(
            model, optimizer, torch.randn(8, 1, 16, 16, generator=g), torch.randint(5, (8,), generator=g)
        )
    return optimizer


def images() -> torch.Tensor:
    return torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("k", [1, 3])
def test_exactly_k_unique_sorted_entries_per_row(calibration, k):
    model = gps_model(calibration, k=k)
    layers = gps_layers(model)
    assert len(layers) == 8  # qkv, proj, fc1, fc2 of 2 blocks
    for layer in layers.values():
        assert layer.indices.shape == (layer.out_features, k)
        assert layer.indices.min() >= 0 and layer.indices.max() < layer.in_features
        assert (layer.indices.diff(dim=1) > 0).all()  # sorted and unique per row
        assert (selection_mask(layer).sum(1) == k).all()


def test_selection_equals_plain_autograd_topk(calibration):
    k = 3
    reference = make_tiny_vit().eval()
    names = [n for n, _ in gps_layers(gps_model(calibration, k=k)).items()]
    weights = [reference.get_submodule(n).weight for n in names]
    sums = [torch.zeros_like(w) for w in weights]
    for x, y in calibration:
        grads = torch.autograd.grad(F.cross_entropy(reference(x), y), weights)
        for total, grad in zip(sums, grads, strict=True):
            total += grad
    layers = gps_layers(gps_model(calibration, k=k))
    for name, total in zip(names, sums, strict=True):
        expected = total.abs().topk(k, dim=1).indices
        got = layers[name].indices
        for row in range(total.shape[0]):
            assert set(got[row].tolist()) == set(expected[row].tolist()), (name, row)


def test_training_changes_only_selected_entries_biases_and_head(calibration):
    model = gps_model(calibration, k=2)
    pretrained = make_tiny_vit().state_dict()
    optimizer = train(model)
    decayed = {
        id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]
    }
    assert id(model.head.weight) in decayed  # decay really is on for some parameters
    for name, layer in gps_layers(model).items():
        assert id(layer.base.weight) not in decayed
        mask, weight, before = selection_mask(layer), layer.base.weight.detach(), pretrained[f"{name}.weight"]
        assert torch.equal(weight[~mask], before[~mask]), name
        assert (weight[mask] != before[mask]).all(), name
        assert torch.equal(layer.pretrained, before.gather(1, layer.indices))
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    changed_entries = sum(int((state[k] != v).sum()) for k, v in pretrained.items())
    assert changed_entries == snell.count_tuned(model) < snell.count_trainable(model)
    for key, before in pretrained.items():
        changed = not torch.equal(state[key], before)
        if "norm" in key or key in ("pos_embed", "cls_token", "patch_embed.proj.weight"):
            assert not changed, key
        elif key.endswith("bias") or key.startswith("head."):
            assert changed, key


def test_save_load_reproduces_outputs_with_small_file(calibration, tmp_path):
    model = gps_model(calibration, k=1)
    train(model)
    path = snell.save_adapter(model, tmp_path / "gps")
    loaded = snell.load_adapter(make_tiny_vit(), path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))
    for name, layer in gps_layers(loaded).items():
        assert torch.equal(layer.indices, gps_layers(model)[name].indices)
        assert torch.equal(layer.mask, gps_layers(model)[name].mask)
    full = sum(4 * m.base.weight.numel() for m in gps_layers(model).values())
    assert snell.adapter_size_bytes(path) < 0.25 * full


def test_merge_keeps_outputs_and_leaves_plain_linears(calibration):
    model = gps_model(calibration, k=2)
    train(model)
    model.eval()
    names = list(gps_layers(model))
    with torch.no_grad():
        before = model(images())
        snell.merge(model)
        after = model(images())
    assert torch.equal(before, after)
    assert not gps_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)


def test_mask_kinds_give_identical_gradients_and_steps(calibration):
    models = {kind: gps_model(calibration, k=2, mask=kind) for kind in ("float32", "bool", "indices")}
    dtypes = {kind: {getattr(m.mask, "dtype", None) for m in gps_layers(model).values()}
              for kind, model in models.items()}  # fmt: skip
    assert dtypes == {"float32": {torch.float32}, "bool": {torch.bool}, "indices": {None}}
    x, y = calibration[0]
    results = {}
    for kind, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        results[kind] = grads, {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer in gps_layers(models["indices"]).values():
        assert (layer.base.weight.grad[~selection_mask(layer)] == 0).all()
        assert (layer.base.weight.grad[selection_mask(layer)] != 0).any()
    grads, params = results["float32"]
    for kind in ("bool", "indices"):
        other_grads, other_params = results[kind]
        assert grads.keys() == other_grads.keys()
        assert all(torch.equal(grads[n], other_grads[n]) for n in grads), kind
        assert all(torch.equal(params[n], other_params[n]) for n in params), kind


def test_supcon_selects_exactly_k_per_row(calibration):
    model = gps_model(calibration, k=2, loss="supcon")
    assert model.tuning_config.loss == "supcon"
    for layer in gps_layers(model).values():
        assert layer.indices.shape == (layer.out_features, 2)
        assert (layer.indices.diff(dim=1) > 0).all()
    # the selection is not all placeholders: supcon gradients reach every block's weights
    assert any((layer.indices != torch.tensor([0, 1])).any() for layer in gps_layers(model).values())


@pytest.mark.parametrize(("option", "value"), [("k", 0), ("mask", "half"), ("loss", "mse")])
def test_bad_config_values_name_the_value(option, value):
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        snell.method_config("gps", **{option: value})


@pytest.mark.parametrize(
    ("options", "with_data", "message"),
    [({"k": 33}, True, "k=33"), ({"k": 1}, False, "calibration"), ({"k": 1}, "empty", "empty")],
)
def test_failed_apply_raises_and_leaves_model_unchanged(calibration, options, with_data, message):
    model = make_tiny_vit()
    before = model_snapshot(model)
    data = {True: calibration, False: None, "empty": []}[with_data]
    with pytest.raises(ValueError, match=message):
        snell.apply_method(model, snell.method_config("gps", **options), data)
    assert_unchanged(model, before)
    assert getattr(model, "tuning_config", None) is None


def test_k_equal_to_narrowest_input_is_allowed(calibration):
    model = gps_model(calibration[:1], k=32)  # attn.proj, qkv, fc1 have 32 inputs: every entry
    for name, layer in gps_layers(model).items():
        if layer.in_features == 32:
            assert selection_mask(layer).all(), name


def test_without_data_applies_without_calibration_with_same_trainables(calibration):
    cfg = snell.method_config("gps", k=2)
    placeholder = cfg.without_data(make_tiny_vit())
    shapes_only = snell.apply_method(make_tiny_vit(), placeholder)
    data_driven = gps_model(calibration, k=2)
    assert snell.count_trainable(shapes_only) == snell.count_trainable(data_driven)
    shapes = {k: v.shape for k, v in snell.core.adapter.adapter_state_dict(shapes_only).items()}
    assert shapes == {k: v.shape for k, v in snell.core.adapter.adapter_state_dict(data_driven).items()}
    assert data_driven.tuning_config == placeholder  # what load_adapter rebuilds from
