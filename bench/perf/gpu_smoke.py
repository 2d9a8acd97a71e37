"""The GPU smoke test: the fused ops of ``snell.tuners.snell.fused`` against an independent reference on
the device,
then one training step each of LoRA-8 and SNELL-8 on ViT-B/16; under 3 minutes on a GPU, Triton's
compilation included. Run it before ``gpu-check``: a broken kernel or a fallback shows here in minutes,
not after a long measurement.

Every check is a row of the record ``gpu-smoke.json`` (what was measured, the tolerance, passed or not),
rendered as ``gpu_smoke.md``; the exit status is 1, with one line per failed check, if any fails.
``--device cpu`` runs the CUDA code path (``snell.tuners.snell.layer.code_path``) on CPU tensors and a
one-block ViT,
the fused ops in Triton's interpreter (``TRITON_INTERPRET=1``): how the tests run it.

    python -m bench gpu-smoke --commit "$(git rev-parse HEAD)"
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from contextlib import nullcontext
from typing import Any

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from bench.methods import preset_config
from bench.perf import gpu_check
from bench.perf.fused_reference import TOLERANCE, Case, compare
from bench.perf.variants import Variant
from bench.records.measurements import write_measurement
from bench.settings import EMBEDDED_BACKBONE
from snell.tuners.snell import fused
from snell.tuners.snell.config import SnellConfig
from snell.tuners.snell.layer import code_path

CASES = (
    *(Case(3, 3, 8, 2, rule, True, weight) for rule in (0, 1, 2) for weight in (False, True)),
    Case(1, 1, 4, 1, 0, False, False),
    Case(1, 1, 8, 2, 0, True, True, in_features=80, out_features=128),
)
"""Each rule with and without the frozen weight, on a fused qkv's three groups; no threshold; two row
tiles and a partial column tile. Small, so that the interpreter runs them in seconds."""
STEP_VARIANTS = tuple(
    v for v in gpu_check.VARIANTS if v.name in ("lora-8", "snell-8") and v.branch == "paper"
)
"""gpu-check's LoRA-8 and SNELL-8 with the paper's branch regularisation (dropout, SNELL's drop-path)."""
BATCH = 8
SMALL_VIT = {"depth": 1, "embed_dim": 32}
"""``--device cpu``'s backbone options (of the embedded ViT): the interpreter takes seconds per step."""


class FusedCalls(TorchDispatchMode):
    """Counts the calls of the fused ops (``snell::update``, ``snell::vjp``) made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.namespace == torch.ops.snell.name  # the library of SNELL's custom ops
        return func(*args, **(kwargs or {}))


def check_row(
    check: str,
    where: str,
    measured: float,
    tolerance: float | None,
    *,
    passed: bool | None = None,
    detail: str = "",
) -> dict[str, Any]:
    """One check of the record: passed when ``measured`` <= ``tolerance`` (NaN fails), unless ``passed``
    is given."""
    passed = measured <= tolerance if passed is None else passed
    return {
        "check": check, "where": where, "measured": float(measured), "tolerance": tolerance,
        "passed": bool(passed), "detail": detail,
    }  # fmt: skip


def op_checks(device: str) -> list[dict[str, Any]]:
    """The fused ops against the reference on ``device``: four checks per case (five with a threshold),
    or one failed check naming the error when a kernel does not compile or launch."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for case in tqdm(CASES, desc="fused ops"):
        try:
            found = compare(case, device, generator)
        except Exception as err:  # a kernel that fails fails its check; the steps still run (fallback)
            first_line = (str(err).strip().splitlines() or [""])[0][:200]
            detail = f"{type(err).__name__}: {first_line}"
            rows.append(check_row("fused ops run", case.label, math.nan, 0.0, detail=detail))
            continue
        rows += [
            check_row("update magnitude", case.label, found["magnitude"], TOLERANCE),
            check_row("update (W0 +) S(dW)", case.label, found["merged"], TOLERANCE),
            check_row("vjp", case.label, max(found["grad_a"], found["grad_b"]), TOLERANCE),
            check_row("vjp reruns equal", case.label, found["rerun_difference"], 0.0),
        ]
        if case.sparse:
            rows.append(check_row("threshold = quantile", case.label, found["threshold_difference"], 0.0))
    return rows


def watch_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """A list that gains, for every gradient the model's trainable parameters receive, its count of
    non-finite entries (a tensor: no device sync until read). ``train_step`` clears the gradients."""
    found = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(lambda p: found.append((~p.grad.isfinite()).sum()))
    return found


def step_row(variant: Variant, precision: str, device: str, backbone: tuple[str, dict]) -> dict[str, Any]:
    """One warm-up step (Triton compiles; fused op calls counted), then one timed step (CUDA peak)."""
    name, options = backbone
    setup = gpu_check.build(variant, BATCH, precision, model_name=name, device=device, **options)
    nonfinite = watch_gradients(setup.model)
    with FusedCalls() as counted:
        setup.step()
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    loss = setup.step().item()
    seconds = time.perf_counter() - tic
    return {
        "variant": variant.name, "precision": precision, "loss": loss, "step_time_ms": 1e3 * seconds,
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / gpu_check.MIB if on_cuda else None,
        "nonfinite_gradients": int(sum(nonfinite)), "fused_calls": counted.calls,
    }  # fmt: skip


def step_checks(variant: Variant, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Loss and gradients finite; for SNELL, the fused ops called and not turned off."""
    where = f"{variant.name} {row['precision']} step"
    rows = [
        check_row("loss finite", where, row["loss"], None, passed=math.isfinite(row["loss"])),
        check_row("gradients finite", where, row["nonfinite_gradients"], 0),
    ]
    if isinstance(preset_config(variant.preset), SnellConfig) and not variant.reference:  # SNELL's own layers
        failure = fused.failure()
        used = row["fused_calls"] > 0 and failure is None
        rows.append(
            check_row("fused ops used", where, row["fused_calls"], None, passed=used, detail=failure or "")
        )
    return rows


def run(args: argparse.Namespace) -> str | None:
    """Check, and write ``gpu-smoke.json``; returns one line per failed check (``bench.cli`` exits with
    them once ``gpu_smoke.md`` is written), or None when every check passed."""
    gpu_check.require_device("gpu-smoke", args.device)
    on_cpu = torch.device(args.device).type == "cpu"
    if on_cpu and not fused.available(torch.device("cpu")):
        raise SystemExit(
            "bench gpu-smoke --device cpu runs the fused ops in Triton's interpreter: set TRITON_INTERPRET=1"
        )
    backbone = (EMBEDDED_BACKBONE, SMALL_VIT) if on_cpu else (gpu_check.MODEL, {})
    steps = []
    with code_path("cuda") if on_cpu else nullcontext():
        rows = op_checks(args.device)
        for variant, precision in tqdm(list(itertools.product(STEP_VARIANTS, args.precisions)), desc="steps"):
            steps.append(step_row(variant, precision, args.device, backbone))
            rows += step_checks(variant, steps[-1])
    checks = pd.DataFrame(rows)
    write_measurement(
        args.results,
        kind="gpu-smoke",
        argv=args.argv,
        settings={
            "model": backbone[0],
            "model_options": backbone[1],
            "batch_size": BATCH,
            "tolerance": TOLERANCE,
            "fused_failure": fused.failure(),
        },
        tables={"checks": checks, "steps": pd.DataFrame(steps)},
        device=torch.device(args.device),
        commit=args.commit,
    )
    failed = checks[~checks.passed]
    lines = [
        f"FAILED {r.check} ({r.where}): measured {r.measured:.3g}, tolerance {r.tolerance}"
        + (f"; {r.detail}" if r.detail else "")
        for r in failed.itertuples()
    ]
    return "\n".join(lines) or None
