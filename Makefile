# Two commands are the whole quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# constraints.txt pins the exact set `make test` last passed with (`make upgrade` moves it).
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)
# `make upgrade` runs the suite in a scratch virtualenv it filled itself, without the pins.
ifeq ($(SKIP_INSTALL),1)
INSTALL :=
else
INSTALL := setup
endif

.PHONY: demo ps-demo test lint setup upgrade test-min clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[torch,rl,ray,wandb,mlflow,dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

LINT_PATHS := $(wildcard src tests benchmarks examples ml tools)

lint: $(INSTALL)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy src/miniray

test: lint
	$(PY) -m pytest -q -rs

# The main job: async RL on a tiny model (about 5 minutes on 2 cores); see runs/<name>/report.md.
demo: setup
	$(PY) -m miniray.rl.demo

ps-demo: setup
	$(PY) examples/parameter_server_demo.py

# Newest versions pyproject.toml allows, in a scratch venv; constraints.txt is rewritten only
# if the whole suite passes there.
upgrade:
	$(PYTHON) tools/refresh_constraints.py

# pyproject.toml's lower bounds, installed exactly in .venv-min, against the test suite.
test-min:
	$(PYTHON) tools/refresh_constraints.py --minimum

clean:
	rm -rf $(VENV) .venv-upgrade .venv-min .pytest_cache .ruff_cache .mypy_cache
