"""Fused ops for SNELL's piecewise-linear kernel on CUDA: dW is computed on the fly from the factors,
never kept (``torch.library`` custom ops, with fake implementations for memory estimates and
``torch.compile``).

- ``update(a, b, coef, t, weight, scale, rule, magnitude)``: |dW| (for the threshold), or
  (W0 +) scale * S(dW): one Triton launch over 2-D tiles.
- ``vjp(a, b, coef, t, grad, rule)``: the gradients of a and b from the gradient reaching S, in closed
  form: one launch writing per-tile partial sums, then one sum per factor (a deterministic two-stage
  reduction: no atomics, so reruns agree to the bit).

A forward pass reads |dW| from ``update(..., magnitude=True)`` for the threshold and frees it before
the merge writes W0 + S: at most one out x in temporary per layer; backward recomputes dW inside the
kernels. Triton is optional: the ops run on CUDA tensors when it imports, and on CPU tensors when
``TRITON_INTERPRET=1`` was set before it was imported (how the tests run them); their fake
implementations need no Triton.

The path degrades instead of failing: if Triton is missing on a CUDA device, or a kernel fails to compile
or launch (``guarded``), the ops are turned off for the process with one warning that names the kernel and
the reason (``failure``), and SNELL's layers compute the same results with torch's CUDA ops.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

RULE_IDS = {"public": 0, "eq5": 1, "hard": 2}
"""``snell.tuners.snell.sparsify.RULES`` as the kernels number them."""
BI = 64
"""Columns per tile."""


@functools.cache
def _triton_imports() -> bool:
    return importlib.util.find_spec("triton") is not None


_failure: str | None = None


class Fallback(RuntimeError):
    """A fused op could not run; the caller computes the same result with torch instead."""


def failure() -> str | None:
    """Why the fused ops are off in this process ("<kernel>: <reason>"), or None while they are usable."""
    return _failure


def _turn_off(kernel: str, reason: str) -> None:
    global _failure
    _failure = f"{kernel}: {reason}"
    warnings.warn(
        f"snell: fused Triton kernel {kernel} is unavailable ({reason}); SNELL layers use torch's CUDA ops"
        " from now on, with the same results (snell.tuners.snell.layer.code_path still chooses the path"
        " explicitly)",
        RuntimeWarning,
        stacklevel=4,
    )


def available(device: torch.device) -> bool:
    """Whether the ops run on ``device``: CUDA with Triton, or the CPU in Triton's interpreter; never
    after they were turned off (``failure``). A CUDA device without Triton turns them off."""
    if _failure is not None:
        return False
    if device.type == "cuda":
        if not _triton_imports():
            _turn_off("update_kernel, vjp_kernel", "Triton is not installed")
        return _failure is None
    return device.type == "cpu" and _triton_imports() and os.environ.get("TRITON_INTERPRET") == "1"


def guarded(
    kernel: str, op: Callable[..., Tensor | tuple[Tensor, Tensor]], *args
) -> Tensor | tuple[Tensor, ...]:
    """``op(*args)``; if its kernel fails to compile or launch, turn the fused ops off (``_turn_off``) and
    raise ``Fallback``. Running out of memory is not a kernel failure: it propagates."""
    try:
        return op(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        _turn_off(f"{kernel} (r={args[0].shape[-1]})", f"{type(err).__name__}: {first_line}")
        raise Fallback(_failure) from err


NUM_WARPS = 8
"""Warps per tile program: with 4, the vjp kernel's tile spills registers at r = 8 (ptxas, sm_90)."""
VJP_REGISTERS = {64: 128, 32: 80}
"""Registers per thread the vjp kernel may use (ptxas ``.maxnreg``) by rows per tile, 64 for smaller tiles:
the most that keep 2, 3 and 4 programs of ``NUM_WARPS`` warps in an SM's 64K registers. Left to choose,
ptxas 12.9 holds the 32-row tile (r = 16, 2 pieces) to 64 and spills on sm_90;
``bench/perf/fused_compile.py`` compiles every launch and checks for spills."""


def launch_options(kernel: str, tile: int) -> dict[str, int]:
    """Triton's compile options of a launch of ``kernel`` (``update_kernel`` or ``vjp_kernel``) with
    ``tile`` rows per tile: what the ops launch and what ``bench.perf.fused_compile`` compiles."""
    if kernel == "vjp_kernel":
        return {"num_warps": NUM_WARPS, "maxnreg": VJP_REGISTERS.get(tile, 64)}
    return {"num_warps": NUM_WARPS}


def _row_tile(out_features: int, units: int, rank: int) -> int:
    """Rows per tile: the largest power of two up to min(64, 512 / r) (larger tiles spill registers)
    that divides the rows of one factor or threshold group, so that no tile spans two."""
    rows = out_features // units
    tile = max(1, min(64, 512 // rank))
    while rows % tile:
        tile //= 2
    return tile


def _launch(a: Tensor, b: Tensor, t: Tensor | None) -> tuple[int, int, int, int, int]:
    """(rows per factor group, rows per threshold group, BJ, grid rows, grid columns)."""
    factors, groups = a.shape[0], 1 if t is None else t.numel()
    out_features, in_features = b.shape[0], a.shape[1]
    tile = _row_tile(out_features, max(factors, groups), a.shape[2])
    return out_features // factors, out_features // groups, tile, out_features // tile, -(-in_features // BI)


@torch.library.custom_op("snell::update", mutates_args=())
def update(
    a: Tensor,
    b: Tensor,
    coef: Tensor,
    t: Tensor | None,
    weight: Tensor | None,
    scale: float,
    rule: int,
    magnitude: bool,
) -> Tensor:
    """|dW| (``magnitude``), else (``weight`` +) ``scale`` * S(dW) (S = dW where t is None): (out, in)
    float32, for a (F, in, r), b (out, r), coef (P,), t (groups,) thresholds."""
    from snell.tuners.snell._fused_kernels import update_kernel

    a, b, coef = a.contiguous().float(), b.contiguous().float(), coef.contiguous().float()
    rows_per_factor, rows_per_group, tile, grid_j, grid_i = _launch(a, b, t)
    out = torch.empty(b.shape[0], a.shape[1], device=b.device, dtype=torch.float32)
    update_kernel[(grid_j, grid_i)](
        a, b, coef, coef if t is None else t.contiguous().float(),
        out if weight is None else weight.contiguous(), out,
        b.shape[0], a.shape[1], rows_per_factor, rows_per_group, float(scale),
        R=a.shape[2], P=coef.numel(), RULE=rule, HAS_T=t is not None, HAS_W=weight is not None,
        MAGNITUDE=magnitude, BJ=tile, BI=BI, **launch_options("update_kernel", tile),
    )  # fmt: skip
    return out


@update.register_fake
def _(a, b, coef, t, weight, scale, rule, magnitude):
    return b.new_empty(b.shape[0], a.shape[1], dtype=torch.float32)


@torch.library.custom_op("snell::vjp", mutates_args=())
def vjp(
    a: Tensor, b: Tensor, coef: Tensor, t: Tensor | None, grad: Tensor, rule: int
) -> tuple[Tensor, Tensor]:
    """(grad of a, grad of b), float32, from ``grad`` (out, in), the gradient reaching S(dW)."""
    from snell.tuners.snell._fused_kernels import vjp_kernel

    a, b, coef = a.contiguous().float(), b.contiguous().float(), coef.contiguous().float()
    rows_per_factor, rows_per_group, tile, grid_j, grid_i = _launch(a, b, t)
    part_a = torch.zeros(grid_j, a.shape[0] * a.shape[1], a.shape[2], device=a.device, dtype=torch.float32)
    part_b = torch.empty(grid_i, *b.shape, device=b.device, dtype=torch.float32)
    vjp_kernel[(grid_j, grid_i)](
        a, b, coef, coef if t is None else t.contiguous().float(), grad.contiguous().float(), part_a, part_b,
        b.shape[0], a.shape[1], rows_per_factor, rows_per_group, a.shape[0] * a.shape[1],
        R=a.shape[2], P=coef.numel(), RULE=rule, HAS_T=t is not None, BJ=tile, BI=BI,
        **launch_options("vjp_kernel", tile),
    )  # fmt: skip
    return part_a.sum(0).view(a.shape), part_b.sum(0)


@vjp.register_fake
def _(a, b, coef, t, grad, rule):
    return a.new_empty(a.shape, dtype=torch.float32), b.new_empty(b.shape, dtype=torch.float32)
