"""The verdict rule in simulation (docs/results.md section 7): A/A false regressions and planted-slowdown power
of `efficiency.report.compare`, and the old rounds-of-one-run rule, with the simulation the tests use
(tests/report/test_compare.py: 3% run-to-run noise, 1% round noise, 7 rounds, 5 runs per side; "busy": 1 run in
10 slowed 4-10%). Usage: python benchmarks/aa/simulate.py [A/A comparisons] [planted comparisons]"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "report")]

from test_compare import _simulate  # noqa: E402  (the one simulation, shared with the tests)


def main() -> None:
    aa_n = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    planted_n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    for busy in (0.0, 0.1):
        aa, old = _simulate(seed=11, comparisons=aa_n, slowdown=1.0, busy=busy)
        p15, _ = _simulate(seed=12, comparisons=planted_n, slowdown=1.15, busy=busy)
        p10, _ = _simulate(seed=13, comparisons=planted_n, slowdown=1.10, busy=busy)
        print(f"busy={busy}: A/A false regressions {aa:.2%} of {aa_n} (old rule {old:.1%}); "
              f"planted 15% called {p15:.1%}, planted 10% {p10:.1%} of {planted_n}", flush=True)
        p15_4, _ = _simulate(seed=12, comparisons=planted_n, slowdown=1.15, busy=busy, runs=4)
        print(f"busy={busy}: with 4 runs per side, planted 15% called {p15_4:.1%}", flush=True)


if __name__ == "__main__":
    main()
