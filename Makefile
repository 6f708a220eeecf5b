# Set-up and entry points. `make demo` and `make test` work on a fresh clone: each creates
# .venv when missing, installs the pinned packages (the ffmpeg binary comes with the
# imageio-ffmpeg wheel) and then runs. Re-running skips what is already done.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install demo test test-fast lint dry-run clean-demo

help:
	@echo "make demo     set up .venv and run the embedded demo DAG (snakemake --cores $(CORES) all)"
	@echo "make test     set up .venv and run the test suite (pytest)"
	@echo "make test-fast  the fast tier only (pytest -m 'not slow': no Snakemake, SLURM or fault runs)"
	@echo "make lint     ruff format --check, ruff check, lint-imports (layers), snakemake --lint, snakefmt --check, mkdocs build --strict"
	@echo "make dry-run  show the demo DAG's jobs without running them"

$(STAMP): pyproject.toml requirements.lock
	@if [ ! -x "$(BIN)/python" ]; then \
	  echo ">> creating $(VENV) with $$($(PYTHON) --version)"; \
	  $(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' \
	    || { echo "error: Python 3.11, 3.12 or 3.13 is required (set PYTHON=/path/to/python3.X)"; exit 1; }; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@echo ">> installing pinned packages into $(VENV) (first time: a few minutes, torch is large)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -c requirements.lock xares==0.1.3  # test oracle, see pyproject
	@$(BIN)/python -c 'from dasheng_pipeline.common.audio import ffmpeg_exe; print(">> ffmpeg:", ffmpeg_exe())'
	@touch $(STAMP)

install: $(STAMP)
	@echo ">> $(VENV) is ready"

demo: $(STAMP)
	@echo ">> running the demo DAG: snakemake --cores $(CORES) all (config/config.yaml)"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) all
	@echo ">> writing the HTML report: snakemake --report results/demo/report.html"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --report results/demo/report.html all
	@echo ">> done: results/demo/eval/results/scores.md (tables), results/demo/report.html (report)"

test: lint
	@echo ">> running the tests: pytest"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: lint
	@echo ">> running the fast tests: pytest -m 'not slow'"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	@echo ">> checking the code's format and style (ruff), the layers (lint-imports), the workflow (snakemake --lint), its format (snakefmt --check) and the docs site (mkdocs build --strict: a broken link fails)"
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

dry-run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --dry-run all

clean-demo:
	rm -rf results/demo logs/demo .snakemake
