"""Retention: the tuned backbone's accuracy on its pretraining task, with its pretraining head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from bench.backbones import CheckpointError, create_backbone, pretraining_head
from bench.data.embedded import _rotation_split, load_mnist_split, retention_digits
from bench.run.config import RunConfig, TrainConfig
from bench.run.retention import retention_task
from bench.run.sweep import SweepError, parse_sweep
from bench.run.train import train_run
from tests.harness import FAST_TRAIN, write_image


def test_retention_digits_are_pretraining_classes_no_task_trains_on() -> None:
    data = retention_digits()
    pretrain = set(load_mnist_split().pretrain.origin.tolist())
    rotation_train = set(_rotation_split()[0].tolist())
    rows = set(data.origin.tolist())
    assert len(rows) == len(data) == 400 and not rows & (pretrain | rotation_train)
    assert sorted(set(data.labels.tolist())) == list(range(10))


@torch.no_grad()
def pretrained_accuracy() -> float:
    data = retention_digits()
    model = create_backbone("vit_mnist_patch7_28", 10).eval()
    return 100.0 * (model(data.images).argmax(1) == data.labels).sum().item() / len(data)


def run_retention(method: str, lr: float) -> float:
    train = TrainConfig(
        **{**FAST_TRAIN, "limit_eval_batches": None, "limit_train_batches": 6}, lr=lr, device="cpu"
    )
    return train_run(RunConfig("digits", method, 0, {}, train), progress=False)["metrics"]["retention_acc"]


@pytest.mark.slow
def test_a_linear_probe_keeps_the_pretrained_accuracy_and_full_fine_tuning_loses_some() -> None:
    before = pretrained_accuracy()
    assert before > 90
    assert run_retention("linear", 1e-2) == pytest.approx(before, abs=1e-6)  # the backbone is untouched
    assert run_retention("full", 3e-3) < before - 1


def write_checkpoint(path: Path, num_classes: int) -> Path:
    model = timm.create_model("test_vit", num_classes=num_classes)
    safetensors.torch.save_file(model.state_dict(), path)
    return path


def test_a_checkpoints_head_and_a_retention_folder(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "pretrained.safetensors", num_classes=7)
    stored = safetensors.torch.load_file(checkpoint)
    head = pretraining_head("test_vit", checkpoint)
    assert torch.equal(head.weight, stored["head.weight"]) and not head.weight.requires_grad
    folder = tmp_path / "imagenet-val"
    for i in range(3):
        write_image(folder / f"n{i:08d}" / "a.png", (40, 30 + i), value=40 * i)
    (folder / "retention.txt").write_text("".join(f"n{i:08d}/a.png {2 * i}\n" for i in range(3)))
    cfg = TrainConfig(
        backbone="test_vit", checkpoint=str(checkpoint), retention_data=str(folder), img_size=160
    )
    task = retention_task(cfg)
    image, label = task.data[2]
    assert (len(task.data), label, tuple(image.shape), task.head.out_features) == (3, 4, (3, 160, 160), 7)
    (folder / "retention.txt").write_text("n00000000/a.png 7\n")  # the head has classes 0-6
    with pytest.raises(ValueError, match=r"label 7 outside \[0, 7\)"):
        retention_task(cfg)


def test_a_checkpoint_without_a_head_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "backbone.safetensors"
    state = timm.create_model("test_vit", num_classes=0).state_dict()
    safetensors.torch.save_file(state, checkpoint)
    with pytest.raises(CheckpointError, match="no pretraining head"):
        pretraining_head("test_vit", checkpoint)
    npz = tmp_path / "ViT.npz"
    np.savez(npz, **{"embedding/kernel": np.zeros(1)})
    with pytest.raises(CheckpointError, match="no pretraining head"):
        pretraining_head("vit_base_patch16_224", npz)


def test_the_sweep_checks_the_retention_folder_before_running(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "c.safetensors", 3)
    sweep = {
        "train": {"backbone": "test_vit", "retention_data": str(tmp_path / "missing")},
        "tasks": ["digits"],
        "grid": [{"method": "linear"}, {"method": "lora", "train": {"checkpoint": str(checkpoint)}}],
    }
    with pytest.raises(SweepError) as err:
        parse_sweep(sweep)
    message = str(err.value)
    assert (
        "needs checkpoint" in message
        and f"{tmp_path / 'missing' / 'retention.txt'} does not exist" in message
    )
