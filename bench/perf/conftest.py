"""Micro-benchmarks of SNELL's parts (``make perf``; not collected by ``make test``).

Each benchmark runs a fixed number of rounds (``benchmark.pedantic``) so that the whole suite stays
within a few minutes on a 2-core CPU; compare medians within one group, measured in one run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def measure(benchmark) -> Callable[..., object]:
    """``measure(fn, rounds=5)``: one warm-up call, then ``rounds`` timed calls of ``fn``."""

    def run(fn: Callable[[], object], rounds: int = 5) -> object:
        return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)

    return run
