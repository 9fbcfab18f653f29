# Two commands are the whole quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo ps-demo test lint setup clean

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

# The main job: async RL on a tiny model (about 5 minutes on 2 cores); see runs/<name>/report.md.
demo: setup
	$(PY) -m miniray.rl.demo

ps-demo: setup
	$(PY) examples/parameter_server_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
