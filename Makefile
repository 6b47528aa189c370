# FedMoE: `make demo` runs the demo, `make test` runs the tests. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a GPU machine use e.g. `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint format bench bench-quick clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/fedmoe demo

# Two pytest processes (pytest-xdist): most tests wait on real servers and subprocesses, so
# the suite takes about half the wall time of one process on 2 cores.
test: setup lint browser
	$(BIN)/pytest -q -n 2

# The dashboard test drives Debian's Chromium (Playwright uses it; it downloads no browser).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

lint: setup
	$(BIN)/ruff check fedmoe tests benchmarks *.py
	$(BIN)/ruff format --check fedmoe tests benchmarks *.py
	$(BIN)/mypy

# The long measurements (about 20 minutes in all on 2 CPU cores); each writes its raw
# results to benchmarks/results/*.json and re-renders benchmarks/RESULTS.md from them
# (python -m benchmarks.render). bench-quick is a smoke run: its JSON goes to a temp dir.
BENCHES := quality_bench async_bench worker_speed_bench coordinator_bench routing_bench serve_bench strategy_bench sync_bench realsize_bench trust_bench forget_bench

bench: setup
	for b in $(BENCHES); do $(BIN)/python -m benchmarks.$$b || exit 1; done

bench-quick: setup
	for b in $(BENCHES); do $(BIN)/python -m benchmarks.$$b --quick || exit 1; done

format: setup
	$(BIN)/ruff format fedmoe tests benchmarks *.py
	$(BIN)/ruff check --fix fedmoe tests benchmarks *.py

clean:
	rm -rf $(VENV) demo_output logs run fedmoe_state .pytest_cache
