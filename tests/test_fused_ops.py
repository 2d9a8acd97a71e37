"""The fused ops of ``snell.tuners.snell.fused`` against an independent torch implementation
(``bench.perf.fused_reference``: the distances computed directly, the rules written out, gradients by
autograd in float64): on CPU tensors in Triton's interpreter (in a subprocess: the interpreter is chosen
when triton is imported), and on a GPU if there is one (the check to run on a lent device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.perf.fused_reference import TOLERANCE
from snell.tuners.snell import fused
from tests.harness import REPO

SCRIPT = r"""
import itertools, json, sys
import torch
from bench.perf.fused_reference import Case, compare

results = []
generator = torch.Generator().manual_seed(0)
for F, G, r, P, rule, sparse, with_weight in itertools.product((1, 3), (1, 3), (4, 8), (1, 2), (0, 1, 2),
                                                                  (False, True), (False, True)):
    if F == 3 and G == 1 or (r, P) == (4, 1) and rule or not sparse and rule:
        continue  # F = 3 comes with G = 3 (q, k, v); no threshold, no rule; fewer keep the interpreter quick
    results.append(compare(Case(F, G, r, P, rule, sparse, with_weight), sys.argv[1], generator))
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def results(request) -> list[dict]:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU: the interpreter run on the CPU checks the same kernels")
    env = {**os.environ, "TRITON_INTERPRET": "1"} if request.param == "cpu" else dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, request.param], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_fused_ops_match_an_independent_implementation(results):
    assert len(results) >= 40
    for r in results:
        assert max(r["magnitude"], r["merged"], r["grad_a"], r["grad_b"]) <= TOLERANCE, r
        assert r["rerun_difference"] == 0, r  # deterministic: reruns agree to the bit


@pytest.mark.slow
def test_threshold_on_the_fused_magnitude_is_quantiles_to_the_bit(results):
    assert all(r["threshold_difference"] == 0 for r in results)


def test_fake_tensors_give_shapes_without_triton():
    with FakeTensorMode():
        a, b, coef = torch.empty(3, 20, 8), torch.empty(24, 8), torch.empty(2)
        t, grad = torch.empty(3), torch.empty(24, 20)
        merged = fused.update(a, b, coef, t, None, 1.0, 0, False)
        grad_a, grad_b = fused.vjp(a, b, coef, t, grad, 0)
    assert merged.shape == (24, 20) and grad_a.shape == a.shape and grad_b.shape == b.shape
    assert merged.dtype == grad_a.dtype == torch.float32
