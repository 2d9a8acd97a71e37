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

import timm
import torch
import yaml

import snell
from bench.backbones import checkpoint_problems
from bench.data import build_task
from bench.data.folders import RETENTION_LAYOUT
from bench.llm.commonsense import check_files, commonsense_tasks, is_commonsense_task
from bench.llm.models import CAUSAL_LM_CONFIGS, check_checkpoint_folder, is_causal_lm_name
from bench.run.config import TRAIN_FIELDS, RunConfig, TrainConfig
from bench.settings import SLURM_KEYS

TOP_KEYS = ("name", "description", "train", "tasks", "seeds", "options", "grid", "slurm")
_KIND_NAMES = {str: "a string", int: "an integer >= 0", float: "a number >= 0", list: "a list of shell lines"}
ENTRY_KEYS = ("method", "train", "tasks", "seeds")


class SweepError(ValueError):
    """A sweep file with one or more mistakes; the message lists all of them."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines, layouts = [], {}
        for problem in problems:
            line, _, layout = problem.partition(f"\n{LAYOUT_HEADING}\n")
            lines.append(f"  - {line}")
            if layout:
                layouts[layout] = None
        shown = "".join(f"\n{LAYOUT_HEADING}\n{layout}" for layout in layouts)
        super().__init__(
            f"{source}: {len(problems)} problem(s), nothing was run:\n" + "\n".join(lines) + shown
        )


LAYOUT_HEADING = "Expected layout:"
"""Data problems end with the expected folder layout; a sweep's message shows each layout once."""


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


def _train_config(overrides: Any, where: str, problems: list[str], local: bool = True) -> TrainConfig | None:
    """The training settings of ``overrides``, their problems appended to ``problems``: unknown keys
    (dropped, so that the other settings are still checked), values, the backbone and its checkpoint, and
    (``local``: the runs start on this host) the device. None if ``overrides`` is not a mapping."""
    if not isinstance(overrides, dict):
        problems.append(f"{where}: must be a mapping of training settings, got {overrides!r}")
        return None
    problems += _unknown(overrides, TRAIN_FIELDS, where)
    cfg = TrainConfig(**{k: v for k, v in overrides.items() if k in TRAIN_FIELDS})
    found = cfg.validate() + _backbone_problems(cfg)
    if local and str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        found.append(f"device={cfg.device!r} but this host has no CUDA device; use device: cpu or auto")
    problems += [f"{where}: {p}" for p in found]
    return cfg


def _backbone_problems(cfg: TrainConfig) -> list[str]:
    """A checkpoint that is not there: a file for timm backbones, a Hugging Face folder for causal LMs
    (which also need one to be pretrained)."""
    if not is_causal_lm_name(cfg.backbone):
        if not isinstance(cfg.backbone, str) or not timm.is_model(cfg.backbone):
            hint = difflib.get_close_matches(str(cfg.backbone), timm.list_models(), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            return [
                f"unknown backbone {cfg.backbone!r}{did_you_mean}: a timm model name or a causal LM shape"
            ]
        if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
            return [f"checkpoint file {cfg.checkpoint!r} does not exist"]
        if cfg.checkpoint is not None:
            return [
                *checkpoint_problems(cfg.backbone, cfg.checkpoint, cfg.img_size),
                *retention_problems(cfg),
            ]
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
    except (ValueError, TypeError, FileNotFoundError) as err:
        return [str(err)]
    return []


def parse_sweep(data: Any, source: str = "sweep", *, local: bool = True) -> Sweep:
    """Expand and validate a sweep mapping into runs; raise SweepError listing every problem, each once.
    ``local``: the runs start on this host, whose devices are checked (not so for SLURM jobs)."""
    if not isinstance(data, dict):
        raise SweepError(source, [f"a sweep file is a mapping with keys {', '.join(TOP_KEYS)}"])
    problems = _unknown(data, TOP_KEYS, "top level")
    base_train = data.get("train") or {}
    base = _train_config(base_train, "train", problems, local)
    base_problems = [p.removeprefix("train: ") for p in problems if p.startswith("train: ")]
    slurm = _slurm_options(data.get("slurm") or {}, problems)
    defaults = _option_defaults(data.get("options") or {}, problems)
    problems += [
        f"seeds: seed {s!r} must be an integer" for s in _as_list(data.get("seeds", [])) if not _is_seed(s)
    ]
    grid = data.get("grid")
    if not isinstance(grid, list) or not grid:
        problems.append("grid: must be a non-empty list of entries, each with at least a 'method'")
        grid = []
    runs, checked = [], {}
    for i, entry in enumerate(grid):
        entry_problems: list[str] = []
        runs += _entry_runs(entry, f"grid[{i}]", data, defaults, base, checked, entry_problems, local)
        problems += [p for p in entry_problems if p.split(".train: ", 1)[-1] not in base_problems]
    problems = list(dict.fromkeys(problems))  # a bad task repeated over entries is reported once
    if problems:
        raise SweepError(source, problems)
    unique, merged = one_run_each(runs)
    return Sweep(str(data.get("name", Path(source).stem)), unique, slurm, merged)


def _option_defaults(options: Any, problems: list[str]) -> dict[str, dict]:
    """The ``options:`` mapping (method -> default options), every problem of it appended."""
    if not isinstance(options, dict):
        problems.append(f"options: must map method names to their default options, got {options!r}")
        return {}
    good = {}
    for method, values in options.items():
        if not isinstance(values, dict):
            problems.append(f"options.{method}: must be a mapping of option values, got {values!r}")
            continue
        found = snell.option_problems(str(method), values)
        problems += [f"options.{method}: {p}" for p in found]
        good[method] = values
    return good


def _names(value: Any, what: str, where: str, problems: list[str]) -> list[str]:
    """A string or a list of strings (method names, tasks), each other element a problem."""
    values = _as_list(value)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        problems.append(f"{where}: {what} must be names (strings), got {bad[0]!r}")
    return [v for v in values if isinstance(v, str)]


def _entry_runs(
    entry: Any,
    where: str,
    data: dict,
    defaults: dict[str, dict],
    base: TrainConfig | None,
    checked: dict,
    problems: list[str],
    local: bool,
) -> list[RunConfig]:
    """The runs of one grid entry; its problems appended to ``problems``."""
    if not isinstance(entry, dict) or "method" not in entry:
        problems.append(f"{where}: each entry is a mapping with a 'method' key, got {entry!r}")
        return []
    train = base
    own = entry.get("train")
    if own is not None and base is not None:  # its own settings over the sweep's
        merged = {**(data.get("train") or {}), **own} if isinstance(own, dict) else own
        train = _train_config(merged, f"{where}.train", problems, local)
    tasks = _names(entry.get("tasks", data.get("tasks", [])), "tasks", where, problems)
    seeds = _as_list(entry.get("seeds", data.get("seeds", [0])))
    if not tasks:
        problems.append(f"{where}: no tasks (set 'tasks' at the top level or in the entry)")
    if "seeds" in entry:  # the sweep's own seeds are checked once, by parse_sweep
        problems += [f"{where}: seed {s!r} must be an integer" for s in seeds if not _is_seed(s)]
    if train is not None:
        task_problems = {t: _check_task(t, train, where, checked) for t in tasks}
        problems += [p for found in task_problems.values() for p in found]
        tasks = [t for t, found in task_problems.items() if not found]
    runs = []
    named = tuple(sorted(k for k in entry if k not in ENTRY_KEYS))
    for method in _names(entry["method"], "methods", f"{where}.method", problems):
        for options, resolved in _option_grid(entry, method, defaults, where, problems):
            if train is not None:
                runs += [
                    RunConfig(t, method, s, options, train, named, resolved) for t in tasks for s in seeds
                ]
    return runs


def _is_seed(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _option_grid(
    entry: dict, method: str, defaults: dict[str, dict], where: str, problems: list[str]
) -> list[tuple[dict, snell.TuningConfig]]:
    """Every combination of one entry's options for ``method`` (a list multiplies out; for a list-valued
    option such as ``targets`` a list of strings is one value and a list of lists the alternatives), with
    the method's defaults under them, and its config; the combinations that do not form a config become
    problems (``snell.option_problems``: each bad option named)."""
    list_valued = snell.list_valued_options(method) if method in snell.list_methods() else set()
    grid = {}
    for key, value in entry.items():
        if key in ENTRY_KEYS:
            continue
        one_value = (
            key in list_valued and isinstance(value, list) and not any(isinstance(v, list) for v in value)
        )
        grid[key] = [value] if one_value else _as_list(value)
    combos = []
    for values in itertools.product(*grid.values()):
        options = {**defaults.get(method, {}), **dict(zip(grid, values, strict=True))}
        try:
            combos.append((options, snell.method_config(method, **options)))
        except (ValueError, TypeError):
            problems += [f"{where} ({method}): {p}" for p in snell.option_problems(method, options)]
    return combos


def load_sweep(path: str | Path, *, local: bool = True) -> Sweep:
    """Read and validate a sweep file (``local``: as ``parse_sweep``)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(str(path), [f"sweep file {path} does not exist"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(str(path), [f"not valid YAML: {err}"]) from err
    return parse_sweep(data, str(path), local=local)
