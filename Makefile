# The two commands a new user needs; each sets everything up itself on a fresh clone.
#   make demo   runs the fine-tuning flow on the offline default (configs/demo.yaml)
#   make test   runs the whole test suite (what CI runs)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

# torch is installed first and pinned: that takes the CPU wheel on disk; an unpinned torch
# (pulled in by another package) would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/vlmops run -c configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf runs mlruns mlartifacts mlflow.db .cache .pytest_cache
