# Targets document themselves: `make help`.
PY ?= python3
VENV ?= .venv
# CPU torch by default (what CI and a laptop need); on a GPU machine use its own torch:
#   make install TORCH_SPEC=   (empty: keep the installed torch)
TORCH_SPEC ?= torch==2.13.0
# installed with the CPU torch (not on a GPU machine, whose torch pins its own): the version
# the GPU machines' torch ships, so that the CPU suite runs the Triton kernels under Triton's
# interpreter (tests/test_ops.py, test_attention.py, test_quant.py) instead of skipping them
TRITON_SPEC ?= triton==3.6.0; platform_system == "Linux" and platform_machine == "x86_64"
BIN := $(VENV)/bin

.PHONY: help install demo test test-cuda lint format clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/.installed: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)" '$(TRITON_SPEC)')
	LX2V_SKIP_CUDA_BUILD=1 $(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed  ## create .venv with lightx2v and its test tools

demo: install  ## run the embedded tiny model end to end (random weights) -> demo.mp4
	$(BIN)/lx2v run -o demo.mp4

test: install  ## the CPU test suite (GPU tests marked cuda are skipped without a GPU)
	$(BIN)/python -m pytest -q

test-cuda:  ## GPU tests only, with the current python (on the GPU machine)
	$(PY) -m pytest -q -m cuda

lint:  ## ruff check + format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:  ## ruff format + autofix
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:  ## remove build outputs (keeps .venv)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
