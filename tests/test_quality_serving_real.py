"""Slow: issue 12's CPU acceptance through the plugin on the real SmolLM2-135M (the Q4_1 GGUF of the Instruct
model, dequantised): per-task accuracy of fp32 and bnb4 with deltas on the shipped local task, an accuracy
threshold below the measured drop failing the case, KL divergence 0 for the baseline and > 0 for bnb4, and the
serving sweep's rows at batch 1 and 4 computed from their own rounds. Which batch is faster is a benchmark's
question (docs/results.md section 8), not this test's: timed here, it failed when CPU contention (``-n 2``) slowed
one batch's rounds."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from test_smollm2_real import run_benchmarks

from conftest import REPO

pytestmark = pytest.mark.slow

QUALITY = ["--eff-techniques", "bnb4", "--eff-tasks", "eff_facts", "--eff-tasks-dir", str(REPO / "fixtures" / "tasks"),
           "--eff-kld-tokens", "256", "--eff-batch-sizes", "1,4", "--eff-input-tokens", "16",
           "--eff-output-tokens", "4", "--eff-threshold", "bnb4=1000"]


def test_tasks_kld_and_serving_through_the_plugin(pytester: pytest.Pytester, shared_data: Path) -> None:
    pytest.importorskip("lm_eval", reason="the [quality] extra (lm-eval) is not installed")
    pytest.importorskip("bitsandbytes")
    result, report = run_benchmarks(pytester, shared_data, *QUALITY)
    cases = {c["technique"]: c for c in report["cases"]}
    base, q4 = cases["fp32"], cases["bnb4"]
    acc_base = base["tasks"]["results"]["eff_facts"]["acc"]
    acc_q4 = q4["tasks"]["results"]["eff_facts"]["acc"]
    assert 0.25 < acc_base <= 1.0 and "acc_stderr" in base["tasks"]["results"]["eff_facts"]
    assert q4["tasks"]["deltas_points"]["eff_facts"]["acc"] == pytest.approx(100 * (acc_q4 - acc_base))
    assert base["kld"]["mean"] == pytest.approx(0.0, abs=1e-6) and base["kld"]["top1_match"] == 1.0
    assert q4["kld"]["mean"] > 0 and q4["metrics"]["kld_mean"] == q4["kld"]["mean"]
    by_batch = {b["batch_size"]: b for b in q4["serving"]["batches"]}
    assert sorted(by_batch) == [1, 4]
    for batch, row in by_batch.items():  # throughput = batch x output tokens / median round, by hand
        assert row["round_s"] == pytest.approx(statistics.median(row["rounds_s"]))
        assert row["tokens_per_s"] == pytest.approx(batch * 4 / row["round_s"])
        assert 0 < row["time_to_first_token_s"] < row["round_s"]
    drop = acc_base - acc_q4
    if drop <= 0:
        pytest.skip(f"bnb4 did not lower eff_facts accuracy here ({acc_base:.3f} -> {acc_q4:.3f}): no threshold to "
                    "set below the drop")
    result, report = run_benchmarks(pytester, shared_data, *QUALITY,
                                    "--eff-accuracy-threshold", f"eff_facts={100 * drop / 2:.4f}")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*smollm2-135m-bnb4: eff_facts acc * vs baseline *: a drop of * points, above*"])
    assert any(v["case_id"] == "smollm2-135m-bnb4" for v in report["violations"])
