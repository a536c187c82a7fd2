# Two commands set everything up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench dist gpu-first gpu-second gpu-test gpu-dry-run gpu-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all,test]'   # pip install powergrad alone is the loss (README)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/powergrad demo

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider   # -q is in pyproject's addopts

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy   # files and settings: [tool.mypy] in pyproject.toml

dist: $(STAMP)   # the sdist and wheel, checked as PyPI would
	rm -rf dist
	$(BIN)/python -m build --outdir dist
	$(BIN)/twine check --strict dist/*

bench: $(STAMP)
	$(BIN)/python benchmarks/loss.py

# The GPU runs, for a borrowed GPU machine with PyTorch but no network and no install rights:
# its own python3, this source tree on PYTHONPATH, no venv (docs/performance.md, "On a GPU").
# Each command ends within 8 minutes; results go to GPU_OUT ($OUT where the machine sets it):
# <run>.jsonl (a line per step, as it finishes), <run>.md (the table), <run>.log.
GPU_PYTHON ?= python3
GPU_OUT ?= $(or $(OUT),runs/gpu)
SHARED_DATA ?= ../shared/data
GPU_RUN := PYTHONPATH=src $(GPU_PYTHON) -m benchmarks.gpu

gpu-first:   # correctness, syncs, resnet20-jpeg eager and compiled, resume, DDP, ResNet-50 formats
	$(GPU_RUN) first --out $(GPU_OUT)

gpu-second:  # CIFAR-10 to 94% against airbench94, ResNet-50 compiled, streaming decode
	$(GPU_RUN) second --out $(GPU_OUT)

gpu-test:    # the GPU correctness tests (skipped without CUDA); the C++ op is CPU-only: off
	POWERGRAD_CPU_KERNEL=0 PYTHONPATH=src $(GPU_PYTHON) -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py

gpu-dry-run: # the first run at tiny sizes on the CPU (what tests/test_gpu_harness.py runs)
	$(GPU_RUN) first --dry-run --out $(GPU_OUT)-dry-run

# CIFAR-10 (JPEG) for the GPU machine: gzip -1 of the shared tar (92.7 MB -> ~20 MB), in the
# ignored .data/ (send it along: the tool's carry=[".data"]); fails if tree + data >= 64 MiB.
gpu-data: .data/cifar10-jpeg.tar.gz
	PYTHONPATH=src $(GPU_PYTHON) -m benchmarks.gpu.carry

.data/cifar10-jpeg.tar.gz: $(SHARED_DATA)/cifar10-jpeg.tar
	mkdir -p .data
	gzip -1 -c $< > $@.tmp
	mv $@.tmp $@

clean:
	rm -rf $(VENV) runs build dist *.egg-info src/*.egg-info
