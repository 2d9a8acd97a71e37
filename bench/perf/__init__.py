"""Speed: pytest-benchmark micro-benchmarks (test_perf_*.py), the step benchmark, the GPU check."""
