# The two commands of the README: `make train` and `make test`. Each sets itself up on
# first use (a virtual environment in .venv with torch from this machine's local disk)
# and is quick once set up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data/cifar10-jpeg.zip)
ifneq ($(wildcard $(SHARED_DATA)),)
export FASTCIFAR_DATA ?= $(SHARED_DATA)
endif
ARGS ?=

.PHONY: setup train test lint bench
setup: $(VENV)/.installed

# The native extension (kernels/, CMakeLists.txt) builds against the venv's torch, so the
# build runs without isolation, with its tools installed first.
$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard kernels/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet "scikit-build-core>=0.10" "cmake>=3.26" ninja
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[dev,track,dali]'
	touch $@

train: setup
	$(BIN)/fastcifar train --arch cerberus --amp $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest $(ARGS)

bench: setup
	$(BIN)/python -m pytest benchmarks/ --benchmark-only $(ARGS)
