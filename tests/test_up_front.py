"""Settings a run takes from the sweep (issue #27): the image size reaches the model."""

from __future__ import annotations

from pathlib import Path

from bench.run.config import RunConfig, TrainConfig
from bench.run.train import train_run
from tests.harness import FAST_TRAIN, write_vtab_task


def test_an_image_size_other_than_the_models_native_one_trains(tmp_path: Path) -> None:
    write_vtab_task(tmp_path, "eurosat")
    train = TrainConfig(
        **FAST_TRAIN, backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, data_root=str(tmp_path)
    )
    metrics = train_run(RunConfig("vtab/eurosat", "lora", 0, {}, train), progress=False)["metrics"]
    assert metrics["loss_curve"] and 0 <= metrics["test_acc"] <= 100
