"""Sweep files (YAML): a grid over methods x options x tasks x seeds, validated as a whole up front.

    name: default
    train: {epochs: 8, lr: 1.0e-3}        # TrainConfig fields, shared by every run
    tasks: [digits, rotation, texture]
    seeds: [0, 1]
    options: {spt-lora: {budget: 20000}}   # per-method default options
    grid:                                  # a union of sub-grids; list values multiply out
      - {method: [full, linear, lora]}
      - {method: snell, kernel: [linear, rbf], sparsity: [0.5, 0.9]}
      - {method: snell, rank: 32, train: {lr: 5.0e-4}, tasks: [digits]}
    slurm: {partition: gpu, timeout_min: 240}   # optional: job settings for --executor submitit

Every mistake in a file (unknown keys with a did-you-mean, bad values, unknown tasks, missing data
folders or checkpoints, missing or malformed commonsense files, a task that the backbone's family does not
run) is collected and reported together before anything runs.
"""

from __future__ import annotations

import difflib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import snell
from bench.arguments import SLURM_KEYS
from bench.data import build_task
from bench.data.folders import RETENTION_LAYOUT
from bench.llm.commonsense import check_files, commonsense_tasks, is_commonsense_task
from bench.llm.models import CAUSAL_LM_CONFIGS, check_checkpoint_folder, is_causal_lm_name
from bench.run.config import TRAIN_FIELDS, RunConfig, TrainConfig

TOP_KEYS = ("name", "description", "train", "tasks", "seeds", "options", "grid", "slurm")
_KIND_NAMES = {str: "a string", int: "an integer >= 0", float: "a number >= 0", list: "a list of shell lines"}
ENTRY_KEYS = ("method", "train", "tasks", "seeds")


class SweepError(ValueError):
    """A sweep file with one or more mistakes; the message lists all of them."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s), nothing was run:\n{lines}")


@dataclass(frozen=True)
class Sweep:
    name: str
    runs: list[RunConfig]
    slurm: dict[str, Any] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    """One line per set of grid entries that resolve to the same run (run once, under the first)."""


def one_run_each(runs: list[RunConfig]) -> tuple[list[RunConfig], list[str]]:
    """The runs with equivalent ones dropped, and a line per drop: two runs are one when task, seed,
    training settings and the resolved method config agree (``{method: lora}`` and ``{method: lora,
    rank: 8}``), whatever options were spelled out; the first one listed is kept."""
    kept: dict[str, RunConfig] = {}
    merged = []
    for run in runs:
        identity = run.identity() | {"method_options": run.method_config.to_dict(), "label_options": None}
        key = json.dumps(identity, sort_keys=True, default=str)
        first = kept.setdefault(key, run)
        if first is not run:
            same = "the same entry" if first.run_id == run.run_id else f"options {run.method_options}"
            merged.append(f"{run.label} on {run.task}, seed {run.seed}: {same} as {first.run_id}, run once")
    return list(kept.values()), merged


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _unknown(keys, allowed, where: str) -> list[str]:
    problems = []
    for key in keys:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), list(allowed), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{where}: unknown key {key!r}{did_you_mean}; allowed: {', '.join(allowed)}")
    return problems


def _slurm_options(value: Any, problems: list[str]) -> dict[str, Any]:
    """The ``slurm:`` mapping, its problems (unknown keys, wrong types) appended to ``problems``."""
    if not isinstance(value, dict):
        problems.append(f"slurm: must be a mapping of SLURM job settings, got {value!r}")
        return {}
    problems += _unknown(value, list(SLURM_KEYS), "slurm")
    for key, kind in SLURM_KEYS.items():
        if key in value and not _is_kind(value[key], kind):
            problems.append(f"slurm.{key}={value[key]!r} must be {_KIND_NAMES[kind]}")
    return value


def _is_kind(value: Any, kind: type) -> bool:
    if kind is list:
        return isinstance(value, list) and all(isinstance(line, str) for line in value)
    if kind is str:
        return isinstance(value, str)
    number = int | float if kind is float else int
    return isinstance(value, number) and not isinstance(value, bool) and value >= 0


def _train_config(overrides: dict, where: str, problems: list[str]) -> TrainConfig | None:
    if not isinstance(overrides, dict):
        problems.append(f"{where}: must be a mapping of training settings, got {overrides!r}")
        return None
    bad = _unknown(overrides, TRAIN_FIELDS, where)
    if bad:
        problems += bad
        return None
    cfg = TrainConfig(**overrides)
    problems += [f"{where}: {p}" for p in cfg.validate()]
    problems += [f"{where}: {p}" for p in _backbone_problems(cfg)]
    return cfg


def _backbone_problems(cfg: TrainConfig) -> list[str]:
    """A checkpoint that is not there: a file for timm backbones, a Hugging Face folder for causal LMs
    (which also need one to be pretrained)."""
    if not is_causal_lm_name(cfg.backbone):
        if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
            return [f"checkpoint file {cfg.checkpoint!r} does not exist"]
        return retention_problems(cfg)
    if cfg.checkpoint is None:
        if cfg.pretrained:
            return [
                f"backbone {cfg.backbone!r} with pretrained: true needs checkpoint: a local Hugging Face "
                "model folder (nothing is downloaded); pretrained: false builds random weights"
            ]
        return []
    if not Path(cfg.checkpoint).exists():
        return [f"checkpoint folder {cfg.checkpoint!r} does not exist (a local Hugging Face model folder)"]
    try:
        check_checkpoint_folder(Path(cfg.checkpoint))
    except FileNotFoundError as err:
        return [str(err)]
    return []


def retention_problems(cfg: TrainConfig) -> list[str]:
    """A ``retention_data`` folder without its list, or without a checkpoint holding the head to use."""
    if cfg.retention_data is None:
        return []
    if cfg.checkpoint is None:
        return [f"retention_data={cfg.retention_data!r} needs checkpoint: the file with the pretraining head"]
    if not (Path(cfg.retention_data) / "retention.txt").is_file():
        return [
            f"retention_data: {Path(cfg.retention_data) / 'retention.txt'} does not exist\n{RETENTION_LAYOUT}"
        ]
    return []


def _check_task(task: str, cfg: TrainConfig, where: str, checked: dict) -> list[str]:
    """The problems of a task under these settings (names, folders, split files, commonsense files, the
    backbone's family), each prefixed with the task; cached per data setting."""
    key = (task, cfg.backbone, cfg.data_root, cfg.img_size, cfg.protocol, cfg.val_examples)
    if key not in checked:
        checked[key] = _task_problems(task, cfg)
    return [f"task {task!r}: {problem}" for problem in checked[key]]


def _task_problems(task: str, cfg: TrainConfig) -> list[str]:
    language = is_causal_lm_name(cfg.backbone)
    if language and not is_commonsense_task(task):
        return [
            f"backbone {cfg.backbone!r} is a causal LM, which runs commonsense tasks ('commonsense' or "
            "'commonsense/<task>+<task>'); image tasks need a timm backbone"
        ]
    if is_commonsense_task(task) and not language:
        return [
            f"a commonsense task needs a causal LM backbone ({', '.join(CAUSAL_LM_CONFIGS)}), "
            f"not {cfg.backbone!r}"
        ]
    try:
        if language:
            return check_files(cfg.data_root, commonsense_tasks(task), val_examples=cfg.val_examples)
        build_task(task, cfg.data_root, cfg.img_size, protocol=cfg.protocol)
    except (ValueError, FileNotFoundError) as err:
        return [str(err)]
    return []


def parse_sweep(data: Any, source: str = "sweep") -> Sweep:
    """Expand and validate a sweep mapping into runs; raise SweepError listing every problem."""
    if not isinstance(data, dict):
        raise SweepError(source, [f"a sweep file is a mapping with keys {', '.join(TOP_KEYS)}"])
    problems = _unknown(data, TOP_KEYS, "top level")
    base_train = data.get("train", {}) or {}
    _train_config(base_train, "train", problems)
    slurm = _slurm_options(data.get("slurm") or {}, problems)
    option_defaults = data.get("options", {}) or {}
    for method, options in option_defaults.items():
        try:
            snell.method_config(method, **options)
        except (ValueError, TypeError) as err:
            problems.append(f"options.{method}: {err}")
    grid = data.get("grid")
    if not isinstance(grid, list) or not grid:
        problems.append("grid: must be a non-empty list of entries, each with at least a 'method'")
        grid = []

    runs, checked_tasks = [], {}
    for i, entry in enumerate(grid):
        where = f"grid[{i}]"
        if not isinstance(entry, dict) or "method" not in entry:
            problems.append(f"{where}: each entry is a mapping with a 'method' key, got {entry!r}")
            continue
        train = _train_config({**base_train, **(entry.get("train") or {})}, f"{where}.train", problems)
        tasks = _as_list(entry.get("tasks", data.get("tasks", [])))
        seeds = _as_list(entry.get("seeds", data.get("seeds", [0])))
        if not tasks:
            problems.append(f"{where}: no tasks (set 'tasks' at the top level or in the entry)")
        problems += [f"{where}: seed {s!r} must be an integer" for s in seeds if not isinstance(s, int)]
        if train is not None:
            task_problems = {t: _check_task(t, train, where, checked_tasks) for t in tasks}
            problems += [p for found in task_problems.values() for p in found]
            tasks = [t for t, found in task_problems.items() if not found]
        option_grid = {k: _as_list(v) for k, v in entry.items() if k not in ENTRY_KEYS}
        for method in _as_list(entry["method"]):
            try:
                allowed = snell.config_fields(method)
            except ValueError as err:
                problems.append(f"{where}.method: {err}")
                continue
            open_ended = snell.core.registry.get_method(
                method
            ).config_cls.open_options  # method_config checks
            unknown = (
                [] if open_ended else _unknown(option_grid, [*allowed, *ENTRY_KEYS], f"{where} ({method})")
            )
            if unknown:
                problems += unknown
                continue
            for values in itertools.product(*option_grid.values()):
                options = {**option_defaults.get(method, {}), **dict(zip(option_grid, values, strict=True))}
                try:
                    resolved = snell.method_config(method, **options)
                except (ValueError, TypeError) as err:
                    problems.append(f"{where} ({method} {options}): {err}")
                    continue
                if train is not None:
                    named = tuple(sorted(option_grid))
                    runs += [
                        RunConfig(t, method, seed, options, train, named, resolved)
                        for t in tasks
                        for seed in seeds
                    ]
    problems = list(dict.fromkeys(problems))  # a bad task repeated over entries is reported once
    if problems:
        raise SweepError(source, problems)
    unique, merged = one_run_each(runs)
    return Sweep(str(data.get("name", Path(source).stem)), unique, slurm, merged)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(str(path), [f"sweep file {path} does not exist"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(str(path), [f"not valid YAML: {err}"]) from err
    return parse_sweep(data, str(path))
