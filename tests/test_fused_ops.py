"""The fused ops of ``snell.fused`` against an independent torch implementation (the distances computed
directly, the rules written out, gradients by autograd in float64): on CPU tensors in Triton's
interpreter (in a subprocess: the interpreter is chosen when triton is imported), and on a GPU if there is
one (the check to run on a lent device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from snell import fused
from tests.harness import REPO

SCRIPT = r"""
import itertools, json, sys
import torch
DEVICE = sys.argv[1]
from snell import fused
from snell.sparsify import threshold

def reference_dw(a, b, coef):
    F, n_in, r = a.shape
    P = coef.numel()
    rows = b.shape[0] // F
    out = []
    for f in range(F):
        ap = a[f].view(n_in, P, r // P)
        bp = b[f * rows:(f + 1) * rows].view(rows, P, r // P)
        dist = ((ap[None] - bp[:, None]) ** 2).sum(-1).sqrt()
        out.append((dist * coef.to(dist.dtype)).sum(-1))
    return torch.cat(out)

def reference_rule(dw, t, rule):
    if t is None:
        return dw
    G = t.numel()
    grouped = dw.view(G, -1)
    magnitude = grouped.abs()
    kept = magnitude > t.view(G, 1)
    if rule == 0:
        out = grouped * magnitude.detach() * kept
    elif rule == 1:
        out = grouped * torch.relu(magnitude - t.view(G, 1))
    else:
        out = grouped * kept
    return out.view(dw.shape)

def rel(x, y):
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()

results = []
generator = torch.Generator().manual_seed(0)
for F, G, r, P, rule, sparse, with_weight in itertools.product((1, 3), (1, 3), (4, 8), (1, 2), (0, 1, 2),
                                                                  (False, True), (False, True)):
    if F == 3 and G == 1 or (r, P) == (4, 1) and rule:
        continue  # F = 3 comes with G = 3 (q, k, v); fewer combinations keep the interpreter quick
    n_in, out = 20, 24
    a = torch.randn(F, n_in, r, generator=generator) * 0.5
    b = torch.randn(out, r, generator=generator) * 0.5
    coef = torch.tensor([0.1 * (-1) ** p for p in range(P)])
    dw = reference_dw(a.double(), b.double(), coef).float()
    on = lambda tensor: None if tensor is None else tensor.to(DEVICE)
    magnitude = fused.update(on(a), on(b), on(coef), None, None, 1.0, rule, True)
    t = threshold(magnitude.clone(), 0.5, G, magnitude=True) if sparse else None
    magnitude, t = magnitude.cpu(), None if t is None else t.cpu()
    t_reference = torch.quantile(magnitude.view(G, -1), 0.5, dim=1) if sparse else None
    weight = torch.randn(out, n_in, generator=generator) if with_weight else None
    merged = fused.update(on(a), on(b), on(coef), on(t), on(weight), 1.5, rule, False).cpu()
    expected = 1.5 * reference_rule(dw.double(), t if t is None else t.double(), rule)
    expected = expected + (0 if weight is None else weight.double())
    grad = torch.randn(out, n_in, generator=generator)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    s64 = reference_rule(reference_dw(a64, b64, coef.double()), None if t is None else t.double(), rule)
    grad_a, grad_b = torch.autograd.grad(s64, [a64, b64], grad.double())
    got_a, got_b = (g.cpu() for g in fused.vjp(on(a), on(b), on(coef), on(t), on(grad), rule))
    again_a, again_b = (g.cpu() for g in fused.vjp(on(a), on(b), on(coef), on(t), on(grad), rule))
    results.append({
        "case": f"F={F} G={G} r={r} P={P} rule={rule} t={sparse} weight={with_weight}",
        "magnitude": rel(magnitude.double(), dw.abs().double()),
        "threshold_equal": t is None or torch.equal(t, t_reference),
        "merged": rel(merged.double(), expected),
        "grad_a": rel(got_a.double(), grad_a), "grad_b": rel(got_b.double(), grad_b),
        "deterministic": torch.equal(got_a, again_a) and torch.equal(got_b, again_b),
    })
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


def test_fused_ops_match_an_independent_implementation(results):
    assert len(results) >= 40
    for r in results:
        assert max(r["magnitude"], r["merged"], r["grad_a"], r["grad_b"]) <= 1e-5, r
        assert r["deterministic"], r


def test_threshold_on_the_fused_magnitude_is_quantiles_to_the_bit(results):
    assert all(r["threshold_equal"] for r in results)


def test_fake_tensors_give_shapes_without_triton():
    with FakeTensorMode():
        a, b, coef = torch.empty(3, 20, 8), torch.empty(24, 8), torch.empty(2)
        t, grad = torch.empty(3), torch.empty(24, 20)
        merged = fused.update(a, b, coef, t, None, 1.0, 0, False)
        grad_a, grad_b = fused.vjp(a, b, coef, t, grad, 0)
    assert merged.shape == (24, 20) and grad_a.shape == a.shape and grad_b.shape == b.shape
    assert merged.dtype == grad_a.dtype == torch.float32
