# Two commands set everything up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench dist gpu-check clean

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

# The CUDA path in one command (<= 20 minutes on one H100): gpu_suite.json and gpu_suite.md in
# GPU_OUT. CIFAR-10 (JPEG) from POWERGRAD_DATA (a folder, or one holding cifar10-jpeg.tar).
GPU_OUT ?= runs/gpu-check
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_suite.py --out $(GPU_OUT)

clean:
	rm -rf $(VENV) runs build dist *.egg-info src/*.egg-info
