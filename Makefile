# The two commands a new user needs; each sets everything up itself on a fresh clone.
#   make demo   runs the fine-tuning flow on the offline default (configs/demo.yaml)
#   make test   runs the whole test suite (what CI runs)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv system-packages serve stop clean

# Debian packages the integration and browser tests run for real: a PostgreSQL server
# (tests/integration/test_postgres_stack.py), docker-compose to validate infra/'s compose
# file without a daemon, and Chromium for the browser test. Installed only where missing
# and where apt-get can run (CI, a root container); elsewhere those tests say what to install.
SYSTEM_PACKAGES := postgresql docker-compose chromium

system-packages:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

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

test: $(STAMP) system-packages
	$(BIN)/python -m pytest

# A local Prefect server, MLflow server and worker on loopback, with every deployment of
# prefect.yaml; prints the two UI addresses. `make stop` stops them and all they spawned.
serve: $(STAMP)
	infra/local/serve.sh

stop:
	infra/local/stop.sh

clean:
	rm -rf runs mlruns mlartifacts mlflow.db .cache .pytest_cache .vlmops-stack
