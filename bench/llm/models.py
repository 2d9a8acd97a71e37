"""LLaMA-family backbones by name: a ``LlamaConfig`` for each shape the suite measures, random weights from
the config, or a local checkpoint folder (``from_pretrained(path)``, safetensors shards) for the real path.

Names: ``llama2_7b`` and ``llama2_13b`` (the shapes of LLaMA-2-7B / -13B: the paper's appendix model and
the next size), ``llama_7b_width`` (a few decoder layers at 7B width, for speed benchmarks) and
``llama_tiny`` (2 layers, width 64: tests and CPU smoke runs). Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
"""LLaMA-2-7B's shape (its published config.json)."""

CAUSAL_LM_CONFIGS: dict[str, dict[str, Any]] = {
    "llama2_7b": LLAMA2_7B,
    "llama2_13b": {
        **LLAMA2_7B,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
    "llama_7b_width": {**LLAMA2_7B, "num_hidden_layers": 2},
    "llama_tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
    },
}
"""Named LLaMA shapes (``LlamaConfig`` fields)."""

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
"""What a local checkpoint's config must share with the name it is loaded under."""


def is_causal_lm_name(name: str) -> bool:
    """Whether ``name`` is one of the named causal LM shapes (else a timm model name)."""
    return name in CAUSAL_LM_CONFIGS


def causal_lm_config(name: str, **overrides: Any) -> LlamaConfig:
    """The ``LlamaConfig`` of a named shape, with ``overrides`` (e.g. ``vocab_size`` of a tokenizer).
    ValueError naming the allowed names for an unknown one."""
    if name not in CAUSAL_LM_CONFIGS:
        raise ValueError(f"unknown causal LM {name!r}; allowed: {', '.join(CAUSAL_LM_CONFIGS)}")
    return LlamaConfig(**{**CAUSAL_LM_CONFIGS[name], **overrides})


def create_causal_lm(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    **overrides: Any,
) -> LlamaForCausalLM:
    """A causal LM of the named shape: random weights from its config (``overrides`` applied), or the
    local checkpoint folder ``checkpoint`` (config.json + safetensors shards), whose shape must be the
    named one. ``attention``: transformers' ``attn_implementation`` ("sdpa" or "eager")."""
    config = causal_lm_config(name, **overrides)
    if checkpoint is None:
        config._attn_implementation = attention
        return LlamaForCausalLM(config).to(dtype)
    path = Path(checkpoint)
    check_checkpoint_folder(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, torch_dtype=dtype, attn_implementation=attention
    )
    different = {k: (getattr(model.config, k), getattr(config, k)) for k in SHAPE_KEYS}
    different = {k: v for k, v in different.items() if v[0] != v[1]}
    if different:
        shown = ", ".join(f"{k} {got} (expected {want})" for k, (got, want) in different.items())
        raise ValueError(f"checkpoint {path} is not a {name}: {shown}")
    return model


def check_checkpoint_folder(path: Path) -> None:
    """FileNotFoundError naming what a local checkpoint folder lacks (config.json, weights)."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"causal LM checkpoint {path} is not a folder; expected a Hugging Face model folder "
            "(config.json, model*.safetensors or pytorch_model*.bin, tokenizer files)"
        )
    weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    missing = [
        n for n, ok in (("config.json", (path / "config.json").is_file()), ("weights", weights)) if not ok
    ]
    if missing:
        raise FileNotFoundError(
            f"causal LM checkpoint {path} has no {' and no '.join(missing)} "
            "(expected config.json and model*.safetensors or pytorch_model*.bin)"
        )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' own gradient (activation) checkpointing of every decoder layer, non-reentrant: frozen
    embeddings need no input gradient, and torch's non-reentrant checkpoint replays the RNG state, so a
    branch dropout draws the same masks in the recomputation (transformers >= 5 names it activation
    checkpointing)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
