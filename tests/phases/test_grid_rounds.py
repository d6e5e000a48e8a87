"""--eff-rounds holds whatever pytest-benchmark does (disabled, or under xdist), and every case's report carries
each phase's window (pytester, tiny GPT-2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_plugin import run_grid, tiny_dir  # noqa: F401  (tiny_dir is a fixture used below)


def test_rounds_are_honoured_with_benchmark_disabled(pytester: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    result, report = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32,bnb4", "--eff-rounds", "4")
    result.assert_outcomes(passed=2)
    for case in report["cases"]:
        assert case["runtime"]["rounds"] == 4 and len(case["runtime"]["rounds_s"]) == 4
        assert set(case["phases"]) == {"quality", "ppl_pass", "prefill", "first_token", "decode", "kld"}
        assert case["metrics"]["runtime_s"] == case["runtime"]["median_s"]
    bnb4 = next(c for c in report["cases"] if c["technique"] == "bnb4")
    assert "runtime_only" in bnb4["scores"]
