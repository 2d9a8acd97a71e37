"""The LLM memory sweep's report: ``llm_memory.csv``, a figure and the tables of ``llm_memory.md``, from its
record (``bench.memory.llm_sweep``).

Per model and gradient checkpointing: each method's peak in GiB, its ratio to LoRA-32's, and what is live
at the peak (parameters, buffers, gradients, optimizer state, activations, temporaries). Estimates that
failed are listed with their error; their cells say so, never a blank or a zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.memory.paper import LLM_BASELINE, LLM_METHOD_NAMES, LLM_MODELS
from bench.report.memory_plots import plot_llm_memory
from snell.core.wrap import DEFAULT_TARGETS

BREAKDOWN = {
    "params_mib": "parameters",
    "buffers_mib": "buffers",
    "grads_mib": "gradients",
    "optimizer_mib": "optimizer",
    "activations_mib": "activations",
    "temporaries_mib": "temporaries",
}
"""Breakdown columns of the record (MiB) -> the table's headers (GiB)."""
SETTINGS = ("tuner", "rank", "alpha", "lora_alpha", "dropout", "lora_dropout", "drop_path", "kernel",
            "sparsity", "k", "mask", "targets")  # fmt: skip
"""Config fields the methods table shows, where a method has them (PEFT's own options included; targets
only where they are not the library's defaults)."""


def method_name(method: str) -> str:
    return LLM_METHOD_NAMES.get(method, method)


def checkpointing_name(on: bool) -> str:
    return "on" if on else "off"


def _gib(mib: float) -> str:
    return "-" if pd.isna(mib) else f"{mib / 1024:,.2f}"


def _estimates(points: pd.DataFrame) -> pd.DataFrame:
    """The rows that have an estimate, with ``ratio``: peak over the baseline's of the same model and
    checkpointing (NaN where the baseline has none)."""
    done = points[points.error.fillna("") == ""].copy()
    base = done[done.method == LLM_BASELINE].set_index(["arch", "gradient_checkpointing"]).peak_mib
    keys = pd.MultiIndex.from_frame(done[["arch", "gradient_checkpointing"]])
    done["ratio"] = done.peak_mib.to_numpy() / base.reindex(keys).to_numpy()
    return done


def _rows(points: pd.DataFrame) -> list[tuple[str, str, bool]]:
    """(arch, method, checkpointing) of every point: models in size order, checkpointing off first, methods
    in the record's order."""
    methods = list(dict.fromkeys(points.method))
    keys = {(r.arch, r.method, bool(r.gradient_checkpointing)) for r in points.itertuples()}
    return sorted(keys, key=lambda k: (list(LLM_MODELS).index(k[0]), k[2], methods.index(k[1])))


def summary_table(points: pd.DataFrame) -> pd.DataFrame:
    """Peak GiB (ratio to LoRA-32) per model and checkpointing (rows) and method (columns)."""
    done = _estimates(points).set_index(["arch", "method", "gradient_checkpointing"])
    table: dict[tuple[str, str], dict[str, str]] = {}
    for arch, method, on in _rows(points):
        if (arch, method, on) in done.index:
            row = done.loc[(arch, method, on)]
            ratio = "" if pd.isna(row.ratio) else f" ({row.ratio:.2f})"
            cell = f"{_gib(row.peak_mib)}{ratio}"
        else:
            cell = "failed"
        table.setdefault((arch, checkpointing_name(on)), {})[method_name(method)] = cell
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["model", "checkpointing"])
    return frame.reset_index()


def breakdown_table(points: pd.DataFrame) -> pd.DataFrame:
    """One row per point: peak GiB, the ratio to LoRA-32, trainable parameters and what is live at the
    peak (GiB); a failed point says so."""
    done = _estimates(points).set_index(["arch", "method", "gradient_checkpointing"])
    rows = []
    for arch, method, on in _rows(points):
        row = {"model": arch, "method": method_name(method), "checkpointing": checkpointing_name(on)}
        if (arch, method, on) not in done.index:
            rows.append({**row, "peak (GiB)": "failed (below)"})
            continue
        est = done.loc[(arch, method, on)]
        rows.append({
            **row,
            "trainable params": f"{est.trainable_params:,.0f}",
            "peak (GiB)": _gib(est.peak_mib),
            f"/ {method_name(LLM_BASELINE)}": "-" if pd.isna(est.ratio) else f"{est.ratio:.2f}",
            **{name: _gib(est.get(column, float("nan"))) for column, name in BREAKDOWN.items()},
        })  # fmt: skip
    return pd.DataFrame(rows).fillna("-")


def methods_table(points: pd.DataFrame) -> pd.DataFrame:
    """Each method's preset and the settings of its config (from the record)."""
    done = _estimates(points).drop_duplicates("method")
    rows = []
    for est in done.itertuples():
        config = json.loads(est.config)
        config = {**config, **config.pop("options", {})}
        if config.get("targets") == list(DEFAULT_TARGETS):
            del config["targets"]
        shown = ", ".join(f"{key} {_setting(config[key])}" for key in SETTINGS if key in config)
        rows.append({"method": method_name(est.method), "preset": est.method,
                     "library method": config["method"], "settings": shown or "(defaults)"})  # fmt: skip
    return pd.DataFrame(rows)


def _setting(value: object) -> str:
    if isinstance(value, list | tuple):
        return " ".join(str(v).lstrip("*") for v in value)
    return str(value)


def failed_table(points: pd.DataFrame) -> str:
    failed = points[points.error.fillna("") != ""]
    if failed.empty:
        return "(none: every estimate ran)"
    table = failed.assign(
        method=failed.method.map(method_name),
        checkpointing=failed.gradient_checkpointing.map(checkpointing_name),
    )
    return table[["arch", "method", "checkpointing", "error"]].to_markdown(index=False)


def render_llm_memory(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, str]:
    """Write ``llm_memory.csv`` and ``llm_memory.png``; return the template's fields."""
    points = tables["points"]
    if "error" not in points:
        points = points.assign(error="")
    points.to_csv(folder / "llm_memory.csv", index=False)
    done = _estimates(points)
    if not done.empty:
        names = {"method": done.method.map(method_name)}
        names["checkpointing"] = done.gradient_checkpointing.map(checkpointing_name)
        plot_llm_memory(done.assign(**names), folder / "llm_memory.png")
    settings = record["settings"]
    return {
        **{
            key: str(settings[key])
            for key in ("batch_size", "seq_len", "precision", "frozen_dtype", "attention")
        },
        "minutes": f"{settings.get('minutes', float('nan')):.1f}",
        "baseline": method_name(LLM_BASELINE),
        "table_methods": methods_table(points).to_markdown(index=False),
        "table_summary": summary_table(points).to_markdown(index=False),
        "table_breakdown": breakdown_table(points).to_markdown(index=False),
        "table_failed": failed_table(points),
    }
