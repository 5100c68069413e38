# Two commands on a fresh machine: `make run` and `make test` (see README).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= examples/minilm.yaml

.PHONY: run test venv protos lint typecheck unit kube preload clean system-deps

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	# constraints.txt pins every transitive dependency (seed 002); torch comes from the local CPU wheel.
	# The dev extra brings the daemon and operator extras (exact pins); the base install is
	# only the client (README: In a training pod).
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## The main job: the daemon on the bundled all-MiniLM-L6-v2, gRPC on :50051, metrics on :9400.
run: $(STAMP)
	$(BIN)/python -m modelcache.examples write-default $(CONFIG)
	$(BIN)/modelcache serve --config $(CONFIG) --port 50051 --metrics-port 9400

protos: $(STAMP)
	bash hack/gen-protos.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check modelcache tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

system-deps:
	bash hack/system-deps.sh

## Everything CI runs: lint, types, unit + integration tests, and the real control plane tests.
NODE_BUILD_LOG := $(or $(TMPDIR),/tmp)/modelcache-kube-node-build.log

test:
	@# The kube binaries and the node's images (minutes on a fresh machine, cached outside
	@# the repository) build while the virtual environment installs.
	bash hack/kube-node.sh build >$(NODE_BUILD_LOG) 2>&1 & build=$$!; \
	  $(MAKE) --no-print-directory $(STAMP) system-deps || { wait $$build; exit 1; }; \
	  wait $$build || { tail -40 $(NODE_BUILD_LOG); exit 1; }; tail -3 $(NODE_BUILD_LOG)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check modelcache tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -ra --tb=short --durations=15

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
