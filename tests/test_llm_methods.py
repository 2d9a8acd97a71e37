"""Every method on a Hugging Face causal LM (a tiny ``LlamaForCausalLM`` built from a config): apply with the
LLM targets, train a step, save and load to identical logits, merge to the same logits; bad input raises
ValueError naming it with the model unchanged; lm_head and embeddings frozen unless asked."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import snell
from bench.run.train import make_optimizer
from bench.step import next_token_loss, train_step
from snell.core.families import IGNORE_INDEX, head_module, is_causal_lm
from snell.core.wrap import AdaptedLinear
from snell.tuners.snell.sparsify import RULES
from tests.harness import assert_unchanged, model_snapshot

VOCAB, WIDTH, MLP = 96, 32, 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 decoder layers, width 32 (4 heads, 2 key-value heads: grouped-query attention, so k and v are
    narrower than q), MLP 64, vocabulary 96; same seed, same weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tokens(batch: int = 3, length: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token labels (the last two positions of each row ignored, as padding is)."""
    ids = torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, -2:] = IGNORE_INDEX
    return ids, labels


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens()[0]).logits


def trained(method: str, **options) -> LlamaForCausalLM:
    """The tiny LLaMA with ``method`` applied (calibration for the data-driven ones) after two AdamW steps
    at a learning rate large enough to move every factor."""
    model = tiny_llama()
    calibration = [tokens(seed=s) for s in (5, 6)]
    snell.apply_method(model, snell.method_config(method, **options), calibration=calibration)
    optimizer, _ = make_optimizer(  # the harness's: honours snell.no_weight_decay (GPS)
        model, lr=1e-2, weight_decay=1e-4, total_steps=2, warmup_steps=0, warmup_lr=1e-2
    )
    model.train()
    for seed in (2, 3):
        train_step(model, optimizer, *tokens(seed=seed), loss_fn=next_token_loss)
    return model.eval()


METHODS = {
    "snell": {"rank": 8},
    "snell-linear-eq5": {"rank": 8, "kernel": "linear", "rule": "eq5"},
    "lora": {"rank": 8},
    "full": {},
    "peft-lora": {"tuner": "lora", "rank": 8},
    "peft-dora": {"tuner": "dora", "rank": 8},
    "gps": {"k": 2},
    "spt-lora": {"budget": 0.01},
    "snella": {"rank": 8},
}
"""Methods and options that fit the tiny LLaMA (width 32)."""


def method_of(key: str) -> str:
    return {"snell-linear-eq5": "snell", "peft-lora": "peft", "peft-dora": "peft"}.get(key, key)


def test_a_causal_lm_is_recognised_with_its_lm_head():
    model = tiny_llama()
    assert is_causal_lm(model)
    assert head_module(model) is model.lm_head


@pytest.mark.parametrize("key", list(METHODS))
def test_method_trains_saves_loads_and_merges(key, tmp_path):
    model = trained(method_of(key), **METHODS[key])
    before = logits(model)
    assert before.isfinite().all()
    assert not torch.equal(before, logits(tiny_llama())), "one training step changed nothing"

    snell.save_adapter(model, tmp_path / "adapter")
    fresh = snell.load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), before, rtol=0, atol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full fine-tuning: "nothing to merge"
        snell.merge(model)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["snell", "lora", "peft-lora", "gps", "snella"])
def test_adapter_methods_adapt_the_seven_projections_and_freeze_lm_head_and_embeddings(key):
    model = tiny_llama()
    calibration = [tokens(seed=5)]
    snell.apply_method(model, snell.method_config(method_of(key), **METHODS[key]), calibration=calibration)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("lm_head", "model.embed_tokens")) for n in trainable)
    for layer in range(2):
        for projection in PROJECTIONS:
            adapted = [
                n for n in trainable if n.startswith(f"model.layers.{layer}.") and f".{projection}." in n
            ]
            assert adapted, f"layer {layer}'s {projection} is not adapted by {key}"


def test_train_head_true_trains_the_lm_head_and_the_default_does_not():
    default = snell.apply_method(tiny_llama(), snell.method_config("snell", rank=8))
    asked = snell.apply_method(tiny_llama(), snell.method_config("snell", rank=8, train_head=True))
    assert not default.lm_head.weight.requires_grad
    assert asked.lm_head.weight.requires_grad
    assert snell.count_trainable(asked) - snell.count_trainable(default) == VOCAB * WIDTH


def test_snell_on_llama_counts_the_factors_of_every_projection():
    model = snell.apply_method(tiny_llama(), snell.method_config("snell", rank=8))
    kv = WIDTH // 2  # 2 key-value heads of 8 of 4 heads of width 8
    shapes = {"q": (WIDTH, WIDTH), "k": (kv, WIDTH), "v": (kv, WIDTH), "o": (WIDTH, WIDTH)}
    shapes |= {"gate": (MLP, WIDTH), "up": (MLP, WIDTH), "down": (WIDTH, MLP)}
    factors = sum(8 * (out + inp) for out, inp in shapes.values())
    assert snell.count_trainable(model) == 2 * factors


def test_bitfit_names_the_missing_biases():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no bias parameters"):
        snell.apply_method(tiny_llama(), snell.method_config("bitfit"))


@pytest.mark.parametrize(
    "method, options, named",
    [
        ("snell", {"targets": ("*q_projj",)}, "q_projj"),
        ("lora", {"targets": ("*attn.qkv",)}, "attn.qkv"),
        ("snell", {"rank": 40}, "rank=40"),
        ("peft", {"tuner": "dora", "rank": 8, "lora_alfa": 16}, "lora_alfa"),
    ],
)
def test_bad_target_or_option_names_it_and_leaves_the_model_unchanged(method, options, named):
    model = tiny_llama()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=named.replace(".", r"\.").replace("*", r"\*")):
        snell.apply_method(model, snell.method_config(method, **options))
    assert_unchanged(model, before)
    assert getattr(model, "tuning_config", None) is None


@pytest.mark.parametrize("architecture", ["MistralForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("method", ["snell", "lora"])
def test_llama_family_models_with_the_same_names_work_unchanged(architecture, method):
    import transformers

    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = getattr(transformers, architecture)(config).eval()
    snell.apply_method(model, snell.method_config(method, rank=8))
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    assert sorted(n.rsplit(".", 1)[1] for n in adapted) == sorted(PROJECTIONS)
    before = logits(model)
    snell.merge(model)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kernel", snell.list_kernels())
def test_every_snell_kernel_and_rule_trains_on_a_causal_lm(kernel, rule):
    model = tiny_llama()
    snell.apply_method(model, snell.method_config("snell", rank=8, kernel=kernel, rule=rule))
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = train_step(model.train(), optimizer, *tokens(), loss_fn=next_token_loss)
    assert loss.isfinite()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, factors[n])]
    assert len(moved) == len(factors), sorted(set(factors) - set(moved))[:3]
