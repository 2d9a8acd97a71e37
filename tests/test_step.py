"""One step function: training, memory estimates and measurements, the GPU check and the perf benchmark
all run ``bench.step.train_step`` (a spy counts its calls from each), so the step whose memory is
estimated is the step that is trained and timed; and each makes its optimizer with
``bench.step.build_optimizer`` (a spy too), whose one-group form is plain ``torch.optim.AdamW``."""

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay

import bench.memory.estimate
import bench.perf.gpu_check
import bench.perf.step_bench
import bench.run.train
import bench.step
import snell
from bench.methods import preset_config
from bench.run.config import RunConfig, TrainConfig
from bench.settings import EMBEDDED_BACKBONE
from tests.harness import FAST_TRAIN


@pytest.fixture
def calls(monkeypatch):
    """The (model class, precision) of every train_step call made while the test runs."""
    seen = []
    real = bench.step.train_step

    def spy(model, optimizer, images, labels, **kwargs):
        seen.append((type(model).__name__, kwargs.get("precision", "fp32")))
        return real(model, optimizer, images, labels, **kwargs)

    monkeypatch.setattr(bench.step, "train_step", spy)
    return seen


@pytest.fixture
def optimizers(monkeypatch):
    """The settings of every build_optimizer call made while the test runs."""
    seen = []
    real = bench.step.build_optimizer

    def spy(model, **settings):
        seen.append(settings)
        return real(model, **settings)

    monkeypatch.setattr(bench.step, "build_optimizer", spy)
    return seen


@pytest.mark.slow
def test_training_runs_the_step(calls, optimizers):
    run = RunConfig("digits", "lora", 0, {"rank": 4}, TrainConfig(**FAST_TRAIN))
    bench.run.train.train_run(run, progress=False)
    assert len(calls) == FAST_TRAIN["limit_train_batches"]
    assert optimizers == [{"lr": run.train.lr, "weight_decay": run.train.weight_decay}]


def test_memory_estimate_and_measurement_run_the_step(calls, optimizers):
    config = preset_config("snell-8")
    bench.memory.estimate.step_memory(EMBEDDED_BACKBONE, config, 4)
    bench.memory.estimate.step_memory(EMBEDDED_BACKBONE, config, 4, measure_on="cpu")
    assert calls == [("VisionTransformer", "fp32")] * 2
    one_group = {"lr": 1e-3, "weight_decay": 1e-4, "foreach": True, "decay_groups": False}
    assert optimizers == [one_group] * 2


def test_gpu_check_runs_the_step(calls, optimizers):
    variant = bench.perf.gpu_check.VARIANTS[1]
    setup = bench.perf.gpu_check.build(variant, 2, "bf16", model_name=EMBEDDED_BACKBONE, device="cpu")
    row = bench.perf.gpu_check.alone(setup, 1, on_cuda=False)
    assert calls == [("VisionTransformer", "bf16")] * 2 and row["trainable_params"] > 0
    assert optimizers == [{"lr": 1e-3, "weight_decay": 1e-4, "decay_groups": False}]


@pytest.mark.slow
def test_perf_benchmark_runs_the_step(calls, optimizers):
    workload = bench.perf.step_bench.vit_workload(bench.perf.step_bench.Setting(2, 64, 1))
    bench.perf.step_bench.build(bench.perf.step_bench.VARIANTS[0], workload).step()
    assert calls == [("VisionTransformer", "fp32")]
    assert optimizers == [{"lr": 1e-3, "weight_decay": 0.01, "decay_groups": False, "foreach": True}]


def _groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's hyperparameters, its parameters by identity."""
    return [{**g, "params": [id(p) for p in g["params"]]} for g in optimizer.param_groups]


def test_one_group_is_plain_adamw_and_groups_are_training_s():
    """``decay_groups=False`` builds exactly ``torch.optim.AdamW(trainable, ...)`` (what the estimate,
    the perf benchmark and the GPU check built before); the default, timm's groups as training built them
    (no decay on 1-d parameters, the model's ``no_weight_decay`` nor ``snell.no_weight_decay``)."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2)
    snell.apply_method(model, snell.method_config("gps", selected=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for settings in ({"lr": 1e-3, "weight_decay": 1e-4}, {"lr": 1e-3, "weight_decay": 0.01, "foreach": True}):
        built = bench.step.build_optimizer(model, decay_groups=False, **settings)
        assert type(built) is torch.optim.AdamW
        assert _groups(built) == _groups(torch.optim.AdamW(trainable, **settings))
    excluded = set(model.no_weight_decay()) | snell.no_weight_decay(model)
    assert snell.no_weight_decay(model)  # GPS marks its weights
    groups = param_groups_weight_decay(model, 1e-4, no_weight_decay_list=excluded)
    expected = create_optimizer_v2(groups, "adamw", lr=1e-3, weight_decay=1e-4)
    assert _groups(bench.step.build_optimizer(model, lr=1e-3, weight_decay=1e-4)) == _groups(expected)
