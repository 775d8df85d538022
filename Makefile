# Set-up is part of each target: a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test bench-step1 clean

$(BIN)/multiflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel, so nothing pulls a CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test]"
	touch $@

## demo: Step 1 on the bundled demo model (tiny LLaVA, random seeded weights), outputs in out/
demo: $(BIN)/multiflow
	HF_HUB_OFFLINE=1 $(BIN)/multiflow distribute --target-sparsity 0.5 --output out/

## test: the whole test suite, offline, on CPU
test: $(BIN)/multiflow
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out
