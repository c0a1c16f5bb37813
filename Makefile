# `make test` and `make demo` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-mlx test-onnx demo fixtures speech clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch is installed first and by exact version: on Linux x86_64 the local pip setup serves the CPU
# build for `torch==2.13.0`, whereas an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-mlx: $(STAMP)
	$(PY) -m pytest -m mlx $(PYTEST_ARGS)

test-onnx: $(STAMP)
	$(PY) -m pytest -m onnx $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/parity demo

fixtures: $(STAMP)
	$(VENV)/bin/parity fixtures

# Regenerates the committed speech fixtures (needs Debian's espeak-ng and sox).
speech: $(STAMP)
	$(PY) -m fixtures.make_speech

clean:
	rm -rf .cache .pytest_cache .hypothesis
