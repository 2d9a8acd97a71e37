"""Causal LM backbones (``bench.llm.models``): named LLaMA shapes from a config, and local checkpoint
folders in Hugging Face's layout (safetensors shards) loaded offline, with clear errors."""

from __future__ import annotations

import pytest
import torch

from bench.llm.models import CAUSAL_LM_CONFIGS, causal_lm_config, create_causal_lm


def test_llama2_7b_shape_has_the_published_parameter_count():
    with torch.device("meta"):
        model = create_causal_lm("llama2_7b")
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616  # LLaMA-2-7B
    assert model.model.layers[0].mlp.up_proj.weight.shape == (11008, 4096)


def test_a_sharded_local_checkpoint_loads_offline_to_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = create_causal_lm("llama_tiny").eval()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB", safe_serialization=True)
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(shards) > 1, shards
    loaded = create_causal_lm("llama_tiny", tmp_path / "ckpt").eval()
    ids = torch.randint(512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_checkpoint_errors_name_the_folder_and_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        create_causal_lm("llama_tiny", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json and no weights"):
        create_causal_lm("llama_tiny", tmp_path / "empty")
    create_causal_lm("llama_tiny").save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"is not a llama2_7b: hidden_size 64 \(expected 4096\)"):
        create_causal_lm("llama2_7b", tmp_path / "tiny")


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(
        ValueError, match="unknown causal LM 'llama3'; allowed: " + ", ".join(CAUSAL_LM_CONFIGS)
    ):
        causal_lm_config("llama3")
