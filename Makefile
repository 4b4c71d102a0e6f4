# Two commands on a fresh machine (Python 3.11): `make repro` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
# dvc.yaml's commands say `python`: make it the venv's
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup lock repro test test-fast bench bench-torch study compare tune ui mlflow-server sysdeps clean-venv

setup: $(STAMP)

$(STAMP): requirements.lock requirements-nodeps.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (this project needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .   # the `srgan` command; code stays in src/
	touch $(STAMP)

# Re-pin requirements.lock from pyproject.toml's direct dependencies (needs the package index).
lock: setup
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra test --extra export --python-version 3.11 \
	  --annotation-style line -o requirements.lock

# Main job: the whole DVC pipeline on the embedded (offline) sample set.
repro: setup
	dvc repro

# System packages the browser and PostgreSQL tests use (Debian/Ubuntu, root only).
# Without them those tests are skipped with a message saying so.
sysdeps:
	@if command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium postgresql >/dev/null; \
	else echo "note: chromium/postgresql missing and not root: browser and PostgreSQL tests will be skipped"; fi

# Test files run in parallel (pytest-xdist; a file's tests stay on one worker, so its shared fixtures
# are built once), one worker more than the cores: several tests wait on servers, locks and child
# processes, and a third worker filled that idle time on 2 cores (docs/MEASUREMENTS.md); TEST_WORKERS=0
# runs them in this process.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
test: setup sysdeps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=10

# Unit tests are CPU-bound, with no costly shared fixtures: one worker per core, spread test by test.
FAST_WORKERS ?= auto
test-fast: setup
	$(BIN)/python -m pytest -q -n $(FAST_WORKERS) --dist load -m "not slow"

bench: setup
	$(BIN)/python src/bench.py $(if $(wildcard $(TORCH_VENV)/bin/python),--torch-python $(TORCH_VENV)/bin/python)

# The PyTorch peer's interpreter (a venv of its own: torch is not a project requirement), then the
# paper-size networks in both frameworks side by side (the README's PyTorch table).
TORCH_VENV := .venv-torch
TORCH_VERSION ?= 2.13.0
$(TORCH_VENV)/bin/python:
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION) numpy
bench-torch: setup $(TORCH_VENV)/bin/python
	$(BIN)/python src/bench.py --target-config --only steps,torch --variants onednn,onednn+bf16 \
	  --torch-python $(TORCH_VENV)/bin/python --out reports/bench-torch.json

# The loss study: every adversarial objective and the control x study.seeds from the one SRResNet -> reports/compare/
study: setup
	$(BIN)/python src/compare.py --run

compare: setup
	$(BIN)/python src/compare.py

tune: setup
	$(BIN)/python src/tune.py

# Browse every run: the repository's store, and the link that opens it in the model-training view
ui: setup
	@$(BIN)/python -c "from srgan import config, tracking; print('open', tracking.ui_link(config.load().tracking.experiment, base='http://$(MLFLOW_HOST):$(MLFLOW_PORT)'))"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

mlflow-server: setup
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlflow-server.db \
	  --artifacts-destination ./mlartifacts --serve-artifacts \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

clean-venv:
	rm -rf $(VENV)
