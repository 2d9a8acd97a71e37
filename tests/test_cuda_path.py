"""SNELL's CUDA code path (the fused Triton ops of ``snell.tuners.snell.fused``), run on CPU tensors in
Triton's
interpreter: the same outputs and gradients as the CPU path, and few ops per layer.

The interpreter must be switched on before triton is imported, so the checks run in a subprocess.
Shapes stay at most 25 wide so that the CPU path's ``torch.cdist`` computes distances directly, as
the fused kernels do (above that it switches to a matmul form that rounds differently).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import REPO

SCRIPT = r"""
import contextlib, json, sys
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from snell.tuners.snell.kernels import build_kernel
from snell.tuners.snell.layer import SnellLinear, code_path

SKIPPED = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh", "_to_copy"}

class Count(TorchDispatchMode):
    # Ops that launch work: views, allocations without a fill, and dtype no-ops are not counted.
    def __init__(self):
        super().__init__()
        self.ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in SKIPPED:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

def layer(groups, sparsity, dropout, drop_path):
    torch.manual_seed(0)
    out = 8 * groups
    made = SnellLinear(nn.Linear(16, out), 8, build_kernel("piecewise_linear", 8), sparsity, groups=groups,
                       dropout=dropout, drop_path=drop_path)
    with torch.no_grad():
        made.lora_A.normal_(0, 0.3), made.lora_B.normal_(0, 0.3)
    return made.train()

def run(made, x, cuda_path, count=None):
    x = x.clone().requires_grad_()
    grad_out = torch.linspace(-1, 1, x.shape[0] * x.shape[1] * made.out_features).view(*x.shape[:-1], -1)
    torch.manual_seed(1)
    with code_path("cuda" if cuda_path else "cpu"):
        assert made.fused(made.lora_B) == cuda_path
        with count if count is not None else contextlib.nullcontext():
            y = made(x)
            y.backward(grad_out)
    grads = [x.grad, made.lora_A.grad, made.lora_B.grad]
    made.zero_grad(set_to_none=True)
    return [y.detach()] + grads

report = {}
x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(2))
for groups in (1, 3):
    for sparsity in (0.0, 0.9):
        for dropout, drop_path in ((0.0, 0.0), (0.1, 0.1), (0.0, 0.3)):
            made = layer(groups, sparsity, dropout, drop_path)
            expected = run(made, x, cuda_path=False)
            count = Count()
            got = run(made, x, cuda_path=True, count=count)
            errors = [((g - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
                      for g, e in zip(got, expected)]
            report[f"groups={groups} s={sparsity} dropout={dropout} drop_path={drop_path}"] = {
                "relative_errors": errors, "ops": count.ops}
json.dump(report, sys.stdout)
"""


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_cuda_path_gives_the_cpu_paths_outputs_and_gradients(report):
    for case, found in report.items():
        assert max(found["relative_errors"]) <= 1e-5, (case, found["relative_errors"])


MAX_OPS = 15
"""Issue #13: at most 15 ops per adapted layer for forward + backward on the CUDA path."""


@pytest.mark.slow
def test_cuda_path_dispatches_at_most_15_ops_per_layer(report):
    merged = report["groups=3 s=0.9 dropout=0.0 drop_path=0.0"]["ops"]
    assert len(merged) <= MAX_OPS, merged
    assert sum(op.startswith("snell.") for op in merged) >= 3, merged  # the fused ops ran
