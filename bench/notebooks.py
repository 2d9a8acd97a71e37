"""Execute the ablation notebooks top to bottom with nbclient: `python -m bench notebooks`.

Each notebook runs in a fresh ``python3`` kernel (the kernel spec that ipykernel installs into the
environment; ``python`` in it resolves to this interpreter), in ``notebooks/``, with OMP_NUM_THREADS=1
unless it is set (the tensors are small: extra threads only contend). ``--small`` sets
SNELL_NOTEBOOK_SMALL=1, which the notebooks read to shrink their workload (tests); ``--in-place`` stores
the outputs in the notebooks themselves (``make notebooks``, the committed version); otherwise the
executed copies go to ``--out`` if given, or nowhere (a check that they run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from bench.settings import NOTEBOOK_RESULTS_ENV as RESULTS_ENV
from bench.settings import NOTEBOOK_SMALL_ENV as SMALL_ENV
from bench.settings import NOTEBOOKS

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_NAME = "python3"


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the kernels started inside the block."""
    with mock.patch.dict(os.environ):  # restores the whole environment on exit
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield


def execute_notebook(
    path: Path, small: bool = False, timeout: int = 1800, results: Path | None = None
) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` in a fresh kernel and return it with its outputs (``path`` is not
    written). ``results`` sets SNELL_RESULTS, the benchmark results that notebook 2 reads."""
    nb = nbformat.read(path, as_version=4)
    run_notebook(nb, path.parent, small=small, timeout=timeout, results=results)
    return nb


def run_notebook(
    nb: nbformat.NotebookNode,
    cwd: Path,
    *,
    small: bool = False,
    timeout: int = 1800,
    results: Path | None = None,
) -> None:
    """Execute ``nb`` in place, in ``cwd``; on a cell error it raises CellExecutionError, and ``nb`` holds
    the outputs up to that cell."""
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=timeout,
        record_timing=False,  # no per-cell timestamps: re-running changes only what the cells print
        resources={"metadata": {"path": str(cwd)}},
    )
    variables = {
        SMALL_ENV: "1" if small else None,
        RESULTS_ENV: str(Path(results).resolve()) if results else os.environ.get(RESULTS_ENV),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    with environment(**variables):
        client.execute()


def select(names: list[str]) -> list[Path]:
    """Notebook paths from names or prefixes ("01", "02_sparsity_and_rank"); all of them if none given."""
    if not names:
        return [NOTEBOOK_DIR / n for n in NOTEBOOKS]
    chosen = []
    for name in names:
        matches = [n for n in NOTEBOOKS if n.startswith(Path(name).name)]
        if len(matches) != 1:
            raise SystemExit(
                f"notebook {name!r} matches {matches or 'nothing'}; allowed: {', '.join(NOTEBOOKS)}"
            )
        chosen.append(NOTEBOOK_DIR / matches[0])
    return chosen


def run(args: argparse.Namespace) -> None:
    if args.in_place and args.out:
        raise SystemExit("--in-place and --out exclude each other")
    if args.in_place and args.small:
        raise SystemExit(
            "--in-place stores the committed outputs, which come from a full-size run: drop --small"
        )
    failed = []
    for path in select(args.names):
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        try:
            run_notebook(nb, path.parent, small=args.small, timeout=args.timeout, results=args.results)
            status = "ok"
        except CellExecutionError as err:
            print(f"{path.name}: {err}", file=sys.stderr)
            failed.append(path.name)
            status = "FAILED"
        # a failed run is written to --out (to see where it stopped), never over the committed notebook
        target = path if args.in_place and status == "ok" else (args.out / path.name if args.out else None)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, target)
        where = f" -> {target}" if target else ""
        print(f"{path.name}: {status} in {time.perf_counter() - start:.0f} s{where}", flush=True)
    if failed:
        raise SystemExit(f"notebook(s) failed: {', '.join(failed)}")
