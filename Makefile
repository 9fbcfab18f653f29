# Two commands are the whole quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint setup clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,rl,ray,dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

LINT_PATHS := $(wildcard src tests benchmarks examples ml)

lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy src/miniray/runtime src/miniray/errors.py

test: lint
	$(PY) -m pytest -q -rs

demo: setup
	$(PY) examples/parameter_server_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
