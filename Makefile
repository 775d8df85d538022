# Set-up is part of each target: a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-fast clean

$(BIN)/multiflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel, so nothing pulls a CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test]"
	touch $@

## demo: Steps 1-3 on the bundled (trained) demo model, the pruned model in out/, then what it cost
demo: $(BIN)/multiflow
	HF_HUB_OFFLINE=1 $(BIN)/multiflow run --target-sparsity 0.5 --output out/ --overwrite
	HF_HUB_OFFLINE=1 $(BIN)/multiflow eval --model out/ --reference src/multiflow/demo_model --nsamples 500

## test: the whole test suite, offline, on CPU
test: $(BIN)/multiflow
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

## test-fast: the suite without the tests marked slow
test-fast: $(BIN)/multiflow
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) out
