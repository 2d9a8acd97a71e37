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

from .callbacks import TrainingCallback
from .registry import apply_method, config_from_dict, unchanged_on_error
from .wrap import AdaptedLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameter entries (shared parameters counted once): what holds gradients
    and optimizer state. ``count_tuned`` counts what training changes."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_tuned(model: nn.Module) -> int:
    """Entries that training changes: trainable parameters outside adapted layers plus each adapted
    layer's ``tuned_entries``. Equals ``count_trainable`` except for methods whose gradients are larger
    than what they tune (GPS: full-size weights, K entries per row selected)."""
    layers = _adapted(model)
    outside = sum(p.numel() for p in _trainable_outside(model, layers).values())
    return outside + sum(layer.tuned_entries() for layer in layers.values())


def _adapted(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Adapted layers by their state-dict prefix (name and a dot)."""
    return {f"{n}.": m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def _outside(name: str, layers: dict[str, AdaptedLinear]) -> bool:
    """Whether a state-dict name belongs to none of ``layers`` (``_adapted``'s prefixes)."""
    return not any(name.startswith(prefix) for prefix in layers)


def _trainable_outside(model: nn.Module, layers: dict[str, AdaptedLinear]) -> dict[str, nn.Parameter]:
    """Trainable parameters of ``model`` outside the adapted ``layers`` (head, cls token, biases...)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and _outside(n, layers)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters outside adapted layers, each adapted layer's ``adapter_tensors`` (its
    trainable parameters and persistent buffers) and the persistent state of training callbacks (what
    SNELLA's allocator decided), by state-dict name."""
    state = model.state_dict()
    layers = _adapted(model)
    found = {n: state[n] for n in _trainable_outside(model, layers)}
    for prefix, layer in layers.items():
        found |= {prefix + n: t for n, t in layer.adapter_tensors().items()}
    for prefix, module in model.named_modules():
        if isinstance(module, TrainingCallback):
            found |= {f"{prefix}.{n}": t for n, t in module.state_dict().items()}
    return {k: found[k].detach().contiguous() for k in sorted(found)}


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
    """Apply the saved method to a fresh ``model`` and load its tensors.

    Atomic: if the adapter does not fit (other backbone, head size or rank), a ValueError names the
    adapter folder, the first tensor that differs and both shapes, and the model is left as it was.
    """
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
    with unchanged_on_error(model):
        try:
            apply_method(model, config)
        except ValueError as err:
            raise ValueError(
                f"adapter {path} ({config.method}) cannot be applied to this model: {err}"
            ) from err
        expected = adapter_state_dict(model)
        in_model_order = {k: expected[k] for k in model.state_dict() if k in expected} | expected
        check_fits(in_model_order, tensors, path)
        layers = _adapted(model)
        with torch.no_grad():
            for prefix, layer in layers.items():
                own = {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
                layer.load_adapter_tensors(own)
            rest = {k: t for k, t in tensors.items() if _outside(k, layers)}
            model.load_state_dict(rest, strict=False)
    return model


def check_fits(expected: dict[str, Tensor], saved: dict[str, Tensor], path: Path) -> None:
    """ValueError naming the adapter folder and the first tensor whose name or shape differs."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [k for k in expected if saved[k].shape != expected[k].shape]  # in the model's order
    if wrong:
        first = wrong[0]
        raise ValueError(
            f"adapter {path} does not fit this model: {first} is {tuple(saved[first].shape)} in the adapter "
            f"but {tuple(expected[first].shape)} in the model ({len(wrong)} tensor(s) differ; was the "
            "adapter trained on another backbone, number of classes or rank?)"
        )
