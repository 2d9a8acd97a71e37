"""The ablation notebooks run top to bottom at small size, into temporary copies, without cell errors.

Notebook 2 reads benchmark records; here it reads a small synthetic set (made-up accuracies, real record
schema) covering every figure, so the test neither trains nor depends on what ``results/`` holds.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import nbformat
import pytest

import snell
from bench.notebooks import NOTEBOOK_DIR, NOTEBOOKS, execute_notebook
from bench.records.records import SCHEMA_VERSION, record_path, write_record
from bench.run.config import RunConfig, TrainConfig

pytestmark = pytest.mark.slow

RUNS = [
    ("full", {}),
    ("lora", {"rank": 8}),
    *(
        ("snell", {"kernel": kernel, "sparsity": s})
        for kernel, s in itertools.product(["linear", "piecewise_linear"], [0.0, 0.5, 0.9])
    ),
    ("snell", {"kernel": "rbf", "sparsity": 0.9}),
    ("snell", {"rank": 16}),
    ("snell", {"rank": 32}),
]


def write_synthetic_records(results: Path) -> None:
    rng = random.Random(0)
    for task, seed, (method, options) in itertools.product(["digits", "texture"], [0, 1], RUNS):
        run = RunConfig(task, method, seed, options, TrainConfig(epochs=1))
        record = {
            "schema": SCHEMA_VERSION,
            "run_id": run.run_id,
            "label": run.label,
            "config": run.to_dict(),
            "method_config": snell.method_config(method, **options).to_dict(),
            "provenance": {"device": "synthetic", "git_commit": "0" * 40},
            "status": "ok",
            "error": None,
            "metrics": {
                "val_acc": rng.uniform(40, 90),
                "test_acc": rng.uniform(40, 90),
                "trainable_params": rng.randint(1_000, 100_000),
                "peak_memory_mib": rng.uniform(10, 50),
                "step_time_s": rng.uniform(0.01, 0.1),
                "update_rank": rng.uniform(8, 128) if method != "full" else None,
            },
        }
        write_record(record_path(results, run.run_id), record)


@pytest.fixture(scope="module")
def synthetic_results(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results")
    write_synthetic_records(results)
    return results


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def has_image(nb: nbformat.NotebookNode) -> bool:
    return any("image/png" in out.get("data", {}) for out in outputs(nb))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_small(name, synthetic_results, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small tensors: threads only contend on a shared machine
    source = NOTEBOOK_DIR / name
    committed = source.read_bytes()
    nb = execute_notebook(source, small=True, timeout=240, results=synthetic_results)
    nbformat.write(nb, tmp_path / name)

    assert source.read_bytes() == committed, "the committed notebook must not be overwritten"
    assert not [out for out in outputs(nb) if out.output_type == "error"]
    assert has_image(nb), f"{name} shows no figure"
    answer = nb.cells[-1]
    assert answer.cell_type == "code" and any(out.get("name") == "stdout" for out in answer.outputs), (
        f"{name} must end with the measured answer printed"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_holds_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "Question" in nb.cells[0].source
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells), f"{name} is not executed: run `make notebooks`"
    assert has_image(nb), f"{name} holds no figure: run `make notebooks`"
    assert not [out for out in outputs(nb) if out.output_type == "error"]
