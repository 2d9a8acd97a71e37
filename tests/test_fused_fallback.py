"""The fused path degrades instead of failing: a kernel that does not compile turns the fused ops off with
one warning, and training goes on with torch's CUDA ops to the same results.

The failure is real: ``snell.tuners.snell.fused.BI`` (columns per tile) set to 48 makes Triton refuse
both kernels
(``tl.arange`` needs a power of two). The kernels run on CPU tensors in Triton's interpreter, which must
be switched on before triton is imported, so the training runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from snell.tuners.snell import fused
from tests.harness import REPO

SCRIPT = r"""
import json, sys, warnings
import torch
from torch import nn
from snell.tuners.snell import fused
from snell.tuners.snell.kernels import build_kernel
from snell.tuners.snell.layer import SnellLinear, code_path

def model():
    torch.manual_seed(0)
    return nn.Sequential(
        SnellLinear(nn.Linear(16, 24), 8, build_kernel("piecewise_linear", 8), 0.9, groups=3),
        nn.GELU(),
        SnellLinear(nn.Linear(24, 8), 8, build_kernel("piecewise_linear", 8), 0.5),
    )

def train(fused_on, break_at=None, steps=3):
    # Losses, outputs and gradients of `steps` AdamW steps on the CUDA code path; `break_at` = (step,
    # "forward" | "backward"): from there on the kernels fail to compile.
    torch.manual_seed(1)
    net = model()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(6, 16), torch.randint(0, 8, (6,))
    record = {"losses": [], "outputs": [], "grads": []}
    with code_path("cuda"):
        for step in range(steps):
            if break_at == (step, "forward"):
                fused.BI = 48
            assert net[0].fused(net[0].lora_B) == (fused_on and fused.failure() is None)
            out = net(x)
            loss = nn.functional.cross_entropy(out, y)
            if break_at == (step, "backward"):
                fused.BI = 48
            loss.backward()
            record["losses"].append(loss.item())
            record["outputs"].append(out.detach())
            record["grads"].append([p.grad.clone() for p in net.parameters() if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad()
    return record

def relative(got, expected):
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()

available = fused.available
fused.available = lambda device: False  # the torch CUDA path, as without Triton
expected = train(fused_on=False)
fused.available = available
report = {}
for break_at in ((0, "forward"), (1, "backward")):
    fused._failure, fused.BI = None, 64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train(fused_on=True, break_at=break_at)
    errors = [relative(g, e) for g, e in zip(got["outputs"], expected["outputs"])]
    errors += [relative(g, e) for gs, es in zip(got["grads"], expected["grads"]) for g, e in zip(gs, es)]
    report[f"{break_at[1]} of step {break_at[0]}"] = {
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "failure": fused.failure(),
        "max_relative_error": max(errors),
        "grads": len(got["grads"][-1]),
    }
json.dump(report, sys.stdout)
"""


@pytest.fixture(scope="module")
def fallback() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["forward of step 0", "backward of step 1"])
def test_a_kernel_that_fails_to_compile_warns_once_and_training_matches_the_torch_path(fallback, when):
    case = fallback[when]
    assert len(case["warnings"]) == 1, case["warnings"]
    kernel = "update_kernel" if when.startswith("forward") else "vjp_kernel"
    assert kernel in case["warnings"][0] and "power of 2" in case["warnings"][0]
    assert case["failure"].startswith(kernel)
    assert case["grads"] == 4  # both layers' A and B: training went on to the end
    assert case["max_relative_error"] <= 1e-5


def test_without_triton_a_cuda_device_turns_the_fused_ops_off_with_one_warning(monkeypatch):
    monkeypatch.setattr(fused, "_failure", None)
    monkeypatch.setattr(fused, "_triton_imports", lambda: False)
    with pytest.warns(RuntimeWarning, match="Triton is not installed") as caught:
        assert not fused.available(torch.device("cuda"))
        assert not fused.available(torch.device("cuda"))
    assert len(caught) == 1
    assert "Triton is not installed" in fused.failure()


def test_running_out_of_memory_is_not_a_kernel_failure(monkeypatch):
    monkeypatch.setattr(fused, "_failure", None)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        fused.guarded("update_kernel", out_of_memory, torch.zeros(1, 2, 8))
    assert fused.failure() is None
