"""Helpers shared by the tests: tiny sweeps that train in seconds on real embedded data, and a snapshot of
everything an atomic call must leave untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
FAST_TRAIN = {
    "epochs": 1,
    "limit_train_batches": 3,
    "limit_eval_batches": 1,
    "batch_size": 16,
    "eval_batch_size": 128,
    "warmup_epochs": 0.5,
}


def write_sweep(path: Path, grid: list[dict], tasks=("digits",), seeds=(0,), **top) -> Path:
    data = {"name": path.stem, "train": FAST_TRAIN, "tasks": list(tasks), "seeds": list(seeds), "grid": grid}
    path.write_text(yaml.safe_dump({**data, **top}))
    return path


def bench_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench", *args]


def run_bench(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(bench_cmd(*args), cwd=REPO, env=env, capture_output=True, text=True, **kwargs)


def record_files(results: Path) -> list[Path]:
    return sorted((results / "records").glob("*.json"))


def comparable(results: Path) -> dict[str, tuple]:
    """run_id -> (status, test accuracy, loss curve): what must not depend on how the sweep was run."""
    out = {}
    for path in record_files(results):
        r = json.loads(path.read_text())
        out[r["run_id"]] = (
            r["status"],
            r["metrics"].get("test_acc"),
            tuple(r["metrics"].get("loss_curve", ())),
        )
    return out


def model_snapshot(model) -> tuple:
    """What an atomic call must leave untouched: tensors, flags, module types, config."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [(n, type(m).__name__) for n, m in model.named_modules()],
        getattr(model, "tuning_config", None),
    )


def assert_unchanged(model, snapshot) -> None:
    """Fail unless ``model`` is exactly as ``model_snapshot`` saw it."""
    state, flags, types, config = snapshot
    now_state, now_flags, now_types, now_config = model_snapshot(model)
    assert now_state.keys() == state.keys() and all(torch.equal(now_state[k], state[k]) for k in state)
    assert (now_flags, now_types, now_config) == (flags, types, config)
