"""Every bad value caught before work starts (issue #27): a sweep's mistakes all at once, malformed files,
operator commands' arguments; and what a sweep means: the image size reaches the model, equivalent
entries are one run, a list of target patterns is one value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import cli
from bench.arguments import parse
from bench.run import execute
from bench.run.config import RunConfig, TrainConfig
from bench.run.sweep import SweepError, parse_sweep
from bench.run.train import train_run
from bench.settings import EMBEDDED_BACKBONE
from tests.harness import FAST_TRAIN, write_sweep, write_vtab_task


@pytest.mark.slow
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


def test_every_mistake_of_a_sweep_is_reported_once_and_nothing_runs(tmp_path: Path) -> None:
    bad_file = tmp_path / "weights.pth"
    bad_file.write_text("not a checkpoint")
    sweep = {
        "train": {
            "epochs": 1, "device": "cuda", "num_workers": -1, "lr": float("nan"), "label_smoothing": 5,
            "backbone": "vit_tinny_patch16_224", "pretrained": "no", "amp": "yes", "epohcs": 2,
        },
        "tasks": ["digits", "mnist_c"],
        "seeds": [0, True],
        "grid": [
            {"method": "peft", "tuner": "lora", "lora_dropout": 5.0, "lora_alpha": "sixteen"},
            {"method": "snell", "kernel_options": {"pieces": 0}, "recompute": "no"},
            {"method": "lora", "alpha": -1, "train_head": "no", "rank": 0,
             "train": {"lr": 0.1, "min_lr": 0.5}},
            {"method": "lora", "train": {"backbone": "vit_tiny_patch16_224", "checkpoint": str(bad_file)}},
        ],
    }  # fmt: skip
    with pytest.raises(SweepError) as err:
        parse_sweep(sweep)
    expected = [
        "num_workers=-1", "lr=nan must be a finite number", "label_smoothing=5", "unknown backbone "
        "'vit_tinny_patch16_224' (did you mean 'vit_tiny_patch16_224'?)", "min_lr=0.5 is above lr=0.1",
        "pretrained='no' must be true or false", "amp='yes' must be true or false", "unknown key 'epohcs'",
        "unknown task 'mnist_c'", "seed True must be an integer",
        "lora_dropout=5.0 must be a number in [0, 1)", "lora_alpha='sixteen' must be an integer",
        "pieces=0 must be >= 1", "recompute='no' must be true or false", "alpha=-1 must be > 0",
        "train_head='no' must be true or false", "rank=0 must be an integer >= 1",
        f"could not read checkpoint {bad_file}",
    ]  # fmt: skip
    if not torch.cuda.is_available():
        expected.append("device='cuda' but this host has no CUDA device")
    message = str(err.value)
    for text in expected:
        assert message.count(text) == 1, (text, message)
    assert not (tmp_path / "records").exists()


def test_a_list_of_target_patterns_is_one_value_of_one_run() -> None:
    runs = parse_sweep({
        "tasks": ["digits"], "grid": [{"method": "lora", "targets": ["*attn.qkv", "*mlp.fc1"]}],
    }).runs  # fmt: skip
    assert len(runs) == 1 and runs[0].method_config.targets == ("*attn.qkv", "*mlp.fc1")
    both = parse_sweep(
        {"tasks": ["digits"], "grid": [{"method": "lora", "targets": [["*attn.qkv"], ["*mlp.fc1"]]}]}
    )
    assert [r.method_config.targets for r in both.runs] == [("*attn.qkv",), ("*mlp.fc1",)]


@pytest.mark.parametrize(
    "data",
    [
        {"tasks": ["digits"], "options": ["lora"], "grid": [{"method": "lora"}]},
        {"tasks": [1], "grid": [{"method": "lora"}]},
        {"tasks": ["digits"], "grid": [{"method": ["lora", ["snell"]]}]},
        {"tasks": ["digits"], "grid": [["lora"]]},
        {"tasks": ["digits"], "grid": [{"method": "lora", "train": [1]}]},
        {"tasks": ["digits"], "train": "fast", "grid": [{"method": "lora"}]},
        {"tasks": ["digits"], "options": {"lora": ["rank"]}, "grid": [{"method": "lora"}]},
        {"tasks": ["digits"], "grid": [{"method": "lora", "rank": {"a": 1}}]},
        ["not", "a", "mapping"],
    ],
)
def test_malformed_sweep_files_get_a_sweep_error_not_a_traceback(data) -> None:
    with pytest.raises(SweepError):
        parse_sweep(data)


@pytest.mark.parametrize(
    "argv, said",
    [
        (["gpu-check", "--batch-sizes", "0"], "argument --batch-sizes: '0': give an integer >= 1"),
        (["gpu-check", "--device", "tpu"], "argument --device: 'tpu': allowed: cpu, cuda, cuda:N"),
        (["perf-step", "--threads", "0", "1"], "argument --threads: '0': give an integer >= 1"),
        (["notebooks", "--timeout", "-1"], "argument --timeout: '-1': give an integer >= 1"),
        (["report", "--results", "/nonexistent"], "--results /nonexistent: no such folder"),
    ],
)
def test_operator_commands_refuse_bad_arguments_in_one_line(argv: list[str], said: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code != 0
    assert said in capsys.readouterr().err + str(exit_.value.code)


def test_gpu_check_on_the_cpu_defaults_to_small_models() -> None:
    args = parse("gpu-check", ["--device", "cpu"])
    assert (args.model, args.llama_model) == (EMBEDDED_BACKBONE, "llama_tiny")
    assert parse("gpu-check", []).model == "vit_base_patch16_224"


def test_a_sweep_with_failed_runs_exits_1_after_its_report(tmp_path: Path, monkeypatch) -> None:
    def broken(run, progress=True):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(execute, "train_run", broken)
    sweep = write_sweep(tmp_path / "s.yaml", [{"method": "linear"}])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", str(sweep), "--results", str(tmp_path / "r"), "--workers", "1"])
    assert "the sweep has failed runs (error)" in str(exit_.value.code)
    assert "| error " in (tmp_path / "r" / "tables" / "results.md").read_text()
