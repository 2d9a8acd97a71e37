"""One run of the benchmark: task x method (with options) x training settings x seed.

A ``RunConfig`` is frozen and JSON-serialisable; its ``run_id`` is readable and carries a hash of the
full config, so a finished run is recognised on disk whatever the sweep file that asked for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED_BACKBONE = "vit_mnist_patch7_28"
EMBEDDED_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / f"{EMBEDDED_BACKBONE}.safetensors"
"""The committed pretrained weights of the embedded backbone (``python -m bench pretrain`` writes them)."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the paper's: AdamW, cosine with warmup, batch 32, lr 1e-3, wd 1e-4).

    The schedule warms up linearly for ``warmup_epochs`` from ``warmup_lr`` (None: lr x 1e-3), then
    decays by a cosine to ``min_lr``. ``drop_path_rate`` is the frozen backbone's own stochastic depth
    (timm's; the public SNELL scripts use 0.1), apart from any adapter's drop-path.
    """

    backbone: str = EMBEDDED_BACKBONE
    checkpoint: str | None = None
    pretrained: bool = True
    data_root: str | None = None
    protocol: str = "paper"
    img_size: int | None = None
    epochs: int = 10
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    warmup_epochs: float = 1.0
    warmup_lr: float | None = None
    min_lr: float = 0.0
    drop_path_rate: float = 0.0
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    diverge_loss: float = 1e3
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0

    def validate(self) -> list[str]:
        """Problems with these settings, as messages naming the bad value (empty if fine)."""
        problems = []
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be an integer >= 1")
        for name in ("limit_train_batches", "limit_eval_batches"):
            limit = getattr(self, name)
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                problems.append(f"{name}={limit!r} must be an integer >= 1 or null (no limit)")
        for name in ("lr", "weight_decay", "warmup_epochs", "min_lr", "label_smoothing", "diverge_loss"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                problems.append(f"{name}={value!r} must be a number >= 0")
        if self.warmup_lr is not None and (not isinstance(self.warmup_lr, int | float) or self.warmup_lr < 0):
            problems.append(f"warmup_lr={self.warmup_lr!r} must be a number >= 0 or null (lr x 1e-3)")
        if not isinstance(self.drop_path_rate, int | float) or not 0 <= self.drop_path_rate < 1:
            problems.append(f"drop_path_rate={self.drop_path_rate!r} must be a number in [0, 1)")
        if isinstance(self.lr, int | float) and self.lr == 0:
            problems.append("lr=0 trains nothing; use a positive learning rate")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            problems.append(f"device={self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        if self.protocol not in ("paper", "tune"):
            problems.append(f"protocol={self.protocol!r}; allowed: paper, tune")
        return problems


TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


@dataclass(frozen=True)
class RunConfig:
    task: str
    method: str
    seed: int
    method_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    label_options: tuple[str, ...] | None = None
    """The options named in the row label (None: all); a sweep names only those its grid entry varies."""
    resolved: Any = field(default=None, compare=False, repr=False)
    """The method's validated ``snell.TuningConfig``: resolved once, by the sweep parser (or on first use
    of ``method_config``); not part of the run's identity (it follows from ``method_options``)."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["resolved"]
        return data

    @property
    def method_config(self) -> Any:
        """The method's ``snell.TuningConfig`` (resolved once)."""
        if self.resolved is None:
            import snell

            object.__setattr__(self, "resolved", snell.method_config(self.method, **self.method_options))
        return self.resolved

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        fields = {**data, "train": TrainConfig(**data["train"])}
        if fields.get("label_options") is not None:  # a JSON list in records
            fields["label_options"] = tuple(fields["label_options"])
        return cls(**fields)

    @property
    def label(self) -> str:
        """A short human name for the method with its options, e.g. ``snell-8 piecewise_linear s=0.9``."""
        return method_label(self.method_config, self.method_options, self.label_options)

    @property
    def run_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{self.task}-{self.label}")
        return f"{slug}-seed{self.seed}-{digest}"


LABEL_HIDDEN = {"calibration_batches"}
"""Options that change how a method is set up but not what it is: left out of row names."""


def method_label(config: Any, options: dict[str, Any], named: Sequence[str] | None = None) -> str:
    """Readable name of a method config and the options it was made from, e.g. ``snell-8
    piecewise_linear s=0.9`` (row names). ``named`` limits the options spelled out after rank, kernel and
    sparsity (default: every option)."""
    method, resolved = config.method, config.to_dict()
    rank = resolved.get("rank")
    name = f"peft-{resolved['tuner']}" if method == "peft" else method  # e.g. peft-dora-8
    parts = [f"{name}-{rank}" if rank is not None else name]
    if method == "snell":
        parts += [resolved["kernel"], f"s={resolved['sparsity']}"]
    hidden = {"rank", "kernel", "sparsity", "tuner"} | LABEL_HIDDEN
    spelled = [k for k in sorted(options) if k not in hidden and (named is None or k in named)]
    parts += [f"{k}={options[k]}" for k in spelled]
    return " ".join(parts)
