"""Records -> one pandas table -> summary.csv, Markdown tables in the paper's form, and figures.

Everything here is derived from ``<results>/records/*.json``; ``python -m bench report`` rebuilds it
without training, and the reports of the measurement records beside it
(``bench.report.measurements``). Failed runs stay visible: a cell with no successful seed shows its status
("OOM", "diverged", "error"), never a blank or a zero. Commonsense runs (causal LMs) fit the same tables
with their mean accuracy over test sets as ``test_acc``, plus a table of the accuracy per test set.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from scipy import stats

import snell
from bench.llm.commonsense import COMMONSENSE_TASKS, is_commonsense_task
from bench.records.records import failure_text, load_records
from bench.report.methods import ablation_axes, exposes, method_family
from bench.run.config import TRAIN_DEFAULTS

TASK_COLUMN_ORDER = ("digits", "rotation", "texture")


def option_columns() -> list[str]:
    """The runs table's option columns: every axis a registered method exposes for comparison
    (``snell.TuningConfig.ablation_axes``), in name order (kernel, rank, sparsity); a run's cell holds its
    resolved option of that name, if it has one, whether or not its method exposes it."""
    return sorted({axis for method in snell.list_methods() for axis in ablation_axes(method)})


def integer_option_columns() -> list[str]:
    """The option columns whose default is an integer in every method that exposes them (rank): nullable
    integers, so that a method without the option leaves an empty cell, not a float beside it."""
    defaults: dict[str, set[type]] = {}
    for method in snell.list_methods():
        fields = {f.name: f.default for f in dataclasses.fields(snell.config_class(method))}
        for axis in ablation_axes(method):
            defaults.setdefault(axis, set()).add(type(fields[axis]))
    return [axis for axis in option_columns() if defaults.get(axis) == {int}]


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per run: config, resolved method options (``option_columns``), metrics, status and
    provenance.

    Runs that share a label but not their training settings (an lr sweep) get those settings appended
    to the label (``lora-8 lr=0.003``), so that no table averages different settings together.
    """
    rows = []
    for r in records:
        method_cfg = r.get("method_config") or {
            **r["config"]["method_options"],
            "method": r["config"]["method"],
        }
        metrics = r["metrics"]
        rows.append({
            "run_id": r["run_id"],
            "label": r["label"],
            "task": r["config"]["task"],
            "method": r["config"]["method"],
            "family": method_family(r["config"]["method"], method_cfg),
            "seed": r["config"]["seed"],
            **{axis: method_cfg.get(axis) for axis in option_columns()},
            "status": r["status"],
            "error": r["error"],
            "val_acc": metrics.get("val_acc"),
            "test_acc": metrics.get("test_acc"),
            "retention_acc": metrics.get("retention_acc"),
            "trainable_params": metrics.get("trainable_params"),
            "tuned_params": metrics.get("tuned_params", metrics.get("trainable_params")),
            "adapter_bytes": metrics.get("adapter_bytes"),
            "peak_memory_mib": metrics.get("peak_memory_mib"),
            "step_time_s": metrics.get("step_time_s"),
            "images_per_s": metrics.get("images_per_s"),
            "wall_time_s": metrics.get("wall_time_s"),
            "update_rank": metrics.get("update_rank"),
            "cpu_per_wall": metrics.get("cpu_per_wall"),
            "threads": r["provenance"].get("threads"),
            "load_avg": max(
                (r["provenance"].get(k) or 0.0 for k in ("load_avg_start", "load_avg_end")), default=0.0
            ),
            "device": r["provenance"].get("device"),
            "git_commit": r["provenance"].get("git_commit"),
            "lr": r["config"]["train"].get("lr"),
        })  # fmt: skip
    df = pd.DataFrame(rows).astype(dict.fromkeys(integer_option_columns(), "Int64"))
    if df.empty:
        return df
    df["timed_under_load"] = timed_under_load(df)
    recorded = [{**TRAIN_DEFAULTS, **r["config"]["train"]} for r in records]  # fields added since: defaults
    train = pd.DataFrame(recorded, index=df.index).astype(str)
    for label, runs in train.groupby(df.label):
        varying = [column for column in runs if runs[column].nunique() > 1]
        for i, settings in runs[varying].iterrows():
            df.loc[i, "label"] = " ".join([label, *(f"{k}={v}" for k, v in settings.items())])
    return df


LOADED_CPU_SHARE = 0.8
"""A CPU run whose timed steps got less than this share of its threads' time (process CPU time over
wall time x threads) waited for cores that other work held: its step times are marked in the tables."""


def timed_under_load(df: pd.DataFrame) -> pd.Series:
    """Whether each run's step times were taken while other work competed for the CPU."""
    on_cpu = df.device.fillna("").str.startswith("CPU")
    share = df.cpu_per_wall / df.threads.fillna(1)
    return on_cpu & (share < LOADED_CPU_SHARE)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per (label, task): accuracy mean/std over successful seeds, cost means, and failure counts."""
    ok = df.status == "ok"
    measured = [
        "test_acc",
        "val_acc",
        "retention_acc",
        "trainable_params",
        "tuned_params",
        "adapter_bytes",
        "peak_memory_mib",
        "step_time_s",
    ]
    only_ok = df.assign(**{c: df[c].where(ok) for c in measured}, ok=ok, loaded=df.timed_under_load & ok)
    summary = only_ok.groupby(["label", "task"]).agg(
        method=("method", "first"),
        **{column: (column, "first") for column in option_columns()},
        runs=("seed", "count"),
        failures=("status", lambda s: ", ".join(sorted(s[s != "ok"]))),
        test_mean=("test_acc", "mean"),
        test_std=("test_acc", "std"),
        val_mean=("val_acc", "mean"),
        retention_mean=("retention_acc", "mean"),
        seeds_ok=("ok", "sum"),
        trainable_params=("trainable_params", "mean"),
        tuned_params=("tuned_params", "mean"),
        adapter_bytes=("adapter_bytes", "mean"),
        peak_memory_mib=("peak_memory_mib", "mean"),
        step_time_s=("step_time_s", "median"),
        timed_under_load=("loaded", "any"),
    )
    return summary.reset_index()


def _cell(row: pd.Series) -> str:
    if row.seeds_ok == 0 or pd.isna(row.test_mean):
        return failure_text(row.failures.split(", "))
    text = f"{row.test_mean:.1f}" + (f" ± {row.test_std:.1f}" if row.seeds_ok > 1 else "")
    if row.failures:
        text += f" ({row.failures})"
    return text


def _task_order(tasks) -> list[str]:
    known = [t for t in TASK_COLUMN_ORDER if t in set(tasks)]
    return known + sorted(set(tasks) - set(known))


def accuracy_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper's table: method x task (test top-1, mean ± std over seeds), mean, params, memory, time."""
    summary = summary.assign(seeds_ok=summary.seeds_ok.fillna(0), cell=summary.apply(_cell, axis=1))
    tasks = _task_order(summary.task)
    table = summary.pivot(index="label", columns="task", values="cell")[tasks]
    means = summary.pivot(index="label", columns="task", values="test_mean")[tasks]
    table["mean"] = means.mean(axis=1, skipna=False).map(lambda v: "—" if pd.isna(v) else f"{v:.1f}")
    costs = summary.groupby("label").agg(
        retention=("retention_mean", "mean"),
        params=("tuned_params", "mean"),
        mem=("peak_memory_mib", "mean"),
        step=("step_time_s", "median"),
        loaded=("timed_under_load", "any"),
    )
    if costs.retention.notna().any():
        table["retention (%)"] = costs.retention.map(lambda v: "—" if pd.isna(v) else f"{v:.1f}")
    table["tuned params"] = costs.params.map(lambda v: "—" if pd.isna(v) else f"{v / 1e3:.1f}K")
    table["peak memory (MiB)"] = costs.mem.map(lambda v: "—" if pd.isna(v) else f"{v:.1f}")
    table["step (ms)"] = [
        "—" if pd.isna(step) else f"{1e3 * step:.0f}" + (" *" if loaded is True else "")
        for step, loaded in zip(costs.step, costs.loaded, strict=True)
    ]
    order = means.mean(axis=1).sort_values(ascending=False).index
    return table.loc[list(order)].rename_axis("method")


def validation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean validation top-1 per method and task: what settings (an lr, a sparsity) are chosen on."""
    tasks = _task_order(summary.task)
    table = summary.pivot(index="label", columns="task", values="val_mean")[tasks]
    table["mean"] = table.mean(axis=1, skipna=False)
    return table.sort_values("mean", ascending=False).round(1).rename_axis("method")


PAIRED_REFERENCE = "lora-8"
"""The row every other is paired with, when it has successful runs (else ``paired_reference`` picks)."""


def paired_reference(df: pd.DataFrame) -> str | None:
    """LoRA-8 if it has successful runs, else the label with the most, or None with fewer than two labels
    that succeeded (nothing to pair)."""
    counts = df[df.status == "ok"].label.value_counts()
    if len(counts) < 2:
        return None
    return PAIRED_REFERENCE if PAIRED_REFERENCE in counts else counts.index[0]


def paired_differences(
    df: pd.DataFrame, reference: str = PAIRED_REFERENCE, confidence: float = 0.95
) -> pd.DataFrame:
    """Each method's test top-1 minus ``reference``'s over the (task, seed) pairs both finished, with a
    paired t interval: a difference is called real only where the interval excludes 0. Empty where
    ``reference`` or every other label has no successful run."""
    ok = df[df.status == "ok"].pivot_table(index=["task", "seed"], columns="label", values="test_acc")
    if reference not in ok or len(ok.columns) < 2:
        return pd.DataFrame()
    rows = []
    for label in ok.columns.drop(reference):
        diff = (ok[label] - ok[reference]).dropna()
        n = len(diff)
        half = stats.t.ppf((1 + confidence) / 2, n - 1) * diff.std() / n**0.5 if n > 1 else float("nan")
        low, high = diff.mean() - half, diff.mean() + half
        rows.append({
            "method": label,
            "pairs": n,
            f"minus {reference}": diff.mean(),
            "95% CI low": low,
            "95% CI high": high,
            "real (CI excludes 0)": "yes" if low > 0 or high < 0 else "no",
        })  # fmt: skip
    table = pd.DataFrame(rows).set_index("method").sort_values(f"minus {reference}", ascending=False)
    return table.round(2)


def ablation_rows(summary: pd.DataFrame, axes: Iterable[str], **fixed) -> pd.DataFrame:
    """Rows of the methods that expose every one of ``axes`` and ``fixed``'s options
    (``snell.TuningConfig.ablation_axes``: SNELL's kernel, rank, sparsity) whose resolved options equal
    ``fixed`` (e.g. rank=8, sparsity=0.9)."""
    rows = summary[exposes(summary.method, [*axes, *fixed])]
    for key, value in fixed.items():
        rows = rows[rows[key] == value]
    return rows


def ablation_table(
    summary: pd.DataFrame, index: str, *, by: Sequence[str] = ("kernel",), **fixed
) -> pd.DataFrame:
    """Test accuracy against one option (kernel, sparsity, rank), one row per value of it within each of
    ``by`` (other than ``index``), other options fixed, over the methods that expose them all (SNELL); the
    method heads the rows where more than one does."""
    by = [axis for axis in by if axis != index]
    rows = ablation_rows(summary, [index, *by], **fixed)
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(seeds_ok=rows.seeds_ok.fillna(0), cell=rows.apply(_cell, axis=1))
    columns = (["method"] if rows.method.nunique() > 1 else []) + [*by, index]
    table = rows.pivot_table(index=columns, columns="task", values="cell", aggfunc="first")
    table = table[_task_order(rows.task)]
    table["mean"] = rows.pivot_table(index=columns, columns="task", values="test_mean").mean(axis=1).round(1)
    return table


def commonsense_table(records: list[dict], df: pd.DataFrame) -> pd.DataFrame:
    """Commonsense runs: accuracy (%) per test set (mean ± std over seeds, the columns in the evaluation
    script's order) and their plain average (the paper's convention), one row per method (labels as in
    ``df``); a method with no successful run shows its status. Empty without commonsense runs."""
    rows = [
        {"run_id": r["run_id"], "test_set": test_set, "acc": acc}
        for r in records
        if r["status"] == "ok"
        for test_set, acc in (r["metrics"].get("task_acc") or {}).items()
    ]
    if not rows:
        return pd.DataFrame()
    accs = pd.DataFrame(rows).merge(df[["run_id", "label"]], on="run_id")
    seeds = accs.groupby(["label", "test_set"]).acc.agg(["mean", "std", "count"])
    cells = seeds.apply(
        lambda s: f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["count"] > 1 else ""), axis=1
    ).unstack()
    order = [t for t in COMMONSENSE_TASKS if t in cells.columns]
    means = seeds["mean"].unstack()[order]
    table = cells[order].assign(
        average=means.mean(axis=1, skipna=False).map(lambda v: "—" if pd.isna(v) else f"{v:.1f}")
    )
    table = table.loc[list(means.mean(axis=1).sort_values(ascending=False).index)]
    failed = df[df.task.map(is_commonsense_task) & ~df.label.isin(table.index)]
    for label, runs in failed.groupby("label"):
        table.loc[label] = failure_text(sorted(runs.status))
    return table.rename_axis("method")


def write_markdown(tables: dict[str, pd.DataFrame], path: Path, header: str) -> None:
    parts = [header]
    for title, table in tables.items():
        if not table.empty:
            parts += [
                f"## {title}",
                "",
                table.reset_index().to_markdown(index=False, disable_numparse=True),
                "",
            ]
    path.write_text("\n".join(parts))


def build_report(results: str | Path) -> pd.DataFrame:
    """Write summary.csv, runs.csv, tables/*.md, figures/*.png and index.html (the results page) under
    ``results``; returns the summary."""
    from bench.report.html import write_results_page
    from bench.report.plots import draw_all

    results = Path(results)
    records = load_records(results)
    df = records_frame(records)
    if df.empty:
        raise SystemExit(f"no records under {results / 'records'}; run a sweep first")
    summary = summarise(df)
    (results / "tables").mkdir(parents=True, exist_ok=True)
    df.to_csv(results / "runs.csv", index=False)
    summary.to_csv(results / "summary.csv", index=False)
    header = _header(df)
    reference = paired_reference(df)
    per_test_set = commonsense_table(records, df)
    header += _notes(reference, per_test_set)
    tables = _tables(records, df, summary, reference, per_test_set)
    write_markdown(tables, results / "tables" / "results.md", header)
    draw_all(df, results / "figures")
    print(f"report: {results / 'summary.csv'}, {results / 'tables' / 'results.md'}, {results / 'figures'}/")
    print(f"report: {write_results_page(results, df, summary, tables)}")
    return summary


def _header(df: pd.DataFrame) -> str:
    """The results page's first lines: runs, devices, commits, load; retention where measured."""
    devices = ", ".join(sorted(df.device.dropna().unique()))
    commits = ", ".join(sorted({c[:10] for c in df.git_commit.dropna()}))
    n_ok = (df.status == "ok").sum()
    loaded = int(df.timed_under_load.sum())
    header = (
        f"# Results\n\n{len(df)} runs ({n_ok} ok); device: {devices}; commit(s): {commits}; highest 1-min "
        f"load average during a run: {df.load_avg.max():.1f}.\n"
        "Test top-1 (%), mean ± std over seeds; peak memory is the tensor-level peak of one training step.\n"
        f"Step times marked * ({loaded} run(s)) were taken while other work shared the CPU (the run got "
        f"under {LOADED_CPU_SHARE:.0%} of its threads' time): compare them with care.\n"
    )
    if df.retention_acc.notna().any():
        header += (
            "Retention (%): top-1 of the tuned backbone on its pretraining task with its pretraining head "
            "(PEFT's 'forgetting'; bench.run.retention), mean over tasks and seeds.\n"
        )
    return header


def _notes(reference: str | None, per_test_set: pd.DataFrame) -> str:
    """The header's notes on the paired differences' reference and on commonsense tasks."""
    notes = ""
    if reference is None:
        notes += "No paired differences: fewer than two methods have a successful run.\n"
    elif reference != PAIRED_REFERENCE:
        notes += f"Paired differences are from {reference} ({PAIRED_REFERENCE} has no successful run).\n"
    if not per_test_set.empty:
        notes += (
            "Commonsense tasks: accuracy (%) of the generated answers; their column in the tables below is "
            "the plain mean over their test sets (the commonsense table has each).\n"
        )
    return notes


def _tables(
    records: list[dict],
    df: pd.DataFrame,
    summary: pd.DataFrame,
    reference: str | None,
    per_test_set: pd.DataFrame,
) -> dict[str, pd.DataFrame]:
    """The report's tables by title (an empty one is left out of the Markdown)."""
    from bench.report.paper import paper_comparison

    return {
        "Methods x tasks": accuracy_table(summary),
        "Beside the SNELL paper (arXiv 2411.01800): our test top-1 and the printed one, per task and in the "
        "paper's averages (VTAB: group means and their mean as Tab. 1, mean over 19 tasks as Tab. A7; FGVC "
        "and commonsense: plain means)": paper_comparison(records),
        "Commonsense reasoning: accuracy per test set (%), mean ± std over seeds": per_test_set,
        f"Difference from {reference} in test top-1, paired over (task, seed), 95% t interval": (
            paired_differences(df, reference) if reference else pd.DataFrame()
        ),
        "Kernels (rank 8, sparsity 0.9)": ablation_table(summary, "kernel", rank=8, sparsity=0.9),
        "Sparsity per kernel (rank 8)": ablation_table(summary, "sparsity", rank=8),
        "Rank (piecewise_linear, sparsity 0.9)": ablation_table(
            summary, "rank", sparsity=0.9, kernel="piecewise_linear"
        ),
        "Validation top-1, mean over seeds (choose settings on this, report the test tables)": (
            validation_table(summary)
        ),
    }


def run(args: argparse.Namespace) -> None:
    """The accuracy report from ``<results>/records`` and the report of every measurement record in a
    folder below ``results`` (perf, memory, GPU check)."""
    from bench.report.measurements import render_folder

    results = Path(args.results)
    if (results / "records").is_dir():
        build_report(results)
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        for path in render_folder(folder):
            print(f"report: {path}")
