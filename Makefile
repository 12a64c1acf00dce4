# Every target sets itself up on a fresh machine: it creates .venv and installs the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps k8s-deps image sbom run test check lint format typecheck proto bench clean lock

# Installs exactly what requirements/dev.lock pins, then the project itself (no dependency resolution).
$(STAMP): pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

## system-deps: PostgreSQL and Redis servers for the connector tests (Debian packages, when root)
system-deps:
	bash scripts/system-deps.sh

## k8s-deps: a real kube-apiserver + controller manager for the operator tests (built once, cached;
## installs golang/etcd Debian packages when root)
k8s-deps:
	bash scripts/k8s-apiserver.sh

## image: the container image etlrouter:VERSION (also tagged etlrouter:test) with buildah, rebuilt only when
## its inputs changed; prints its size and `etlrouter --help` from it; its SBOM in artifacts/ (docs/image.md)
image:
	bash scripts/image-build.sh
	bash scripts/image-sbom.sh

## sbom: the image's CycloneDX SBOM and licence list in artifacts/ (part of `make image`)
sbom:
	bash scripts/image-sbom.sh

## run: the main job — a local cluster moving records through the sample pipelines
run: $(STAMP)
	$(BIN)/etlrouter dev

## test: the whole test suite
test: $(STAMP) system-deps k8s-deps image
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## check: lint, format, types, generated code, locks against pyproject, a warning-free build
check: lint typecheck
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/python scripts/check_lock.py
	$(BIN)/python scripts/check_packaging.py

## lock: re-resolve requirements/*.lock from pyproject.toml (after changing a dependency, or to upgrade:
## `make lock UPGRADE=--upgrade`); the build backend pin in pyproject is raised by hand beside it
LOCK = $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --custom-compile-command "make lock" --quiet $(UPGRADE)
lock: $(STAMP)
	$(LOCK) --extra connectors --extra tracing -o requirements/runtime.lock
	$(LOCK) --extra dev -o requirements/dev.lock

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

## proto: regenerate src/etlrouter/_proto from proto/
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

## bench: every benchmark of benchmarks/ (the README's table), one after another; BENCH="codec raft" for some
BENCH ?= codec sdk transport wal raft flow placement dsl control_plane pipeline e2e
bench: $(STAMP)
	$(BIN)/pip install --quiet bytewax==0.21.1  # e2e.py's peer row (not a dependency of the project)
	@set -e; for b in $(BENCH); do echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
