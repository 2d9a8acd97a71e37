"""The memory sweep's report: ``memory.csv``, two figures and ``memory_vs_paper.md`` from its record; and
the memory timeline's: ``memory_timeline.png`` and ``memory_timeline.md`` (``render_memory_timeline``).

Our estimates beside the SNELL paper's table and the paper's claims as ratios of peaks (both with the public
code's explicit attention, as the paper measured), what timm's fused attention saves, every method's peak,
and real CUDA peaks (the sweep's ``--measure`` rows, or the ``bench gpu-check`` record) beside the estimates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.memory.estimate import ESTIMATE_DEVICE
from bench.memory.paper import METHODS, MODELS, PAPER_ATTENTION, PAPER_BATCH, PAPER_MB
from bench.records.measurements import read_measurement
from bench.report.memory_plots import plot_breakdown, plot_memory_timeline, plot_memory_vs_model_size
from bench.report.methods import method_family
from bench.report.plots import family_colour
from bench.settings import ATTENTIONS


def _mib(value: float) -> str:
    return f"{value:,.0f}"


def peaks(estimates: pd.DataFrame) -> pd.DataFrame:
    """Peak MiB by (model, batch size, attention) and method, models in size order, methods in ``METHODS``
    order."""
    peak = estimates.pivot(index=["arch", "batch_size", "attention"], columns="method", values="peak_mib")
    order = {"arch": list(MODELS), "attention": list(ATTENTIONS)}
    rows = sorted(
        peak.index, key=lambda row: (order["arch"].index(row[0]), row[1], order["attention"].index(row[2]))
    )
    return peak.loc[rows, [m for m in METHODS if m in peak.columns]]


def paper_table(estimates: pd.DataFrame) -> pd.DataFrame:
    """Ours beside the paper's figures at the paper's batch size and attention, one row per model."""
    peak = peaks(estimates).xs((PAPER_BATCH, PAPER_ATTENTION), level=("batch_size", "attention"))
    rows = []
    for arch in peak.index:
        paper, ours = PAPER_MB[arch], peak.loc[arch]
        rows.append({
            "model": arch,
            "LoRA-8 paper (MB)": _mib(paper["lora-8"]),
            "LoRA-8 ours (MiB)": _mib(ours["lora-8"]),
            "SNELL-8 paper": _mib(paper["snell-8"]),
            "SNELL-8 ours": _mib(ours["snell-8"]),
            "GPS paper": _mib(paper["gps"]),
            "GPS ours": _mib(ours["gps"]),
            "GPS ours, float32 mask": _mib(ours["gps (float32 mask)"]),
            "GPS - LoRA-8 paper": _mib(paper["gps"] - paper["lora-8"]),
            "GPS - LoRA-8 ours, float32 mask": _mib(ours["gps (float32 mask)"] - ours["lora-8"]),
            "SNELL/LoRA paper": f"{paper['snell-8'] / paper['lora-8']:.2f}",
            "SNELL/LoRA ours": f"{ours['snell-8'] / ours['lora-8']:.2f}",
            "GPS/SNELL paper": f"{paper['gps'] / paper['snell-8']:.2f}",
            "GPS/SNELL ours": f"{ours['gps'] / ours['snell-8']:.2f}",
            "GPS/SNELL ours, float32 mask": f"{ours['gps (float32 mask)'] / ours['snell-8']:.2f}",
            "full ours": _mib(ours["full"]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def claims_table(estimates: pd.DataFrame) -> pd.DataFrame:
    """The paper's memory claims as ratios of peaks, at every model size and batch (the paper's attention),
    and whether LoRA-8 and SNELL-8 stay below both full fine-tuning and GPS."""
    peak = peaks(estimates).xs(PAPER_ATTENTION, level="attention")
    snell8, lora8, gps = peak["snell-8"], peak["lora-8"], peak["gps"]
    table = pd.DataFrame({
        "LoRA-8 / full": lora8 / peak["full"],
        "SNELL-8 / full": snell8 / peak["full"],
        "GPS / LoRA-8": gps / lora8,
        "GPS / SNELL-8": gps / snell8,
        "GPS (float32 mask) / SNELL-8": peak["gps (float32 mask)"] / snell8,
        "SNELL-8 / LoRA-8": snell8 / lora8,
        "SNELLA-8 / SNELL-8": peak["snella-8"] / snell8,
        "DoRA-8 / LoRA-8 (PEFT, ours; no dropout)": peak["dora-8 (peft, no dropout)"]
        / peak["lora-8 (no branch dropout)"],
        "SNELL-8 without trick / SNELL-8": peak["snell-8 (no recompute)"] / snell8,
    }).map("{:.2f}".format)  # fmt: skip
    below = peak[["lora-8", "snell-8"]].max(axis=1) < peak[["full", "gps"]].min(axis=1)
    return table.assign(**{"LoRA-8, SNELL-8 below both": below.map({True: "yes", False: "NO"})})


def attention_table(estimates: pd.DataFrame) -> pd.DataFrame:
    """What explicit attention adds to the peak of fused attention, per model and batch: the amount most
    methods share, the methods whose amount differs, and LoRA-8's ratio for scale."""
    peak = peaks(estimates)
    explicit, fused = (peak.xs(kind, level="attention") for kind in ("explicit", "fused"))
    added = (explicit - fused).round()
    common = added.mode(axis=1)[0]
    differ = [
        ", ".join(f"{method} {value:,.0f}" for method, value in row.items() if value != common[key]) or "-"
        for key, row in added.iterrows()
    ]
    return pd.DataFrame({
        "explicit - fused (MiB), most methods": common.map(_mib),
        "methods that differ (MiB)": differ,
        "LoRA-8 explicit / fused": (explicit["lora-8"] / fused["lora-8"]).map("{:.2f}".format),
    }).reset_index()  # fmt: skip


def measured_table(measured: pd.DataFrame, estimates: pd.DataFrame) -> str:
    """Real peaks (``peak_mib``, ``device``) beside the estimates of the same model, method, batch and
    precision. A measurement of another adapter layout (other trainable parameters: an earlier commit)
    is listed, not compared."""
    keys = ["model", "method", "batch_size", "precision", "attention"]
    both = measured.drop(columns="arch", errors="ignore").merge(
        estimates, on=keys, suffixes=("", "_estimate")
    )
    parts = []
    if "trainable_params" in measured:
        other = both[both.trainable_params != both.trainable_params_estimate]
        both = both[both.trainable_params == both.trainable_params_estimate]
        if not other.empty:
            parts.append(
                f"Not compared (other trainable parameters): {', '.join(sorted(set(other.method)))}."
            )
    if not both.empty:
        both = both.assign(**{
            "measured / estimate": both.peak_mib / both.peak_mib_estimate,
            "measured (MiB)": both.peak_mib.map(_mib),
            "estimate (MiB)": both.peak_mib_estimate.map(_mib),
        })  # fmt: skip
        columns = ["arch", *keys[1:], "device", "estimate (MiB)", "measured (MiB)", "measured / estimate"]
        parts.insert(0, both[columns].to_markdown(index=False, floatfmt=".3f"))
    return "\n\n".join(parts) or "(none of the measured configurations is in this sweep)"


def gpu_check_peaks(path: Path) -> pd.DataFrame | None:
    """The CUDA peaks of a ``bench gpu-check`` record, as measured rows; None without one."""
    if not path.is_file():
        return None
    _, tables = read_measurement(path)
    steps = tables["steps"]
    own_layout = steps[steps.variant != "reference-8"]  # the public code's layout has no estimate
    return own_layout.rename(columns={"cuda_max_allocated_mib": "peak_mib"})


def render_memory_sweep(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, str]:
    """Write ``memory.csv`` and the figures; return the template's fields."""
    frame = tables["points"]
    frame.to_csv(folder / "memory.csv", index=False)
    estimates = frame[frame.device == ESTIMATE_DEVICE]
    attentions = set(estimates.attention)
    shown = PAPER_ATTENTION if PAPER_ATTENTION in attentions else estimates.attention.iloc[0]
    figures = estimates[estimates.attention == shown]
    plot_memory_vs_model_size(figures, folder / "memory_vs_model_size.png", list(METHODS))
    arch, batch = figures.arch.iloc[0], figures.batch_size.max()
    slug = arch.lower().replace("-", "_").replace("/", "")
    plot_breakdown(
        figures,
        folder / f"memory_breakdown_{slug}_b{batch}.png",
        arch=arch,
        batch_size=batch,
        methods=list(METHODS),
    )
    measured = [frame[frame.device != ESTIMATE_DEVICE]]
    gpu = gpu_check_peaks(Path(record["settings"]["gpu_check"]))
    if gpu is not None:
        measured.append(gpu)
    measured = pd.concat(measured, ignore_index=True)
    paper = PAPER_ATTENTION in attentions
    return {
        "precision": ", ".join(sorted(estimates.precision.unique())),
        "paper_batch": str(PAPER_BATCH),
        "figure_attention": shown,
        "table_paper": paper_table(estimates).to_markdown(index=False)
        if paper and PAPER_BATCH in set(estimates.batch_size)
        else f"(no batch-{PAPER_BATCH} estimates with {PAPER_ATTENTION} attention in this sweep)",
        "table_claims": claims_table(estimates).reset_index().to_markdown(index=False)
        if paper
        else f"(no estimates with {PAPER_ATTENTION} attention in this sweep)",
        "table_attention": attention_table(estimates).to_markdown(index=False)
        if attentions == set(ATTENTIONS)
        else "(this sweep has one attention only)",
        "table_peaks": peaks(estimates).map(_mib).reset_index().to_markdown(index=False),
        "table_measured": "(none)" if measured.empty else measured_table(measured, estimates),
    }


TIMELINE_NAMES = {"full": "full fine-tuning", "lora-8": "LoRA-8", "snell-8": "SNELL-8", "gps": "GPS"}
"""The memory timeline's presets -> their names in its figure and table."""


def timeline_table(methods: pd.DataFrame) -> str:
    """Per method of a memory timeline: trainable parameters, ops, MiB at the start, at the end of the
    forward pass, at the peak (with its phase and place in the step) and after the step."""
    table = pd.DataFrame({
        "method": methods.method.map(lambda m: TIMELINE_NAMES.get(m, m)),
        "trainable params": methods.trainable_params,
        "ops": methods.ops,
        "resident at start (MiB)": methods.start_mib,
        "end of forward (MiB)": methods.end_forward_mib,
        "peak (MiB)": methods.peak_mib,
        "phase of the peak": methods.peak_phase,
        "peak at (share of the step's ops)": methods.peak_progress,
        "after the step (MiB)": methods.end_mib,
    })  # fmt: skip
    floats = ("", "", "", ",.1f", ",.1f", ",.1f", "", ".3f", ",.1f")
    return table.to_markdown(index=False, floatfmt=floats, intfmt=",")


def timeline_colours(methods: pd.DataFrame) -> dict[str, str]:
    """Each method's colour: its family's (``bench.report.plots.family_colour``), as in every figure."""
    configs = methods.set_index("method").config.map(json.loads)
    return {method: family_colour(method_family(c["method"], c)) for method, c in configs.items()}


def render_memory_timeline(record: dict, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, str]:
    """Write ``memory_timeline.png``; return the template's fields."""
    settings = record["settings"]
    setting = (
        f"{settings['backbone']}, batch {settings['batch_size']}, {settings['precision']}, "
        f"{settings['attention']} attention"
    )
    methods = tables["methods"]
    last_op = tables["points"].method.map(methods.set_index("method").ops + 1)
    plot_memory_timeline(
        tables["points"].assign(progress=tables["points"].op / last_op),
        methods,
        folder / "memory_timeline.png",
        title=f"Memory through one training step: {setting} (fake-tensor estimate, tensor bytes)",
        names=TIMELINE_NAMES,
        colours=timeline_colours(methods),
    )
    return {
        "setting": setting,
        "max_points": f"{settings['max_points']:,}",
        "table_methods": timeline_table(methods),
    }
