# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= .demo

.PHONY: venv test test-fast demo protos lint-protos lint bench images image-test clean

# The venv is (re)installed when it is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the suite into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
	@touch $(STAMP)

venv: $(STAMP)

protos: venv
	$(PY) protos/generate.py

lint-protos: venv
	cd protos && ../$(VENV)/bin/buf lint && ../$(VENV)/bin/buf breaking --against releases/v0.1.0.binpb

lint: venv
	$(VENV)/bin/ruff check wombat_core services clients tests benchmarks protos/generate.py
	$(VENV)/bin/ruff format --check wombat_core services clients tests benchmarks protos/generate.py

# Runs everything, slow tests included (not the image tests: they need podman, see image-test). pytest
# exits 5 when it collects no tests, which fails the target.
test: venv lint-protos lint
	$(PY) -m pytest tests -m "not images"

test-fast: venv
	$(PY) -m pytest tests -m "not slow"

demo: venv
	$(VENV)/bin/wombat demo --workdir $(DEMO_DIR)

bench: venv
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]' 2> >(grep -v "is ignored: it is neither" >&2)
	$(PY) benchmarks/materialize.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/rrhf.py
	$(PY) benchmarks/reliability.py

# The service images, built with podman from deploy/docker/Dockerfile (deploy/images.sh: a debootstrap
# base, this machine's wheels and runtime flags). Needs podman, buildah, runc and debootstrap.
images:
	deploy/images.sh build

# Runs each image as its pod runs it (read-only, uid 10001, no capabilities) and uses it from the host.
# Fails, never skips, without podman.
image-test: venv images
	$(PY) -m pytest tests/images -m images -s -p no:cacheprovider

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
