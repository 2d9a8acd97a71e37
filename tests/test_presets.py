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
    monkeypatch.setattr(bench.run.sweep, "_check_task", lambda *args: [])
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


# GPS: FightingFighting/GPS train_scripts/vit/{vtab,fgvc}/*/train_gps.sh (commit 72e0c31):
# task: (batch, lr, backbone drop-path, K = times_para); every script: Adam, weight decay 0, 100 epochs,
# warmup 10 from 1e-7, cosine to 1e-8, --contrastive selection.
GPS_SCRIPTS = {
    "vtab/cifar": (32, 0.01, 0.0, 1),
    "vtab/caltech101": (16, 0.002, 0.0, 1),
    "vtab/dtd": (16, 0.002, 0.0, 1),
    "vtab/oxford_flowers102": (16, 0.002, 0.0, 1),
    "vtab/oxford_iiit_pet": (32, 0.003, 0.0, 1),
    "vtab/svhn": (32, 0.005, 0.0, 1),
    "vtab/sun397": (16, 0.0025, 0.0, 1),
    "vtab/patch_camelyon": (32, 0.004, 0.0, 2),
    "vtab/eurosat": (16, 0.002, 0.0, 1),
    "vtab/resisc45": (16, 0.0015, 0.1, 1),
    "vtab/diabetic_retinopathy": (32, 0.002, 0.2, 1),
    "vtab/clevr_count": (16, 0.0003, 0.1, 1),
    "vtab/clevr_dist": (16, 0.002, 0.1, 1),
    "vtab/dmlab": (16, 0.0015, 0.1, 1),
    "vtab/kitti": (16, 0.001, 0.0, 1),
    "vtab/dsprites_loc": (32, 0.007, 0.0, 1),
    "vtab/dsprites_ori": (16, 0.0005, 0.2, 1),
    "vtab/smallnorb_azi": (32, 0.003, 0.1, 1),
    "vtab/smallnorb_ele": (32, 0.0003, 0.2, 1),
    "fgvc/cub": (32, 0.003, 0.0, 2),
    "fgvc/nabirds": (32, 0.0001, 0.1, 20),
    "fgvc/flowers": (32, 0.001, 0.1, 1),
    "fgvc/cars": (32, 0.0005, 0.0, 15),
    "fgvc/dogs": (64, 0.0001, 0.0, 1),
}
# SNELLA: ssfgunner/SNELL scripts/{vtab,fgvc}/snella32 (commit e9d5185): task: (tuning_model, batch, lr,
# weight decay, init_thres, target_ratio); rank 32, 100 epochs.
SNELLA_SCRIPTS = {
    "vtab/cifar": ("snella", 8, 1e-3, 0.05, 0.01, 0.8),
    "vtab/caltech101": ("mixk", 16, 1e-3, 1e-4, None, None),
    "vtab/dtd": ("snella", 8, 1e-3, 0.005, 0.01, 0.93),
    "vtab/oxford_flowers102": ("snella", 8, 1e-3, 0.001, 0.01, 0.4),
    "vtab/oxford_iiit_pet": ("snella", 16, 1e-3, 0.05, 0.01, 0.55),
    "vtab/svhn": ("mixk", 16, 1e-3, 1e-4, None, None),
    "vtab/patch_camelyon": ("snella", 8, 1e-3, 5e-4, 0.01, 0.76),
    "vtab/diabetic_retinopathy": ("snella", 32, 1e-3, 0.05, 0.01, 0.2),
    "vtab/smallnorb_ele": ("snella", 32, 1e-3, 0.001, 0.01, 0.63),
    "fgvc/cub": ("snella", 16, 1e-3, 0.05, 0.0, 0.3),
    "fgvc/dogs": ("snella", 32, 1e-4, 0.005, 0.0, 0.24),
    "fgvc/flowers": ("snella", 16, 1e-3, 0.001, 0.0, 0.61),
    "fgvc/nabirds": ("snella", 32, 1e-3, 5e-4, 0.0, 0.16),
    "fgvc/cars": ("mixk", 16, 1e-3, 0.05, None, None),
}


def preset_runs(preset: str, methods: set[str], monkeypatch) -> dict[str, object]:
    """The preset's runs of ``methods`` by task (one each), parsed without data folders and checkpoint."""
    monkeypatch.setattr(bench.run.sweep, "_check_task", lambda *args: [])
    data = yaml.safe_load(Path(f"bench/presets/{preset}.yaml").read_text())
    data["train"].pop("checkpoint")
    runs = [r for r in parse_sweep(data, preset).runs if r.method in methods]
    by_task = {r.task: r for r in runs}
    assert len(by_task) == len(runs)
    return by_task


def test_paper_presets_hold_the_gps_scripts_values(monkeypatch):
    runs = {
        **preset_runs("paper_vtab", {"gps"}, monkeypatch),
        **preset_runs("paper_fgvc", {"gps"}, monkeypatch),
    }
    assert set(runs) == set(GPS_SCRIPTS)
    for task, run in runs.items():
        t, config = run.train, run.method_config
        batch, lr, drop_path, k = GPS_SCRIPTS[task]
        assert (t.batch_size, t.lr, t.drop_path_rate, config.k) == pytest.approx((batch, lr, drop_path, k)), (
            task
        )
        shared = (t.weight_decay, t.epochs, t.warmup_epochs, t.warmup_lr, t.min_lr, config.loss)
        assert shared == (0.0, 100, 10, 1e-7, 1e-8, "supcon"), task


def test_paper_presets_hold_the_snella_scripts_values(monkeypatch):
    methods = {"snella", "mixk"}
    runs = {
        **preset_runs("paper_vtab", methods, monkeypatch),
        **preset_runs("paper_fgvc", methods, monkeypatch),
    }
    assert set(runs) == set(SNELLA_SCRIPTS)
    for task, run in runs.items():
        method, batch, lr, weight_decay, init, target = SNELLA_SCRIPTS[task]
        t, config = run.train, run.method_config
        assert run.method == method and config.rank == 32 and t.epochs == 100, task
        assert (t.batch_size, t.lr, t.weight_decay) == pytest.approx((batch, lr, weight_decay)), task
        if method == "snella":
            assert (config.sparsity, config.target_sparsity) == pytest.approx((init, target)), task
        else:
            assert config.sparsity == 0.0, task


# LLaMA-2-7B commonsense: NVlabs/DoRA commonsense_reasoning (finetune.py, llama2_7B_DoRA.sh,
# commonsense_evaluate.py, README), transcribed independently of the YAML file.
COMMONSENSE_RECIPE = {
    "epochs": 3,
    "batch_size": 16,
    "weight_decay": 0.0,
    "warmup_steps": 100,
    "warmup_lr": 0.0,
    "schedule": "linear",
    "min_lr": 0.0,
    "max_length": 256,
    "val_examples": 120,
    "gradient_checkpointing": True,
    "num_beams": 4,
    "max_new_tokens": 32,
}
COMMONSENSE_TARGETS = ("*q_proj", "*k_proj", "*v_proj", "*up_proj", "*down_proj")


def test_paper_commonsense_preset_holds_the_recipe(monkeypatch):
    monkeypatch.setattr(bench.run.sweep, "_check_task", lambda *args: [])
    data = yaml.safe_load(Path("bench/presets/paper_commonsense.yaml").read_text())
    assert data["train"].pop("checkpoint") == "checkpoints/Llama-2-7b-hf"
    data["train"]["pretrained"] = False  # no checkpoint folder here
    runs = {r.method: r for r in parse_sweep(data, "paper_commonsense").runs}
    assert set(runs) == {"lora", "snell"}
    for method, run in runs.items():
        t, config = run.train, run.method_config
        assert (run.task, t.backbone, t.data_root) == ("commonsense", "llama2_7b", "data/commonsense")
        assert {k: getattr(t, k) for k in COMMONSENSE_RECIPE} == COMMONSENSE_RECIPE, method
        assert (config.rank, config.dropout, config.targets) == (32, 0.05, COMMONSENSE_TARGETS), method
    assert (runs["lora"].method_config.alpha, runs["lora"].train.lr) == (64, 3e-4)
    snell_config = runs["snell"].method_config
    assert (snell_config.kernel, snell_config.sparsity, snell_config.drop_path) == (
        "piecewise_linear",
        0.9,
        0.0,
    )
    assert runs["snell"].train.lr == 2e-4


# Precision per task, transcribed from the scripts (True: the script passes --amp, autocast; False:
# float32, the default of the scripts' train.py / train_alloc.py / train_alloc_ema.py, whose --amp is
# store_true). ssfgunner/SNELL scripts/ (commit e9d5185): no snell{8,16,32} script passes --amp; of the
# snella32 ones only vtab/cifar.sh, camelyon.sh and pets.sh do (not the FGVC ones, nor caltech/svhn,
# MixK through train.py). FightingFighting/GPS train_scripts/vit/*/*/train_gps.sh (commit 72e0c31): all
# pass --amp. Columns: (SNELL, SNELLA or MixK, GPS); None where that method has no script for the task.
SCRIPTS_AMP = {
    "vtab/cifar": (False, True, True),
    "vtab/caltech101": (False, False, True),
    "vtab/dtd": (False, False, True),
    "vtab/oxford_flowers102": (False, False, True),
    "vtab/oxford_iiit_pet": (False, True, True),
    "vtab/svhn": (False, False, True),
    "vtab/sun397": (False, None, True),
    "vtab/patch_camelyon": (False, True, True),
    "vtab/eurosat": (False, None, True),
    "vtab/resisc45": (False, None, True),
    "vtab/diabetic_retinopathy": (False, False, True),
    "vtab/clevr_count": (False, None, True),
    "vtab/clevr_dist": (False, None, True),
    "vtab/dmlab": (False, None, True),
    "vtab/kitti": (False, None, True),
    "vtab/dsprites_loc": (False, None, True),
    "vtab/dsprites_ori": (False, None, True),
    "vtab/smallnorb_azi": (False, None, True),
    "vtab/smallnorb_ele": (False, False, True),
    "fgvc/cub": (False, False, True),
    "fgvc/nabirds": (False, False, True),
    "fgvc/flowers": (False, False, True),
    "fgvc/dogs": (False, False, True),
    "fgvc/cars": (False, False, True),
}
SCRIPT_FAMILY = {"snell": 0, "snella": 1, "mixk": 1, "gps": 2}
"""The scripts each preset method follows; LoRA, full and linear (FGVC) run SNELL's train.py settings."""


def all_runs(preset: str, monkeypatch) -> list:
    monkeypatch.setattr(bench.run.sweep, "_check_task", lambda *args: [])
    data = yaml.safe_load(Path(f"bench/presets/{preset}.yaml").read_text())
    data["train"].pop("checkpoint")
    return parse_sweep(data, preset).runs


@pytest.mark.parametrize("preset", ["paper_vtab", "paper_fgvc"])
def test_paper_presets_train_in_the_scripts_precision(preset, monkeypatch):
    seen = set()
    for run in all_runs(preset, monkeypatch):
        column = SCRIPT_FAMILY.get(run.method, 0)
        expected = SCRIPTS_AMP[run.task][column]
        assert expected is not None, (run.task, run.method)
        assert run.train.amp is expected, (run.task, run.method, run.method_options)
        seen.add((run.task, column))
    scripted = {
        (task, c) for task, row in SCRIPTS_AMP.items() for c, amp in enumerate(row) if amp is not None
    }
    assert {key for key in scripted if key[0].split("/")[0] == preset.split("_")[1]} == seen


def test_paper_lora_is_the_public_codes_lora(monkeypatch):
    # TuningModule('lora'): no scaling (alpha = r), dropout 0.1 on the input, drop-path 0.1 on the branch.
    runs = [r for r in all_runs("paper_fgvc", monkeypatch) if r.method == "lora"]
    assert {r.task for r in runs} == {f"fgvc/{task}" for task in FGVC_SCRIPTS}
    for run in runs:
        config = run.method_config
        assert (config.alpha / config.rank, config.dropout, config.drop_path, config.qkv) == (
            1.0,
            0.1,
            0.1,
            "separate",
        )
