"""Hugging Face PEFT's tuners as one method family: ``snell.method_config("peft", tuner="dora", rank=8)``.

``tuner`` is PEFT's method name in lower case (``PeftType`` lowercased: lora, loha, lokr, adalora, boft,
oft, ia3, vera, fourierft, hra, ...) or "dora" (LoRA with ``use_dora=True``); ``rank`` sets the tuner's
rank field (``RANK_FIELDS``; ``r`` where it has one); any other option is a field of the tuner's PEFT
config, passed through (``lora_alpha=16``, ``lora_dropout=0.1``). The adapters go on the same layers
as our methods (``DEFAULT_TARGETS``: timm's fused qkv, attn.proj, fc1, fc2; never the head or the patch
embedding), named to PEFT by their full module names, and the head and cls token train as ours do, so
rows compare like for like.

``peft.inject_adapter_in_model`` puts PEFT's layers into the timm model itself (no ``PeftModel``
wrapper). Two kinds of tuner keep state on PEFT's tuner object, which ``inject_adapter_in_model``
refuses or drops, so they get the tuner built directly (what that function does): shared-state tuners
(VeRA's frozen random projections, VB-LoRA's vector bank, ...), whose layers hold the shared state, so
it stays on the model; and AdaLoRA, whose rank allocator runs as a ``TrainingCallback`` after each
optimizer step (PEFT's ``update_and_allocate``). AdaLoRA's orthogonal regularisation is not added: PEFT
adds it only to an output's ``.loss``, which a timm model's logits do not have.

Adapters save and load through snell's own files: every tensor a tuner needs is a trainable parameter
or is rebuilt the same by ``apply`` (VeRA's projections from ``projection_prng_key``, FourierFT's
frequencies from ``random_loc_seed``, BOFT's permutations). AdaLoRA's allocator state (step, importance
averages) is not saved: a loaded adapter computes the same outputs, and further training would allocate
anew. Shapes-only memory estimates (``bench.memory.estimate.step_memory``) work for tuners whose set-up
and forward read no tensor values; LoHa and LoKr (a random module-dropout draw in every forward), BOFT,
SHiRA, FRoD, UniLoRA, AdaMSS (set-up) and VB-LoRA, WaveFT (forward) do, and need a real measurement.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, ClassVar

import peft
import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules.module import register_module_module_registration_hook

from snell.core.callbacks import TrainingCallback
from snell.core.families import trains_head
from snell.core.registry import Calibration, TuningConfig, register_method
from snell.core.validation import check_rank, field_type_problems
from snell.core.wrap import (
    DEFAULT_TARGETS,
    classifier,
    freeze_all_but_head,
    matches,
    set_cls_token_trainable,
    targets_except_head,
)

PEFT_VERSION: str = peft.__version__
"""The PEFT release whose tuners ran (records name it through ``bench.records.provenance.versions``)."""

ADAPTER = "default"
"""PEFT's adapter name: parameters are named ``<layer>.<tuner param>.default...``."""

UNSUPPORTED = {
    "ln_tuning": "it tunes norm layers, not the linear targets every method here adapts",
    "poly": "its layers need task_ids in every forward call",
    "shadow": "peft.inject_adapter_in_model refuses it",
    "trainable_tokens": "it tunes token embeddings, which a ViT does not have",
}
"""PEFT tuners for layers that a ViT classifier does not have or that need more than images to run."""


def _injectable() -> dict[str, PeftType]:
    """Lower-case name -> PeftType of every PEFT tuner that adapts modules named in ``target_modules``
    (prompt learning and adaption prompt do not), less ``UNSUPPORTED``."""
    found = {}
    for peft_type in PeftType:
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
        if config_cls is None or not (isinstance(tuner_cls, type) and issubclass(tuner_cls, BaseTuner)):
            continue
        if "target_modules" in {f.name for f in dataclasses.fields(config_cls)}:
            found[peft_type.value.lower()] = peft_type
    return {name: t for name, t in sorted(found.items()) if name not in UNSUPPORTED}


PEFT_TYPES: dict[str, PeftType] = _injectable() | {"dora": PeftType.LORA}
"""Every tuner name the method takes (PEFT's, plus "dora")."""

TUNERS: tuple[str, ...] = tuple(sorted(PEFT_TYPES))

RANK_FIELDS: dict[str, str | None] = {
    name: ("r" if "r" in {f.name for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[t])} else None)
    for name, t in PEFT_TYPES.items()
} | {"adalora": "target_r", "oft": None}
"""The PEFT config field ``rank`` sets, or None (then ``rank`` must be None). AdaLoRA: its target
average rank (it starts at ``init_r``, default 12; its ``r`` is unused). OFT: ``r`` counts blocks, not a
rank, and excludes ``oft_block_size``: pass either as an option."""

RESERVED = {
    "target_modules": "the targets are the standard ones (DEFAULT_TARGETS), for like-for-like rows",
    "target_parameters": "the targets are the standard ones (DEFAULT_TARGETS), for like-for-like rows",
    "exclude_modules": "the targets are the standard ones (DEFAULT_TARGETS), for like-for-like rows",
    "modules_to_save": "the head trains through train_head",
} | {f.name: "PEFT's bookkeeping, set by PEFT or by tuner" for f in dataclasses.fields(peft.PeftConfig)}
"""PEFT config fields the method sets itself: options may not name them."""

IA3_FEEDFORWARD = ("*mlp.fc2",)
"""IA3's default ``feedforward_modules`` (globs over the targets; an option of that name replaces them):
fc2's input, the FFN's inner activation, is scaled as in the (IA)^3 paper; other targets scale outputs.
PEFT itself knows defaults only for transformers' architectures and refuses a timm model without them."""

_PLACEHOLDER_TARGETS = ["qkv", "proj", "fc1", "fc2"]
"""Targets for building a PEFT config before a model is known (PEFT's own checks of the options)."""


def config_class(tuner: str) -> type:
    """The PEFT config dataclass of ``tuner``."""
    return PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPES[tuner]]


def tuner_options(tuner: str) -> list[str]:
    """The PEFT config fields ``tuner`` takes as options (its rank field is set through ``rank``)."""
    reserved = set(RESERVED) | {RANK_FIELDS[tuner]} | ({"use_dora"} if tuner == "dora" else set())
    return [f.name for f in dataclasses.fields(config_class(tuner)) if f.name not in reserved]


def _freeze(value: Any) -> Any:
    """Lists as tuples (as ``TuningConfig.from_options`` does), so a JSON round trip compares equal."""
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


def _thaw(value: Any) -> Any:
    """Tuples back to the lists PEFT's configs expect."""
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class PeftMethodConfig(TuningConfig):
    """A PEFT tuner (``tuner``, lower case; "dora" = LoRA with ``use_dora=True``) on the standard targets.

    rank: the tuner's rank field (``RANK_FIELDS``), or None for PEFT's default or a tuner without one.
    options: other fields of the tuner's PEFT config (``method_config`` takes them as keywords).
    train_cls_token: the cls token trains too, as in our methods (the head trains through train_head).
    """

    open_options: ClassVar[bool] = True
    """``from_options`` takes keywords beyond the fields (a sweep must not reject them up front)."""
    ablation_axes: ClassVar[tuple[str, ...]] = ("rank",)
    label_hidden: ClassVar[frozenset[str]] = TuningConfig.label_hidden | {"tuner"}
    """The tuner is in the label's head (``peft-dora-8``)."""

    tuner: str = "lora"
    rank: int | None = 8
    options: dict[str, Any] = field(default_factory=dict)
    train_cls_token: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.options, dict):
            raise ValueError(f"options={self.options!r} must be a dict of PEFT config fields")
        object.__setattr__(self, "options", {k: _freeze(v) for k, v in self.options.items()})
        super().__post_init__()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    @classmethod
    def family(cls, options: Mapping[str, Any]) -> str:
        """``peft-<tuner>`` (``peft-dora``): each PEFT tuner is a family of its own in figures."""
        return f"peft-{options.get('tuner') or cls.tuner}"

    @classmethod
    def from_options(cls, **options: Any) -> PeftMethodConfig:
        """Own fields by name, every other keyword into ``options`` (checked against the tuner's PEFT
        config in ``validate``). Without an explicit ``rank``, a tuner with no rank field gets None."""
        own = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in options.items() if k not in own}
        fields = {k: v for k, v in options.items() if k in own}
        nested = fields.pop("options", None) or {}
        if not isinstance(nested, dict):
            raise ValueError(f"options={nested!r} must be a dict of PEFT config fields")
        clash = sorted(set(nested) & set(extra))
        if clash:
            raise ValueError(f"option(s) {clash} given both as keywords and in options")
        tuner = fields.get("tuner", cls.tuner)
        if "rank" not in fields and isinstance(tuner, str) and RANK_FIELDS.get(tuner, "r") is None:
            fields["rank"] = None
        return cls(**fields, options={**nested, **extra})

    def validate(self) -> None:
        if self.tuner in UNSUPPORTED:
            raise ValueError(
                f"PEFT tuner {self.tuner!r} is not supported here: {UNSUPPORTED[self.tuner]}; allowed "
                f"(peft {PEFT_VERSION}): {', '.join(TUNERS)}"
            )
        if self.tuner not in PEFT_TYPES:
            hint = difflib.get_close_matches(str(self.tuner), TUNERS, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(
                f"unknown PEFT tuner {self.tuner!r}{did_you_mean}; allowed (peft {PEFT_VERSION}): "
                f"{', '.join(TUNERS)}"
            )
        rank_field = RANK_FIELDS[self.tuner]
        if self.rank is not None:
            if rank_field is None:
                raise ValueError(
                    f"tuner {self.tuner!r} has no rank field: pass rank=None and size it with its own "
                    f"options ({', '.join(tuner_options(self.tuner))})"
                )
            check_rank(self.rank)
        allowed = tuner_options(self.tuner)
        bad = sorted(set(self.options) - set(allowed))
        if bad:
            why = [f"{k}: {RESERVED[k]}" for k in bad if k in RESERVED]
            if rank_field in bad:
                why.append(f"{rank_field}: set it with rank=")
            if self.tuner == "dora" and "use_dora" in bad:
                why.append("use_dora: tuner 'dora' sets it")
            hints = [h for b in bad for h in difflib.get_close_matches(str(b), allowed, n=1)]
            raise ValueError(
                f"unknown option(s) {bad} for PEFT tuner {self.tuner!r} ({config_class(self.tuner).__name__})"
                + (f" ({'; '.join(why)})" if why else "")
                + (f" (did you mean {', '.join(map(repr, hints))}?)" if hints else "")
                + f"; allowed: {', '.join(allowed)} (and train_head, train_cls_token, rank)"
            )
        with warnings.catch_warnings():  # the same config is built again, warnings and all, by apply
            warnings.simplefilter("ignore")
            built = self.peft_config(_PLACEHOLDER_TARGETS)
        problems = [p for p in field_type_problems(built) if p.split("=", 1)[0] in self.options]
        problems += [
            f"{name}={value!r} must be a number in [0, 1)"
            for name, value in self.options.items()
            if name.endswith("dropout") and not (isinstance(value, int | float) and 0 <= value < 1)
        ]
        if problems:
            raise ValueError(f"PEFT tuner {self.tuner!r}: " + "; ".join(dict.fromkeys(problems)))

    def peft_config(self, targets: list[str]) -> peft.PeftConfig:
        """The PEFT config for ``targets`` (full module names); ValueError with PEFT's own message if PEFT
        rejects the options."""
        kwargs = {k: _thaw(v) for k, v in self.options.items()}
        if self.tuner == "ia3":  # globs over the targets, as full names
            patterns = kwargs.get("feedforward_modules", IA3_FEEDFORWARD)
            patterns = [patterns] if isinstance(patterns, str) else patterns
            kwargs["feedforward_modules"] = [t for t in targets if matches(t, patterns)]
        if self.rank is not None:
            kwargs[RANK_FIELDS[self.tuner]] = self.rank
        if self.tuner == "dora":
            kwargs["use_dora"] = True
        try:
            return config_class(self.tuner)(target_modules=list(targets), **kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"PEFT rejects tuner {self.tuner!r} with options {kwargs}: {err}") from err


class AdaLoraAllocator(TrainingCallback):
    """AdaLoRA's rank allocation (PEFT's ``update_and_allocate``) after each optimizer step, as PEFT's
    training loop makes it. The tuner object is kept outside the module tree (it holds the model)."""

    def __init__(self, tuner: BaseTuner) -> None:
        super().__init__()
        object.__setattr__(self, "_tuner", tuner)
        self.step = 0

    def after_optimizer_step(self) -> None:
        self._tuner.update_and_allocate(self.step)
        self.step += 1

    def record(self) -> dict[str, Any]:
        """Ranks kept per layer once allocated (PEFT's rank pattern)."""
        pattern = self._tuner.peft_config[ADAPTER].rank_pattern or {}
        return {"adalora_ranks": {name: int(sum(mask)) for name, mask in pattern.items()}}


def _is_fake(model: nn.Module) -> bool:
    """Whether ``model`` is made of fake tensors (``step_memory``'s shapes-only estimate)."""
    return any(isinstance(t, FakeTensor) for t in itertools.chain(model.parameters(), model.buffers()))


def _in_place(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> bool:
    """Whether ``Module.to(device, dtype)`` leaves ``t`` as it is (it casts floating and complex only)."""
    keeps_dtype = dtype is None or not (t.is_floating_point() or t.is_complex()) or t.dtype == dtype
    return (device is None or t.device == device) and keeps_dtype


def _to_unless_there(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """``module.to(*args, **kwargs)``, except that a module already where and what it would be moved to is
    returned as it is (as ``Module.to`` leaves it on real tensors), its tensors not swapped."""
    device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    tensors = itertools.chain(module.parameters(), module.buffers())
    if memory_format is None and all(_in_place(t, device, dtype) for t in tensors):
        return module
    return nn.Module.to(module, *args, **kwargs)


@contextmanager
def _fake_tensor_moves(model: nn.Module) -> Iterator[None]:
    """For a model made of fake tensors (a shapes-only memory estimate): each module of the model and each
    that PEFT adds while the block runs (its layers and their adapters) gets, until the block ends, a
    ``to`` of its own (``_to_unless_there``) that leaves it as it is where it already is, as ``Module.to``
    does on real tensors.

    PEFT moves each new adapter to its base layer's device and dtype with ``Module.to``; on fake tensors
    that always swaps each parameter for a new one (``torch.utils.swap_tensors``), which fails for tensors
    the fake mode holds weak references to or that init code still refers to. The move is a no-op here
    (the adapter is made where its base layer is), so it is skipped; other moves run as usual. The modules
    are found by torch's module registration hook as PEFT registers them; ``nn.Module`` is not patched.
    """
    if not _is_fake(model):
        yield
        return
    added: list[nn.Module] = []

    def own_to(parent: nn.Module, name: str, module: nn.Module | None) -> None:
        if module is not None and "to" not in module.__dict__:
            module.to = MethodType(_to_unless_there, module)
            added.append(module)

    for module in model.modules():  # the layers PEFT wraps, and those it adds (the hook) while it runs
        own_to(model, "", module)
    handle = register_module_module_registration_hook(own_to)
    try:
        yield
    finally:
        handle.remove()
        for module in added:
            del module.__dict__["to"]


def peft_targets(model: nn.Module) -> list[str]:
    """Full names of the standard targets (``DEFAULT_TARGETS``) of ``model``, never its head."""
    return targets_except_head(model, DEFAULT_TARGETS)


@register_method("peft", PeftMethodConfig, "PEFT: a Hugging Face PEFT tuner on the standard targets")
def apply_peft(model: nn.Module, cfg: PeftMethodConfig, calibration: Calibration = None) -> PeftMethodConfig:
    """Inject the tuner's layers (PEFT freezes everything else), then unfreeze the head and cls token."""
    head = classifier(model) if trains_head(model, cfg.train_head) else None
    config = cfg.peft_config(peft_targets(model))
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    attributes = set(model.__dict__)
    freeze_all_but_head(model, False)
    try:
        with _fake_tensor_moves(model):
            if getattr(tuner_cls, "uses_shared_state", False) or cfg.tuner == "adalora":
                tuner = tuner_cls(model, config, adapter_name=ADAPTER)
                if cfg.tuner == "adalora":
                    model.add_module("peft_adalora_allocator", AdaLoraAllocator(tuner))
            else:
                peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except Exception as err:
        for name in set(model.__dict__) - attributes:  # PEFT's attributes (the module tree is restored)
            del model.__dict__[name]
        if _is_fake(model):
            raise ValueError(
                f"PEFT tuner {cfg.tuner!r} cannot be built on fake tensors (a shapes-only memory estimate): "
                f"{type(err).__name__}: {err} (its set-up reads tensor values; measure it on real tensors "
                "instead, e.g. step_memory(..., measure_on='cpu'))"
            ) from err
        raise ValueError(f"PEFT tuner {cfg.tuner!r} cannot be applied to this model: {err}") from err
    if head is not None:
        head.requires_grad_(True)
    set_cls_token_trainable(model, cfg.train_cls_token)
    return cfg
