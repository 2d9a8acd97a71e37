"""Measurement records: what the perf benchmark, the memory sweeps, the GPU check and the GPU smoke test
measured, as JSON.

One record per command run, ``<results>/<kind>.json``: the command line, its settings, the provenance
(commit, versions, device, load) and the measured tables. Markdown reports are rendered from records
(``bench.report.measurements``), never written by the measuring code, so ``python -m bench report``
rebuilds them without measuring again.
"""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench.records.provenance import provenance
from bench.records.records import RecordError, write_json

MEASUREMENT_SCHEMA = 1
KINDS = (
    "perf-step",
    "perf-inference",
    "memory-sweep",
    "memory-timeline",
    "llm-memory",
    "gpu-check",
    "gpu-smoke",
    "fused-compile",
)


def measurement_path(results: str | Path, kind: str) -> Path:
    return Path(results) / f"{kind}.json"


def write_measurement(
    results: str | Path,
    *,
    kind: str,
    argv: list[str],
    settings: dict[str, Any],
    tables: dict[str, pd.DataFrame],
    device: torch.device,
    commit: str | None = None,
) -> Path:
    """Write the record of one ``python -m bench <kind> <argv>`` run; ``commit`` overrides the git commit
    (a device machine's copy of the repository has no git metadata)."""
    if kind not in KINDS:
        raise ValueError(f"unknown measurement kind {kind!r}; allowed: {', '.join(KINDS)}")
    origin = provenance(device)
    if commit is not None:
        origin.update(git_commit=commit, git_dirty=None)
    record = {
        "schema": MEASUREMENT_SCHEMA,
        "kind": kind,
        "command": shlex.join(["python", "-m", "bench", kind, *argv]),
        "settings": settings,
        "provenance": origin,
        "tables": {
            name: json.loads(frame.to_json(orient="table", double_precision=15))
            for name, frame in tables.items()
        },
    }
    path = measurement_path(results, kind)
    write_json(path, record)
    return path


def read_measurement(path: str | Path) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """A record and its tables as DataFrames (index and dtypes as written; floats to 15 digits, so
    reports render from the record, not from the in-memory tables)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        if record.get("schema") != MEASUREMENT_SCHEMA or record.get("kind") not in KINDS:
            raise RecordError(f"{path} is not a measurement record of schema {MEASUREMENT_SCHEMA}")
        tables = {
            name: pd.read_json(io.StringIO(json.dumps(table)), orient="table")
            for name, table in record["tables"].items()
        }
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise RecordError(f"cannot read measurement record {path}: {err}") from err
    return record, tables
