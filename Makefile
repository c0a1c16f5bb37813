# `make test` and `make demo` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# PyTorch's CPU wheel index for `make install` on Linux, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# PyPI's Linux torch wheel is the multi-GB CUDA build; the workflows set this (see .ci/run).
# Unset (the default), pip's own configuration decides where torch comes from.
TORCH_INDEX ?=
# A JUnit XML report of the test targets, e.g. `make test JUNIT=reports/junit/tests.xml` (CI artifacts).
JUNIT ?=
PYTEST := $(PY) -m pytest $(if $(JUNIT),--junitxml=$(JUNIT))

.PHONY: install lint test test-mlx test-onnx demo fixtures speech clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch is installed first and by exact version, so that the extras below find it satisfied: on
# Linux x86_64 an unpinned resolve from PyPI would pull the multi-GB CUDA build. With TORCH_INDEX
# set, torch (and only torch) comes from that index; the local pip setup here serves the CPU
# build for `torch==2.13.0` without it.
$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all]'
	# mlx-audio's nemotron_asr (a peer backend): without its declared dependencies (see pyproject's mlx-audio extra).
	$(PY) -m pip install --quiet --no-deps -c constraints.txt mlx-audio==0.6.2
	touch $(STAMP)

install: $(STAMP)

# ruff (style and errors) and import-linter (the package layers in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The default suite runs on every core (pytest-xdist), a test module to a worker at a time (--dist loadfile: a
# module's fixtures are built once, in one worker); at most 4 workers, since each holds its own fixture backends
# (NeMo, ONNX Runtime, MLX). PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(PYTEST) -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile $(PYTEST_ARGS)

test-mlx: $(STAMP)
	$(PYTEST) -m mlx $(PYTEST_ARGS)

test-onnx: $(STAMP)
	$(PYTEST) -m onnx $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/parity demo

fixtures: $(STAMP)
	$(VENV)/bin/parity fixtures

# Regenerates the committed speech fixtures (needs Debian's espeak-ng and sox).
speech: $(STAMP)
	$(PY) -m streaming_parity.fixtures.make_speech

clean:
	rm -rf .cache .pytest_cache .hypothesis
