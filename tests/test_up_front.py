"""What a sweep means (issue #27): the image size reaches the model, equivalent entries are one run."""

from __future__ import annotations

from pathlib import Path

from bench.run.config import RunConfig, TrainConfig
from bench.run.sweep import parse_sweep
from bench.run.train import train_run
from tests.harness import FAST_TRAIN, write_vtab_task


def test_an_image_size_other_than_the_models_native_one_trains(tmp_path: Path) -> None:
    write_vtab_task(tmp_path, "eurosat")
    train = TrainConfig(
        **FAST_TRAIN, backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, data_root=str(tmp_path)
    )
    metrics = train_run(RunConfig("vtab/eurosat", "lora", 0, {}, train), progress=False)["metrics"]
    assert metrics["loss_curve"] and 0 <= metrics["test_acc"] <= 100


def test_equivalent_grid_entries_are_one_run() -> None:
    sweep = parse_sweep({
        "tasks": ["digits"],
        "seeds": [0, 1],
        "grid": [
            {"method": "lora"}, {"method": "lora", "rank": 8},
            {"method": "lora"}, {"method": "lora", "rank": 4},
        ],
    })  # fmt: skip
    assert [(r.label, r.seed) for r in sweep.runs] == [
        ("lora-8", 0),
        ("lora-8", 1),
        ("lora-4", 0),
        ("lora-4", 1),
    ]
    assert len(sweep.merged) == 4
    assert sum("options {'rank': 8} as digits-lora-8-seed0" in line for line in sweep.merged) == 1
    assert sum("the same entry as" in line for line in sweep.merged) == 2
