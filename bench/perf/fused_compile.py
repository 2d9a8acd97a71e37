"""Ahead-of-time compilation of every fused Triton kernel (``snell.tuners.snell._fused_kernels``) for
sm_80 and sm_90,
with no GPU: registers, spills and shared memory per specialisation, from Triton's bundled ptxas.

A kernel that spills registers runs slower on every GPU and one that needs more shared memory than the
target has does not launch; both are visible at compile time, so the tests check them on a CPU-only
machine. The specialisations are those the layer launches (``snell.tuners.snell.fused``): a, b, coef, t
and the
gradient in float32, the frozen weight in float32 or bfloat16, every rule, 1 or 2 pieces, ranks 8, 16
and 32, the row tiles ``_row_tile`` picks for ViT-B/16 and LLaMA-2-7B / 13B widths, and the launch's
options (``launch_options``: warps, the vjp kernel's register budget). Without thresholds the kernels
never read the rule, so RULE = 0 stands for all three there. Every pointer and integer argument is
compiled as divisible by 16, as Triton specialises real launches (torch's allocations are 16-byte
aligned; every row count and width above is a multiple of 16).
Writes the record ``fused-compile.json``; ``bench.report.measurements`` renders ``fused_compile.md``.

    python -m bench fused-compile
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from triton.runtime.jit import JITFunction

TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448)}
"""Compute capability and the shared memory one block may opt in to (bytes), per target."""
RANKS = (8, 16, 32)
PIECES = (1, 2)
LAYER_ROWS = ((768, 1), (2304, 3), (3072, 1), (4096, 1), (11008, 1), (5120, 1), (13824, 1))
"""(out_features, threshold groups) of the adapted layers: ViT-B/16's proj / fc2, fused qkv and fc1,
LLaMA-2-7B's and -13B's attention and MLP projections."""


@dataclass(frozen=True)
class Spec:
    """One specialisation of a fused kernel, as ``snell.tuners.snell.fused`` launches it."""

    kernel: str
    R: int
    P: int
    BJ: int
    has_t: bool
    rule: str
    magnitude: bool
    weight: str

    def constexprs(self, rule_ids: dict[str, int], columns: int) -> dict[str, int | bool]:
        """The kernel's constexpr arguments."""
        common = {"R": self.R, "P": self.P, "RULE": rule_ids.get(self.rule, 0), "HAS_T": self.has_t}
        if self.kernel == "update_kernel":
            common |= {"HAS_W": self.weight != "-", "MAGNITUDE": self.magnitude}
        return common | {"BJ": self.BJ, "BI": columns}


def row_tiles(rank: int) -> list[int]:
    """Every row tile ``snell.tuners.snell.fused`` picks at ``rank`` for the layers of ``LAYER_ROWS``."""
    from snell.tuners.snell.fused import _row_tile

    return sorted({_row_tile(rows, units, rank) for rows, units in LAYER_ROWS})


def specs() -> list[Spec]:
    """Every specialisation of both kernels that the layer launches."""
    from snell.tuners.snell.fused import RULE_IDS

    thresholds = [(False, "-")] + [(True, rule) for rule in RULE_IDS]
    update = [(False, "-", True, "-")] + [
        (has_t, rule, False, weight) for has_t, rule in thresholds for weight in ("-", "fp32", "bf16")
    ]
    vjp = [(has_t, rule, False, "-") for has_t, rule in thresholds]
    return [
        Spec(kernel, rank, pieces, tile, *variant)
        for kernel, variants in (("update_kernel", update), ("vjp_kernel", vjp))
        for rank in RANKS
        for tile in row_tiles(rank)
        for pieces in PIECES
        for variant in variants
    ]


def signature(fn: JITFunction, spec: Spec) -> tuple[dict[str, str], dict[tuple[int], list]]:
    """Triton's signature of ``fn`` at ``spec`` and the divisible-by-16 attribute of every pointer and
    integer argument."""
    types, attrs = {}, {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            types[name] = "*bf16" if name == "w_ptr" and spec.weight == "bf16" else "*fp32"
        else:
            types[name] = "fp32" if name == "scale" else "i32"
        if types[name] != "fp32":
            attrs[(param.num,)] = [["tt.divisibility", 16]]
    return types, attrs


def ptxas_usage(log: str) -> dict[str, int]:
    """Registers and spill bytes of the one entry function in a ``ptxas -v`` log."""
    registers = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if len(registers) != 1 or len(spills) != 1:
        raise RuntimeError(f"expected one function in the ptxas log, got:\n{log}")
    return {
        "registers": int(registers[0]),
        "spill_store_bytes": int(spills[0][0]),
        "spill_load_bytes": int(spills[0][1]),
    }


def reason(err: BaseException) -> str:
    """The innermost cause of a compile error, in one line (Triton wraps it once per calling function)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(getattr(err, "error_message", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def compile_spec(spec: Spec, target: str) -> dict:
    """Compile one specialisation for ``target`` (no GPU needed): its row of the table; a compile error
    is recorded in ``error`` (the registers and spills are then missing)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from snell.tuners.snell import _fused_kernels, fused

    fn = getattr(_fused_kernels, spec.kernel)
    capability, limit = TARGETS[target]
    types, attrs = signature(fn, spec)
    source = ASTSource(fn, types, spec.constexprs(fused.RULE_IDS, fused.BI), attrs)
    options = fused.launch_options(spec.kernel, spec.BJ)
    row = {**asdict(spec), "target": target, "num_warps": options["num_warps"]}
    row |= {"maxnreg": options.get("maxnreg"), "shared_limit_bytes": limit}
    log, tic = io.StringIO(), time.perf_counter()
    try:
        with (
            tempfile.TemporaryDirectory() as cache,  # nothing cached is reused, nothing left behind
            triton.knobs.cache.scope(),
            triton.knobs.compilation.scope(),
            triton.knobs.nvidia.scope(),
            contextlib.redirect_stdout(log),  # where make_cubin prints the ptxas log
        ):
            triton.knobs.cache.dir = cache
            triton.knobs.compilation.always_compile = True
            triton.knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
        row |= ptxas_usage(log.getvalue()) | {"shared_bytes": compiled.metadata.shared, "error": ""}
    except Exception as err:  # noqa: BLE001 - any failure to compile is a result, reported per kernel
        row["error"] = reason(err)
    row["compile_s"] = time.perf_counter() - tic
    return row


def compile_all(workers: int = 2) -> pd.DataFrame:
    """Compile every specialisation for every target, on ``workers`` processes (forked: they share the
    imported kernels): one row each."""
    import snell.tuners.snell._fused_kernels  # noqa: F401 - imported once, before the workers fork

    jobs = [(spec, target) for target in TARGETS for spec in specs()]
    if workers == 1:
        rows = [compile_spec(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(compile_spec, *zip(*jobs, strict=True)))
    columns = ["kernel", "target", *(k for k in asdict(jobs[0][0]) if k != "kernel"), "num_warps", "maxnreg"]
    columns += ["registers", "spill_store_bytes", "spill_load_bytes", "shared_bytes", "shared_limit_bytes"]
    return pd.DataFrame(rows)[[*columns, "compile_s", "error"]]


def ptxas_version() -> str:
    """The version of the ptxas Triton compiles with (``12.9.86``), and whether it is Triton's bundled one."""
    from triton.knobs import nvidia

    tool = nvidia.ptxas
    text = subprocess.run([tool.path, "--version"], capture_output=True, text=True, check=True).stdout
    version = re.search(r"release [\d.]+, V([\d.]+)", text).group(1)
    bundled = Path(tool.path).resolve() == Path(nvidia.knob_descriptors["ptxas"].default_path).resolve()
    return f"{version} ({'bundled with Triton' if bundled else tool.path})"


def run(args: argparse.Namespace) -> None:
    """Compile the matrix and write ``fused-compile.json`` (``bench.cli`` renders ``fused_compile.md``)."""
    import torch
    import triton

    from bench.records.measurements import write_measurement

    tic = time.perf_counter()
    kernels = compile_all(args.workers)
    settings = {
        "triton": triton.__version__,
        "ptxas": ptxas_version(),
        "targets": {
            name: {"capability": cap, "shared_limit_bytes": limit} for name, (cap, limit) in TARGETS.items()
        },
        "workers": args.workers,
        "wall_s": round(time.perf_counter() - tic, 1),
    }
    write_measurement(
        args.results,
        kind="fused-compile",
        argv=args.argv,
        settings=settings,
        tables={"kernels": kernels},
        device=torch.device("cpu"),
        commit=args.commit,
    )
