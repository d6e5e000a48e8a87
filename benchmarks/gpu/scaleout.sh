#!/usr/bin/env bash
# Scale-out checks that one GPU can make (issue 13): `bash benchmarks/gpu/scaleout.sh OUTDIR`.
#   1. device-map: opt-1.3b (random weights, config from $EFFICIENCY_DATA_DIR/architectures) loaded with
#      --eff-device-map auto on the GPU(s) this process sees; reports peak memory per GPU, the placement, the
#      metered NVML indices; bnb4 must skip (it cannot run on a split model) with the reason.
#   2. pinned: opt-125m with `-n 1 --eff-devices auto`: the worker pinned through CUDA_VISIBLE_DEVICES, its GPU
#      metered by PCI bus id.
# Writes OUTDIR/{device-map,pinned}.{json,log} and OUTDIR/scaleout-summary.json; exits non-zero when a check
# fails. On a machine without CUDA it runs the dry check only: --eff-device-map on a CPU run must be a usage error
# (exit 4) naming the option, and the script says so.
set -uo pipefail
out=${1:?usage: scaleout.sh OUTDIR}; mkdir -p "$out"
: "${EFFICIENCY_DATA_DIR:?set EFFICIENCY_DATA_DIR}"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
archs="--eff-random-weights --eff-model-dir $EFFICIENCY_DATA_DIR/architectures"
. "$(dirname "$0")/common.sh"
plugin=$(plugin_option "$py")
pytest_grid() {  # pytest_grid NAME pytest-args...
  local name=$1; shift
  $py -m pytest benchmarks/test_grid.py $plugin -p no:cacheprovider -q -rs \
    --eff-data-dir "$EFFICIENCY_DATA_DIR" --eff-report "$out/$name.json" --eff-history off "$@" 2>&1 | \
    tee "$out/$name.log" | grep -v "^Loading\|^Writing\|it/s\]$"
  return "${PIPESTATUS[0]}"
}

if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "scaleout: no CUDA GPU here: dry check only (--eff-device-map must be refused on a CPU run)"
  pytest_grid dry-cpu --eff-device cpu --eff-device-map auto $archs --eff-models opt-125m --eff-techniques fp32
  rc=$?
  if [ "$rc" -eq 4 ] && grep -q "eff-device-map auto splits a model across CUDA GPUs" "$out/dry-cpu.log"; then
    echo "scaleout: dry check passed: usage error (exit 4) as designed; run on a GPU machine for the real checks"
    exit 0
  fi
  echo "scaleout: dry check FAILED: expected exit 4 naming --eff-device-map, got exit $rc"; exit 1
fi

pytest_grid device-map --eff-device cuda --eff-device-map auto $archs --eff-models opt-1.3b \
  --eff-techniques fp16,bnb4 --eff-max-tokens 8192 --eff-min-window 3
pytest_grid pinned -n 1 --eff-devices auto $archs --eff-models opt-125m --eff-techniques fp16 \
  --eff-max-tokens 8192 --eff-min-window 3

$py - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
problems, summary = [], {}
dm = json.loads((out / "device-map.json").read_text()) if (out / "device-map.json").exists() else {"cases": []}
for c in dm["cases"]:
    mem = c.get("memory") or {}
    row = {"status": c["status"], "reason": c.get("reason"), "peak_bytes": mem.get("peak_bytes"),
           "peak_bytes_by_device": mem.get("peak_bytes_by_device"),
           "device_map": (c.get("model_info") or {}).get("device_map"),
           "energy_j": (c.get("energy") or {}).get("energy_j"),
           "energy_domains": ((c.get("energy") or {}).get("gpu") or {}).get("domains"),
           "nvml": [g.get("nvml_index") for g in ((c.get("conditions") or {}).get("placement") or {}).get("gpus", [])],
           "runtime_median_s": (c.get("runtime") or {}).get("median_s"), "load_s": c.get("load_s")}
    summary[c["id"]] = row
fp16 = summary.get("opt-1.3b-fp16")
if not fp16 or fp16["status"] != "measured":
    problems.append(f"opt-1.3b-fp16 not measured: {fp16}")
elif not fp16["peak_bytes_by_device"] or not fp16["device_map"]:
    problems.append(f"opt-1.3b-fp16: no per-GPU memory or placement: {fp16}")
bnb = summary.get("opt-1.3b-bnb4")
if not bnb or bnb["status"] != "skipped" or "split across GPUs" not in (bnb["reason"] or ""):
    problems.append(f"opt-1.3b-bnb4 should skip (cannot run split): {bnb}")
pinned = json.loads((out / "pinned.json").read_text()) if (out / "pinned.json").exists() else {"cases": []}
plan = (pinned.get("environment") or {}).get("devices")
summary["pinned"] = {"plan": plan, "cases": {c["id"]: {
    "status": c["status"], "placement": (c.get("conditions") or {}).get("placement"),
    "energy_j": (c.get("energy") or {}).get("energy_j"), "energy_reason": (c.get("energy") or {}).get("reason")}
    for c in pinned["cases"]}}
case = summary["pinned"]["cases"].get("opt-125m-fp16")
if not plan or not case or case["status"] != "measured":
    problems.append(f"pinned run: no plan or opt-125m-fp16 not measured: {summary['pinned']}")
elif not (case["placement"] or {}).get("cuda_visible_devices"):
    problems.append(f"pinned run: the worker's CUDA_VISIBLE_DEVICES was not set: {case}")
summary["problems"] = problems
(out / "scaleout-summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
sys.exit(1 if problems else 0)
EOF
