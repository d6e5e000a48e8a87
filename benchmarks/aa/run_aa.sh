#!/usr/bin/env bash
# A/A experiment (issue 9): N runs of the same commit and workload, one process each, reports into OUTDIR.
# `python benchmarks/aa/analyse.py OUTDIR` then counts false regressions (old rounds-level test vs the
# run-level verdict) and checks a planted slowdown. Usage: bash benchmarks/aa/run_aa.sh OUTDIR N [pytest args]
set -uo pipefail
out=$1; n=$2; shift 2
mkdir -p "$out"
for i in $(seq -w 1 "$n"); do
  python -m pytest benchmarks/test_grid.py -p no:cacheprovider -q --eff-quiet --benchmark-disable \
    --eff-report "$out/run$i.json" --eff-history off "$@" > "$out/run$i.log" 2>&1
  echo "run $i: exit $? $(python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['status'], \
[round(c['runtime']['median_s'],4) for c in d['cases'] if c.get('status')=='measured'])" "$out/run$i.json")"
done
