"""One JSON record per run, written atomically, plus claim files so concurrent sweeps never collide.

Layout: ``<results>/records/<run_id>.json`` (finished, whatever the status) and
``<results>/records/<run_id>.claim`` (a run in progress: host, pid, start time). A record is written
to a temporary file, fsynced, then renamed over the final name, so a kill at any moment leaves either
no record or a whole one. A claim whose process is gone (same host, dead pid) is stale and retaken.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "diverged", "oom", "error")
FAILED_LABEL = {"oom": "OOM", "diverged": "diverged", "error": "error"}
"""How tables show a failed run's status."""


def failure_text(statuses: Iterable[str]) -> str:
    """The failed statuses among ``statuses`` as a table shows them, each once: "OOM / error"."""
    return " / ".join(dict.fromkeys(FAILED_LABEL[s] for s in statuses if s != "ok"))


REQUIRED_KEYS = ("schema", "run_id", "status", "error", "label", "config", "metrics", "provenance")


class RecordError(ValueError):
    """A record file that is corrupt, truncated or not in the expected schema."""


def records_dir(results: str | Path) -> Path:
    return Path(results) / "records"


def record_path(results: str | Path, run_id: str) -> Path:
    return records_dir(results) / f"{run_id}.json"


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Check ``record`` and write it atomically to ``path``."""
    check_record(record, path)
    write_json(path, record)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically write ``record`` as JSON to ``path`` (temp file in the same folder + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_record(record: dict[str, Any], path: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise RecordError(f"record {path} lacks key(s) {missing}; a record has {list(REQUIRED_KEYS)}")
    if record["status"] not in STATUSES:
        raise RecordError(f"record {path} has status {record['status']!r}; allowed: {', '.join(STATUSES)}")
    if record["schema"] != SCHEMA_VERSION:
        raise RecordError(f"record {path} has schema {record['schema']!r}; this code reads {SCHEMA_VERSION}")


def read_record(path: Path) -> dict[str, Any]:
    """Load and check one record; a corrupt, truncated or incomplete file raises RecordError naming it
    and saying what to do."""
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise RecordError(f"corrupt record file {path}: not a JSON object")
        check_record(record, path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"corrupt record file {path}: {err}; delete it to rerun that run") from err
    except RecordError as err:
        raise RecordError(f"{err}; delete it to rerun that run") from err
    return record


def load_records(results: str | Path) -> list[dict[str, Any]]:
    """Every record under ``<results>/records``, sorted by run id."""
    return [read_record(p) for p in sorted(records_dir(results).glob("*.json"))]


def _claim_path(results: str | Path, run_id: str) -> Path:
    return records_dir(results) / f"{run_id}.claim"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(path: Path) -> bool:
    try:
        owner = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return True  # a claim killed while being written
    return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))


def try_claim(results: str | Path, run_id: str) -> bool:
    """Claim a run for this process; False if another live process holds it. A claim appears whole
    (written beside it, then hard-linked into place, which fails if one exists), so an empty or half
    written claim file is never seen; one that cannot be read is stale."""
    path = _claim_path(results, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": dt.datetime.now().isoformat()}
    draft = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    draft.write_text(json.dumps(owner))
    try:
        for _ in range(2):
            try:
                os.link(draft, path)
                return True
            except FileExistsError:
                if not _is_stale(path):
                    return False
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return False
    finally:
        draft.unlink()


def release_claim(results: str | Path, run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _claim_path(results, run_id).unlink()


class ResultsFolderError(ValueError):
    """The results folder cannot hold records (read-only, not a folder, no permission)."""


def check_results_folder(results: str | Path) -> None:
    """ResultsFolderError (one line) unless ``results/records`` exists as a writable folder or can be
    created: checked before the sweep is loaded and before any worker is spawned; creates nothing."""
    folder = records_dir(results)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"no write permission in {existing} (or a read-only file system)"
    else:
        return
    raise ResultsFolderError(f"results folder {folder} is not writable: {reason}")
