"""The memory figures: peak memory against model size per method, and a per-category breakdown."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

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
