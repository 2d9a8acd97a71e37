"""Helpers shared by the harness tests: tiny sweeps that train in seconds on real embedded data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
