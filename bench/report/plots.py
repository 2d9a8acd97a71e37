"""Figures from the runs table (``report.records_frame``): one function per figure, seaborn style."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.llm.commonsense import is_commonsense_task  # noqa: E402

DPI = 150


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated by another with lower-or-equal x and higher y (sorted by x)."""
    front, best = [], float("-inf")
    for _, row in points.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            front.append(row)
            best = row[y]
    return pd.DataFrame(front)


def memory_vs_accuracy(
    ok: pd.DataFrame, path: Path, ylabel: str = "mean test top-1 over tasks (%)", title: str = ""
) -> None:
    """Mean test accuracy over tasks against peak training memory, with the Pareto front."""
    points = ok.groupby(["label", "method"], as_index=False).agg(
        acc=("test_acc", "mean"), mem=("peak_memory_mib", "mean")
    )
    points = points.dropna()
    if points.empty:
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sns.scatterplot(points, x="mem", y="acc", hue="method", s=70, ax=ax)
    front = pareto_front(points, "mem", "acc")
    ax.plot(front.mem, front.acc, "--", color="grey", lw=1, label="Pareto front", zorder=0)
    for _, row in front.iterrows():
        ax.annotate(row.label, (row.mem, row.acc), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set(xlabel="peak training memory (MiB, tensor-level)", ylabel=ylabel)
    ax.set_title(f"{title}Memory vs accuracy (up and to the left is better)")
    ax.legend(fontsize=8)
    _save(fig, path)


def kernel_ablation(snell_ok: pd.DataFrame, path: Path) -> None:
    """Test accuracy per kernel (rank 8, sparsity 0.9), one bar per task, error bars over seeds."""
    data = snell_ok[(snell_ok["rank"] == 8) & (snell_ok.sparsity == 0.9)]
    if data.kernel.nunique() < 2:
        return
    order = data.groupby("kernel").test_acc.mean().sort_values(ascending=False).index
    fig, ax = plt.subplots(figsize=(9, 4.5))
    sns.barplot(data, x="kernel", y="test_acc", hue="task", order=order, errorbar="sd", ax=ax)
    ax.set(xlabel="kernel", ylabel="test top-1 (%)", title="SNELL kernels (rank 8, sparsity 0.9)")
    ax.tick_params(axis="x", rotation=20)
    _save(fig, path)


def sparsity_per_kernel(snell_ok: pd.DataFrame, path: Path) -> None:
    """Test accuracy against sparsity ratio, one line per kernel, one panel per task."""
    data = snell_ok[snell_ok["rank"] == 8]
    per_kernel = data.groupby("kernel").sparsity.nunique()
    data = data[data.kernel.isin(per_kernel[per_kernel > 1].index)]
    if data.empty:
        return
    grid = sns.relplot(
        data, x="sparsity", y="test_acc", hue="kernel", col="task", kind="line", marker="o",
        errorbar="sd", height=3.4, aspect=1.0, facet_kws={"sharey": False},
    )  # fmt: skip
    grid.set_axis_labels("sparsity ratio s (fraction of dW zeroed)", "test top-1 (%)")
    grid.figure.suptitle("Accuracy vs sparsity per kernel (rank 8)", y=1.03)
    grid.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(grid.figure)


def rank_ablation(snell_ok: pd.DataFrame, path: Path) -> None:
    """Test accuracy against rank (sparsity 0.9), one line per task."""
    data = snell_ok[snell_ok.sparsity == 0.9]
    data = data[data.kernel == data.kernel.mode().iloc[0]] if not data.empty else data
    if data["rank"].nunique() < 2:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    sns.lineplot(data, x="rank", y="test_acc", hue="task", marker="o", errorbar="sd", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(data["rank"].unique()), labels=[str(int(r)) for r in sorted(data["rank"].unique())])
    kernel = data.kernel.iloc[0]
    ax.set(xlabel="rank r", ylabel="test top-1 (%)", title=f"SNELL rank ablation ({kernel}, sparsity 0.9)")
    _save(fig, path)


def step_time(ok: pd.DataFrame, path: Path) -> None:
    """Median training step time per method (ms), over all its runs."""
    data = ok.dropna(subset=["step_time_s"]).assign(step_ms=lambda d: 1e3 * d.step_time_s)
    if data.empty:
        return
    order = data.groupby("label").step_ms.median().sort_values().index
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(order) + 1.5))
    sns.barplot(
        data, y="label", x="step_ms", hue="method", order=order, estimator="median", errorbar=None, ax=ax
    )
    device = data.device.iloc[0]
    ax.set(xlabel="median training step time (ms)", ylabel="", title=f"Step time per method\n{device}")
    ax.title.set_fontsize(9)
    _save(fig, path)


def draw_all(df: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure that the runs support; returns the files written. Commonsense runs (causal LMs) get
    their own memory-accuracy figure; the others leave them out."""
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df.status == "ok"]
    snell_ok = ok[ok.method == "snell"]
    language = ok.task.map(is_commonsense_task).astype(bool)
    commonsense_pareto = functools.partial(
        memory_vs_accuracy, ylabel="mean accuracy over test sets (%)", title="Commonsense reasoning: "
    )
    figures = {
        "memory_vs_accuracy.png": (memory_vs_accuracy, ok[~language]),
        "commonsense_memory_vs_accuracy.png": (commonsense_pareto, ok[language]),
        "kernels.png": (kernel_ablation, snell_ok),
        "sparsity_per_kernel.png": (sparsity_per_kernel, snell_ok),
        "rank.png": (rank_ablation, snell_ok),
        "step_time.png": (step_time, ok),
    }
    for name, (draw, data) in figures.items():
        draw(data, out / name)
    return [out / name for name in figures if (out / name).exists()]
