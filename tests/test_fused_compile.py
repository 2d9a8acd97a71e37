"""Issue #23: every fused Triton kernel compiles for sm_80 and sm_90 with no GPU, at every specialisation
the layer launches, with 0 spill bytes, at most 255 registers and shared memory within the target's limit.

The matrix compiles in a subprocess (``python -m bench fused-compile``, Triton's interpreter off there
whatever this process has), which also writes the record and its report.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

pytest.importorskip("triton")

from bench.perf.fused_compile import RANKS, TARGETS, Spec, compile_spec, ptxas_usage, specs
from bench.records.measurements import read_measurement
from snell.tuners.snell.fused import RULE_IDS
from tests.harness import REPO

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'vjp_kernel' for 'sm_90a'
ptxas info    : Function properties for vjp_kernel
    16 bytes stack frame, 12 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 16 bytes cumulative stack size
"""
"""A real ``ptxas -v`` log (vjp_kernel, r = 16, 2 pieces, sm_90, before its register budget)."""
MAX_REGISTERS = 255
"""Registers a thread can address."""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[pd.DataFrame, str]:
    """Every specialisation's row, and the rendered report."""
    folder = tmp_path_factory.mktemp("fused_compile")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "fused-compile", "--results", str(folder)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _, tables = read_measurement(folder / "fused-compile.json")
    return tables["kernels"], (folder / "fused_compile.md").read_text()


@pytest.mark.slow
def test_the_matrix_covers_every_kernel_target_rank_rule_and_weight_dtype(compiled):
    kernels, _ = compiled
    assert len(kernels) == len(TARGETS) * len(specs())
    assert set(kernels.kernel) == {"update_kernel", "vjp_kernel"}
    assert set(kernels.target) == {"sm_80", "sm_90"}
    assert set(kernels.R) == set(RANKS) == {8, 16, 32}
    assert set(kernels.P) == {1, 2}
    for kernel in ("update_kernel", "vjp_kernel"):
        rows = kernels[kernels.kernel == kernel]
        assert set(rows[rows.has_t.astype(bool)].rule) == set(RULE_IDS)
        assert set(rows[~rows.has_t.astype(bool)].rule) == {"-"}
    update = kernels[kernels.kernel == "update_kernel"]
    assert {"fp32", "bf16"} <= set(update.weight) and update.magnitude.astype(bool).any()
    keys = ["kernel", "target", "R", "P", "BJ", "has_t", "rule", "magnitude", "weight"]
    assert not kernels.duplicated(keys).any()


@pytest.mark.slow
def test_every_specialisation_compiles_without_spills_within_registers_and_shared_memory(compiled):
    kernels, report = compiled
    failed = kernels[kernels.error.fillna("") != ""]
    assert failed.empty, failed[["kernel", "target", "R", "P", "error"]].to_string()
    assert (kernels.spill_store_bytes == 0).all() and (kernels.spill_load_bytes == 0).all(), kernels[
        (kernels.spill_store_bytes > 0) | (kernels.spill_load_bytes > 0)
    ].to_string()
    assert kernels.registers.between(1, MAX_REGISTERS).all()
    assert (kernels.shared_bytes <= kernels.shared_limit_bytes).all()
    limits = {target: limit for target, (_, limit) in TARGETS.items()}
    assert (kernels.shared_limit_bytes == kernels.target.map(limits)).all()
    assert limits == {"sm_80": 166_912, "sm_90": 232_448}
    assert f"All {len(kernels)} specialisations compile with 0 spill bytes" in report


def test_ptxas_log_gives_registers_and_spills():
    assert ptxas_usage(PTXAS_LOG) == {"registers": 64, "spill_store_bytes": 12, "spill_load_bytes": 24}
    with pytest.raises(RuntimeError, match="one function"):
        ptxas_usage(PTXAS_LOG + PTXAS_LOG)


def test_a_kernel_that_does_not_compile_is_recorded_as_an_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels compile only with Triton's interpreter off")
    spec = Spec("update_kernel", R=8, P=2, BJ=48, has_t=False, rule="-", magnitude=True, weight="-")
    row = compile_spec(spec, "sm_90")  # 48 rows: tl.arange needs a power of two
    assert "power of 2" in row["error"] and "registers" not in row
