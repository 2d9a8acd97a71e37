"""``python -m bench gpu-smoke`` on the CPU, the CUDA code path forced (``--device cpu``) and the fused ops
in Triton's interpreter (in a subprocess: the interpreter is chosen when triton is imported): it writes
its record, every check passes and SNELL-8's step runs the fused ops; a failed check fails the command."""

from __future__ import annotations

import math
import os
import subprocess

import pytest

from bench.cli import main as bench_command
from bench.perf import gpu_smoke
from bench.records.measurements import read_measurement
from tests.harness import REPO, bench_cmd


@pytest.mark.slow
def test_gpu_smoke_runs_the_cuda_path_on_a_cpu_and_writes_its_record(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = bench_cmd("gpu-smoke", "--device", "cpu", "--precisions", "fp32", "--results", str(tmp_path))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record, tables = read_measurement(tmp_path / "gpu-smoke.json")
    checks, steps = tables["checks"], tables["steps"].set_index("variant")
    assert checks.passed.all(), checks[~checks.passed]
    assert {case.label for case in gpu_smoke.CASES} < set(checks["where"])
    assert set(steps.index) == {"lora-8", "snell-8"} and all(math.isfinite(loss) for loss in steps.loss)
    assert steps.nonfinite_gradients.eq(0).all() and steps.step_time_ms.gt(0).all()
    # SNELL-8's four adapted layers each call |dW|, the merge, the vjp and the update again in backward
    assert steps.fused_calls.to_dict() == {"lora-8": 0, "snell-8": 16}
    assert record["settings"]["fused_failure"] is None
    assert f"All {len(checks)} checks passed." in (tmp_path / "gpu_smoke.md").read_text()


def test_a_failed_check_fails_the_command_and_names_itself(tmp_path, monkeypatch):
    def broken(case, device, generator):
        raise RuntimeError("kernel refused\nmore lines")

    monkeypatch.setattr(gpu_smoke, "compare", broken)
    monkeypatch.setattr(gpu_smoke, "CASES", gpu_smoke.CASES[:1])
    lora = tuple(v for v in gpu_smoke.STEP_VARIANTS if v.name == "lora-8")  # SNELL would try the kernels
    monkeypatch.setattr(gpu_smoke, "STEP_VARIANTS", lora)
    monkeypatch.setattr(gpu_smoke.fused, "available", lambda device: True)  # no interpreter needed
    with pytest.raises(SystemExit) as exit_info:
        bench_command(["gpu-smoke", "--device", "cpu", "--precisions", "fp32", "--results", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("FAILED fused ops run (F=3 G=3") and "RuntimeError: kernel refused" in message
    _, tables = read_measurement(tmp_path / "gpu-smoke.json")
    assert not tables["checks"].passed.all()
    assert "checks failed.**" in (tmp_path / "gpu_smoke.md").read_text()
