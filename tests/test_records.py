"""Records: schema, atomic writes, clear errors for corrupt files, claims."""

import json
import os
from pathlib import Path

import pytest

from bench.records.records import (
    RecordError,
    load_records,
    read_record,
    record_path,
    release_claim,
    try_claim,
    write_record,
)


def record(run_id="r1", status="ok"):
    return {
        "schema": 1,
        "run_id": run_id,
        "status": status,
        "error": None,
        "label": "lora-8",
        "config": {},
        "metrics": {"test_acc": 50.0},
        "provenance": {},
    }


def test_write_and_read_round_trip(tmp_path):
    path = record_path(tmp_path, "r1")
    write_record(path, record())
    assert read_record(path) == record()
    assert [r["run_id"] for r in load_records(tmp_path)] == ["r1"]
    assert not list(path.parent.glob("*.tmp"))


def test_schema_is_enforced(tmp_path):
    bad = record()
    del bad["metrics"]
    with pytest.raises(RecordError, match=r"lacks key\(s\) \['metrics'\]"):
        write_record(record_path(tmp_path, "r1"), bad)
    with pytest.raises(RecordError, match="status 'finished'; allowed: ok, diverged, oom, error"):
        write_record(record_path(tmp_path, "r1"), record(status="finished"))


def test_truncated_record_names_the_file(tmp_path):
    path = record_path(tmp_path, "r1")
    write_record(path, record())
    path.write_text(path.read_text()[:40])
    with pytest.raises(RecordError, match=f"corrupt record file {path}"):
        load_records(tmp_path)


def test_claims_exclude_live_owners_and_retake_stale_ones(tmp_path):
    assert try_claim(tmp_path, "r1")
    assert not try_claim(tmp_path, "r1")  # held by this (live) process
    claim = tmp_path / "records" / "r1.claim"
    owner = json.loads(claim.read_text())
    dead_pid = max(os.getpid(), 2) + 10_000_000  # above any pid_max
    claim.write_text(json.dumps({**owner, "pid": dead_pid}))
    assert try_claim(tmp_path, "r1")  # stale: its process is gone
    release_claim(tmp_path, "r1")
    assert not claim.exists()


def test_a_claim_appears_whole(tmp_path, monkeypatch):
    seen = []
    link = os.link

    def spy(source, target):  # what another process could read the moment the claim exists
        seen.append(json.loads(Path(source).read_text()))
        link(source, target)

    monkeypatch.setattr(os, "link", spy)
    assert try_claim(tmp_path, "r1") and not try_claim(tmp_path, "r1")
    assert (
        seen[0]["pid"] == os.getpid()
        and json.loads((tmp_path / "records" / "r1.claim").read_text()) == seen[0]
    )
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["r1.claim"]  # no draft left
