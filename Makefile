# One entry point per chore. `make serve` starts a demo server. `make test` is what CI runs (.ci/run): it creates
# the virtualenv, installs everything, checks lint and types, and runs the whole suite (PostgreSQL is found or
# started by tests/conftest.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install serve test check lint format typecheck pytest bench dist clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fusillade needs Python 3.11 or newer: set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# `fusillade serve` on ./fusillade.db, http://$(HOST):$(PORT) (default 127.0.0.1:8080; `make serve PORT=9000`),
# with the fake upstream in the same process: every model goes to it. A demo: for real upstreams, route models in
# a configuration file (docs/configuration.md).
serve: install
	$(PY) -m fusillade serve --mock-upstream --host $(HOST) --port $(PORT)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

typecheck: install
	$(PY) -m mypy

# Two workers for most tests (many wait on processes, sockets and timers); those that measure a rate or a
# latency (marker `solo`) run afterwards, alone.
pytest: install
	$(PY) -m pytest -n 2 -m "not solo" $(PYTEST_ARGS)
	$(PY) -m pytest -m solo $(PYTEST_ARGS)

check: lint typecheck

test: check pytest

# The daemon's benchmark runs against Debian's nginx (installed here when missing, which needs root; or set
# FUSILLADE_BENCH_NGINX to another nginx binary).
bench: install
	@test -n "$$FUSILLADE_BENCH_NGINX" || test -x /usr/sbin/nginx || (apt-get install -y -qq --no-install-recommends nginx || (apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx))
	$(PY) bench/daemon_throughput.py
	$(PY) bench/queue_throughput.py
	$(PY) bench/upload_memory.py
	$(PY) bench/run_memory.py
	$(PY) bench/latency_bound.py
	$(PY) bench/first_request.py
	$(PY) bench/write_statement.py
	$(PY) bench/adaptive_limit.py --runs 1
	$(PY) bench/rate_limit.py

# The sdist and the wheel in dist/ (tests/packaging builds them too, and installs the wheel in a clean virtualenv).
dist: install
	rm -rf dist
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache dist build
