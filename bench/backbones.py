"""Backbones: the embedded MNIST ViT (a timm model with committed weights) and offline checkpoint loading.

Importing this module registers `vit_mnist_patch7_28` with timm, whose pretrained weights are the local
file `bench/assets/vit_mnist_patch7_28.safetensors` (made by `python -m bench pretrain`), so
`timm.create_model("vit_mnist_patch7_28", pretrained=True, num_classes=k)` works offline and gives a
fresh k-way head. Other timm models load a user-supplied local checkpoint; nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg_value,
    load_state_dict,
    register_model,
)
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from bench.data.embedded import IMG_SIZE, MNIST_MEAN, MNIST_STD
from bench.settings import ATTENTIONS, EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS

# State-dict entries that are not part of a classification backbone: classifier heads (always
# re-initialised for the downstream task), MoCo v3's momentum encoder and predictor, MAE's decoder.
_NON_BACKBONE_PREFIXES = ("head.", "head_dist.", "momentum_encoder.", "predictor.", "decoder", "mask_token")
_MOCO_PREFIX = "base_encoder."  # after timm has stripped DDP's "module."
_SHOW_KEYS = 5

default_cfgs = generate_default_cfgs(
    {
        f"{EMBEDDED_BACKBONE}.mnist5k": {
            "file": str(EMBEDDED_WEIGHTS),
            "num_classes": 10,
            "input_size": (1, IMG_SIZE, IMG_SIZE),
            "mean": (MNIST_MEAN,),
            "std": (MNIST_STD,),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "fixed_input_size": True,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    }
)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


@register_model
def vit_mnist_patch7_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 28x28 greyscale digits: 7x7 patches (16 tokens), width 128, depth 6, 4 heads (~1.2M params)."""
    model_args = dict(img_size=IMG_SIZE, patch_size=7, in_chans=1, embed_dim=128, depth=6, num_heads=4)
    return build_model_with_cfg(
        VisionTransformer,
        EMBEDDED_BACKBONE,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(model_args, **kwargs),
    )


def create_backbone(
    name: str,
    num_classes: int,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    **timm_kwargs,
) -> nn.Module:
    """timm model `name` with a fresh `num_classes` head, offline.

    With `checkpoint`, that local file is loaded (any name; see `load_checkpoint`). Without it,
    `pretrained=True` loads the committed asset for the embedded backbone and is an error for any
    other name; `pretrained=False` gives random init.
    """
    if checkpoint is None and pretrained:
        if name != EMBEDDED_BACKBONE:
            raise ValueError(
                f"pretrained {name!r} needs a local checkpoint file (checkpoint=...: .npz, .pth, .pth.tar or "
                ".safetensors); this benchmark runs offline and never downloads weights"
            )
        if not EMBEDDED_WEIGHTS.is_file():
            raise FileNotFoundError(
                f"{EMBEDDED_WEIGHTS} is missing; create it with `python -m bench pretrain`"
            )
    model = timm.create_model(
        name, pretrained=checkpoint is None and pretrained, num_classes=num_classes, **timm_kwargs
    )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load backbone weights from a local file into `model`, leaving its classifier head as initialised.

    `.npz`: Google's ViT format (e.g. ViT-B_16.npz), via timm's VisionTransformer loader.
    Anything else: a torch or safetensors state dict, bare or under "model" (MAE) or "state_dict"
    (MoCo v3, whose "module.base_encoder." prefix is stripped); heads, MoCo's momentum encoder and
    predictor, and MAE's decoder are dropped, then timm's ViT filter adapts patch/position embeddings.
    Raises FileNotFoundError for a missing file and CheckpointError for an unreadable file or for
    missing/unexpected/mis-shaped weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".npz":
        _load_npz(model, path)
    else:
        _load_state_dict(model, path)


def _arch(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _load_npz(model: nn.Module, path: Path) -> None:
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"{path}: .npz checkpoints need a timm VisionTransformer, not {_arch(model)}")
    try:
        model.load_pretrained(str(path))
    except KeyError as e:
        raise CheckpointError(f"{path} does not fit {_arch(model)}: missing array {e}") from e
    except Exception as e:  # unreadable archive, wrong shapes: name the file whatever numpy/torch raised
        raise CheckpointError(f"could not load {path} into {_arch(model)}: {e}") from e


def _load_state_dict(model: nn.Module, path: Path) -> None:
    try:
        state_dict = load_state_dict(str(path))  # unwraps "state_dict"/"model", strips "module."
    except Exception as e:  # truncated or not a checkpoint at all
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
    if any(k.startswith(_MOCO_PREFIX) for k in state_dict):
        state_dict = {
            k.removeprefix(_MOCO_PREFIX): v for k, v in state_dict.items() if k.startswith(_MOCO_PREFIX)
        }
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_NON_BACKBONE_PREFIXES)}
    if isinstance(model, VisionTransformer):
        state_dict = checkpoint_filter_fn(state_dict, model)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path} does not fit {_arch(model)}: {e}") from e
    missing = [k for k in missing if not k.startswith(_NON_BACKBONE_PREFIXES)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit {_arch(model)}: {len(missing)} missing keys {missing[:_SHOW_KEYS]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:_SHOW_KEYS]}"
        )


def input_size(name: str, img_size: int | None) -> dict[str, int]:
    """``img_size`` for timm models built for one input size (ViT, Swin: their position embeddings or
    windows follow it, a checkpoint's are resampled); convolutional ones take any size and no option."""
    return {"img_size": img_size} if img_size and get_pretrained_cfg_value(name, "fixed_input_size") else {}


@functools.cache
def checkpoint_problems(name: str, checkpoint: str, img_size: int | None = None) -> tuple[str, ...]:
    """Why ``checkpoint`` cannot be loaded into timm model ``name`` (unreadable, missing or mis-shaped
    weights), or nothing: the file is read and loaded into the model built on the meta device, which
    allocates no weights. Cached per file, so a sweep reads each checkpoint once."""
    if not timm.is_model(name):
        return ()  # the unknown name is reported on its own
    options = (
        {"img_size": img_size} if img_size and get_pretrained_cfg_value(name, "fixed_input_size") else {}
    )
    try:
        with torch.device("meta"):
            model = timm.create_model(name, **options)
        with warnings.catch_warnings():  # copying into meta parameters is a no-op, and says so
            warnings.simplefilter("ignore")
            load_checkpoint(model, checkpoint)
    except (CheckpointError, FileNotFoundError, OSError, ValueError) as err:
        return (str(err),)
    return ()


def pretraining_head(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """The classifier head backbone ``name`` was pretrained with, frozen: the embedded backbone's (no
    checkpoint), or the head stored in a local checkpoint (``.npz``: ``head/kernel``; a state dict: the
    model's classifier entries, e.g. ``head.weight``). CheckpointError if the checkpoint has none."""
    if checkpoint is None:
        model = create_backbone(name, num_classes=10) if name == EMBEDDED_BACKBONE else None
    else:
        model = _model_with_stored_head(name, Path(checkpoint))
    if model is None:
        raise ValueError(f"the pretraining head of {name!r} needs its checkpoint file (checkpoint=...)")
    return model.get_classifier().requires_grad_(False)


def _model_with_stored_head(name: str, path: Path) -> nn.Module:
    """timm model ``name`` with as many classes as the checkpoint's head, that head loaded into it."""
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            if "head/bias" not in arrays:
                raise CheckpointError(f"{path} has no pretraining head (head/kernel, head/bias)")
            num_classes = arrays["head/bias"].shape[-1]
        model = timm.create_model(name, num_classes=num_classes)
        _load_npz(model, path)
        return model
    model = timm.create_model(name)
    classifier = model.pretrained_cfg.get("classifier", "head")
    state_dict = load_state_dict(str(path))
    head = {
        k.removeprefix(f"{classifier}."): v for k, v in state_dict.items() if k.startswith(f"{classifier}.")
    }
    if "weight" not in head:
        raise CheckpointError(f"{path} has no pretraining head ({classifier}.weight)")
    model.reset_classifier(head["weight"].shape[0])
    model.get_classifier().load_state_dict(head)
    return model


def check_attention(attention: str) -> None:
    """Raise ValueError, naming the allowed values, unless ``attention`` is one of ``ATTENTIONS``."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTIONS}")


def set_attention(model: nn.Module, attention: str) -> nn.Module:
    """Compute attention ``"fused"`` (timm's default: ``F.scaled_dot_product_attention``, which keeps no
    token-by-token matrix for backward) or ``"explicit"`` (``softmax(q k^T) v``, as the public SNELL and GPS
    code and timm before 0.9 compute it: every block keeps its batch x heads x N x N attention matrix for
    backward, which is in the memory figures of the SNELL paper). Same outputs; only memory and speed differ.
    """
    check_attention(attention)
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    if attention == "explicit" and not modules:
        raise ValueError(
            f"attention='explicit' needs timm attention modules (a `fused_attn` switch); "
            f"{type(model).__name__} has none"
        )
    for module in modules:
        module.fused_attn = attention == "fused"
    return model


def attention_of(model: nn.Module) -> str:
    """How ``model`` computes attention: "explicit" if any timm attention module has ``fused_attn`` off
    (``set_attention``, or timm's ``TIMM_FUSED_ATTN=0``), else "fused"."""
    explicit = any(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    return "explicit" if explicit else "fused"
