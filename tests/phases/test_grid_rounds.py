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


def test_pytest_benchmark_table_is_narrow_for_the_grid(pytester: pytest.Pytester, tiny_dir: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-benchmark's dozen-column table repeated the runtimes the suite's own table shows; the grid keeps
    min, median, max and rounds (the narrowing looked for the wrong plugin object and never applied). The inner
    run is not an xdist worker even when this test runs in one (`-n 2`): pytest-benchmark reads the inherited
    PYTEST_XDIST_WORKER and turns itself off, and there was no table to look at."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    result, _ = run_grid(pytester, tiny_dir, "--eff-techniques", "fp32", benchmark=True)
    result.assert_outcomes(passed=1)
    header = next(line for line in result.stdout.lines if line.startswith("Name (time in"))
    assert "Median" in header and "Rounds" in header
    assert "StdDev" not in header and "OPS" not in header and "Outliers" not in header
