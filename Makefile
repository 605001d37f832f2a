# Every target sets itself up on a fresh machine: the virtualenv at .venv, the pinned packages, the data.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup data notebooks bench bench-setup clean

demo: setup data          ## the seed flow on Fashion-MNIST: train sparse, prune, compare
	$(BIN)/python -m fasterai.demo

test: setup data          ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -q -c constraints.txt -e '.[dev]'
	touch $@

data:                     ## Fashion-MNIST from Debian's dataset-fashion-mnist package
	@sh scripts/get-fashion-mnist.sh

notebooks: setup data     ## re-execute the notebooks in place, outputs included
	$(BIN)/python scripts/run_notebooks.py --write

bench-setup: setup       ## the benchmark peers, installed beside fasterai, never its dependencies
	$(BIN)/pip install --progress-bar off -q torch-pruning==1.6.1 einops==0.8.2
	test -d bench/.peer/fasterai || $(BIN)/pip install --progress-bar off -q --no-deps --target bench/.peer fasterai==0.4.1

bench: bench-setup data   ## every benchmark table and plot in bench/results (BENCHMARKS.md collects them)
	$(BIN)/python bench/prune_time.py --out bench/results/prune_time.md
	$(BIN)/python bench/memory.py --out bench/results/memory.md
	$(BIN)/python bench/trace_modes.py --out bench/results/trace_modes.md
	$(BIN)/python bench/shortcuts.py --out bench/results/shortcuts.md
	$(BIN)/python bench/callback_overhead.py --out bench/results/callback_overhead.md
	$(BIN)/python bench/latency.py --out bench/results/latency.md
	$(BIN)/python bench/timed_values.py --out bench/results/timed_values.md
	$(BIN)/python bench/width_steps.py --out bench/results/width_steps.md
	$(BIN)/python bench/timing_noise.py --out bench/results/timing_noise.md
	$(BIN)/python bench/latency_model.py --out bench/results/latency_model.md
	$(BIN)/python bench/allocator.py --out bench/results/allocator.md
	$(BIN)/python bench/accuracy.py --out bench/results/accuracy.md
	$(BIN)/python bench/collect.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
