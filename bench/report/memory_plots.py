"""The memory figures: peak memory against model size per method, a per-category breakdown, the LLM
sweep's peaks and the memory timeline of one step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

CATEGORY_COLUMNS = {
    "params_mib": "parameters",
    "buffers_mib": "buffers",
    "grads_mib": "gradients",
    "optimizer_mib": "optimizer state",
    "activations_mib": "activations",
    "temporaries_mib": "temporaries",
    "other_mib": "other",
}
DPI = 150


def _setting(rows: pd.DataFrame) -> str:
    """Precision and attention of the plotted estimates, e.g. "fp32, explicit attention"."""
    return f"{'/'.join(rows.precision.unique())}, {'/'.join(rows.attention.unique())} attention"


def plot_memory_vs_model_size(estimates: pd.DataFrame, path: Path, methods: list[str]) -> None:
    """One panel per batch size: peak MiB of each method against the backbone's parameter count."""
    data = estimates.assign(params_m=estimates.params_total / 1e6)
    batches = sorted(data.batch_size.unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        panel = data[data.batch_size == batch]
        sns.lineplot(
            panel, x="params_m", y="peak_mib", hue="method", style="method", hue_order=methods,
            style_order=methods, markers=True, dashes=False, ax=ax, legend=ax is axes[0][-1],
        )  # fmt: skip
        ticks = panel.drop_duplicates("arch")
        ax.set_xticks(ticks.params_m, ticks.arch + "\n" + ticks.params_m.map("{:.0f}M".format))
        ax.set(
            xlabel="backbone (parameters)",
            ylabel="peak memory of a training step (MiB)",
            title=f"batch {batch}, {_setting(panel)}",
            ylim=(0, None),
        )
        ax.grid(alpha=0.3)
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title="method")
    fig.suptitle("Peak training memory against model size (estimated: tensor bytes, fake tensors on CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def plot_breakdown(
    estimates: pd.DataFrame, path: Path, *, arch: str, batch_size: int, methods: list[str]
) -> None:
    """Stacked bars per method: what is live at the peak of one step of ``arch`` at ``batch_size``."""
    rows = estimates[(estimates.arch == arch) & (estimates.batch_size == batch_size)]
    table = rows.set_index("method").reindex([m for m in methods if m in set(rows.method)])
    table = table[list(CATEGORY_COLUMNS)].rename(columns=CATEGORY_COLUMNS)
    table = table.loc[:, table.sum() > 0]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(table) + 1.8))
    table.plot.barh(stacked=True, ax=ax, color=sns.color_palette("tab10", len(table.columns)), width=0.75)
    totals = table.sum(axis=1)
    for y, total in enumerate(totals):
        ax.text(total, y, f" {total:,.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(
        xlabel="memory live at the step's peak (MiB)",
        ylabel="",
        title=f"{arch}, batch {batch_size}, {_setting(rows)}: peak memory by category",
    )
    ax.set_xlim(0, totals.max() * 1.12)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), title="live at the peak")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def plot_llm_memory(estimates: pd.DataFrame, path: Path) -> None:
    """One panel per model: each method's peak GiB, a bar per gradient checkpointing setting (its
    ``checkpointing`` column: "off" or "on")."""
    data = estimates.assign(peak_gib=estimates.peak_mib / 1024)
    archs = list(dict.fromkeys(data.arch))
    fig, axes = plt.subplots(1, len(archs), figsize=(6.5 * len(archs), 4.5), squeeze=False, sharey=True)
    for ax, arch in zip(axes[0], archs, strict=True):
        panel = data[data.arch == arch]
        sns.barplot(
            panel, x="method", y="peak_gib", hue="checkpointing", hue_order=["off", "on"], ax=ax,
            order=list(dict.fromkeys(data.method)), legend=ax is axes[0][-1],
        )  # fmt: skip
        for container in ax.containers:
            ax.bar_label(container, fmt="%.0f", fontsize=8)
        ax.set(xlabel="", ylabel="peak memory of a training step (GiB)", title=arch)
        ax.grid(axis="y", alpha=0.3)
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title="gradient\ncheckpointing")
    first = data.iloc[0]
    fig.suptitle(
        f"Peak training memory, batch {first.batch_size} x {first.seq_len} tokens, frozen weights "
        f"{first.frozen_dtype}, {first.precision} autocast (estimated: tensor bytes, fake tensors on CPU)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


PHASE_COLOURS = {"forward": "#e8eef8", "backward": "#fbeee0", "optimizer": "#e6f2e6"}
"""Background of each phase of the step in the timeline figure."""


def _phase_spans(ax: plt.Axes, points: pd.DataFrame) -> None:
    """Shade each phase of one method's step (from its first point to the next phase's first) and name it
    at the top (right-aligned in a narrow span, so the name stays inside the axes)."""
    starts = points.groupby("phase", sort=False).progress.min().sort_values()
    ends = [*starts.iloc[1:], points.progress.max()]
    for (phase, start), end in zip(starts.items(), ends, strict=True):
        ax.axvspan(start, end, color=PHASE_COLOURS.get(phase, "#eeeeee"), zorder=0, lw=0)
        narrow = end - start < 0.1
        x, align = (end - 0.004, "right") if narrow else ((start + end) / 2, "center")
        ax.text(x, 0.96, phase, transform=ax.get_xaxis_transform(), ha=align, va="top", fontsize=8,
                color="dimgrey")  # fmt: skip


def _mark(ax: plt.Axes, x: float, mib: float, marker: str, text: str) -> None:
    """A black marker at (x, mib) with a note to its right."""
    ax.plot(x, mib, marker, color="black", ms=6)
    ax.annotate(text, (x, mib), textcoords="offset points", xytext=(7, 2), va="bottom", fontsize=8)


def _mark_at_end(ax: plt.Axes, x: float, mib: float, text: str, above: float) -> None:
    """A black marker at (x, mib) near the right edge, its note to the left at height ``above`` (MiB: over
    the curve there), with an arrow when the note is not beside the marker."""
    ax.plot(x, mib, "^", color="black", ms=6)
    arrow = {"arrowstyle": "-", "color": "dimgrey", "lw": 0.8} if above > mib else None
    ax.annotate(text, (x, mib), xytext=(x - 0.012, max(above, mib)), ha="right", va="bottom", fontsize=8,
                arrowprops=arrow)  # fmt: skip


def _timeline_panel(ax: plt.Axes, curve: pd.DataFrame, row, colour, name: str, top: float) -> None:  # noqa: ANN001
    """One method's curve with its phases, its peak and the optimizer phase's highest point (``top``: the
    y axis' limit, MiB)."""
    _phase_spans(ax, curve)
    ax.plot(curve.progress, curve.mib, color=colour, lw=1.2)
    ax.fill_between(curve.progress, curve.mib, color=colour, alpha=0.12, lw=0)
    _mark(ax, row.peak_progress, row.peak_mib, "v", f"peak {row.peak_mib:,.0f} MiB ({row.peak_phase})")
    step = curve[curve.phase == "optimizer"]
    if row.peak_phase != "optimizer" and not step.empty:
        high = step.loc[step.mib.idxmax()]
        above = curve[curve.progress >= 0.7].mib.max() + 0.04 * top  # clear of the curve under the note
        _mark_at_end(ax, high.progress, high.mib, f"optimizer step's highest {high.mib:,.0f} MiB", above)
    ax.text(0.006, 0.8, name, transform=ax.transAxes, fontsize=9, fontweight="bold", color=colour)
    ax.set_ylabel("allocated MiB")
    ax.grid(axis="y", alpha=0.3)


def plot_memory_timeline(
    points: pd.DataFrame,
    methods: pd.DataFrame,
    path: Path,
    *,
    title: str,
    names: dict[str, str],
    colours: dict[str, str],
) -> None:
    """One panel per method (rows of ``methods``, same y scale): MiB live against progress through the
    step (``points``: method, progress, mib, phase), phases shaded and named, the peak marked, and the
    optimizer step's highest point where the peak is elsewhere; ``names`` and ``colours`` by method."""
    fig, axes = plt.subplots(
        len(methods), 1, figsize=(10, 1.9 * len(methods) + 1.4), sharex=True, sharey=True
    )
    axes = np.atleast_1d(axes)
    top = methods.peak_mib.max() * 1.3
    for ax, row in zip(axes, methods.itertuples(), strict=True):
        curve = points[points.method == row.method].sort_values("progress")
        _timeline_panel(ax, curve, row, colours[row.method], names.get(row.method, row.method), top)
    axes[-1].set(xlim=(0, 1), ylim=(0, top))
    axes[-1].set_xlabel("progress through the step (op index / ops in the step)")
    handles = [Line2D([], [], color=colours[m], lw=2) for m in methods.method]
    handles += [Line2D([], [], marker=m, color="black", ls="") for m in ("v", "^")]
    labels = [*(names.get(m, m) for m in methods.method), "peak of the step", "optimizer step's highest"]
    handles += [Patch(color=colour) for colour in PHASE_COLOURS.values()]
    labels += list(PHASE_COLOURS)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=5, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
