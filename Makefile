# gpt2-training - developer entry points.  `make help` lists the targets.
# From a fresh clone:  make train   |   make test

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# cpu (default): torch's CUDA runtime wheels are not installed (use a CPU torch build, e.g. via
# a local wheel directory or PyTorch's CPU wheel index in PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL).
# cuda: also install requirements/cuda.txt (the locked NVIDIA runtime wheels; Linux GPU boxes).
TORCH_VARIANT ?= cpu

REQS_BASE := requirements/lock.txt requirements/dev.txt
ifeq ($(TORCH_VARIANT),cuda)
REQS_BASE += requirements/cuda.txt
endif
REQS_FF := requirements/full-finetuning.txt
REQS_DS := requirements/deepspeed.txt

# The stamp names carry a hash of the pinned requirements, so a re-lock re-installs and an
# unchanged lock makes `make install` instant.
hash_of = $(shell cat $(1) pyproject.toml | sha256sum | cut -c1-12)
STAMP_BASE := $(VENV)/.installed-$(call hash_of,$(REQS_BASE))
STAMP_FF := $(VENV)/.installed-ff-$(call hash_of,$(REQS_BASE) $(REQS_FF))
STAMP_DS := $(VENV)/.installed-ds-$(call hash_of,$(REQS_BASE) $(REQS_FF) $(REQS_DS))

TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
LINT_PATHS := src tests bench 01-Full-Fine-Tuning/train.py
NOTEBOOKS := $(wildcard 01-Full-Fine-Tuning/*.ipynb)

.DEFAULT_GOAL := help
.PHONY: help install install-full-finetuning install-deepspeed train test test-interop lab lint format notebooks \
        bench lock lock-check clean distclean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-24s\033[0m %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(STAMP_BASE): | $(VENV)/bin/python
	rm -f $(VENV)/.installed-*
	$(PIP) install -r requirements/lock.txt -r requirements/dev.txt \
	  $(if $(filter cuda,$(TORCH_VARIANT)),-r requirements/cuda.txt)
	$(PIP) install --no-deps -e .
	touch $@

$(STAMP_FF): $(STAMP_BASE)
	$(PIP) install -r $(REQS_FF)
	touch $@

install: $(STAMP_BASE) ## create .venv and install the locked runtime + dev dependencies
install-full-finetuning: $(STAMP_FF) ## install + the full-finetuning group (deeplake, bitsandbytes, wandb)

# DS_BUILD_OPS=0: no C++/CUDA op is compiled at install; the trainer uses torch's optimizers and gloo/NCCL.
$(STAMP_DS): $(STAMP_FF)
	DS_BUILD_OPS=0 $(PIP) install -r $(REQS_DS)
	touch $@

install-deepspeed: $(STAMP_DS) ## install-full-finetuning + DeepSpeed (no ops compiled); `make test` needs it

train: install-full-finetuning ## CPU quick-start training run
	$(VPY) 01-Full-Fine-Tuning/train.py --config 01-Full-Fine-Tuning/configs/cpu-quickstart.yaml

test: install-deepspeed ## run the test suite (offline)
	$(TEST_ENV) $(VPY) -m pytest $(PYTEST_ARGS)

# Not part of `make test`: it builds .venv-interop (transformers 4.46, optimum-onnx, ONNX Runtime, gguf) and
# downloads llama.cpp's converter; see tools/interop.sh.
test-interop: install ## check a trained model in transformers 4.46, llama.cpp's GGUF converter and ONNX Runtime
	VPY=$(VPY) PYTHON=$(PYTHON) tools/interop.sh

lab: install-full-finetuning ## start JupyterLab on the tutorial
	$(VENV)/bin/jupyter lab 01-Full-Fine-Tuning/

lint: install ## ruff check + format check
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: install ## ruff --fix + ruff format
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

notebooks: install-full-finetuning ## re-execute the tutorial notebooks in place, then clean them
	$(filter-out WANDB_MODE=offline,$(TEST_ENV)) $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace $(NOTEBOOKS)
	$(VPY) tools/clean_notebooks.py $(NOTEBOOKS)

bench: install-full-finetuning ## run the benchmarks
	@if [ -f bench/run_all.py ]; then $(VPY) bench/run_all.py; \
	else for f in bench/*.py; do echo "== $$f"; $(VPY) $$f || exit 1; done; fi

lock: ## re-lock with Poetry (index taken from your pip config) and export requirements/*.txt
	$(if $(wildcard $(VPY)),$(VPY),$(PYTHON)) tools/lock.py

lock-check: ## fail if requirements/*.txt do not match poetry.lock
	$(if $(wildcard $(VPY)),$(VPY),$(PYTHON)) tools/lock.py --check

clean: ## remove caches, run outputs and build artefacts (keeps .venv)
	rm -rf runs/ outputs/ wandb/ build/ dist/ .pytest_cache/ .ruff_cache/ .cache/
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \
	  -o -name .ipynb_checkpoints \) -prune -exec rm -rf {} +

distclean: clean ## clean + remove .venv
	rm -rf $(VENV) .venv-interop
