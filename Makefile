# The two commands a newcomer needs:
#   make demo   - install, then bring the whole system up and predict through it
#   make test   - install, then lint, type-check and run the full test suite
# Both create .venv on first use (Python >= 3.11 required).

PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo up test lint unit bench bench-quick bench-backends bench-repository bench-bulk-baseline clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "predictq needs Python >= 3.11, found " + sys.version' 
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/predictq up --demo

up: $(STAMP)
	$(BIN)/predictq up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict workers producer predictq predictq_ops

test: lint
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest tests/test_batcher.py tests/test_codec.py tests/test_settings.py tests/test_validation.py \
		tests/test_structure.py tests/test_layering.py

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

bench-backends: $(STAMP)
	$(BIN)/python -m bench.backends

bench-repository: $(STAMP)
	$(BIN)/python -m bench.repository

bench-bulk-baseline: $(STAMP)
	$(BIN)/python -m bench.bulk_baseline

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench/results
