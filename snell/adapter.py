"""Counting, saving and loading what a tuning method trains (the "adapter"), PEFT-style on disk.

An adapter directory holds ``adapter_config.json`` (the applied method config) and
``adapter_model.safetensors`` (every trainable parameter plus the persistent buffers of adapter
modules, e.g. SPT's selected indices). Loading applies the same method to a fresh model, then the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .registry import apply_method, config_from_dict
from .wrap import AdaptedLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameter entries (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters plus the persistent buffers of adapter modules, by state-dict name."""
    state = model.state_dict()
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            own = {n for n, _ in module.named_buffers() if not n.startswith("base.")}
            keys |= {f"{prefix}.{n}" for n in own if f"{prefix}.{n}" in state}
    return {k: state[k].detach().contiguous() for k in sorted(keys)}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter of a model that had ``apply_method`` called on it; returns the directory."""
    config = getattr(model, "tuning_config", None)
    if config is None:
        raise ValueError("model has no tuning method applied; call snell.apply_method first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    save_file(adapter_state_dict(model), str(path / WEIGHTS_NAME))
    return path


def adapter_size_bytes(path: str | Path) -> int:
    """Size on disk of a saved adapter (its tensors file)."""
    return (Path(path) / WEIGHTS_NAME).stat().st_size


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the saved method to a fresh ``model`` and load its tensors. Errors name the bad file."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter file {f} not found (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = config_from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt adapter config {config_file}: {err}") from err
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt adapter weights {weights_file}: {err}") from err
    apply_method(model, config)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {weights_file} does not fit this model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)
    return model
