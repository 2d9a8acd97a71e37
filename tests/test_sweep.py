"""Sweep files: expansion into runs, and every mistake reported at once before anything runs."""

import dataclasses
import json

import pytest

from bench.run.config import ADDED_TRAIN_FIELDS, TRAIN_DEFAULTS, RunConfig
from bench.run.sweep import SweepError, load_sweep, parse_sweep
from tests.harness import FAST_TRAIN, REPO


def sweep(grid, **top):
    return {"train": FAST_TRAIN, "tasks": ["digits"], "seeds": [0, 1], "grid": grid, **top}


def test_grid_expands_to_the_product():
    runs = parse_sweep(
        sweep(
            [
                {"method": ["full", "lora"]},
                {"method": "snell", "kernel": ["linear", "rbf"], "sparsity": [0, 0.9]},
            ]
        )
    ).runs
    assert len(runs) == (2 + 4) * 2
    assert {(r.method, r.method_options.get("kernel"), r.seed) for r in runs} >= {("snell", "rbf", 1)}
    assert len({r.run_id for r in runs}) == len(runs)


def test_entry_overrides_tasks_seeds_and_training():
    runs = parse_sweep(
        sweep([{"method": "lora", "tasks": ["rotation"], "seeds": [5], "train": {"lr": 0.01}}])
    ).runs
    assert [(r.task, r.seed, r.train.lr, r.train.epochs) for r in runs] == [("rotation", 5, 0.01, 1)]


def test_per_method_default_options_apply():
    runs = parse_sweep(sweep([{"method": "lora"}], options={"lora": {"rank": 4}})).runs
    assert all(r.method_options == {"rank": 4} for r in runs)


def test_labels_name_what_the_entry_varies_not_the_sweep_wide_options():
    runs = parse_sweep(
        sweep([{"method": "snell", "rank": 16, "rule": "eq5"}], options={"snell": {"dropout": 0.0}})
    ).runs
    assert {r.label for r in runs} == {"snell-16 piecewise_linear s=0.9 rule=eq5"}
    assert all(r.method_options["dropout"] == 0.0 for r in runs)
    restored = RunConfig.from_dict(json.loads(json.dumps(runs[0].to_dict())))
    assert restored == runs[0] and restored.run_id == runs[0].run_id


def test_run_id_is_stable_and_sensitive_to_config():
    a = parse_sweep(sweep([{"method": "lora", "rank": 4}])).runs
    b = parse_sweep(sweep([{"method": "lora", "rank": 4}])).runs
    c = parse_sweep(sweep([{"method": "lora", "rank": 8}])).runs
    assert [r.run_id for r in a] == [r.run_id for r in b]
    assert not {r.run_id for r in a} & {r.run_id for r in c}


def test_every_committed_record_keeps_its_run_id():
    paths = sorted((REPO / "results" / "records").glob("*.json"))
    paths += sorted((REPO / "results" / "lr_search" / "records").glob("*.json"))
    assert len(paths) > 300
    for path in paths:
        record = json.loads(path.read_text())
        assert RunConfig.from_dict(record["config"]).run_id == record["run_id"], path.name


def test_training_fields_added_later_enter_the_run_id_only_off_their_defaults():
    (run,) = parse_sweep(sweep([{"method": "lora"}], seeds=[0])).runs
    assert set(ADDED_TRAIN_FIELDS) <= set(run.to_dict()["train"])  # records store every setting
    assert not set(ADDED_TRAIN_FIELDS) & set(run.identity()["train"])
    old_record = run.to_dict()
    for name in ADDED_TRAIN_FIELDS:
        del old_record["train"][name]  # a record written before the fields existed
    assert RunConfig.from_dict(old_record).run_id == run.run_id
    for name, value in {"max_length": 128, "schedule": "linear", "gradient_checkpointing": True}.items():
        assert TRAIN_DEFAULTS[name] != value
        changed = dataclasses.replace(run, train=dataclasses.replace(run.train, **{name: value}))
        assert changed.run_id != run.run_id and changed.identity()["train"][name] == value


def test_new_training_fields_are_validated():
    bad = {"max_length": 0, "num_beams": 1.5, "val_examples": -1, "warmup_steps": "100", "schedule": "step"}
    with pytest.raises(SweepError) as info:
        parse_sweep(sweep([{"method": "lora"}], train={**FAST_TRAIN, **bad, "gradient_checkpointing": "yes"}))
    text = str(info.value)
    assert "max_length=0 must be an integer >= 1" in text and "num_beams=1.5 must be an integer >= 1" in text
    assert "val_examples=-1 must be an integer >= 0" in text
    assert "warmup_steps='100' must be an integer >= 0 or null" in text
    assert "schedule='step'; allowed: cosine, linear" in text
    assert "gradient_checkpointing='yes' must be true or false" in text


def test_three_mistakes_are_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "train: {epochs: 1}\n"
        "tasks: [digits, mnist_c]\n"
        "grid:\n"
        "  - {method: snell, rnak: 8}\n"
        "  - {method: snell, sparsity: 1.5}\n"
    )
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    problems = info.value.problems
    assert len(problems) == 3, problems
    text = str(info.value)
    assert "unknown option(s) ['rnak'] for method 'snell' (did you mean 'rank'?)" in text
    assert "sparsity=1.5 must be a number in [0, 1)" in text
    assert "unknown task 'mnist_c'" in text
    assert not (tmp_path / "records").exists()


def test_bad_top_level_and_training_values():
    with pytest.raises(SweepError) as info:
        parse_sweep({"tasks": ["digits"], "grid": [{"method": "lora"}], "trian": {}, "train": {"epochs": 0}})
    text = str(info.value)
    assert "unknown key 'trian' (did you mean 'train'?)" in text
    assert "epochs=0 must be an integer >= 1" in text


def test_missing_data_folder_and_checkpoint_are_reported(tmp_path):
    data = sweep(
        [{"method": "lora"}],
        tasks=["vtab/cifar"],
        train={**FAST_TRAIN, "data_root": str(tmp_path), "checkpoint": str(tmp_path / "ViT-B_16.npz")},
    )
    with pytest.raises(SweepError) as info:
        parse_sweep(data)
    text = str(info.value)
    assert "ViT-B_16.npz" in text and "does not exist" in text
    assert "train800val200.txt" in text  # the expected VTAB-1k layout is shown


def test_presets_are_valid():
    for name in ("quick", "default", "paper_vtab", "paper_fgvc", "paper_commonsense"):
        path = f"bench/presets/{name}.yaml"
        if name.startswith("paper"):
            with pytest.raises(SweepError, match="does not exist|not found|layout"):
                load_sweep(path)  # no data or checkpoint here: validated, and says what is missing
        else:
            assert load_sweep(path).runs
