"""``python -m bench``: every command's --help answers before torch is imported, and the README's
Python blocks run as written."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.arguments import COMMANDS
from tests.harness import REPO, run_bench

HELP_BOUND_S = 3.0  # generous for a loaded CI machine; README quotes the measured figure


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_quick_and_imports_no_torch(command):
    start = time.perf_counter()
    done = run_bench(command, "--help")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and f"python -m bench {command}" in done.stdout
    assert elapsed < HELP_BOUND_S, f"{command} --help took {elapsed:.2f} s"
    probe = (
        "import sys; from bench.arguments import parse; "
        f"parse({command!r}, {example_args(command)!r}); "
        "print('torch' in sys.modules)"
    )
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert imported.stdout.strip() == "False", imported.stderr


def example_args(command: str) -> list[str]:
    """Arguments that parse for each command (positionals where it has them)."""
    return {"sweep": ["bench/presets/quick.yaml", "--dry-run"], "memory": ["vit_base_patch16_224"]}.get(
        command, []
    )


def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = readme_python_blocks()
    assert blocks, "README.md has no python block"
    for i, block in enumerate(blocks):
        script = tmp_path / f"block{i}.py"
        script.write_text(block)
        done = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"README python block {i} failed:\n{block}\n{done.stderr[-2000:]}"
    assert (Path(tmp_path) / "run" / "adapter" / "adapter_model.safetensors").is_file()
