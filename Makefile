# Every target sets itself up on a fresh machine: the virtualenv at .venv, the pinned packages, the data.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup data notebooks clean

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

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
