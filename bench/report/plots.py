"""Figures from the runs table (``report.records_frame``): one function per figure, seaborn style.

Every figure (and the HTML page, ``bench.report.html``) colours a run by its method family
(``bench.report.methods.method_family``) with one fixed colour per family (``family_colour``).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.textpath import TextPath  # noqa: E402

from bench.llm.commonsense import is_commonsense_task  # noqa: E402
from bench.report.methods import ABLATION_AXES, exposes, keeps_backbone  # noqa: E402

DPI = 150

FAMILY_COLOURS = {
    "full": "#7f7f7f",
    "linear": "#bcbd22",
    "lora": "#1f77b4",
    "spt-lora": "#17becf",
    "gps": "#8c564b",
    "snell": "#d62728",
    "snella": "#ff7f0e",
    "peft-dora": "#9467bd",
    "peft-vera": "#2ca02c",
    "peft-lora": "#e377c2",
    "bitfit": "#dbdb8d",
    "mixk": "#ff9896",
    "peft-loha": "#c5b0d5",
    "peft-lokr": "#98df8a",
    "peft-adalora": "#aec7e8",
    "peft-ia3": "#f7b6d2",
    "peft-boft": "#c49c94",
    "peft-oft": "#9edae5",
    "peft-fourierft": "#ffbb78",
    "peft-hra": "#c7c7c7",
}
"""One fixed colour per method family (matplotlib's tab10, then tab20's light shades), in every figure
and in the HTML page; a family not listed gets one of these by a hash of its name (``family_colour``)."""


def family_colour(family: str) -> str:
    """The family's fixed colour (hex); the same in every figure, whichever families a figure shows."""
    if family in FAMILY_COLOURS:
        return FAMILY_COLOURS[family]
    colours = list(FAMILY_COLOURS.values())
    return colours[zlib.crc32(family.encode()) % len(colours)]


def family_palette(families: Iterable[str]) -> dict[str, str]:
    """``{family: colour}`` for seaborn's ``palette=``, in sorted order (legends list families so)."""
    return {family: family_colour(family) for family in sorted(set(families))}


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


def pareto_points(ok: pd.DataFrame) -> pd.DataFrame:
    """One point per label from successful runs: accuracy as the mean over seeds of each seed's mean over
    tasks (``acc_std``: their std), mean peak memory (MiB) and tuned parameters; sorted by label."""
    per_seed = ok.groupby(["label", "family", "seed"], as_index=False).agg(
        acc=("test_acc", "mean"), mem=("peak_memory_mib", "mean"), params=("tuned_params", "mean")
    )
    points = per_seed.groupby(["label", "family"], as_index=False).agg(
        acc=("acc", "mean"), acc_std=("acc", "std"), mem=("mem", "mean"), params=("params", "mean")
    )
    return points.dropna(subset=["acc", "mem"]).sort_values("label").reset_index(drop=True)


Box = tuple[float, float, float, float]
LABEL_OFFSETS = tuple(
    (sx * r, sy * r) for r in (5, 12, 21, 32, 45, 60) for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1))
)
"""Where a label may sit, nearest first: its box's corner at (dx, dy) from the point, on dx's and dy's
side of it."""


def text_size(text: str, size: float) -> tuple[float, float]:
    """Width and line height of ``text`` at font ``size``, in the unit of ``size`` (points or pixels)."""
    return TextPath((0, 0), text, size=size).get_extents().width, 1.25 * size


def _box(x: float, y: float, size: tuple[float, float], offset: tuple[float, float]) -> Box:
    (w, h), (dx, dy) = size, offset
    x0 = x + dx if dx > 0 else x + dx - w
    y0 = y + dy if dy > 0 else y + dy - h
    return x0, y0, x0 + w, y0 + h


def _overlap(a: Box, b: Box) -> float:
    return max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)


def place_labels(
    anchors: Sequence[tuple[float, float]],
    sizes: Sequence[tuple[float, float]],
    bounds: Box,
    *,
    markers: Sequence[tuple[float, float]] = (),
    obstacles: Sequence[Box] = (),
    clearance: float = 14.0,
) -> list[tuple[float, float]]:
    """An offset from ``LABEL_OFFSETS`` per label, greedily: the nearest at which its box overlaps no label
    placed before it nor ``obstacles`` (lines), keeps ``clearance`` from every other marker (so that it
    reads as its own point's) and stays inside ``bounds``; where none is free, the least overlapping.
    Works in any unit and either y direction (the offsets are symmetric)."""
    placed, offsets = list(obstacles), []
    for (x, y), size in zip(anchors, sizes, strict=True):
        others = [
            (mx - clearance, my - clearance, mx + clearance, my + clearance)
            for mx, my in markers
            if (mx, my) != (x, y)
        ]
        area = size[0] * size[1]

        def cost(offset: tuple[float, float], x=x, y=y, size=size, area=area, others=others) -> float:
            box = _box(x, y, size, offset)
            return area - _overlap(box, bounds) + sum(_overlap(box, other) for other in placed + others)

        best = min(LABEL_OFFSETS, key=cost)
        placed.append(_box(x, y, size, best))
        offsets.append(best)
    return offsets


def line_boxes(xy: Sequence[tuple[float, float]], step: float = 3.0, half: float = 1.5) -> list[Box]:
    """Small boxes every ``step`` along the polyline through ``xy``: a line as ``place_labels`` obstacles."""
    boxes = []
    for (x0, y0), (x1, y1) in pairwise(xy):
        n = max(int(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 / step), 1)
        for i in range(n + 1):
            x, y = x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n
            boxes.append((x - half, y - half, x + half, y + half))
    return boxes


def annotate_points(ax: plt.Axes, points: pd.DataFrame, front: pd.DataFrame, fontsize: float = 7) -> None:
    """Label the Pareto ``front`` points (columns label, mem, acc) without overlaps among themselves, with
    the front's line, or near another marker of ``points``; labels away from their point get a leader
    line. Call once the axes' layout is final."""
    to_points = 72 / ax.figure.dpi
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling before reading positions

    def at(frame: pd.DataFrame) -> list[tuple[float, float]]:
        xy = ax.transData.transform(frame[["mem", "acc"]].to_numpy()) * to_points
        return [(float(x), float(y)) for x, y in xy]

    window = ax.get_window_extent()
    bounds = (window.x0 * to_points, window.y0 * to_points, window.x1 * to_points, window.y1 * to_points)
    sizes = [text_size(label, fontsize) for label in front.label]
    offsets = place_labels(at(front), sizes, bounds, markers=at(points), obstacles=line_boxes(at(front)))
    for (_, row), (dx, dy) in zip(front.iterrows(), offsets, strict=True):
        leader = {"arrowstyle": "-", "color": "0.45", "lw": 0.6, "shrinkA": 1, "shrinkB": 4.5}
        ax.annotate(
            row.label, (row.mem, row.acc), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
            ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
            arrowprops=leader if abs(dx) > LABEL_OFFSETS[0][0] else None,
        )  # fmt: skip


def memory_vs_accuracy(
    ok: pd.DataFrame, path: Path, ylabel: str = "mean test top-1 over tasks (%)", title: str = ""
) -> None:
    """Mean test accuracy over tasks against peak training memory, coloured by method family, with the
    Pareto front and its points labelled."""
    points = pareto_points(ok)
    if points.empty:
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    palette = family_palette(points.family)
    sns.scatterplot(
        points, x="mem", y="acc", hue="family", hue_order=list(palette), palette=palette, s=70, ax=ax,
        edgecolor="white", linewidth=0.6,
    )  # fmt: skip
    front = pareto_front(points, "mem", "acc")
    ax.plot(front.mem, front.acc, "--", color="grey", lw=1, label="Pareto front", zorder=0)
    ax.set(xlabel="peak training memory (MiB, tensor-level)", ylabel=ylabel)
    ax.set_title(f"{title}Memory vs accuracy (up and to the left is better)")
    ax.legend(fontsize=8, title="method family", title_fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    annotate_points(ax, points, front)
    _save(fig, path)


def kernel_ablation(ablated: pd.DataFrame, path: Path) -> None:
    """Test accuracy per kernel (rank 8, sparsity 0.9), one bar per task, error bars over seeds."""
    data = ablated[(ablated["rank"] == 8) & (ablated.sparsity == 0.9)]
    if data.kernel.nunique() < 2:
        return
    order = data.groupby("kernel").test_acc.mean().sort_values(ascending=False).index
    fig, ax = plt.subplots(figsize=(9, 4.5))
    sns.barplot(data, x="kernel", y="test_acc", hue="task", order=order, errorbar="sd", ax=ax)
    ax.set(xlabel="kernel", ylabel="test top-1 (%)", title="SNELL kernels (rank 8, sparsity 0.9)")
    ax.tick_params(axis="x", rotation=20)
    _save(fig, path)


def sparsity_per_kernel(ablated: pd.DataFrame, path: Path) -> None:
    """Test accuracy against sparsity ratio, one line per kernel, one panel per task."""
    data = ablated[ablated["rank"] == 8]
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


def rank_ablation(ablated: pd.DataFrame, path: Path) -> None:
    """Test accuracy against rank (sparsity 0.9), one line per task."""
    data = ablated[ablated.sparsity == 0.9]
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
    palette = family_palette(data.family)
    sns.barplot(
        data, y="label", x="step_ms", hue="family", hue_order=list(palette), palette=palette, order=order,
        estimator="median", errorbar=None, ax=ax,
    )  # fmt: skip
    device = data.device.iloc[0]
    ax.set(xlabel="median training step time (ms)", ylabel="", title=f"Step time per method\n{device}")
    ax.legend(title="method family", fontsize=8, title_fontsize=8)
    ax.title.set_fontsize(9)
    _save(fig, path)


def retention(ok: pd.DataFrame, path: Path) -> None:
    """Retention per method (top-1 on the backbone's pretraining task with its pretraining head, mean
    over tasks and seeds, error bars: std over them), coloured by method family; the value of the methods
    that keep the backbone's features (``keeps_backbone``: the linear probe), where they ran, marks the
    untouched backbone."""
    data = ok.dropna(subset=["retention_acc"])
    if data.empty:
        return
    order = data.groupby("label").retention_acc.mean().sort_values(ascending=False).index
    palette = family_palette(data.family)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(order) + 1.6))
    sns.barplot(
        data, y="label", x="retention_acc", hue="family", hue_order=list(palette), palette=palette,
        order=order, errorbar="sd", dodge=False, ax=ax,
    )  # fmt: skip
    frozen = data[keeps_backbone(data.method)].retention_acc
    if not frozen.empty:
        ax.axvline(frozen.mean(), color="0.3", ls="--", lw=1, label="backbone untouched (linear probe)")
    low = max(0.0, data.retention_acc.min() - 5)
    ax.set(xlim=(low, 100), xlabel="retention: pretraining-task top-1 after tuning (%)", ylabel="")
    ax.set_title("What tuning leaves of the pretraining task (higher is less forgetting)", fontsize=10)
    ax.legend(fontsize=8, title="method family", title_fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, path)


def draw_all(df: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure that the runs support; returns the files written. Commonsense runs (causal LMs) get
    their own memory-accuracy figure; the others leave them out."""
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df.status == "ok"]
    ablated = ok[exposes(ok.method, ABLATION_AXES)]
    language = ok.task.map(is_commonsense_task).astype(bool)
    commonsense_pareto = functools.partial(
        memory_vs_accuracy, ylabel="mean accuracy over test sets (%)", title="Commonsense reasoning: "
    )
    figures = {
        "memory_vs_accuracy.png": (memory_vs_accuracy, ok[~language]),
        "commonsense_memory_vs_accuracy.png": (commonsense_pareto, ok[language]),
        "kernels.png": (kernel_ablation, ablated),
        "sparsity_per_kernel.png": (sparsity_per_kernel, ablated),
        "rank.png": (rank_ablation, ablated),
        "step_time.png": (step_time, ok),
        "retention.png": (retention, ok[~language]),
    }
    for name, (draw, data) in figures.items():
        draw(data, out / name)
    return [out / name for name in figures if (out / name).exists()]
