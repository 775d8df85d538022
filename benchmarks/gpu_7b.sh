#!/usr/bin/env bash
# One prepared command for a GPU machine (about 5-8 minutes on one H100): write the LLaVA-1.5-7B-shaped
# checkpoint (random fp16, 14 GB), then time `multiflow run --device cuda` (Step 1 distribute, Step 2
# calibrate block by block on the GPU, Step 3 prune) in fp16 and bf16, 8 samples, and print the table.
#
#   bash benchmarks/gpu_7b.sh                    # results under $OUT (device tool) or ./gpu-results
#
# Needs python3 with torch (CUDA), transformers >= 5, safetensors, accelerate, numba, tqdm, pillow,
# scikit-image, matplotlib, pyyaml (the GPU image has them); multiflow runs from src/ (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
RESULTS=${OUT:-$PWD/gpu-results}
mkdir -p "$RESULTS"
CHECKPOINT=${CHECKPOINT:-/tmp/llava-7b-hub-fp16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu.txt" || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
$PY benchmarks/make_llava7b_checkpoint.py "$CHECKPOINT" --threads "$(nproc)"
$PY benchmarks/bench_run_7b.py --checkpoint "$CHECKPOINT" --scratch /tmp/mf-run --device cuda \
    --variant fp16 --variant bf16 --results "$RESULTS" 2>&1 | tee "$RESULTS/table.txt"
