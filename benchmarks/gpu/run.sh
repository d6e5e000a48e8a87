#!/usr/bin/env bash
# The GPU runs behind docs/results.md, one mode per call: `bash benchmarks/gpu/run.sh MODE OUTDIR`.
# Expects EFFICIENCY_DATA_DIR (WikiText-2 + architectures) and, on a machine without PyPI, the SmolLM2 GGUF
# already in $EFFICIENCY_CACHE_DIR/smollm2/gguf/. Each mode writes a JSON report and a log to OUTDIR.
set -uo pipefail
mode=$1; out=$2; mkdir -p "$out"
: "${EFFICIENCY_DATA_DIR:?set EFFICIENCY_DATA_DIR}"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
. "$(dirname "$0")/common.sh"
plugin=$(plugin_option "$py")
# A TERM or INT sent to this script (`timeout`, a CI cancel) reaches the running pytest, which then marks its report
# 'interrupted' and writes it; without this the shell died alone and the report stayed 'running'.
suite_pid=
stop() {
  trap - TERM INT
  if [ -n "$suite_pid" ]; then kill -TERM "$suite_pid" 2>/dev/null; wait "$suite_pid"; fi
  exit 143
}
trap stop TERM INT
run() {  # run NAME pytest-args...
  local name=$1; shift
  $py -m pytest benchmarks/test_grid.py $plugin -p no:cacheprovider -q -rs --eff-device cuda \
    --eff-data-dir "$EFFICIENCY_DATA_DIR" --eff-report "$out/$name.json" "$@" \
    > >(tee "$out/$name.log" | grep -v "^Loading\|^Writing\|it/s\]$") 2>&1 &
  suite_pid=$!
  wait "$suite_pid"
  suite_pid=
}
archs="--eff-random-weights --eff-model-dir $EFFICIENCY_DATA_DIR/architectures"
# deploy: compiled bf16 against compiled low-bit kernels, batch-1 decode of 64 tokens after a 128-token prompt;
# perplexity pass over 65536 tokens = 128 windows of 1024 (stride 512), windows per forward chosen automatically.
# int8dq: its pass is the one low-bit pass faster than bf16 measured (1.13x, opt-6.7b, docs/results.md 5f); its decode
# at batch 1 is refused with the reason (cuBLAS's int8 GEMM takes more than 16 rows); DEPLOY_BATCH_SIZES=32 adds a
# serving sweep at those batch sizes, where it decodes.
deploy_techniques=${DEPLOY_TECHNIQUES:-bf16+compile,gemlite-int4+compile,int4wo+compile,gemlite-fp8wo+compile,int8wo+compile,fp8dq+compile,int8dq+compile}
smollm2_deploy=bf16+compile,int4wo-g64+compile,fp8wo+compile,int8wo+compile,int8dq+compile,fp8dq+compile,\
gemlite-int4-g64+compile,gemlite-fp8wo+compile,bf16
deploy() {  # deploy NAME MODEL
  run "$1" $archs --eff-models "$2" --eff-techniques "$deploy_techniques" --eff-baseline bf16+compile \
    --eff-max-tokens "${DEPLOY_MAX_TOKENS:-65536}" --eff-decode-tokens 64 --eff-prefill-tokens 128 \
    --eff-min-window "${DEPLOY_MIN_WINDOW:-3}" --eff-threshold 100000 --eff-history off \
    ${DEPLOY_BATCH_SIZES:+--eff-batch-sizes "$DEPLOY_BATCH_SIZES"}
}
case $mode in
  deploy)    [ "${DEPLOY_PPL_SPEED:-1}" = 1 ] && $py benchmarks/gpu/ppl_speed.py "$out/ppl_speed.json" --model opt-125m 2>&1 | \
               tee "$out/ppl_speed.log"
             for m in ${DEPLOY_MODELS:-opt-6.7b opt-1.3b gpt2-xl}; do deploy "deploy-$m" "$m"; done
             $py benchmarks/gpu/deploy_table.py "$out"/deploy-*.json | tee "$out/deploy_table.md" ;;
  aa)        # A/A (issue 9): N same-commit runs, one process each; analysed by benchmarks/aa/analyse.py
             for i in $(seq -w 1 "${AA_RUNS:-10}"); do
               run "aa-$i" $archs --eff-models opt-125m --eff-techniques fp16 --eff-max-tokens 16384 --eff-rounds 5 \
                 --eff-min-window "${AA_MIN_WINDOW:-1}" --eff-kld-tokens 0 --eff-history off --benchmark-disable --eff-quiet
             done ;;
  probe)     run probe $archs --eff-models opt-125m --eff-techniques fp16,bnb4 --eff-max-tokens 8192 --eff-min-window 3 ;;
  archs)     run archs $archs --eff-models opt-125m,opt-1.3b,opt-6.7b --eff-techniques fp16,bf16,bnb8,bnb4 \
               --eff-max-tokens 32768 ;;
  smollm2)   run smollm2 --eff-models smollm2-135m --eff-techniques fp32,fp16,bf16,bnb8,bnb4,bnb4-fp4 ;;
  smollm2-deploy)  # the deployment techniques on the real SmolLM2 weights: perplexity (65536 tokens) next to speed.
             # Its 576-wide layers take int4 groups of 64 (int4wo and gemlite-int4 at group 128 refuse them).
             run smollm2-deploy --eff-models smollm2-135m --eff-techniques "${DEPLOY_TECHNIQUES:-$smollm2_deploy}" \
               --eff-baseline bf16+compile --eff-max-tokens "${DEPLOY_MAX_TOKENS:-65536}" --eff-decode-tokens 64 \
               --eff-prefill-tokens 128 --eff-min-window "${DEPLOY_MIN_WINDOW:-1}" --eff-threshold 100000 \
               --eff-history off ;;
  gpu-tests) # the tests marked `gpu` (they skip, saying why, without CUDA): run them on each new GPU or software
             $py -m pytest tests/ $plugin -p no:cacheprovider -p no:logging -m gpu -q -rs 2>&1 | tee "$out/gpu-tests.log" ;;
  pruning)   run pruning --eff-models smollm2-135m --eff-max-tokens 65536 --eff-threshold 100000 --eff-techniques \
               ah90,ah80,mag50,mag-2:4,sparsegpt50,sparsegpt-2:4,ah90+bnb4,sparsegpt50+bnb4,minitron-w25,distil-d50 ;;
  pruning-archs) run pruning-archs $archs --eff-models opt-125m,opt-1.3b --eff-max-tokens 32768 --eff-techniques \
               mag50,mag-2:4,sparsegpt50,sparsegpt-2:4 ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
