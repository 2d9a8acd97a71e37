"""Backbones: the embedded asset via timm, and local .npz / .pth / .safetensors checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from bench.backbones import CheckpointError, create_backbone
from bench.data import load_mnist_split
from bench.settings import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS

NAME = "vit_tiny_patch16_224"
SMALL = dict(img_size=32, depth=2)  # 4 patches, 2 blocks: builds in milliseconds


@pytest.fixture
def source() -> VisionTransformer:
    """A randomly initialised 10-class ViT whose weights the checkpoints carry."""
    torch.manual_seed(0)
    return timm.create_model(NAME, num_classes=10, **SMALL)


def _backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def _assert_same_backbone(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = _backbone(a), _backbone(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _write_google_npz(model: VisionTransformer, path: Path) -> None:
    """Write `model` in Google's ViT .npz naming, the inverse of timm's `_load_weights`."""
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": model.patch_embed.proj.bias,
        "cls": model.cls_token,
        "Transformer/posembed_input/pos_embedding": model.pos_embed,
        "Transformer/encoder_norm/scale": model.norm.weight,
        "Transformer/encoder_norm/bias": model.norm.bias,
        "head/kernel": model.head.weight.T,
        "head/bias": model.head.bias,
    }
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        attn = p + "MultiHeadDotProductAttention_1/"
        w |= {
            p + "LayerNorm_0/scale": block.norm1.weight,
            p + "LayerNorm_0/bias": block.norm1.bias,
            p + "LayerNorm_2/scale": block.norm2.weight,
            p + "LayerNorm_2/bias": block.norm2.bias,
            attn + "out/kernel": block.attn.proj.weight.reshape(dim, heads, -1).permute(1, 2, 0),
            attn + "out/bias": block.attn.proj.bias,
        }
        for name, weight, bias in zip(
            ("query", "key", "value"),
            block.attn.qkv.weight.chunk(3),
            block.attn.qkv.bias.chunk(3),
            strict=True,
        ):
            w[attn + f"{name}/kernel"] = weight.T.reshape(dim, heads, -1)
            w[attn + f"{name}/bias"] = bias.reshape(heads, -1)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = fc.weight.T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = fc.bias
    np.savez(path, **{k: v.detach().numpy() for k, v in w.items()})


def test_npz_round_trip(source: VisionTransformer, tmp_path: Path) -> None:
    path = tmp_path / "ViT-tiny.npz"
    _write_google_npz(source, path)
    same_head = create_backbone(NAME, num_classes=10, checkpoint=path, **SMALL)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(same_head.eval()(x), source.eval()(x), atol=1e-5)  # head kept when it fits
    new_head = create_backbone(NAME, num_classes=3, checkpoint=path, **SMALL)
    _assert_same_backbone(new_head, source)
    assert new_head.head.weight.shape == (3, 192)


def test_npz_missing_arrays_and_corrupt_file(source: VisionTransformer, tmp_path: Path) -> None:
    shallow = timm.create_model(NAME, num_classes=10, img_size=32, depth=1)
    path = tmp_path / "shallow.npz"
    _write_google_npz(shallow, path)
    with pytest.raises(CheckpointError, match=r"shallow\.npz.*encoderblock_1"):
        create_backbone(NAME, num_classes=3, checkpoint=path, **SMALL)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"shallow\.npz"):
        create_backbone(NAME, num_classes=3, checkpoint=path, **SMALL)


@pytest.mark.parametrize("style", ["mae", "moco", "bare"])
def test_state_dict_formats(source: VisionTransformer, tmp_path: Path, style: str) -> None:
    weights = source.state_dict()
    if style == "mae":  # {"model": encoder} plus decoder weights
        checkpoint = {"model": _backbone(source) | {"decoder_embed.weight": torch.zeros(4, 4)}}
    elif style == "moco":  # DDP-wrapped base and momentum encoders, MLP projection head, predictor
        encoder = _backbone(source) | {"head.0.weight": torch.zeros(8, 192)}
        checkpoint = {
            "epoch": 300,
            "state_dict": {f"module.base_encoder.{k}": v for k, v in encoder.items()}
            | {f"module.momentum_encoder.{k}": v + 1 for k, v in encoder.items()}
            | {"module.predictor.0.weight": torch.zeros(8, 8)},
        }
    else:
        checkpoint = weights
    path = tmp_path / f"{style}.pth.tar"
    torch.save(checkpoint, path)
    model = create_backbone(NAME, num_classes=5, checkpoint=path, **SMALL)
    _assert_same_backbone(model, source)
    assert model.head.out_features == 5


def test_safetensors_and_embedded_name(tmp_path: Path) -> None:
    """The embedded model loads any local file too; its head is re-initialised for the new classes."""
    torch.manual_seed(1)
    trained = timm.create_model(EMBEDDED_BACKBONE, num_classes=10)
    path = tmp_path / "mnist.safetensors"
    safetensors.torch.save_file(trained.state_dict(), path)
    model = create_backbone(EMBEDDED_BACKBONE, num_classes=8, checkpoint=path)
    _assert_same_backbone(model, trained)
    assert model.head.out_features == 8
    # timm's own pretrained_cfg file= mechanism, as the registered cfg uses for the asset
    via_timm = timm.create_model(
        EMBEDDED_BACKBONE, pretrained=True, num_classes=8, pretrained_cfg_overlay=dict(file=str(path))
    )
    _assert_same_backbone(via_timm, trained)


def test_mismatched_keys_are_listed(source: VisionTransformer, tmp_path: Path) -> None:
    weights = _backbone(source)
    weights["blocks.0.extra.weight"] = torch.zeros(1)
    del weights["blocks.1.norm1.weight"]
    path = tmp_path / "odd.pth"
    torch.save({"model": weights}, path)
    with pytest.raises(
        CheckpointError, match=r"odd\.pth.*blocks\.1\.norm1\.weight.*blocks\.0\.extra\.weight"
    ):
        create_backbone(NAME, num_classes=5, checkpoint=path, **SMALL)


def test_wrong_shapes_name_the_file(source: VisionTransformer, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(_backbone(source), path)
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors"):
        create_backbone(NAME, num_classes=5, checkpoint=path, img_size=32, depth=2, embed_dim=96)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file_names_it(source: VisionTransformer, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        safetensors.torch.save_file(source.state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"broken\\{suffix}"):
        create_backbone(NAME, num_classes=5, checkpoint=path, **SMALL)


def test_missing_file_and_offline_rules(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_backbone(NAME, num_classes=5, checkpoint=tmp_path / "nowhere.pth", **SMALL)
    with pytest.raises(ValueError, match="local checkpoint"):
        create_backbone(NAME, num_classes=5, **SMALL)
    model = create_backbone(NAME, num_classes=5, pretrained=False, **SMALL)
    assert model.head.out_features == 5


def test_embedded_asset_is_a_good_mnist_model() -> None:
    """The committed asset loads through timm's registry and classifies the held-out digits."""
    assert EMBEDDED_WEIGHTS.is_file(), "run `python -m bench pretrain` to create the asset"
    heldout = load_mnist_split().heldout
    model = create_backbone(EMBEDDED_BACKBONE, num_classes=10).eval()
    with torch.no_grad():
        accuracy = (model(heldout.images).argmax(1) == heldout.labels).float().mean().item()
    assert accuracy > 0.9
    fresh_head = timm.create_model(EMBEDDED_BACKBONE, pretrained=True, num_classes=8)
    _assert_same_backbone(fresh_head, model)
    assert fresh_head.head.out_features == 8
    scratch = create_backbone(EMBEDDED_BACKBONE, num_classes=8, pretrained=False)
    assert not torch.equal(scratch.patch_embed.proj.weight, model.patch_embed.proj.weight)
