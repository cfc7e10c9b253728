#!/usr/bin/env bash
# The plateau sweep of docs/stage2.md (issue 13): optimizer-level levers, one setting at a time (2 cores).
# Overfit set: 32 starter pairs, eps = 0, 60 steps, scored on themselves. Results: bench/results/stage2_sweep.jsonl.
#   SETTINGS="norm1 norm30" bench/plateau_sweep.sh   (names below; unset: the first sweep; SETTINGS= skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OVERFIT=(--pairs 32 --eval-train --set encode.order=both --set finetune.max_steps=60 --set finetune.batch_size=8
         --set finetune.grad_accum_steps=1 --set finetune.label_smoothing=0.0 --set finetune.learning_rate=1e-3)
declare -A SET=(
  [norm1]="--set finetune.final_norm_lr_multiplier=1"
  [norm30]="--set finetune.final_norm_lr_multiplier=30"
  [norm100]="--set finetune.final_norm_lr_multiplier=100"
  [verdict1]="--set model.untie_verdict_rows=true --set finetune.verdict_lr_multiplier=1"
  [verdict01]="--set model.untie_verdict_rows=true --set finetune.verdict_lr_multiplier=0.1"
  [norm10-verdict1]="--set finetune.final_norm_lr_multiplier=10 --set model.untie_verdict_rows=true --set finetune.verdict_lr_multiplier=1"
  [norm30-warm0]="--set finetune.final_norm_lr_multiplier=30 --set finetune.warmup_ratio=0"
  [norm30-b16]="--set finetune.final_norm_lr_multiplier=30 --set finetune.batch_size=16"
  [lr3e-4-norm100]="--set finetune.learning_rate=3e-4 --set finetune.final_norm_lr_multiplier=100"
  [lr3e-4-norm300]="--set finetune.learning_rate=3e-4 --set finetune.final_norm_lr_multiplier=300"
  [lr1e-4-norm300]="--set finetune.learning_rate=1e-4 --set finetune.final_norm_lr_multiplier=300"
  [lr1e-4-norm1000]="--set finetune.learning_rate=1e-4 --set finetune.final_norm_lr_multiplier=1000"
  [norm300]="--set finetune.final_norm_lr_multiplier=300"
  [b95]="--set finetune.adam_beta2=0.95"
  [norm300-b95]="--set finetune.final_norm_lr_multiplier=300 --set finetune.adam_beta2=0.95"
  [norm30-b95]="--set finetune.final_norm_lr_multiplier=30 --set finetune.adam_beta2=0.95"
  [top20]="--set model.freeze_layers=10"
  [lr3e-3]="--set finetune.learning_rate=3e-3"
  [lr5e-3]="--set finetune.learning_rate=5e-3"
  [lr3e-3-b95]="--set finetune.learning_rate=3e-3 --set finetune.adam_beta2=0.95"
  [seed1]="--set finetune.seed=1"
  [b16]="--set finetune.batch_size=16"
  [b4]="--set finetune.batch_size=4"
  [b2]="--set finetune.batch_size=2"
  [b2-lr2e-3]="--set finetune.batch_size=2 --set finetune.learning_rate=2e-3"
  [b2-lr5e-4]="--set finetune.batch_size=2 --set finetune.learning_rate=5e-4"
  # Full fine-tuning as the paper does it: every layer and the (tied) embeddings, so the verdict rows train.
  [fullft]="--set model.freeze_layers=0 --set finetune.learning_rate=1e-4 --set finetune.adam_beta2=0.95"
)
for name in ${SETTINGS-norm1 norm30 norm100 verdict1 verdict01 norm30-warm0 norm30-b16}; do
  # shellcheck disable=SC2086
  $PY -m bench.stage2_sweep --name "of60-$name" "${OVERFIT[@]}" ${SET[$name]}
done

# Full set (FULL=1): every starter pair, eps = 0.1, the demo's batch, scored on the leak-free starter eval
# (120 in-distribution pairs, stratified, plus every held-out pair) every EVAL_EVERY steps (30).
for name in ${FULL_SETTINGS:-}; do
  # shellcheck disable=SC2086
  $PY -m bench.stage2_sweep --name "full${FULL_STEPS:-60}-$name" --eval-limit 120 --eval-every ${EVAL_EVERY:-30} --set encode.order=both \
    --set finetune.max_steps=${FULL_STEPS:-60} --set finetune.batch_size=8 --set finetune.grad_accum_steps=1 \
    --set finetune.label_smoothing=0.1 --set finetune.learning_rate=1e-3 ${SET[$name]}
done
