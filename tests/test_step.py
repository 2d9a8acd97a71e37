"""One step function: training, memory estimates and measurements, the GPU check and the perf benchmark
all run ``bench.step.train_step`` (a spy counts its calls from each), so the step whose memory is
estimated is the step that is trained and timed."""

import pytest

import bench.memory.estimate
import bench.perf.gpu_check
import bench.perf.step_bench
import bench.run.train
import bench.step
from bench.methods import preset_config
from bench.run.config import EMBEDDED_BACKBONE, RunConfig, TrainConfig
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


def test_training_runs_the_step(calls):
    run = RunConfig("digits", "lora", 0, {"rank": 4}, TrainConfig(**FAST_TRAIN))
    bench.run.train.train_run(run, progress=False)
    assert len(calls) == FAST_TRAIN["limit_train_batches"]


def test_memory_estimate_and_measurement_run_the_step(calls):
    config = preset_config("snell-8")
    bench.memory.estimate.step_memory(EMBEDDED_BACKBONE, config, 4)
    bench.memory.estimate.step_memory(EMBEDDED_BACKBONE, config, 4, measure_on="cpu")
    assert calls == [("VisionTransformer", "fp32")] * 2


def test_gpu_check_runs_the_step(calls):
    variant = bench.perf.gpu_check.VARIANTS[1]
    setup = bench.perf.gpu_check.build(variant, 2, "bf16", model_name=EMBEDDED_BACKBONE, device="cpu")
    row = bench.perf.gpu_check.alone(setup, 1, on_cuda=False)
    assert calls == [("VisionTransformer", "bf16")] * 2 and row["trainable_params"] > 0


def test_perf_benchmark_runs_the_step(calls):
    workload = bench.perf.step_bench.vit_workload(bench.perf.step_bench.Setting(2, 64, 1))
    bench.perf.step_bench.build(bench.perf.step_bench.VARIANTS[0], workload).step()
    assert calls == [("VisionTransformer", "fp32")]
