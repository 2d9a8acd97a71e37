"""Our results beside the SNELL paper's printed numbers: per task and in the paper's own averages.

The paper's figures live in one data file, ``paper_results.csv`` (each with the table that prints it).
A run is compared when its backbone and pretraining are a setting of the paper (``paper_setting``) and its
method is one the paper reports (``paper_method``). Where several of our configurations map to one
paper method on a task (a sparsity or lr search), the one with the best mean validation accuracy is
shown, as the paper picks per task; its label is in the table.

Averages follow the paper: VTAB-1k group means (Natural 7, Specialized 4, Structured 8 tasks), the mean
of the three group means (Tab. 1, 2, 3, 4) and the mean over all 19 tasks (Tab. A7, 5b); FGVC's mean of
its 5 datasets; commonsense's plain mean of its 8 test sets (Tab. A13). Ours is given only where every
task of an average finished; otherwise the cell says how many did.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from bench.llm.commonsense import COMMONSENSE_TASKS
from bench.records.records import failure_text

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")

SETTINGS = {
    "vit_b16_in21k": "ViT-B/16, ImageNet-21k supervised",
    "vit_b16_mae": "ViT-B/16, MAE",
    "vit_b16_mocov3": "ViT-B/16, MoCo v3",
    "swin_b": "Swin-B, ImageNet-21k supervised",
    "convnext_b": "ConvNeXt-B, ImageNet-21k supervised",
    "vit_l16": "ViT-L/16, ImageNet-21k supervised",
    "vit_h14": "ViT-H/14, ImageNet-21k supervised",
    "llama2_7b": "LLaMA-2-7B",
}
"""The paper's backbones (with their pretraining), keys of the data file's ``setting`` column."""

ARCHITECTURES = {
    "vit_large_patch16": "vit_l16",
    "vit_huge_patch14": "vit_h14",
    "swin_base": "swin_b",
    "convnext_base": "convnext_b",
    "llama2_7b": "llama2_7b",
}
"""timm / causal LM name prefix -> setting; ViT-B/16 is told apart by its checkpoint (``paper_setting``)."""

VTAB_GROUPS = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": (
        "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
        "smallnorb_ele",
    ),
}  # fmt: skip
FGVC_TASKS = ("cub", "nabirds", "flowers", "dogs", "cars")

AVERAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{
        f"vtab/{group}": (
            f"VTAB {group.title()}: mean of its {len(tasks)} tasks",
            tuple(f"vtab/{t}" for t in tasks),
        )
        for group, tasks in VTAB_GROUPS.items()
    },
    "vtab/mean": ("VTAB mean of the 3 group means", tuple(f"vtab/{g}" for g in VTAB_GROUPS)),
    "vtab/mean19": (
        "VTAB mean over the 19 tasks",
        tuple(f"vtab/{t}" for tasks in VTAB_GROUPS.values() for t in tasks),
    ),
    "fgvc/mean": ("FGVC mean of the 5 datasets", tuple(f"fgvc/{t}" for t in FGVC_TASKS)),
    "commonsense/average": (
        "Commonsense mean of the 8 test sets",
        tuple(f"commonsense/{t}" for t in COMMONSENSE_TASKS),
    ),
}
"""Each average the paper prints: its name in our tables and what it averages (tasks or other averages)."""

TASK_ORDER = [*AVERAGES["vtab/mean19"][1], *AVERAGES["fgvc/mean"][1], *AVERAGES["commonsense/average"][1]]


@functools.cache
def paper_results() -> pd.DataFrame:
    """The data file: setting, method, task, top1 (%), table."""
    return pd.read_csv(PAPER_RESULTS, comment="#")


def paper_setting(backbone: str, checkpoint: str | None) -> str | None:
    """The paper's setting a run's backbone is, or None (random weights, or a backbone the paper does not
    use). ViT-B/16's pretraining is read from its checkpoint's file name ("mae", "moco"; else supervised)."""
    if checkpoint is None:
        return None
    if backbone.startswith("vit_base_patch16"):
        name = Path(checkpoint).name.lower()
        return "vit_b16_mae" if "mae" in name else "vit_b16_mocov3" if "moco" in name else "vit_b16_in21k"
    return next((s for prefix, s in ARCHITECTURES.items() if backbone.startswith(prefix)), None)


def paper_method(method: str, options: dict) -> str | None:
    """The paper's name for one of our method configurations, or None where the paper has no such row
    (SNELL with another kernel than its piecewise-linear one, a PEFT tuner, ...)."""
    rank = options.get("rank")
    names = {
        "full": "Full",
        "linear": "Linear",
        "bitfit": "Bias",
        "spt-lora": "SPT-LoRA",
        "gps": "GPS",
        "lora": f"LoRA-{rank}",
        "snell": f"SNELL-{rank}" if options.get("kernel") == "piecewise_linear" else None,
    }
    return names.get(method)


def _runs(records: list[dict]) -> pd.DataFrame:
    """One row per (run, task it scores): setting, paper method, label, status, val and test top-1; a
    commonsense run scores each of its test sets (``commonsense/<set>``)."""
    rows = []
    for r in records:
        cfg, metrics = r["config"], r["metrics"]
        options = r.get("method_config") or cfg["method_options"]
        row = {
            "setting": paper_setting(cfg["train"]["backbone"], cfg["train"].get("checkpoint")),
            "method": paper_method(cfg["method"], options),
            "label": r["label"],
            "status": r["status"],
            "val_acc": metrics.get("val_acc"),
        }
        scores = {f"commonsense/{k}": v for k, v in (metrics.get("task_acc") or {}).items()}
        for task, acc in (scores or {cfg["task"]: metrics.get("test_acc")}).items():
            rows.append({**row, "task": task, "test_acc": acc})
    runs = pd.DataFrame(rows, columns=["setting", "method", "label", "status", "val_acc", "task", "test_acc"])
    return runs.dropna(subset=["setting", "method"])


def ours_per_task(records: list[dict]) -> pd.DataFrame:
    """Per (setting, method, task): our mean and std of test top-1 over successful seeds, the seeds, the
    label chosen (best mean validation accuracy), or the failure status where no seed succeeded."""
    runs = _runs(records)
    ok = runs.status == "ok"
    per_label = runs.assign(ok=ok, test=runs.test_acc.where(ok), val=runs.val_acc.where(ok))
    per_label = per_label.groupby(["setting", "method", "task", "label"], as_index=False).agg(
        mean=("test", "mean"),
        std=("test", "std"),
        seeds=("ok", "sum"),
        val=("val", "mean"),
        failures=("status", failure_text),
    )
    per_label = per_label.sort_values(["seeds", "val"], ascending=False, na_position="last", kind="stable")
    return per_label.drop_duplicates(["setting", "method", "task"]).drop(columns="val")


def leaves(key: str) -> tuple[str, ...]:
    """The tasks an average (or a task itself) finally averages."""
    if key not in AVERAGES:
        return (key,)
    return tuple(task for part in AVERAGES[key][1] for task in leaves(part))


def averages(ours: dict[str, float]) -> dict[str, tuple[float | None, int]]:
    """Each of the paper's averages of ``ours`` (task -> mean top-1): its value where every task under it
    is known (else None), and how many of those tasks are."""
    values, out = dict(ours), {}
    for key, (_, parts) in AVERAGES.items():  # group means come before their mean
        known = [values[p] for p in parts if p in values]
        value = sum(known) / len(known) if len(known) == len(parts) else None
        out[key] = (value, sum(task in ours for task in leaves(key)))
        if value is not None:
            values[key] = value
    return out


def _ours_cell(row: pd.Series) -> str:
    if row.seeds == 0:
        return row.failures
    return f"{row['mean']:.1f}" + (f" ± {row['std']:.1f}" if row.seeds > 1 else "")


def _method_rows(paper: pd.DataFrame, ours: pd.DataFrame) -> list[dict]:
    """The rows of one (setting, method): each task we ran that the paper prints, then its averages."""
    printed = paper.set_index("task")
    done = ours[ours.seeds > 0].set_index("task")["mean"].to_dict()
    rows = []
    for _, run in ours.set_index("task").loc[[t for t in TASK_ORDER if t in set(ours.task)]].iterrows():
        if run.name in printed.index:
            value = run["mean"] if run.seeds > 0 else None
            rows.append(_row(run.name, _ours_cell(run), value, printed.loc[run.name], run.label))
    for key, (value, known) in averages(done).items():
        if key in printed.index and known:
            cell = f"{value:.1f}" if value is not None else f"— ({known} of {len(leaves(key))} tasks done)"
            rows.append(_row(AVERAGES[key][0], cell, value, printed.loc[key], ""))
    return rows


def _row(task: str, cell: str, value: float | None, printed: pd.Series, label: str) -> dict:
    difference = "—" if value is None else f"{value - printed.top1:+.1f}"
    return {
        "task": task,
        "ours": cell,
        "paper": f"{printed.top1:.1f}",
        "ours - paper": difference,
        "paper table": printed.table,
        "our configuration": label,
    }


def paper_comparison(records: list[dict]) -> pd.DataFrame:
    """Ours beside the paper per (setting, method): every task we ran that the paper prints, then the
    paper's averages (ours where complete). Empty when no run is in one of the paper's settings."""
    paper = paper_results()
    order = {key: i for i, key in enumerate([*SETTINGS, *dict.fromkeys(paper.method)])}
    ours = ours_per_task(records)
    ours = ours.sort_values(["setting", "method"], key=lambda column: column.map(order), kind="stable")
    rows = []
    for (setting, method), mine in ours.groupby(["setting", "method"], sort=False):
        printed = paper[(paper.setting == setting) & (paper.method == method)]
        for row in _method_rows(printed, mine):
            rows.append({"setting": SETTINGS[setting], "method": method, **row})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).set_index(["setting", "method"])
