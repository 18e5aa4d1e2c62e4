# Targets people expect: setup, test, lint, demo, bench. Everything runs inside .venv.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := fluidsynth fluid-soundfont-gm ffmpeg chromium chromium-driver

.PHONY: setup apt venv test test-slow lint format demo bench bench-release clean

setup: apt venv

# System packages: FluidSynth + General MIDI soundfont render the synthetic corpus; ffmpeg decodes the audio formats
# soundfile cannot (musicflamingo/audio/io.py); chromium + chromium-driver run the server page's browser test.
# Installed only when missing (a second `make setup` checks and does nothing); python3-venv too where this
# Python cannot make a venv. No apt-get (not Debian): says what to install where it is missing.
SOUNDFONT := /usr/share/sounds/sf2/FluidR3_GM.sf2
apt:
	@if command -v apt-get >/dev/null 2>&1; then \
	  missing=""; for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	  done; \
	  $(PY) -c "import ensurepip" >/dev/null 2>&1 || [ -x $(BIN)/pip ] || missing="$$missing python3-venv"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	    elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	    else echo "make setup: the Debian packages$$missing are missing and installing them needs root: run" \
	      "'apt-get install$$missing' as root (or install sudo), then make setup again" >&2; exit 1; fi; \
	    echo "make setup: installing the Debian packages$$missing"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	else \
	  missing=""; for c in fluidsynth ffmpeg; do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	  [ -f $(SOUNDFONT) ] || missing="$$missing $(SOUNDFONT) (a General MIDI soundfont)"; \
	  if [ -n "$$missing" ]; then \
	    echo "make setup: no apt-get here, so nothing is installed; missing:$$missing (make demo and the tests" \
	      "that render audio need them: install them with this system's package manager)" >&2; \
	  fi; \
	fi

# pip, not python: a venv whose creation failed (no ensurepip) has a python and no pip, and is made again.
$(BIN)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/pip || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

# Two pytest workers of one OpenMP thread each (tests/conftest.py gives each worker its share of the cores): most
# tests are tiny models and child processes that one thread runs as fast as two. TEST_WORKERS=1 runs them serially.
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=120

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

# Caches only: outputs/ holds trained models, evaluations and the demo's run (delete it yourself).
clean:
	rm -rf .pytest_cache .ruff_cache
