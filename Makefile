# The two set-up commands: `make demo` (train the demo preset, write a sample grid) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo needs the package alone; the tests add the dev tools (pytest, ruff, notebook runner).
CORE := $(VENV)/.installed-core
DEV := $(VENV)/.installed-dev
# The browser page's runtime (onnxruntime-web, pinned by export/web/package-lock.json), where npm is.
WEB := export/web/node_modules/.package-lock.json
NPM := $(shell command -v npm 2>/dev/null)

.PHONY: demo test lint bench clean

$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(CORE)

$(DEV): $(CORE)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(DEV)

$(WEB): export/web/package-lock.json
ifneq ($(NPM),)
	npm ci --prefix export/web --ignore-scripts --no-audit --no-fund --loglevel=error
else
	@echo "npm not found: the browser page's test will be skipped (install Node.js and npm to run it)"
endif

demo: $(CORE)
	$(BIN)/kddpm train --preset demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(DEV) $(WEB)
	$(BIN)/ruff check kddpm tests benchmarks export tools
	$(BIN)/python -m pytest -q --durations=20

lint: $(DEV)
	$(BIN)/ruff check kddpm tests benchmarks export tools

bench: $(CORE)
	$(BIN)/python benchmarks/bench_train_and_sample.py

clean:
	rm -rf $(VENV) runs
