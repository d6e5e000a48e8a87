#!/usr/bin/env bash
# The serving sweep of docs/results.md (issue 12): opt-1.3b (random weights) at batch 1, 8, 32, 128, prompts of
# 128 tokens, exactly 64 new tokens, one energy window of >= 3 s per batch size, for each technique given.
# `bash benchmarks/gpu/quality_serving.sh OUTDIR [TECHNIQUES]`; expects EFFICIENCY_DATA_DIR (WikiText-2 +
# architectures). Writes OUTDIR/serving.json, serving.png and serving.log.
set -uo pipefail
out=$1; techniques=${2:-bf16,bnb4}; mkdir -p "$out"
: "${EFFICIENCY_DATA_DIR:?set EFFICIENCY_DATA_DIR}"
export PYTHONUNBUFFERED=1
${PYTHON:-python3} benchmarks/gpu/quality_serving.py --model opt-1.3b --random-weights \
  --model-dir "$EFFICIENCY_DATA_DIR/architectures" --data-dir "$EFFICIENCY_DATA_DIR" --techniques "$techniques" \
  --batch-sizes "${BATCH_SIZES:-1,8,32,128}" --input-tokens 128 --output-tokens 64 --min-window "${MIN_WINDOW:-3}" \
  --out "$out" 2>&1 | tee "$out/serving.log" | grep -v "it/s\]$"
