"""The public interface: methods, configs, apply, counts, merge, adapters, bad input."""

import copy
import warnings

import pytest
import timm
import torch

import snell
from tests.conftest import make_tiny_vit
from tests.harness import assert_unchanged, model_snapshot

ADAPTER_METHODS = ["lora", "snell"]


def test_required_methods_registered():
    assert {"full", "linear", "lora", "spt-lora", "snell", "bitfit"} <= set(snell.list_methods())


def test_snell_config_round_trips_through_dict():
    cfg = snell.method_config("snell", rank=16, kernel="rbf", kernel_options={"beta": 2.0}, sparsity=0.5)
    assert snell.config_from_dict(cfg.to_dict()) == cfg


def test_methods_describe_themselves():
    """Row labels, families, ablation axes and whether the backbone changes come from each config."""
    cfg = snell.method_config("snell", rank=4, rule="eq5")
    assert cfg.label({"rank": 4, "rule": "eq5"}) == "snell-4 piecewise_linear s=0.9 rule=eq5"
    assert cfg.label({"rank": 4, "rule": "eq5"}, named=()) == "snell-4 piecewise_linear s=0.9"
    snella = snell.method_config("snella", rank=32, sparsity=0.0, target_sparsity=0.3)
    assert (
        snella.label({"rank": 32, "sparsity": 0.0, "target_sparsity": 0.3}) == "snella-32 target_sparsity=0.3"
    )
    dora = snell.method_config("peft", tuner="dora", lora_alpha=16)
    assert dora.label({"tuner": "dora", "lora_alpha": 16}) == "peft-dora-8 lora_alpha=16"
    assert snell.method_config("gps").label({"calibration_batches": 2}) == "gps"
    assert snell.config_class("peft").family({"tuner": "vera"}) == "peft-vera"
    assert (
        snell.config_class("peft").family({}) == "peft-lora"
        and snell.config_class("lora").family({}) == "lora"
    )
    assert snell.config_class("snell").ablation_axes == ("kernel", "rank", "sparsity")
    assert (
        snell.config_class("lora").ablation_axes == ("rank",)
        and snell.config_class("full").ablation_axes == ()
    )
    changes = {m: snell.config_class(m).changes_backbone for m in snell.list_methods()}
    assert [m for m, changed in changes.items() if not changed] == ["linear"]


def targets_of(model):
    return [m for m in model.modules() if isinstance(m, snell.AdaptedLinear)]


@pytest.mark.parametrize("method", ADAPTER_METHODS)
@pytest.mark.parametrize("rank", [2, 8])
@pytest.mark.parametrize("qkv", ["separate", "shared_a"])
def test_trainable_counts_match_formula(method, rank, qkv):
    model = make_tiny_vit()
    head = sum(p.numel() for p in model.get_classifier().parameters())
    cls = model.cls_token.numel()
    snell.apply_method(model, snell.method_config(method, rank=rank, qkv=qkv))
    layers = targets_of(model)
    assert len(layers) == 2 * 4  # qkv, proj, fc1, fc2 in each of 2 blocks

    def factors(m):  # q, k and v of the fused qkv each have their own A unless it is shared
        copies_of_a = 3 if qkv == "separate" and m.out_features == 3 * m.in_features else 1
        return rank * (copies_of_a * m.in_features + m.out_features)

    assert snell.count_trainable(model) == sum(factors(m) for m in layers) + head + cls


@pytest.mark.parametrize(("qkv", "factor_entries"), [("separate", 1_327_104), ("shared_a", 1_179_648)])
def test_vit_b16_snell8_trains_the_public_codes_factor_count(qkv, factor_entries):
    with torch.device("meta"):  # shapes only: nothing allocated
        model = timm.create_model("vit_base_patch16_224", num_classes=100)
    snell.apply_method(model, snell.method_config("snell", rank=8, qkv=qkv))
    head_and_cls = 768 * 100 + 100 + 768
    assert snell.count_trainable(model) == factor_entries + head_and_cls


def test_full_and_linear_counts():
    full, linear = make_tiny_vit(), make_tiny_vit()
    total = sum(p.numel() for p in full.parameters())
    snell.apply_method(full, snell.method_config("full"))
    snell.apply_method(linear, snell.method_config("linear"))
    assert snell.count_trainable(full) == total
    assert snell.count_trainable(linear) == sum(p.numel() for p in linear.head.parameters())


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_merge_leaves_outputs_unchanged(method, images):
    model = make_tiny_vit()
    snell.apply_method(model, snell.method_config(method, rank=4))
    with torch.no_grad():  # move LoRA's zero-initialised B away from zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    before = model(images)
    snell.merge(model)
    assert not targets_of(model)
    assert (model(images) - before).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", ADAPTER_METHODS + ["full", "linear", "bitfit"])
def test_adapter_round_trip(method, images, tmp_path):
    model = make_tiny_vit(seed=0)
    snell.apply_method(model, snell.method_config(method))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    snell.save_adapter(model, tmp_path / "adapter")
    fresh = snell.load_adapter(make_tiny_vit(seed=0), tmp_path / "adapter")
    model.eval(), fresh.eval()
    assert torch.equal(model(images), fresh(images))
    assert fresh.tuning_config == model.tuning_config


def test_state_dict_holds_no_index_or_mask(tiny_vit):
    reference = set(make_tiny_vit().state_dict())
    snell.apply_method(tiny_vit, snell.method_config("snell", sparsity=0.9))
    extra = {
        k for k in tiny_vit.state_dict() if not k.endswith(".base.weight") and not k.endswith(".base.bias")
    }
    extra -= reference
    assert extra and all(k.endswith(("lora_A", "lora_B")) for k in extra), extra
    assert not any(b.dtype == torch.bool or not b.is_floating_point() for b in tiny_vit.buffers())


@pytest.mark.parametrize("s", [0.5, 0.9, 0.99])
def test_applied_update_has_the_requested_sparsity(s, tiny_vit):
    snell.apply_method(tiny_vit, snell.method_config("snell", rank=4, sparsity=s, qkv="fused"))
    for layer in targets_of(tiny_vit):
        update = layer.delta_weight()
        assert abs((update == 0).float().mean().item() - s) <= 1 / update.numel() + 1e-9


BAD_INPUTS = [
    (("snell",), {"rank": 0}, "rank=0 must be an integer >= 1"),
    (("lora",), {"rank": 64}, r"rank=64 exceeds min\(in, out\)=32"),
    (("snell",), {"sparsity": 1.0}, r"sparsity=1.0 must be a number in \[0, 1\)"),
    (("snell",), {"sparsity": -0.1}, r"sparsity=-0.1 must be a number in \[0, 1\)"),
    (("snell",), {"kernel": "gauss"}, "unknown kernel 'gauss'; allowed: .*piecewise_linear"),
    (("snell",), {"rule": "soft"}, "unknown sparsification rule 'soft'; allowed: public, eq5, hard"),
    (("snell",), {"ranks": 8}, r"unknown option\(s\) \['ranks'\].*did you mean 'rank'"),
    (("snel",), {}, "unknown method 'snel' \\(did you mean 'snell'\\?\\); allowed: "),
    (("snell",), {"targets": ("*attn.qkvv",)}, r"target pattern\(s\) \['\*attn.qkvv'\] match no nn.Linear"),
    (("spt-lora",), {}, "calibration"),
]


@pytest.mark.parametrize("args,options,message", BAD_INPUTS)
def test_bad_input_raises_clear_error_and_leaves_model_untouched(args, options, message):
    model = make_tiny_vit()
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        snell.apply_method(model, snell.method_config(*args, **options))
    assert [p.requires_grad for p in model.parameters()] == flags
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(model, "tuning_config", None) is None


def test_corrupt_adapter_names_the_file(tmp_path, tiny_vit):
    snell.apply_method(tiny_vit, snell.method_config("lora"))
    path = snell.save_adapter(tiny_vit, tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        snell.load_adapter(make_tiny_vit(), path)


def saved_adapter(tmp_path, model, **options):
    snell.apply_method(model, snell.method_config("snell", **options))
    return snell.save_adapter(model, tmp_path / "adapter")


def wider_vit(num_classes=5):
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, embed_dim=48, depth=2, num_heads=2, num_classes=num_classes
    )


def rank_edited(path):
    config = path / "adapter_config.json"
    config.write_text(config.read_text().replace('"rank": 4', '"rank": 2'))
    return path


MISFITS = {  # a saved adapter and a model it does not fit, and the first tensor that differs
    "other backbone": (lambda p: p, wider_vit, "cls_token"),
    "other head size": (lambda p: p, lambda: make_tiny_vit(num_classes=9), "head.weight"),
    "other rank": (rank_edited, make_tiny_vit, "blocks.0.attn.qkv.lora_A"),
}


@pytest.mark.parametrize("case", MISFITS)
def test_load_adapter_that_does_not_fit_names_it_and_leaves_the_model_as_it_was(case, tmp_path, images):
    edit, target, first_tensor = MISFITS[case]
    path = edit(saved_adapter(tmp_path, make_tiny_vit(), rank=4))
    model = target()
    before = model_snapshot(model)
    with pytest.raises(
        ValueError,
        match=rf"adapter {path}.*: {first_tensor} is \([\d, ]+\) in the adapter but \([\d, ]+\) in the model",
    ):
        snell.load_adapter(model, path)
    assert_unchanged(model, before)
    snell.apply_method(model, snell.method_config("lora"))  # the model can take an adapter again


def test_apply_method_failing_midway_leaves_the_model_as_it_was():
    model = make_tiny_vit()
    before = model_snapshot(model)

    def batches():  # SPT's calibration: one good batch, then one whose labels do not exist
        yield torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
        yield torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 99])

    with pytest.raises((IndexError, RuntimeError)):
        snell.apply_method(model, snell.method_config("spt-lora", budget=500), calibration=batches())
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ADAPTER_METHODS + ["linear"])
def test_merge_returns_a_plain_model(method, tmp_path):
    plain = make_tiny_vit()
    model = snell.apply_method(make_tiny_vit(), snell.method_config(method))
    assert snell.count_trainable(model) != snell.count_trainable(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # linear: nothing to fold
        snell.merge(model)
    assert snell.count_trainable(model) == snell.count_trainable(plain)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == [
        (n, p.requires_grad) for n, p in plain.named_parameters()
    ]
    assert getattr(model, "tuning_config", None) is None
    with pytest.raises(ValueError, match="no adapter to merge"):
        snell.merge(model)  # a second merge
    with pytest.raises(ValueError, match="no tuning method applied"):
        snell.save_adapter(model, tmp_path)
    snell.apply_method(model, snell.method_config("lora", rank=4))  # tuned anew
    assert targets_of(model)


def test_merge_says_when_there_is_nothing_to_merge():
    with pytest.raises(ValueError, match="no adapter to merge"):
        snell.merge(make_tiny_vit())
    model = snell.apply_method(make_tiny_vit(), snell.method_config("full"))
    with pytest.warns(UserWarning, match="nothing to merge"):
        snell.merge(model)


def test_a_calibration_function_passed_uncalled_is_named():
    def batches():
        yield from ()

    with pytest.raises(TypeError, match=r"got function; call it: calibration=batches\(\)"):
        snell.apply_method(make_tiny_vit(), snell.method_config("spt-lora"), calibration=batches)
