"""Count false regressions in real A/A runs (same commit, same workload) under the old and the new verdict, and
check that a planted slowdown is still called. Usage: python benchmarks/aa/analyse.py OUTDIR [--planted 1.15]

- old rule (before issue 9): one run against another, the rounds of each run taken as independent samples:
  a regression when the median is more than 5% slower and a one-sided Mann-Whitney U on the rounds gives
  p <= 0.05. Every ordered pair of runs is one comparison.
- new rule: ``efficiency.report.compare.compare`` (independent runs; each run one value; >= MIN_RUNS per
  side). Every split of the runs into two disjoint sides of MIN_RUNS runs is one comparison (the splits
  share runs, so they are not independent trials: the count says how often this data set would have cried wolf).
- planted slowdown: the head side's recorded times (rounds and median) multiplied by the factor, the same
  splits compared again: how often the new rule calls it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from efficiency.report.compare import MIN_RUNS, Criteria, busy, compare
from efficiency.report.io import read
from efficiency.report.stats import mann_whitney_u


def _slow(run: dict[str, Any], factor: float) -> dict[str, Any]:
    run = copy.deepcopy(run)
    for c in run["cases"]:
        if c.get("status") == "measured":
            rt = c["runtime"]
            rt["rounds_s"] = [t * factor for t in rt["rounds_s"]]
            rt["median_s"] *= factor
            c["metrics"]["runtime_s"] = rt["median_s"]
    return run


def old_rule(base: dict[str, Any], head: dict[str, Any], threshold_pct: float = 5.0, alpha: float = 0.05) -> int:
    found = 0
    heads = {c["id"]: c for c in head["cases"] if c.get("status") == "measured"}
    for b in base["cases"]:
        h = heads.get(b["id"])
        if h is None:
            continue
        bs, hs = b["runtime"]["rounds_s"], h["runtime"]["rounds_s"]
        change = (statistics.median(hs) / statistics.median(bs) - 1) * 100
        if change > threshold_pct and mann_whitney_u(hs, bs, "greater").p_value <= alpha:
            found += 1
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--planted", type=float, default=1.15)
    ap.add_argument("--min-runs", type=int, default=MIN_RUNS, help="runs per side of each A/A split (the gate's "
                    "default %(default)s)")
    ap.add_argument("--include-busy", action="store_true", help="let runs flagged 'machine busy' count")
    ap.add_argument("--pattern", default="run*.json", help="report files in OUTDIR (default %(default)s)")
    args = ap.parse_args()
    runs = [read(p) for p in sorted(args.outdir.glob(args.pattern))]
    runs = [r for r in runs if r.get("status") == "complete"]
    n = len(runs)
    medians: dict[str, list[float]] = {c["id"]: [] for c in runs[0]["cases"]}
    for r in runs:
        for c in r["cases"]:
            medians[c["id"]].append(c["runtime"]["median_s"])
    print(f"{n} complete runs; per case: run medians (s)")
    for cid, values in medians.items():
        m = statistics.median(values)
        spread = (max(values) - min(values)) / 2 / m * 100
        within = statistics.median(
            (max(c["runtime"]["rounds_s"]) - min(c["runtime"]["rounds_s"])) / 2 / c["runtime"]["median_s"] * 100
            for r in runs for c in r["cases"] if c["id"] == cid)
        print(f"  {cid}: median {m:.4f} s, run-to-run ±{spread:.1f}% (half range), within-run ±{within:.1f}% "
              f"(median half range of the rounds); values {[round(v, 4) for v in values]}")
    pairs = [(a, b) for a, b in itertools.permutations(range(n), 2)]
    old = sum(old_rule(runs[a], runs[b]) > 0 for a, b in pairs)
    print(f"old rule: {old} false regressions in {len(pairs)} ordered run-vs-run comparisons "
          f"({old / len(pairs):.1%})")
    k = args.min_runs
    if n < 2 * k:
        print(f"new rule: needs {2 * k} runs for one A/A split of {k} vs {k}; have {n}")
        return
    splits = [(a, b) for a in itertools.combinations(range(n), k)
              for b in itertools.combinations([i for i in range(n) if i not in a], k) if a < b]
    false, detected = 0, 0
    for base_idx, head_idx in splits:
        base = [runs[i] for i in base_idx]
        head = [runs[i] for i in head_idx]
        crit = Criteria(include_busy=args.include_busy, min_runs=k)
        false += bool(compare(base, head, crit).regressions())
        detected += bool(compare(base, [_slow(r, args.planted) for r in head], crit).regressions())
    flagged = sum(any(busy(c) for c in r["cases"] if c.get("status") == "measured") for r in runs)
    print(f"{flagged} of {n} runs flagged 'machine busy' by the suite"
          + (" (counted: --include-busy)" if args.include_busy else " (left out of runtime verdicts)"))
    print(f"new rule: {false} false regressions in {len(splits)} A/A splits ({k} vs {k} runs) "
          f"({false / len(splits):.1%})")
    print(f"new rule: planted x{args.planted} slowdown called in {detected} of {len(splits)} splits "
          f"({detected / len(splits):.1%})")
    print(json.dumps({"runs": n, "old_false": old, "old_comparisons": len(pairs), "new_false": false,
                      "new_comparisons": len(splits), "planted": args.planted, "planted_detected": detected}))


if __name__ == "__main__":
    main()
