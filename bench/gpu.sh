#!/usr/bin/env bash
# bench/compare.py on one NVIDIA GPU (H200 class, about 140 GiB): a LLaMA-style model, 16
# layers at hidden 2048 (1.3 B parameters), sequences of 2048 tokens, bf16 autocast over fp32
# weights; every contender, one process each, one repeat; the batch that fits a 24 GiB limit
# for the contenders that keep the least. Writes bench/out/gpu.{md,json,png} and prints the
# table. The whole run stops starting new processes after BUDGET_S seconds (default 450), so
# it ends within 8 minutes; anything left is listed as not run.
#
#   bash bench/gpu.sh                 # from a checkout with the venv of the README active
#   LAYERS=32 BUDGET_S=1500 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-bench/out}
LAYERS=${LAYERS:-16}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python bench/compare.py --device cuda --dtype bf16 \
  --models llama --layers "$LAYERS" --hidden 2048 --heads 16 --seq 2048 --vocab 32000 \
  --batch 2 --steps 3 --repeats 1 \
  --contenders eager,block_ckpt,compile,ckpt_peak_0.0,torch_0.1,ckpt,ckpt_peak_0.5,torch_0.5,ckpt_uniform,ckpt_megatron \
  --fit eager,block_ckpt,torch_0.1,ckpt_peak_0.0 --limit-mib 24576 --max-batch 64 \
  --budget-s "$BUDGET_S" --timeout 240 \
  --md "$OUT_DIR/gpu.md" --json "$OUT_DIR/gpu.json" --png "$OUT_DIR/gpu.png"
