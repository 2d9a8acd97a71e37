"""Markdown reports rendered from measurement records (``bench.run.measurements``).

The prose of each report is a template in ``bench/report/templates/<kind>.md`` (``string.Template``
fields: ``$command``, ``$device``, ``$commit``, ``$torch`` and the kind's tables); this module computes
the derived tables (ratios, goals) from the measured ones and fills the template in. ``python -m bench
report`` re-renders every record it finds, so the reports follow the records, byte for byte.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from bench.report.llm_memory import render_llm_memory
from bench.report.memory import render_memory_sweep
from bench.run.measurements import KINDS, measurement_path, read_measurement

TEMPLATES = Path(__file__).parent / "templates"
REPORT_NAMES = {
    "perf-step": "perf_step.md",
    "memory-sweep": "memory_vs_paper.md",
    "llm-memory": "llm_memory.md",
    "gpu-check": "gpu_check.md",
}

PERF_GOALS = (
    ("time", "lora-8", "off", None, 1.08),
    ("time", "lora-8", "paper", 2080, 1.50),
    ("time", "lora-8", "paper", 4112, 1.30),
    ("memory", "lora-8", None, None, 1.03),
    ("time", "reference-8", None, None, 1.0),
)
"""Issue #13's bounds on snell-8's ratios: (quantity, baseline, branch, tokens, bound); None = every."""


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    return frame.to_markdown(index=index, floatfmt=".3f")


def perf_ratios(steps: pd.DataFrame) -> pd.DataFrame:
    """Each row's time, CPU time and peak over the LoRA-8 and reference-8 rows of its setting and branch."""
    frame = steps.set_index(["setting", "branch", "variant"])
    out = frame[["steps", "step_s", "cpu_s", "peak_mib"]].astype({"steps": int})
    for base in ("lora-8", "reference-8"):
        baseline = frame.xs(base, level="variant")
        for column, label in (("step_s", "time"), ("cpu_s", "cpu time"), ("peak_mib", "memory")):
            reference = baseline[column].reindex(out.index.droplevel("variant"))
            out[f"{label} / {base}"] = out[column].to_numpy() / reference.to_numpy()
    return out


def perf_goals(ratios: pd.DataFrame, tokens: pd.Series, vit_b16: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (goal, where): snell-8's measured ratio, the bound, and whether it holds. ``tokens``:
    tokens per step by setting; ``vit_b16``: the ViT-B/16 peaks by (batch, branch) and variant."""
    snell_rows = ratios.xs("snell-8", level="variant")
    rows = []
    for quantity, base, branch, at_tokens, bound in PERF_GOALS:
        for (setting, row_branch), row in snell_rows.iterrows():
            if branch not in (None, row_branch) or at_tokens not in (None, tokens[setting]):
                continue
            ratio = row[f"{quantity} / {base}"]
            rows.append((f"{quantity} snell-8 / {base}", f"{setting}, branch {row_branch}", ratio, bound))
    if vit_b16 is not None:
        for (batch, branch), row in vit_b16.iterrows():
            where = f"ViT-B/16 estimate, batch {batch}, branch {branch}"
            rows.append(("memory snell-8 / lora-8", where, row["snell-8"] / row["lora-8"], 1.03))
    return verdicts(pd.DataFrame(rows, columns=["goal", "where", "measured", "bound"]))


def llama_ratios(llama: pd.DataFrame) -> pd.DataFrame:
    """The LLaMA setting's rows with their time, CPU time and peak over LoRA-32's."""
    frame = llama.set_index(["setting", "variant"])[["steps", "step_s", "cpu_s", "peak_mib"]]
    lora = frame.xs("lora-32", level="variant").reindex(frame.index.droplevel("variant"))
    for column, label in (("step_s", "time"), ("cpu_s", "cpu time"), ("peak_mib", "memory")):
        frame[f"{label} / lora-32"] = frame[column].to_numpy() / lora[column].to_numpy()
    return frame.reset_index()


def render_perf_step(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, str]:
    steps = tables["steps"]
    ratios = perf_ratios(steps)
    tokens = steps.groupby("setting").tokens.first()
    vit_b16 = tables.get("vit_b16")
    if vit_b16 is not None:
        vit_b16 = vit_b16.pivot_table(index=["batch", "branch"], columns="variant", values="peak_mib")
    return {
        "table_steps": markdown_table(ratios.reset_index(), False),
        "table_goals": markdown_table(perf_goals(ratios, tokens, vit_b16), False),
        "table_llama": (
            "(not measured in this run)"
            if "llama" not in tables
            else markdown_table(llama_ratios(tables["llama"]), False)
        ),
        "table_vit_b16": (
            "(not estimated in this run)" if vit_b16 is None else markdown_table(vit_b16.reset_index(), False)
        ),
    }


GPU_GOALS = (
    ("time", "lora-8", (8, "fp32", "off"), 1.20),
    ("time", "lora-8", (8, "fp32", "paper"), 1.35),
    ("time", "lora-8", (64, "bf16", "off"), 1.05),
    ("time", "lora-8", (64, "bf16", "paper"), 1.15),
    ("time", "lora-8", (64, "fp32", "off"), 1.25),
    ("memory", "lora-8", None, 1.03),
    ("time", "reference-8", None, 1.0),
)
"""Issue #13's bounds on snell-8's GPU ratios: (quantity, baseline, (batch, precision, branch), bound);
None = every row."""


def gpu_ratios(steps: pd.DataFrame) -> pd.DataFrame:
    """snell-8's time, memory and launches over LoRA-8's and the reference's of the same batch,
    precision and branch regularisation."""
    frame = steps.set_index(["batch_size", "precision", "branch", "variant"])
    memory = "cuda_max_allocated_mib" if "cuda_max_allocated_mib" in frame else None
    rows = []
    for (batch, precision, branch), group in frame.groupby(level=[0, 1, 2]):
        group = group.droplevel([0, 1, 2])
        if "snell-8" not in group.index:
            continue
        mine = group.loc["snell-8"]
        row = {"batch_size": batch, "precision": precision, "branch": branch}
        for base in ("lora-8", "reference-8"):
            other = group.loc[base]
            row[f"time / {base}"] = mine.step_time_ms / other.step_time_ms
            row[f"memory / {base}"] = mine[memory] / other[memory] if memory else float("nan")
            row[f"launches / {base}"] = mine.launches_per_step / max(other.launches_per_step, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def gpu_goals(ratios: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for quantity, base, where, bound in GPU_GOALS:
        for _, row in ratios.iterrows():
            at = (row.batch_size, row.precision, row.branch)
            if where in (None, at):
                label = f"batch {at[0]} {at[1]}, branch {at[2]}"
                rows.append((f"{quantity} snell-8 / {base}", label, row[f"{quantity} / {base}"], bound))
    return verdicts(pd.DataFrame(rows, columns=["goal", "where", "measured", "bound"]))


def verdicts(goals: pd.DataFrame) -> pd.DataFrame:
    """A goals table with a verdict per row: met, missed by how much, or not measured."""
    goals["verdict"] = [
        "not measured" if pd.isna(m) else "met" if m <= b else f"missed by {m / b - 1:.1%}"
        for m, b in zip(goals.measured, goals.bound, strict=True)
    ]
    return goals


def render_gpu_check(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, str]:
    steps = tables["steps"]
    columns = [c for c in steps.columns if c not in ("model", "method", "device")]
    ratios = gpu_ratios(steps)
    return {
        "model": str(record["settings"]["model"]),
        "warmup": str(record["settings"]["warmup"]),
        "steps": str(record["settings"]["steps"]),
        "table_steps": markdown_table(steps[columns], False),
        "table_ratios": markdown_table(ratios, False),
        "table_goals": markdown_table(gpu_goals(ratios), False),
        "table_llama": (
            "(not measured in this run)"
            if "llama" not in tables
            else markdown_table(tables["llama"].drop(columns=["method", "device"]), False)
        ),
    }


RENDERERS: dict[str, Callable[[dict, dict[str, pd.DataFrame], Path], dict[str, str]]] = {
    "perf-step": render_perf_step,
    "memory-sweep": render_memory_sweep,
    "llm-memory": render_llm_memory,
    "gpu-check": render_gpu_check,
}
"""Per kind: the template fields (derived tables) of a record; more files may be written beside."""


def render(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> str:
    """The Markdown report of one measurement record (its renderer may write figures into ``folder``)."""
    origin = record["provenance"]
    fields = {
        "command": record["command"],
        "device": origin["device"],
        "commit": (origin.get("git_commit") or "unknown")[:10]
        + (" (uncommitted changes)" * bool(origin.get("git_dirty"))),
        "torch": origin["versions"].get("torch"),
        **RENDERERS[record["kind"]](record, tables, folder),
    }
    template = string.Template((TEMPLATES / f"{record['kind']}.md").read_text())
    return template.substitute(fields)


def render_folder(folder: str | Path) -> list[Path]:
    """Render the report of every measurement record in ``folder``; returns the written files."""
    written = []
    for kind in KINDS:
        path = measurement_path(folder, kind)
        if path.is_file() and kind in RENDERERS:
            record, tables = read_measurement(path)
            out = Path(folder) / REPORT_NAMES[kind]
            out.write_text(render(record, tables, Path(folder)))
            written.append(out)
    return written
