"""The metric registry and its consumers: deltas, Pareto with tolerance, the version-1 upgrade."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from efficiency import metrics
from efficiency.report.schema import SchemaError, upgrade
from efficiency.score import case_deltas, case_scores, pareto_front

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reports"


def test_every_metric_is_well_formed() -> None:
    assert len(set(metrics.NAMES)) == len(metrics.METRICS)
    for m in metrics.METRICS:
        assert m.better in ("lower", "higher") and m.kind in ("quality", "regression", "info") and m.path
    assert metrics.get("runtime_s").gated and not metrics.get("size_bytes").gated
    with pytest.raises(KeyError, match="unknown metric"):
        metrics.get("speed")


def test_every_metric_says_whether_a_rerun_gives_the_same_number() -> None:
    """A metric read from a clock, a meter or a sampled memory level (or derived from one: TFLOP/s, B/s, MFU %) is
    not deterministic, whatever its unit; a new entry must say which it is (no default)."""
    deterministic = {m.name for m in metrics.METRICS if m.deterministic}
    assert deterministic == {"perplexity", "size_bytes", "parameters", "kld_mean", "kld_p99", "top1_match",
                             "task_acc_mean"}
    for m in metrics.METRICS:  # anything with per-round samples, or gated as a regression, is measured
        assert not (m.deterministic and (m.samples_path or m.kind == "regression")), m.name
    with pytest.raises(TypeError, match="deterministic"):
        metrics.Metric("new", "new", "", "lower", ("x",))  # type: ignore[call-arg]


def test_higher_is_better_metrics_judge_direction() -> None:
    assert metrics.get("tokens_per_s").is_worse(-10.0) and not metrics.get("tokens_per_s").is_worse(10.0)
    assert metrics.get("runtime_s").is_worse(10.0)


def test_pareto_front_tolerates_noise() -> None:
    # bf16: 0.01 lower perplexity (0.03%) at 3.4x the time: within perplexity noise, so dominated
    fp32, bf16 = [29.98, 4.9], [29.97, 16.7]
    assert pareto_front([fp32, bf16]) == [True, True]
    assert pareto_front([fp32, bf16], [0.005, 0.03]) == [True, False]


def test_runtime_only_score_is_available_without_energy() -> None:
    scores = case_scores({"perplexity": 10.0, "runtime_s": -20.0, "energy_j": None})
    assert scores["runtime"]["status"] == "unavailable"
    assert scores["runtime_only"]["status"] == "ok"
    assert scores["runtime_only"]["value"] == pytest.approx(10.0**1.5 / 20.0)


def test_version_1_reports_upgrade_on_read() -> None:
    v1 = json.loads((FIXTURES / "real-cpu-0001.json").read_text())
    assert v1["schema_version"] == 1
    v2 = upgrade(v1)
    assert v2["schema_version"] == 2 and v2["upgraded_from"] == 1
    bnb4 = next(c for c in v2["cases"] if c["technique"] == "bnb4")
    assert bnb4["metrics"]["perplexity"] == bnb4["perplexity"]["value"]
    assert "perplexity" in bnb4["deltas"] and "perplexity_pct" not in bnb4["deltas"]
    # version 1 on CPU stored the process high-water mark, which is not a per-case figure
    assert bnb4["metrics"]["peak_bytes"] is None and bnb4["memory"]["process_high_water_bytes"] > 0
    base = next(c for c in v2["cases"] if c["technique"] == "fp32")
    assert case_deltas(bnb4, base)["perplexity"] == pytest.approx(bnb4["deltas"]["perplexity"])


@pytest.mark.parametrize("version", [0, None, 99])
def test_unreadable_schema_versions_are_refused(version: object) -> None:
    with pytest.raises(SchemaError):
        upgrade({"schema_version": version, "cases": []})


def test_metrics_measured_against_the_baseline_get_no_percent_change() -> None:
    """KL divergence is 0 for the baseline: a percent change against it read +8e8% in the fresh-clone run."""
    base = {"status": "measured", "perplexity": {"value": 30.0, "meaningful": True}, "kld": {"mean": 1e-10}}
    case = {"status": "measured", "perplexity": {"value": 31.0, "meaningful": True}, "kld": {"mean": 0.02}}
    deltas = case_deltas(case, base)
    assert deltas["kld_mean"] is None and deltas["perplexity"] == pytest.approx(100 / 30)
