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
from PIL import Image

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


def write_image(path: Path, size: tuple[int, int], value: int) -> None:
    """A flat RGB image (red ``value``, green 255 - ``value``) at ``path``, its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 0)).save(path)


def write_vtab_task(root: Path, task: str) -> Path:
    """A VTAB-1k task folder in the NOAH layout under ``root``: 4 train800, 2 val200 (and their union,
    train800val200) and 3 test images of various sizes; image i has label i mod min(10, classes)."""
    from bench.data.folders import VTAB_NUM_CLASSES

    task_dir = root / task
    lists = {"train800.txt": range(4), "val200.txt": range(4, 6), "test.txt": range(6, 9)}
    for list_name, ids in lists.items():
        lines = []
        for i in ids:
            relative = f"images/{list_name[:-4]}/{i:04d}.png"
            write_image(task_dir / relative, (40 + 3 * i, 30), value=20 * i)
            lines.append(f"{relative} {i % min(10, VTAB_NUM_CLASSES[task])}")
        (task_dir / list_name).write_text("\n".join(lines) + "\n")
    combined = (task_dir / "train800.txt").read_text() + (task_dir / "val200.txt").read_text()
    (task_dir / "train800val200.txt").write_text(combined)
    return task_dir
