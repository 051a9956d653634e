# The two commands of README.md. Each sets up .venv on first use (torch pinned to the CPU wheel), then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench-gate

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,bench,deepspeed,dali]"
	touch $@

demo: setup
	$(BIN)/python -m engine.demo

# the unit tests, then every benchmark once as a smoke test (timings belong to `pytest benchmarks/ --benchmark-only`)
test: setup
	$(BIN)/python -m pytest tests -q
	$(BIN)/python -m pytest benchmarks -q --benchmark-disable

# the regression gate on a GPU session's committed results (benchmarks/README.md):
#   make bench-gate RESULTS=benchmarks/results/<date>_<device> [THRESHOLD=0.10]
THRESHOLD ?= 0.10
bench-gate: setup
	@test -n "$(RESULTS)" || { echo "usage: make bench-gate RESULTS=benchmarks/results/<date>_<device>"; exit 2; }
	$(BIN)/python benchmarks/gate.py --current $(RESULTS)/bench_*.json --threshold $(THRESHOLD)
