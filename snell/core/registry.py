"""The one tuning-method interface: a frozen config dataclass per method plus an ``apply`` function.

Every method (SNELL here, the baselines in ``baselines/``) registers ``name -> (config class, apply)``.
``apply(model, config, calibration)`` validates everything first, then modifies the model in place
(freezes what it does not tune, adds its trainables) and returns the config to record: usually the
one it got, or a resolved one (SPT records the entries it selected so ``load_adapter`` can rebuild it).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .validation import field_type_problems

Calibration = Iterable[Any] | None
ApplyFn = Callable[[nn.Module, "TuningConfig", Calibration], "TuningConfig"]


@dataclass(frozen=True)
class TuningConfig:
    """Base of every method's config. Subclasses add fields and check values in ``validate``."""

    method: ClassVar[str] = ""
    open_options: ClassVar[bool] = False
    """True for a method whose ``from_options`` takes options beyond its fields (the ``peft`` family passes
    PEFT's config fields through): callers check its options with ``method_config``, not ``config_fields``."""
    ablation_axes: ClassVar[tuple[str, ...]] = ()
    """The options along which reports compare this method's runs (their columns in a results table):
    SNELL's kernel, rank and sparsity, LoRA's rank, none for full fine-tuning."""
    changes_backbone: ClassVar[bool] = True
    """Whether tuning changes the backbone's features: False for a method that trains the head alone (the
    linear probe), whose retention of the pretraining task is the untouched backbone's."""
    label_hidden: ClassVar[frozenset[str]] = frozenset({"rank"})
    """Options that ``label`` does not spell out as ``name=value``: those its head shows (rank) and those
    that change how a method is set up but not what it is (GPS's and SPT's ``calibration_batches``)."""
    train_head: bool | None = None
    """Train the model's head: None is its family's default (``snell.core.families.trains_head``: a timm
    classifier's new head trains, a causal LM's pretrained lm_head stays frozen)."""

    def __post_init__(self) -> None:
        problems = field_type_problems(self)
        if problems:
            raise ValueError(f"method {self.method!r}: " + "; ".join(problems))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming a bad value and what is allowed (model-independent checks; every
        field's plain type is checked before, ``field_type_problems``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the method name, the inverse of ``config_from_dict``."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_options(cls, **options: Any) -> TuningConfig:
        """The config for ``snell.method_config(name, **options)``: options are its fields (lists become
        tuples); an unknown one raises ValueError naming the allowed ones. A method whose options are
        open-ended (the ``peft`` family passes PEFT's own fields through) overrides this."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(options) - set(allowed))
        if bad:
            hints = [h for b in bad for h in difflib.get_close_matches(b, allowed, n=1)]
            did_you_mean = f" (did you mean {', '.join(map(repr, hints))}?)" if hints else ""
            raise ValueError(
                f"unknown option(s) {bad} for method {cls.method!r}{did_you_mean}; "
                f"allowed: {', '.join(allowed)}"
            )
        defaults = _field_defaults(cls)
        return cls(**{k: _as_field_value(v, defaults[k]) for k, v in options.items()})

    def without_data(self, model: nn.Module) -> TuningConfig:
        """A config that ``apply`` takes without calibration data and that tunes tensors of the same
        shapes as a data-driven selection would: what a shapes-only memory estimate applies. Methods
        that select from data override it (SPT: a uniform plan; GPS: placeholder selections)."""
        return self

    @classmethod
    def family(cls, options: Mapping[str, Any]) -> str:
        """The family a run of this method with ``options`` (its config's fields, or the options it was
        made from) belongs to in figures and legends: the method's name; PEFT's is its tuner's."""
        return cls.method

    def label_head(self) -> str:
        """The start of the row label: the family, and ``-<rank>`` where the config has a rank (``lora-8``,
        ``peft-dora-8``, ``full``); SNELL adds its kernel and sparsity."""
        rank = getattr(self, "rank", None)
        name = self.family(dataclasses.asdict(self))
        return f"{name}-{rank}" if rank is not None else name

    def label(self, options: Mapping[str, Any], named: Collection[str] | None = None) -> str:
        """The row label of a run of this config made from ``options`` (as given, e.g. by a sweep grid
        entry): ``label_head``, then ``name=value`` for each option in ``named`` (None: every option)
        that ``label_hidden`` does not hide, in name order (``snell-8 piecewise_linear s=0.9 rule=eq5``)."""
        spelled = [k for k in sorted(options) if k not in self.label_hidden and (named is None or k in named)]
        return " ".join([self.label_head(), *(f"{k}={options[k]}" for k in spelled)])


def _field_defaults(cls: type[TuningConfig]) -> dict[str, Any]:
    """Each field's default value (a default factory's product)."""
    return {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
    }


def _as_field_value(value: Any, default: Any) -> Any:
    """Lists become tuples; one string given for a tuple-valued option (``targets="*attn.qkv"``) is a
    tuple of that one string, not of its characters."""
    if isinstance(value, str) and isinstance(default, tuple):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


NO_WEIGHT_DECAY = "_no_weight_decay"


def exclude_from_weight_decay(param: nn.Parameter) -> None:
    """Mark a parameter that the optimizer must not decay (GPS: its unselected entries must stay
    exactly pretrained, and decoupled decay would move them). Training loops honour it through
    ``no_weight_decay``."""
    setattr(param, NO_WEIGHT_DECAY, True)


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that a method marked with ``exclude_from_weight_decay``."""
    return {n for n, p in model.named_parameters() if getattr(p, NO_WEIGHT_DECAY, False)}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[TuningConfig]
    apply: ApplyFn
    description: str


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[TuningConfig], description: str = "") -> Callable:
    """Decorator for a method's apply function: ``@register_method("lora", LoraConfig)``."""

    def deco(fn: ApplyFn) -> ApplyFn:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        config_cls.method = name
        _METHODS[name] = MethodSpec(name, config_cls, fn, description or (fn.__doc__ or "").split("\n")[0])
        return fn

    return deco


def list_methods() -> list[str]:
    """Names of all registered tuning methods."""
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """The registered spec for ``name``; ValueError naming the allowed names otherwise."""
    allowed = list_methods()
    if name not in _METHODS:
        hint = difflib.get_close_matches(str(name), allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown method {name!r}{did_you_mean}; allowed: {', '.join(allowed)}")
    return _METHODS[name]


def config_class(name: str) -> type[TuningConfig]:
    """The config class of method ``name``: how the method describes itself to reports without a config
    being built (``ablation_axes``, ``family``, ``changes_backbone``); ValueError for an unknown name."""
    return get_method(name).config_cls


def config_fields(name: str) -> list[str]:
    """The options ``method_config(name, ...)`` accepts."""
    return [f.name for f in dataclasses.fields(get_method(name).config_cls)]


def method_config(name: str, **options: Any) -> TuningConfig:
    """Build and validate a method's config; unknown options raise ValueError naming the allowed ones."""
    return get_method(name).config_cls.from_options(**options)


def option_problems(name: str, options: dict[str, Any]) -> list[str]:
    """Every problem of ``method_config(name, **options)``, one line each (not only the first): an unknown
    method, unknown options (with a did-you-mean; a method with open-ended options checks them itself),
    then each option's value on its own, then their combination. Empty when the config builds."""
    try:
        spec = get_method(name)
    except ValueError as err:
        return [str(err)]
    try:
        spec.config_cls.from_options(**options)
        return []
    except (ValueError, TypeError) as err:
        combined = str(err)
    alone = []
    for key, value in options.items():
        try:
            spec.config_cls.from_options(**{key: value})
        except (ValueError, TypeError) as err:
            alone.append(str(err))
    return list(dict.fromkeys(alone)) or [combined]


def list_valued_options(name: str) -> set[str]:
    """The options of method ``name`` whose value is itself a list (``targets``): in a sweep grid a list
    of strings is one such value, and a list of lists the alternatives."""
    defaults = _field_defaults(get_method(name).config_cls)
    return {option for option, default in defaults.items() if isinstance(default, list | tuple)}


def config_from_dict(data: dict[str, Any]) -> TuningConfig:
    """Inverse of ``TuningConfig.to_dict``."""
    data = dict(data)
    if "method" not in data:
        raise ValueError(f"config dict has no 'method' key: {sorted(data)}")
    return method_config(data.pop("method"), **data)


@contextmanager
def unchanged_on_error(model: nn.Module) -> Iterator[None]:
    """Undo every change a method makes to ``model`` if the block raises: module tree (types and
    children), ``requires_grad`` flags, gradients, train/eval modes and ``tuning_config``.

    Methods wrap modules and flip flags but never write weights, so the saved references suffice;
    wrapped layers keep the original module objects, which come back as they were.
    """
    children = [(module, dict(module._modules)) for module in model.modules()]
    modes = [(module, module.training) for module in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    had_config = "tuning_config" in model.__dict__
    config = model.__dict__.get("tuning_config")
    try:
        yield
    except BaseException:
        for module, kids in children:
            module._modules.clear()
            module._modules.update(kids)
        for module, training in modes:
            module.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad
        if had_config:
            model.tuning_config = config
        else:
            model.__dict__.pop("tuning_config", None)
        raise


def apply_method(model: nn.Module, config: TuningConfig, calibration: Calibration = None) -> nn.Module:
    """Apply a tuning method to ``model`` in place and return it.

    Atomic: on any error (bad input, a failing calibration batch) the model is left exactly as it was,
    and bad input raises ValueError naming the value. The applied (possibly resolved) config is kept as
    ``model.tuning_config`` for ``save_adapter``.
    """
    if not isinstance(config, TuningConfig):
        raise TypeError(f"config must come from snell.method_config(...), got {type(config).__name__}")
    if getattr(model, "tuning_config", None) is not None:
        raise ValueError(f"model already has method {model.tuning_config.method!r} applied")
    if calibration is not None and not isinstance(calibration, Iterable):
        hint = f"; call it: calibration={calibration.__name__}()" if callable(calibration) else ""
        raise TypeError(
            "calibration must be an iterable of (inputs, labels) batches, "
            f"got {type(calibration).__name__}{hint}"
        )
    spec = get_method(config.method)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with unchanged_on_error(model):
        model.tuning_config = spec.apply(model, config, calibration)
    model.__dict__[FLAGS_BEFORE_TUNING] = flags
    return model


FLAGS_BEFORE_TUNING = "requires_grad_before_tuning"
"""The model attribute where ``apply_method`` keeps every parameter's ``requires_grad`` as it found it."""


def end_tuning(model: nn.Module) -> None:
    """Make a merged model plain again: no ``tuning_config`` (so a method can be applied anew and no
    adapter is saved from it), and every parameter's ``requires_grad`` as before ``apply_method``."""
    flags = model.__dict__.pop(FLAGS_BEFORE_TUNING, {})
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
    model.__dict__.pop("tuning_config", None)
