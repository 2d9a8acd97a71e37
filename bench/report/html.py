"""``<results>/index.html``: the report as one self-contained page, for any browser and no network.

Sortable tables (every table of ``tables/results.md``), the memory / accuracy plot as inline SVG
(points coloured by method family as in the figures, the Pareto front, a hover label per point), a
drill-down per method with its runs (failed ones and their errors included) and a header with the
device(s), commit(s) and run counts. CSS and the small script are inline in ``templates/results.html``;
the page holds no URL. The same records give the same bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader
from matplotlib.ticker import MaxNLocator

from bench.llm.commonsense import is_commonsense_task
from bench.report.plots import (
    LABEL_OFFSETS,
    family_colour,
    family_palette,
    line_boxes,
    pareto_front,
    pareto_points,
    place_labels,
    text_size,
)

TEMPLATES = Path(__file__).parent / "templates"
WIDTH, HEIGHT, MARGIN = 980, 520, {"left": 64, "right": 20, "top": 16, "bottom": 50}
FONT_PX = 11
NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?")
FAILURE = re.compile(r"\b(?:OOM|oom|diverged|error)\b")
RUN_COLUMNS = {
    "task": "task",
    "seed": "seed",
    "status": "status",
    "test_acc": "test top-1 (%)",
    "val_acc": "val top-1 (%)",
    "peak_memory_mib": "peak memory (MiB)",
    "step_ms": "step (ms)",
    "tuned_params": "tuned params",
    "run_id": "run id",
    "error": "error",
}
FAILED_COLUMNS = ("task", "seed", "status", "run_id", "error")
"""What the table of failed runs shows (their drill-downs show every column)."""


def write_results_page(
    results: Path, df: pd.DataFrame, summary: pd.DataFrame, tables: dict[str, pd.DataFrame]
) -> Path:
    """Write ``results/index.html`` from the runs frame, the summary and the report's tables."""
    path = Path(results) / "index.html"
    path.write_text(render_page(df, summary, tables), encoding="utf-8")
    return path


def render_page(df: pd.DataFrame, summary: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> str:
    """The page's HTML (``templates/results.html`` filled in)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True,
    )  # fmt: skip
    return env.get_template("results.html").render(**page_context(df, summary, tables))


def page_context(df: pd.DataFrame, summary: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> dict:
    """Everything the template shows, as plain values in a fixed order."""
    means = summary.groupby("label").test_mean.mean().sort_values(ascending=False, kind="stable")
    order = list(dict.fromkeys([*means.index, *sorted(df.label)]))
    anchors = {label: f"m-{i}" for i, label in enumerate(order)}
    ok = df[df.status == "ok"]
    language = ok.task.map(is_commonsense_task).astype(bool)
    plots = [
        pareto_svg(ok[~language], "Memory vs accuracy", "mean test top-1 over tasks (%)", anchors),
        pareto_svg(
            ok[language],
            "Commonsense reasoning: memory vs accuracy",
            "mean accuracy over test sets (%)",
            anchors,
        ),
    ]
    families = dict(zip(df.label, df.family, strict=True))
    return {
        "runs": len(df),
        "ok": int((df.status == "ok").sum()),
        "devices": sorted(df.device.dropna().unique()),
        "commits": sorted({c[:10] for c in df.git_commit.dropna()}),
        "tables": [
            table_context(f"t{i}", title, table, anchors=anchors, families=families)
            for i, (title, table) in enumerate(tables.items())
            if not table.empty
        ],
        "plots": [plot for plot in plots if plot],
        "failed": runs_table("failed", df[df.status != "ok"], anchors, FAILED_COLUMNS),
        "methods": [method_context(label, df[df.label == label], anchors[label]) for label in order],
    }


def _text(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


def _cell(value) -> dict:
    """A table cell: its text, numeric sort key ("50.4 ± 1.1" -> "50.4", "1200.1K" -> "1200.1"; "" for
    text, which sorts by itself) and whether it reports a failure (OOM, diverged, error)."""
    text = _text(value)
    match = NUMBER.match(text.strip())
    return {"text": text, "sort": match.group(0) if match else "", "bad": bool(FAILURE.search(text))}


def table_context(
    key: str, title: str, table: pd.DataFrame, *, anchors: dict[str, str], families: dict[str, str]
) -> dict:
    """One sortable table: headers (numeric or text) and rows of cells; a ``method`` cell links to the
    method's drill-down and shows its family's colour."""
    flat = table.reset_index()
    columns = [str(c) for c in flat.columns]
    rows = []
    for values in flat.itertuples(index=False):
        cells = [_cell(value) for value in values]
        for column, cell in zip(columns, cells, strict=True):
            if column == "method" and cell["text"] in anchors:
                label = cell["text"]
                cell |= {"sort": "", "bad": False, "href": f"#{anchors[label]}"}
                cell["colour"] = family_colour(families[label])
        rows.append({"cells": cells, "failed": False})
    return {"id": key, "title": title, "columns": _columns(columns, rows), "rows": rows}


def _columns(names: list[str], rows: list[dict]) -> list[dict]:
    """Headers; a column is numeric (sorts by number, right-aligned) when any of its cells has a number."""
    return [
        {"name": name, "numeric": any(row["cells"][i]["sort"] for row in rows)}
        for i, name in enumerate(names)
    ]


def runs_table(
    key: str,
    runs: pd.DataFrame,
    anchors: dict[str, str] | None = None,
    columns: tuple[str, ...] = tuple(RUN_COLUMNS),
) -> dict:
    """One row per run (``columns`` of ``RUN_COLUMNS``, the error last; with ``anchors``, first the method,
    linked to its drill-down), sorted by method, task and seed; failed runs flagged."""
    runs = runs.assign(
        step_ms=(1e3 * runs.step_time_s).round(), tuned_params=runs.tuned_params.astype("Float64").round()
    ).sort_values(["label", "task", "seed"])
    names = (["label"] if anchors else []) + list(columns)
    rows = []
    for run in runs.itertuples():
        cells = [_cell(getattr(run, name)) for name in names]
        cells[-1]["text"] = "" if run.error is None or pd.isna(run.error) else str(run.error)
        if anchors:
            cells[0] |= {"sort": "", "href": f"#{anchors[run.label]}", "colour": family_colour(run.family)}
        rows.append({"cells": cells, "failed": run.status != "ok"})
    titles = ["method"] * bool(anchors) + [RUN_COLUMNS[name] for name in columns]
    return {"id": key, "title": "", "columns": _columns(titles, rows), "rows": rows}


def method_context(label: str, runs: pd.DataFrame, anchor: str) -> dict:
    """A method's drill-down: its family, counts and every run."""
    family = runs.family.iloc[0]
    return {
        "label": label,
        "anchor": anchor,
        "family": family,
        "colour": family_colour(family),
        "ok": int((runs.status == "ok").sum()),
        "count": len(runs),
        "table": runs_table(f"r-{anchor}", runs),
    }


def _scale(values: pd.Series, low: float, high: float) -> tuple[list[float], Callable[[float], float]]:
    """Nice ticks around ``values`` and the map from data to pixels between ``low`` and ``high``."""
    lo, hi = float(values.min()), float(values.max())
    pad = 0.06 * (hi - lo) or max(abs(lo) * 0.05, 1.0)
    ticks = [float(t) for t in MaxNLocator(nbins=6).tick_values(lo - pad, hi + pad)]
    ticks = [t for t in ticks if lo - pad <= t <= hi + pad] or ticks
    d0, d1 = min(ticks[0], lo - pad), max(ticks[-1], hi + pad)
    return ticks, lambda v: round(low + (float(v) - d0) / (d1 - d0) * (high - low), 1)


def _tip(point) -> str:
    std = "" if pd.isna(point.acc_std) else f" ± {point.acc_std:.1f}"
    params = "—" if pd.isna(point.params) else f"{point.params / 1e3:.1f}K"
    return (
        f"{point.label} ({point.family})\naccuracy {point.acc:.1f}{std} %\n"
        f"peak memory {point.mem:.1f} MiB\ntuned params {params}"
    )


def pareto_svg(ok: pd.DataFrame, title: str, ylabel: str, anchors: dict[str, str]) -> dict | None:
    """The memory / accuracy plot's geometry in pixels: axes, ticks, points (colour, hover text, link),
    the Pareto front and its labels placed without overlaps; None without points."""
    points = pareto_points(ok)
    if points.empty:
        return None
    x_ticks, sx = _scale(points.mem, MARGIN["left"], WIDTH - MARGIN["right"])
    y_ticks, sy = _scale(points.acc, HEIGHT - MARGIN["bottom"], MARGIN["top"])
    front = pareto_front(points, "mem", "acc")
    xy = [(sx(p.mem), sy(p.acc)) for p in points.itertuples()]
    front_xy = [(sx(p.mem), sy(p.acc)) for p in front.itertuples()]
    bounds = (MARGIN["left"], MARGIN["top"], WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"])
    sizes = [text_size(label, FONT_PX) for label in front.label]
    offsets = place_labels(front_xy, sizes, bounds, markers=xy, obstacles=line_boxes(front_xy), clearance=18)
    labels = [
        {
            "text": label, "x": x + dx, "y": round(y + dy + (0.8 * h if dy > 0 else -0.25 * h), 1),
            "anchor": "start" if dx > 0 else "end", "leader": abs(dx) > LABEL_OFFSETS[0][0],
            "x0": x, "y0": y, "x1": x + dx, "y1": y + dy,
        }
        for label, (x, y), (_, h), (dx, dy) in zip(front.label, front_xy, sizes, offsets, strict=True)
    ]  # fmt: skip
    return {
        "title": title, "ylabel": ylabel, "width": WIDTH, "height": HEIGHT, "bounds": bounds, "font": FONT_PX,
        "x_ticks": [(sx(t), _text(t)) for t in x_ticks], "y_ticks": [(sy(t), _text(t)) for t in y_ticks],
        "front": " ".join(f"{x},{y}" for x, y in front_xy), "labels": labels,
        "points": [
            {"x": x, "y": y, "colour": family_colour(p.family), "label": p.label, "tip": _tip(p),
             "href": f"#{anchors[p.label]}"}
            for p, (x, y) in zip(points.itertuples(), xy, strict=True)
        ],
        "families": list(family_palette(points.family).items()),
    }  # fmt: skip
