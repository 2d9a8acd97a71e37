"""PEFT's tuners as the ``peft`` method: a training step per tuner, save/load to identical outputs (VeRA's
projections regenerated from their key), merge, PEFT's LoRA against ours (outputs, gradients, memory
estimate), config round trips and bad input (model unchanged)."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_vit
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import baselines.hf_peft  # noqa: F401
import snell
import snell.core.wrap
from baselines.hf_peft import PEFT_VERSION, TUNERS, PeftMethodConfig
from baselines.lora import LoraLinear
from bench.memory.estimate import step_memory
from bench.records import provenance
from bench.run.config import RunConfig
from bench.run.sweep import SweepError, parse_sweep
from bench.step import train_step
from tests.harness import FAST_TRAIN, record_files, run_bench, write_sweep

TARGETS = [
    f"blocks.{b}.{layer}" for b in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
]
"""The tiny ViT's standard targets (dim 32, mlp 128): every tuner below adapts exactly these."""

TUNED = {
    "lora": {},
    "dora": {},
    "loha": {"rank": 4},
    "lokr": {"rank": 4},
    "vera": {},
    "ia3": {},
    "boft": {"boft_block_size": 4},
    "oft": {"oft_block_size": 4},
    "fourierft": {"n_frequency": 64},
    "adalora": {"rank": 4, "init_r": 8, "total_step": 4, "tinit": 1, "tfinal": 1},
    "hra": {},
}
"""Tuners and options that fit the tiny ViT (block sizes divide 32, at most 32 * 32 frequencies)."""


def batches(n: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 16, 16, generator=g), torch.randint(5, (8,), generator=g)) for _ in range(n)]


def images() -> torch.Tensor:
    return torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def peft_model(tuner: str, **options) -> nn.Module:
    return snell.apply_method(make_tiny_vit(), snell.method_config("peft", tuner=tuner, **options))


def train(model: nn.Module, steps: int = 2) -> torch.Tensor:
    """``steps`` training steps (AdamW over the trainable parameters); the last loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for x, y in batches(steps):
        loss = train_step(model, optimizer, x, y)
    return loss


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    return model.eval()(images())


def peft_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("tuner", list(TUNED))
def test_one_training_step_moves_the_adapter_head_and_cls_token_only(tuner):
    model = peft_model(tuner, **TUNED[tuner])
    assert sorted(peft_layers(model)) == sorted(TARGETS)  # not the head, not the patch embedding
    assert not isinstance(model.head, BaseTunerLayer) and model.tuning_config.tuner == tuner
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias", "cls_token"} <= trainable
    adapter = trainable - {"head.weight", "head.bias", "cls_token"}
    assert adapter and all(any(n.startswith(f"{t}.") for t in TARGETS) for n in adapter)
    assert not any(".base_layer." in n for n in adapter)  # pretrained weights stay frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = train(model, steps=1)
    assert math.isfinite(loss.item())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trainable and "head.weight" in moved and "cls_token" in moved
    assert moved & adapter, f"{tuner}: no adapter parameter moved"


def test_head_and_cls_token_follow_the_flags():
    model = peft_model("lora", train_head=False, train_cls_token=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("tuner", list(TUNED))
def test_saved_adapter_loads_to_identical_outputs(tuner, tmp_path):
    model = peft_model(tuner, **TUNED[tuner])
    train(model, steps=4 if tuner == "adalora" else 2)  # AdaLoRA: through its final allocation
    trained = outputs(model)
    snell.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["tuner"] == tuner
    torch.manual_seed(123)  # another init for the fresh adapter: loading must overwrite all of it
    assert not torch.equal(outputs(peft_model(tuner, **TUNED[tuner])), trained)
    torch.manual_seed(123)
    loaded = snell.load_adapter(make_tiny_vit(), tmp_path)
    assert loaded.tuning_config == model.tuning_config
    assert torch.equal(outputs(loaded), trained)


def test_vera_projections_are_regenerated_from_their_key_not_saved(tmp_path):
    model = peft_model("vera")
    train(model)
    snell.save_adapter(model, tmp_path)
    saved = snell.core.adapter.adapter_state_dict(model)
    assert not any("vera_A" in k or "vera_B" in k for k in saved)  # only the scaling vectors (and head)
    torch.manual_seed(5)
    loaded = snell.load_adapter(make_tiny_vit(), tmp_path)
    for name in TARGETS:
        ours, theirs = model.get_submodule(name), loaded.get_submodule(name)
        assert torch.equal(ours.vera_A["default"], theirs.vera_A["default"])
        assert torch.equal(ours.vera_B["default"], theirs.vera_B["default"])
    other_key = peft_model("vera", projection_prng_key=1).get_submodule(TARGETS[0]).vera_A["default"]
    assert not torch.equal(other_key, model.get_submodule(TARGETS[0]).vera_A["default"])


@pytest.mark.parametrize("tuner", list(TUNED))
def test_merged_outputs_equal_unmerged(tuner):
    model = peft_model(tuner, **TUNED[tuner])
    train(model)
    unmerged = outputs(model)
    snell.merge(model)
    assert not peft_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in TARGETS)
    torch.testing.assert_close(outputs(model), unmerged, rtol=1e-5, atol=1e-5)


def lora_pair() -> tuple[nn.Module, nn.Module]:
    """Our LoRA (one A on the fused qkv: PEFT's layout, alpha = r: scaling 1, no dropout) and PEFT's LoRA
    (r = lora_alpha = 8), on the same backbone, with PEFT's factors copied from ours and B nonzero."""
    ours = snell.apply_method(
        make_tiny_vit(), snell.method_config("lora", rank=8, alpha=8.0, qkv="shared_a", dropout=0.0)
    )
    theirs = peft_model("lora", rank=8, lora_alpha=8, lora_dropout=0.0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in TARGETS:
            mine, peft_layer = ours.get_submodule(name), theirs.get_submodule(name)
            assert isinstance(mine, LoraLinear) and mine.groups == 1 and mine.scaling == 1.0
            assert peft_layer.scaling["default"] == 1.0
            mine.lora_B.copy_(torch.randn(mine.lora_B.shape, generator=g) * 0.1)
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A)  # both (r, in)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B)  # both (out, r)
    return ours, theirs


def test_peft_lora_equals_our_lora_with_the_same_factors():
    ours, theirs = lora_pair()
    assert snell.count_trainable(ours) == snell.count_trainable(theirs)
    x, y = batches(1)[0]
    grads = []
    for model in (ours, theirs):
        model.train()
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (out_ours, g_ours), (out_theirs, g_theirs) = grads
    torch.testing.assert_close(out_theirs, out_ours, rtol=1e-6, atol=1e-6)
    rename = {f"{t}.lora_{f}": f"{t}.lora_{f}.default.weight" for t in TARGETS for f in "AB"}
    assert {rename.get(n, n) for n in g_ours} == set(g_theirs)
    for name, grad in g_ours.items():
        assert grad.abs().sum() > 0, name  # B nonzero: A's gradient too
        torch.testing.assert_close(g_theirs[rename.get(name, name)], grad, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_memory_estimate_of_peft_lora_equals_ours_and_dora_vera_estimate():
    """ViT-B/16, batch 8 (fake tensors): PEFT's LoRA-8 is our LoRA-8 with one A on the fused qkv. A
    tuner whose set-up reads tensor values (BOFT's permutation matrices) fails naming the fake tensors."""
    ours = step_memory(
        "vit_base_patch16_224", snell.method_config("lora", rank=8, qkv="shared_a", dropout=0.0), 8
    )
    theirs = step_memory("vit_base_patch16_224", snell.method_config("peft", rank=8, lora_dropout=0.0), 8)
    assert theirs.trainable_params == ours.trainable_params
    assert theirs.peak_bytes == pytest.approx(ours.peak_bytes, rel=0.005)
    assert theirs.config == {**snell.method_config("peft", lora_dropout=0.0).to_dict()}
    dora = step_memory("vit_base_patch16_224", snell.method_config("peft", tuner="dora"), 8)
    vera = step_memory("vit_base_patch16_224", snell.method_config("peft", tuner="vera"), 8)
    assert dora.trainable_params > theirs.trainable_params > vera.trainable_params
    assert dora.peak_bytes > theirs.peak_bytes  # DoRA's weight norm keeps full-size activations
    with pytest.raises(ValueError, match="'boft' cannot be built on fake tensors"):  # reads values
        step_memory("vit_base_patch16_224", snell.method_config("peft", tuner="boft"), 8)


def test_config_round_trips_through_dict_and_json():
    config = snell.method_config("peft", tuner="dora", rank=8, lora_alpha=16, layers_to_transform=[0, 1])
    assert config.options == {"lora_alpha": 16, "layers_to_transform": (0, 1)}
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {
        "method": "peft",
        "train_head": None,
        "tuner": "dora",
        "rank": 8,
        "options": {"lora_alpha": 16, "layers_to_transform": [0, 1]},
        "train_cls_token": True,
    }
    assert snell.config_from_dict(data) == config and hash(snell.config_from_dict(data)) == hash(config)
    assert (
        snell.method_config("peft", tuner="dora", options={"lora_alpha": 16, "layers_to_transform": [0, 1]})
        == config
    )
    built = config.peft_config(TARGETS)
    assert (built.r, built.lora_alpha, built.use_dora, built.target_modules) == (8, 16, True, set(TARGETS))


def test_rank_maps_to_the_tuners_rank_field():
    assert snell.method_config("peft", tuner="ia3").rank is None  # no rank field: None unless given
    assert (
        snell.method_config("peft", tuner="adalora", total_step=10, rank=4).peft_config(TARGETS).target_r == 4
    )
    assert snell.method_config("peft", tuner="vera", rank=16).peft_config(TARGETS).r == 16
    assert snell.method_config("peft", rank=None).peft_config(TARGETS).r == peft.LoraConfig().r
    ia3 = snell.method_config("peft", tuner="ia3").peft_config(TARGETS)
    assert ia3.feedforward_modules == {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"}  # fc2's input is scaled
    assert peft.__version__ == PEFT_VERSION


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tuner": "lorra"}, r"unknown PEFT tuner 'lorra' \(did you mean 'lora'\?\); allowed .*dora.*vera"),
        ({"tuner": "poly"}, "not supported here: its layers need task_ids"),
        (
            {"lora_alphaa": 16},
            r"unknown option\(s\) \['lora_alphaa'\].*did you mean 'lora_alpha'.*lora_dropout",
        ),
        ({"tuner": "ia3", "rank": 8}, "tuner 'ia3' has no rank field.*feedforward_modules"),
        ({"r": 16}, "r: set it with rank="),
        ({"target_modules": ["qkv"]}, "target_modules: the targets are the standard ones"),
        ({"tuner": "dora", "use_dora": False}, "use_dora: tuner 'dora' sets it"),
        ({"tuner": "adalora"}, "PEFT rejects tuner 'adalora'.*total_step"),
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"options": [1]}, "must be a dict of PEFT config fields"),
    ],
)
def test_bad_options_fail_up_front_naming_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        snell.method_config("peft", **options)


def test_tuners_are_peft_names_in_lower_case_plus_dora():
    assert {
        "lora",
        "dora",
        "loha",
        "lokr",
        "adalora",
        "boft",
        "oft",
        "ia3",
        "vera",
        "fourierft",
        "hra",
    } <= set(TUNERS)
    assert set(TUNERS) - {"dora"} <= {t.value.lower() for t in peft.utils.PeftType}
    assert not {"prompt_tuning", "prefix_tuning", "poly"} & set(TUNERS)
    assert isinstance(snell.method_config("peft"), PeftMethodConfig)


@pytest.mark.parametrize(
    "options",
    [
        {"tuner": "fourierft", "n_frequency": 2000},  # fits qkv (32 x 96), not the next layer (32 x 32)
        {"tuner": "boft", "boft_block_size": 5},
    ],
)
def test_a_tuner_that_does_not_fit_the_model_leaves_it_unchanged(options):
    model = make_tiny_vit()
    modules = [(n, type(m)) for n, m in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attributes = set(model.__dict__)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"PEFT tuner {options['tuner']!r} cannot be applied to this model"):
        snell.apply_method(model, snell.method_config("peft", **options))
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(model.__dict__) == attributes  # no tuning_config, no PEFT peft_config
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    snell.apply_method(model, snell.method_config("peft", tuner="lora"))  # and it still takes a method
    assert sorted(peft_layers(model)) == sorted(TARGETS)


@pytest.mark.slow
def test_adalora_allocates_its_rank_budget_through_the_training_callback():
    model = peft_model("adalora", **TUNED["adalora"])
    (allocator,) = snell.training_callbacks(model)
    train(model, steps=4)  # step 3 = total_step - tfinal: the final allocation
    ranks = allocator.record()["adalora_ranks"]
    assert len(ranks) == len(TARGETS) and sum(ranks.values()) == 4 * len(TARGETS)  # target_r on average
    kept = [int((model.get_submodule(t).lora_E["default"] != 0).sum()) for t in TARGETS]
    assert sum(kept) == 4 * len(TARGETS) and max(kept) <= 8


def test_sweep_entries_pass_peft_options_through_and_name_the_tuner():
    grid = [
        {"method": "peft", "tuner": "dora", "rank": [4, 8], "lora_alpha": 16},
        {"method": "peft", "tuner": "ia3"},
    ]
    runs = parse_sweep({"train": FAST_TRAIN, "tasks": ["digits"], "grid": grid}).runs
    assert {r.label for r in runs} == {"peft-dora-4 lora_alpha=16", "peft-dora-8 lora_alpha=16", "peft-ia3"}
    run = next(r for r in runs if r.method_options.get("rank") == 8)
    assert run.method_config == snell.method_config("peft", tuner="dora", rank=8, lora_alpha=16)
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))).method_config == run.method_config
    with pytest.raises(SweepError, match="did you mean 'lora_alpha'"):
        parse_sweep({"train": FAST_TRAIN, "tasks": ["digits"], "grid": [{"method": "peft", "lora_alph": 4}]})


def test_records_name_the_peft_version():
    assert provenance.versions()["peft"] == PEFT_VERSION


@pytest.mark.slow
def test_six_tuners_train_on_the_embedded_backbone_through_a_sweep_file(tmp_path):
    """A sweep file on the embedded benchmark's backbone and data: one record per tuner, each ok, each
    naming the PEFT version that ran it."""
    tuners = {"lora": {}, "dora": {}, "vera": {}, "ia3": {}, "loha": {"rank": 4}, "fourierft": {}}
    grid = [{"method": "peft", "tuner": tuner, **options} for tuner, options in tuners.items()]
    sweep = write_sweep(tmp_path / "peft.yaml", grid)
    done = run_bench("sweep", str(sweep), "--results", str(tmp_path / "results"), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in record_files(tmp_path / "results")]
    assert sorted(r["method_config"]["tuner"] for r in records) == sorted(tuners)
    for record in records:
        assert record["status"] == "ok", record["error"]
        assert record["provenance"]["versions"]["peft"] == PEFT_VERSION
        assert record["metrics"]["tuned_params"] > 0
