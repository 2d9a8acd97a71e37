"""The report's paper comparison: our records beside the SNELL paper's printed numbers (the data file)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from bench.records.records import SCHEMA_VERSION, record_path, write_record
from bench.report.build import build_report
from bench.report.paper import AVERAGES, PAPER_RESULTS, averages, paper_method, paper_setting
from bench.run import sweep as sweep_module
from bench.run.config import RunConfig
from bench.run.sweep import parse_sweep
from tests.harness import REPO, write_vtab_task

TASKS = ("vtab/cifar", "vtab/dtd", "vtab/eurosat")


def printed() -> dict[tuple[str, str, str], tuple[float, str]]:
    """The data file read independently of the report: (setting, method, task) -> (top-1, table)."""
    lines = [line for line in PAPER_RESULTS.read_text().splitlines() if not line.startswith("#")]
    return {
        (r["setting"], r["method"], r["task"]): (float(r["top1"]), r["table"]) for r in csv.DictReader(lines)
    }


def preset_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """The paper_vtab preset's runs on three tasks, its data pointed at fixtures and its checkpoint at an
    empty file (whose contents the sweep's check is told to accept: no ViT-B/16 weights here)."""
    monkeypatch.setattr(sweep_module, "checkpoint_problems", lambda *args: ())
    for task in TASKS:
        write_vtab_task(tmp_path / "vtab-1k", task.removeprefix("vtab/"))
    checkpoint = tmp_path / "ViT-B_16.npz"
    checkpoint.touch()
    data = yaml.safe_load((REPO / "bench/presets/paper_vtab.yaml").read_text())
    data["train"] |= {"data_root": str(tmp_path / "vtab-1k"), "checkpoint": str(checkpoint)}
    data["grid"] = [e for e in data["grid"] if set(e["tasks"]) <= set(TASKS)]
    return parse_sweep(data).runs


def our_top1(run: RunConfig) -> float:
    """A test accuracy that differs per method and task, so that a mix-up shows."""
    return 50.0 + 3.0 * TASKS.index(run.task) + 0.1 * (run.method_options.get("rank") or 0) + 0.37 * run.seed


def write_records(runs: list[RunConfig], results: Path) -> None:
    for run in runs:
        record = {
            "schema": SCHEMA_VERSION,
            "run_id": run.run_id,
            "label": run.label,
            "config": run.to_dict(),
            "method_config": run.resolved.to_dict(),
            "provenance": {"device": "synthetic", "git_commit": "0" * 40},
            "status": "ok",
            "error": None,
            "metrics": {"val_acc": 60.0, "test_acc": our_top1(run), "peak_memory_mib": 100.0},
        }
        write_record(record_path(results, run.run_id), record)


def section(markdown: str) -> list[list[str]]:
    """The rows of the report's paper table: [setting, method, task, ours, paper, diff, table, label]."""
    part = markdown.split("## Beside the SNELL paper", 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in part.splitlines() if line.startswith("|")
    ]
    return rows[2:]


def test_paper_table_of_three_vtab_tasks_matches_the_data_file(tmp_path: Path, monkeypatch) -> None:
    runs = preset_runs(tmp_path, monkeypatch)
    assert {r.task for r in runs} == set(TASKS) and {"snell", "gps", "snella"} <= {r.method for r in runs}
    write_records(runs, tmp_path / "results")
    build_report(tmp_path / "results")
    rows = section((tmp_path / "results/tables/results.md").read_text())
    paper = printed()
    per_task = [r for r in rows if r[2] in TASKS]
    # SNELL-16 is the one method with per-task VTAB numbers in the paper (Tab. A7); GPS and SNELLA have none
    assert {(r[1], r[2]) for r in per_task} == {("SNELL-16", t) for t in TASKS}
    for setting, method, task, ours, theirs, diff, table, label in per_task:
        run = next(r for r in runs if r.task == task and r.label == label)
        value, source = paper["vit_b16_in21k", method, task]
        assert setting == "ViT-B/16, ImageNet-21k supervised" and run.method_options["rank"] == 16
        assert (float(ours), float(theirs), table) == (pytest.approx(our_top1(run), abs=0.05), value, source)
        assert float(diff) == pytest.approx(our_top1(run) - value, abs=0.051)
    averages_shown = {(r[1], r[2]): r for r in rows if r[2] not in TASKS}
    for method in ("SNELL-8", "SNELL-16", "SNELL-32"):
        natural = averages_shown[method, AVERAGES["vtab/natural"][0]]
        assert natural[3] == "— (2 of 7 tasks done)" and natural[5] == "—"
        assert (float(natural[4]), natural[6]) == paper["vit_b16_in21k", method, "vtab/natural"]
        mean19 = averages_shown[method, AVERAGES["vtab/mean19"][0]]
        assert mean19[3] == "— (3 of 19 tasks done)"
        assert (float(mean19[4]), mean19[6]) == paper["vit_b16_in21k", method, "vtab/mean19"]


def test_the_paper_averages_reproduce_its_own_printed_means() -> None:
    """The paper's SNELL-16 per-task numbers (Tab. A7) averaged our way give its printed group means and
    their mean (Tab. 1) and its 19-task mean (Tab. A7): the two conventions are the paper's."""
    paper = printed()
    snell16 = {t: v for (s, m, t), (v, _) in paper.items() if (s, m) == ("vit_b16_in21k", "SNELL-16")}
    per_task = {t: v for t, v in snell16.items() if t not in AVERAGES}
    assert len(per_task) == 19 + 5  # VTAB-1k (Tab. A7) and FGVC (Tab. 1)
    checked = []
    for key, (value, _known) in averages(per_task).items():
        if key in snell16:
            assert value == pytest.approx(snell16[key], abs=0.051), key
            checked.append(key)
    assert set(checked) == {
        *(f"vtab/{k}" for k in ("natural", "specialized", "structured", "mean", "mean19")),
        "fgvc/mean",
    }


@pytest.mark.parametrize(
    "backbone, checkpoint, setting",
    [
        ("vit_base_patch16_224", "checkpoints/ViT-B_16.npz", "vit_b16_in21k"),
        ("vit_base_patch16_224", "ckpt/mae_pretrain_vit_base.pth", "vit_b16_mae"),
        ("vit_base_patch16_224", "ckpt/linear-vit-b-300ep-MoCo.pth.tar", "vit_b16_mocov3"),
        ("swin_base_patch4_window7_224", "swin.pth", "swin_b"),
        ("vit_huge_patch14_224", "h.npz", "vit_h14"),
        ("vit_base_patch16_224", None, None),
        ("vit_mnist_patch7_28", "x.safetensors", None),
    ],
)
def test_paper_setting(backbone: str, checkpoint: str | None, setting: str | None) -> None:
    assert paper_setting(backbone, checkpoint) == setting


def test_paper_method_names() -> None:
    assert paper_method("snell", {"rank": 8, "kernel": "piecewise_linear"}) == "SNELL-8"
    assert paper_method("snell", {"rank": 8, "kernel": "rbf"}) is None
    assert paper_method("lora", {"rank": 16}) == "LoRA-16"
    assert paper_method("peft", {"tuner": "dora", "rank": 8}) is None
