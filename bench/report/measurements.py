"""Markdown reports rendered from measurement records (``bench.records.measurements``).

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

from bench.records.measurements import KINDS, measurement_path, read_measurement
from bench.report.llm_memory import render_llm_memory
from bench.report.memory import render_memory_sweep, render_memory_timeline

TEMPLATES = Path(__file__).parent / "templates"
REPORT_NAMES = {
    "perf-step": "perf_step.md",
    "perf-inference": "perf_inference.md",
    "memory-sweep": "memory_vs_paper.md",
    "memory-timeline": "memory_timeline.md",
    "llm-memory": "llm_memory.md",
    "gpu-check": "gpu_check.md",
    "gpu-smoke": "gpu_smoke.md",
    "fused-compile": "fused_compile.md",
}

PERF_GOALS = (
    (13, "time", "lora-8", "off", None, 1.08),
    (13, "time", "lora-8", "paper", 2080, 1.50),
    (13, "time", "lora-8", "paper", 4112, 1.30),
    (13, "time", "reference-8", None, None, 1.0),
    (23, "time", "full", "off", None, 1.0),
    (23, "time", "matmul floor", "paper", None, 1.05),
    (23, "memory", "lora-8", None, None, 1.03),
)
"""Issues #13's and #23's bounds on snell-8's ratios: (issue, quantity, baseline, branch, tokens, bound);
None = every."""
PERF_RATIOS = {
    "lora-8": ("time", "cpu time", "memory"),
    "full": ("time", "memory"),
    "matmul floor": ("time",),
    "reference-8": ("time", "memory"),
}
"""The ratios of the step table: per baseline variant, the quantities divided by its row's. Full
fine-tuning has no branch: its one row per setting serves both branches."""
QUANTITIES = {"time": "step_s", "cpu time": "cpu_s", "memory": "peak_mib"}


def markdown_table(frame: pd.DataFrame, index: bool = True, floatfmt: str = ".3f") -> str:
    return frame.to_markdown(index=index, floatfmt=floatfmt)


def perf_ratios(steps: pd.DataFrame) -> pd.DataFrame:
    """Each row's quantities over those of the baseline rows (``PERF_RATIOS``) of its setting and branch
    (of its setting only for a baseline measured in one branch, full fine-tuning)."""
    frame = steps.set_index(["setting", "branch", "variant"])
    out = frame[["steps", "step_s", "cpu_s", "peak_mib"]].astype({"steps": int})
    for base, quantities in PERF_RATIOS.items():
        baseline = frame.xs(base, level="variant")
        keys = out.index.droplevel("variant")
        if baseline.index.get_level_values("branch").nunique() == 1:
            baseline, keys = baseline.droplevel("branch"), keys.get_level_values("setting")
        for label in quantities:
            column = QUANTITIES[label]
            out[f"{label} / {base}"] = out[column].to_numpy() / baseline[column].reindex(keys).to_numpy()
    return out


def perf_goals(ratios: pd.DataFrame, tokens: pd.Series, vit_b16: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (goal, where): snell-8's measured ratio, the bound, and whether it holds. ``tokens``:
    tokens per step by setting; ``vit_b16``: the ViT-B/16 peaks by (batch, branch) and variant."""
    snell_rows = ratios.xs("snell-8", level="variant")
    rows = []
    for issue, quantity, base, branch, at_tokens, bound in PERF_GOALS:
        for (setting, row_branch), row in snell_rows.iterrows():
            if branch not in (None, row_branch) or at_tokens not in (None, tokens[setting]):
                continue
            ratio = row[f"{quantity} / {base}"]
            goal = f"{quantity} snell-8 / {base}"
            rows.append((f"#{issue}", goal, f"{setting}, branch {row_branch}", ratio, bound))
    if vit_b16 is not None:
        for (batch, branch), row in vit_b16.iterrows():
            where = f"ViT-B/16 estimate, batch {batch}, branch {branch}"
            rows.append(("#13", "memory snell-8 / lora-8", where, row["snell-8"] / row["lora-8"], 1.03))
    return verdicts(pd.DataFrame(rows, columns=["issue", "goal", "where", "measured", "bound"]))


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


INFERENCE_BOUND = 0.02
"""Issue #24's goal: a merged model's throughput within 2% of the frozen backbone's."""


def inference_goals(inference: pd.DataFrame) -> pd.DataFrame:
    """Per merged model: its throughput over the frozen backbone's, against ``INFERENCE_BOUND``."""
    merged = inference[inference.model.str.endswith(" merged")]
    return pd.DataFrame({
        "model": merged.model,
        "merged / frozen images per s": merged.vs_frozen,
        "goal": f"within {INFERENCE_BOUND:.0%}",
        "met": ["yes" if abs(r - 1) <= INFERENCE_BOUND else "no" for r in merged.vs_frozen],
    })  # fmt: skip


def inference_tables(inference: pd.DataFrame) -> str:
    """The throughput table, then the goal per merged model."""
    shown = inference.assign(
        max_abs_diff=inference.max_abs_diff.map(lambda v: "—" if pd.isna(v) else f"{v:.1e}")
    )
    return (
        f"{markdown_table(shown, False)}\n\nGoal (issue #24): a merged model runs at the frozen backbone's "
        f"speed, within {INFERENCE_BOUND:.0%}.\n\n{markdown_table(inference_goals(inference), False)}"
    )


def render_perf_inference(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, str]:
    return {"table_inference": inference_tables(tables["inference"])}


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
        "table_inference": (
            "(not measured in this run)"
            if "inference" not in tables
            else inference_tables(tables["inference"])
        ),
    }


def render_gpu_smoke(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, str]:
    """The checks (errors to 3 significant digits: they are near 1e-7), a verdict and the steps."""
    checks, settings = tables["checks"], record["settings"]
    failed = int((~checks.passed.astype(bool)).sum())
    verdict = (
        f"**{failed} of {len(checks)} checks failed.**" if failed else f"All {len(checks)} checks passed."
    )
    options = ", ".join(f"{key}={value}" for key, value in settings["model_options"].items())
    return {
        "model": settings["model"] + (f" ({options})" if options else ""),
        "batch_size": str(settings["batch_size"]),
        "verdict": verdict,
        "fused_failure": settings["fused_failure"] or "none",
        "table_checks": markdown_table(checks, False, floatfmt=".3g"),
        "table_steps": markdown_table(tables["steps"], False),
    }


def fused_compile_summary(kernels: pd.DataFrame) -> pd.DataFrame:
    """Per target, kernel and rank: specialisations compiled (of all), their row tiles, the most
    registers, the spill bytes (stores + loads, summed), the most shared memory and the target's limit."""
    frame = kernels.assign(
        ok=kernels.error.fillna("") == "", spill_bytes=kernels.spill_store_bytes + kernels.spill_load_bytes
    )
    summary = frame.groupby(["target", "kernel", "R"]).agg(
        specialisations=("kernel", "size"),
        compiled=("ok", "sum"),
        BJ=("BJ", lambda tiles: ", ".join(map(str, sorted(set(tiles))))),
        max_registers=("registers", "max"),
        spill_bytes=("spill_bytes", "sum"),
        max_shared_bytes=("shared_bytes", "max"),
        shared_limit_bytes=("shared_limit_bytes", "first"),
    )
    return summary.astype({"max_registers": int, "spill_bytes": int, "max_shared_bytes": int}).reset_index()


def render_fused_compile(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, str]:
    """A verdict, the summary per target and rank, and every specialisation."""
    kernels, settings = tables["kernels"], record["settings"]
    failed = kernels.error.fillna("") != ""
    spilled = kernels.spill_store_bytes.fillna(0) + kernels.spill_load_bytes.fillna(0) > 0
    over = kernels.shared_bytes > kernels.shared_limit_bytes
    bad = int((failed | spilled | over).sum())
    verdict = (
        f"**{bad} of {len(kernels)} specialisations failed to compile, spill or exceed shared memory.**"
        if bad
        else f"All {len(kernels)} specialisations compile with 0 spill bytes and shared memory within limits."
    )
    kernels = kernels.assign(maxnreg=[("-" if pd.isna(n) else str(int(n))) for n in kernels.maxnreg])
    return {
        "triton": settings["triton"],
        "ptxas": settings["ptxas"],
        "workers": str(settings["workers"]),
        "wall_s": f"{settings['wall_s']:.0f}",
        "compile_s": f"{kernels.compile_s.sum():.0f}",
        "verdict": verdict,
        "table_summary": markdown_table(fused_compile_summary(tables["kernels"]), False),
        "table_kernels": markdown_table(kernels, False, floatfmt=".2f"),
    }


RENDERERS: dict[str, Callable[[dict, dict[str, pd.DataFrame], Path], dict[str, str]]] = {
    "perf-step": render_perf_step,
    "memory-sweep": render_memory_sweep,
    "memory-timeline": render_memory_timeline,
    "llm-memory": render_llm_memory,
    "perf-inference": render_perf_inference,
    "gpu-check": render_gpu_check,
    "gpu-smoke": render_gpu_smoke,
    "fused-compile": render_fused_compile,
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


def render_folder(folder: str | Path, kinds: tuple[str, ...] = KINDS) -> list[Path]:
    """Render the report of every measurement record (of ``kinds``) in ``folder``; returns the written
    files."""
    written = []
    for kind in kinds:
        path = measurement_path(folder, kind)
        if path.is_file() and kind in RENDERERS:
            record, tables = read_measurement(path)
            out = Path(folder) / REPORT_NAMES[kind]
            out.write_text(render(record, tables, Path(folder)))
            written.append(out)
    return written
