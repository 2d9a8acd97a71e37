# Two commands matter: `make bench` (sets up .venv on first use, then runs the default benchmark)
# and `make test`. Everything else is a convenience.
PY      := .venv/bin/python
STAMP   := .venv/.installed
THREADS ?= 1
RESULTS ?= results
export OMP_NUM_THREADS ?= $(THREADS)

.PHONY: setup bench bench-quick report pretrain memory llm-memory perf notebooks test test-fast lint format clean bench-slurm

setup: $(STAMP)

# torch/torchvision are pinned to the pair that installs from local wheels on the dev machines (no
# multi-GB download); on other machines pip fetches the same pair.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m bench sweep bench/presets/default.yaml --results $(RESULTS)

bench-quick: $(STAMP)
	$(PY) -m bench sweep bench/presets/quick.yaml --results results/quick

# The sweep as one SLURM job per run (submitit), e.g. make bench-slurm ARGS="--partition gpu --no-wait"
bench-slurm: SWEEP ?= bench/presets/paper_vtab.yaml
bench-slurm: $(STAMP)
	$(PY) -m bench sweep $(SWEEP) --executor submitit --results results/slurm $(ARGS)

report: $(STAMP)
	$(PY) -m bench report --results $(RESULTS)

pretrain: $(STAMP)
	$(PY) -m bench pretrain

memory: $(STAMP)
	$(PY) -m bench memory-sweep --results results/memory
	$(PY) -m bench memory-timeline --results results/memory

llm-memory: $(STAMP)
	$(PY) -m bench llm-memory --results results/memory

perf: $(STAMP)
	$(PY) -m pytest bench/perf -q --benchmark-enable --benchmark-columns=min,median,max -p no:cacheprovider
	$(PY) -m bench perf-step --results results/perf --rounds 7 --budget 400
	$(PY) -m bench perf-inference --results results/perf

notebooks: $(STAMP)
	$(PY) -m bench notebooks --in-place

test: $(STAMP)
	$(PY) -m pytest -q

# The quick tier: the suite less the tests marked slow (subprocesses, notebooks, ViT-B/16-sized models,
# anything over ~5 s); `make test` (CI) runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean:
	rm -rf .venv results/quick .pytest_cache
