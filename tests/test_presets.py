"""The paper presets hold the public scripts' per-task settings (ssfgunner/SNELL scripts/, commit e9d5185).

The tables below are transcribed from the scripts independently of the YAML files: (batch, lr, weight
decay, sparsity, epochs) per VTAB-1k task (scripts/vtab/snell32) and (lr, {rank: (wd, sparsity)}) per FGVC
dataset (scripts/fgvc/snell{8,16,32}, 100 epochs, batch 32).
"""

from pathlib import Path

import pytest
import yaml

import bench.run.sweep
from bench.run.sweep import parse_sweep

VTAB_SCRIPTS = {
    "cifar": (16, 1e-3, 0.01, 0.9, 200),
    "caltech101": (16, 1e-3, 0.01, 0.4, 200),
    "dtd": (64, 1e-3, 0.01, 0.995, 200),
    "oxford_flowers102": (32, 1e-3, 0.01, 0.9, 200),
    "oxford_iiit_pet": (32, 1e-3, 0.01, 0.5, 200),
    "svhn": (32, 1e-3, 0.01, 0.0, 200),
    "sun397": (32, 1e-3, 0.001, 0.99, 200),
    "patch_camelyon": (16, 7e-4, 0.05, 0.15, 100),
    "eurosat": (16, 1e-3, 4e-4, 0.5, 100),
    "resisc45": (32, 1e-3, 0.01, 0.0, 100),
    "diabetic_retinopathy": (32, 1e-3, 0.05, 0.5, 100),
    "clevr_count": (16, 1e-3, 0.01, 0.1, 100),
    "clevr_dist": (16, 1e-3, 0.001, 0.74, 100),
    "dmlab": (8, 1e-3, 1e-4, 0.0, 100),
    "kitti": (8, 1e-3, 0.01, 0.37, 100),
    "dsprites_loc": (16, 1e-3, 0.01, 0.0, 100),
    "dsprites_ori": (8, 1e-3, 0.01, 0.88, 100),
    "smallnorb_azi": (16, 1e-3, 0.01, 0.0, 100),
    "smallnorb_ele": (16, 1e-3, 0.001, 0.08, 200),
}
FGVC_SCRIPTS = {  # our task name: (lr, {rank: (weight decay, sparsity)})
    "cub": (1e-3, {8: (0.01, 0.3), 16: (0.01, 0.3), 32: (0.01, 0.3)}),
    "nabirds": (5e-4, {8: (0.01, 0.1), 16: (0.01, 0.1), 32: (0.01, 0.1)}),
    "flowers": (1e-3, {8: (0.01, 0.6), 16: (0.01, 0.6), 32: (0.01, 0.8)}),
    "dogs": (3e-4, {8: (0.001, 0.1), 16: (0.001, 0.1), 32: (0.005, 0.1)}),
    "cars": (1e-3, {8: (0.01, 0.0), 16: (0.01, 0.0), 32: (0.01, 0.0)}),
}


def snell_runs(preset: str, monkeypatch) -> dict[tuple[str, int], object]:
    """The preset's SNELL runs by (task, rank), parsed without the data folders and checkpoint."""
    monkeypatch.setattr(bench.run.sweep, "_check_task", lambda *args: None)
    data = yaml.safe_load(Path(f"bench/presets/{preset}.yaml").read_text())
    data["train"].pop("checkpoint")
    runs = [r for r in parse_sweep(data, preset).runs if r.method == "snell"]
    by_key = {(r.task.split("/")[1], r.method_options.get("rank", 8)): r for r in runs}
    assert len(by_key) == len(runs)  # one run per task and rank
    return by_key


def check_shared_schedule(train) -> None:
    assert (train.warmup_epochs, train.warmup_lr, train.min_lr, train.drop_path_rate) == (10, 1e-6, 1e-5, 0.1)


def test_paper_vtab_preset_holds_the_scripts_values(monkeypatch):
    runs = snell_runs("paper_vtab", monkeypatch)
    assert {task for task, _ in runs} == set(VTAB_SCRIPTS)
    for (task, rank), run in runs.items():
        t = run.train
        expected = VTAB_SCRIPTS[task]
        actual = (t.batch_size, t.lr, t.weight_decay, run.method_options["sparsity"], t.epochs)
        assert actual == pytest.approx(expected), (task, rank)
        check_shared_schedule(t)
        assert run.train.protocol == "paper" and rank in (8, 16, 32)


def test_paper_fgvc_preset_holds_the_scripts_values(monkeypatch):
    runs = snell_runs("paper_fgvc", monkeypatch)
    assert set(runs) == {(task, rank) for task in FGVC_SCRIPTS for rank in (8, 16, 32)}
    for (task, rank), run in runs.items():
        lr, per_rank = FGVC_SCRIPTS[task]
        weight_decay, sparsity = per_rank[rank]
        t = run.train
        actual = (t.batch_size, t.lr, t.weight_decay, run.method_options["sparsity"], t.epochs)
        assert actual == pytest.approx((32, lr, weight_decay, sparsity, 100)), (task, rank)
        check_shared_schedule(t)
