# The two set-up commands: `make demo` (train the demo preset, write a sample grid) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo needs the package alone; the tests add the dev tools (pytest, ruff, notebook runner).
CORE := $(VENV)/.installed-core
DEV := $(VENV)/.installed-dev

.PHONY: demo test lint bench clean

$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(CORE)

$(DEV): $(CORE)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(DEV)

demo: $(CORE)
	$(BIN)/kddpm train --preset demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(DEV)
	$(BIN)/ruff check kddpm tests benchmarks export tools
	$(BIN)/python -m pytest -q --durations=20

lint: $(DEV)
	$(BIN)/ruff check kddpm tests benchmarks export tools

bench: $(CORE)
	$(BIN)/python benchmarks/bench_train_and_sample.py

clean:
	rm -rf $(VENV) runs
