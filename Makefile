# Targets people expect: setup, test, lint, demo, bench. Everything runs inside .venv.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := fluidsynth fluid-soundfont-gm ffmpeg chromium chromium-driver

.PHONY: setup apt venv test test-slow lint format demo bench bench-release clean

setup: apt venv

# System packages: FluidSynth + General MIDI soundfont render the synthetic corpus; ffmpeg lets torchcodec decode.
apt:
	@if command -v apt-get >/dev/null 2>&1; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	fi

$(BIN)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

test: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

demo: setup
	$(BIN)/python -m musicflamingo.demo

bench: venv
	$(BIN)/python bench/run.py

# The 8.27 B release shape on this machine, ours vs the reference (writes a 16.5 GB random checkpoint once).
bench-release: venv
	$(BIN)/python bench/release.py

clean:
	rm -rf outputs .pytest_cache
