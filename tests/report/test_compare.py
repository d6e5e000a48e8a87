"""Comparison of stored runs: noise is not a regression, a planted 15% slowdown is, settings mismatches and
too few rounds are said, never called. Also the Mann-Whitney U test against brute-force enumeration."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import pytest

from efficiency.report import stats
from efficiency.report.compare import Criteria, compare
from efficiency.report.stats import mann_whitney_u, min_p_value, u_statistic

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "reports"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def verdicts(comp: Any, metric: str) -> dict[str, str]:
    return {c.case_id: m.verdict for c in comp.cases for m in c.metrics if m.metric == metric}


def test_run_to_run_noise_is_not_a_regression() -> None:
    comp = compare([load("base")], [load("head-noise")])
    assert comp.compared == 4
    assert comp.regressions() == [] and comp.improvements() == []
    assert set(verdicts(comp, "runtime_s").values()) <= {"unchanged", "not significant"}
    assert set(verdicts(comp, "perplexity").values()) == {"unchanged"}


def test_planted_15pct_slowdown_is_detected_only_where_planted() -> None:
    comp = compare([load("base")], [load("head-slow")])
    regs = comp.regressions()
    assert [(cid, m.metric) for cid, m in regs] == [("smollm2-135m-bnb8", "runtime_s")]
    m = regs[0][1]
    assert 10 < (m.change_pct or 0) < 20 and m.p_value is not None and m.p_value <= 0.05
    assert (m.n_base, m.n_head) == (7, 7)
    # a threshold above the change: significant but not practical -> not a regression
    assert compare([load("base")], [load("head-slow")], Criteria(runtime_pct=20)).regressions() == []


def test_false_regression_rate_on_pure_noise_is_below_alpha() -> None:
    """Same true runtime on both sides, 2.5% run-to-run noise, 7 rounds each: both criteria together call far
    fewer false regressions than the test alone (alpha) or the threshold alone would."""
    rng = random.Random(0)
    base, head = load("base"), load("head-noise")
    calls = beyond = significant = 0
    draws = 150
    for _ in range(draws):
        for run in (base, head):
            for c, true in zip(run["cases"], (4.95, 30.2, 20.0, 21.0), strict=True):
                c["runtime"]["rounds_s"] = [true * math.exp(rng.gauss(0, 0.025)) for _ in range(7)]
        comp = compare([base], [head])
        calls += len(comp.regressions())
        runtime = [m for c in comp.cases for m in c.metrics if m.metric == "runtime_s"]
        beyond += sum((m.change_pct or 0) > 5 for m in runtime)
        significant += sum(
            mann_whitney_u(h["runtime"]["rounds_s"], b["runtime"]["rounds_s"], "greater").p_value <= 0.05
            for b, h in zip(base["cases"], head["cases"], strict=True))
    n = draws * 4
    assert calls <= beyond and calls / n < 0.01
    assert 0.02 < significant / n < 0.09  # the test alone: about alpha


def test_different_workload_settings_are_not_compared_with_the_reason() -> None:
    comp = compare([load("base")], [load("head-settings")])
    assert comp.compared == 0 and comp.regressions() == []
    for case in comp.cases:
        assert not case.compared
        assert case.reason is not None
        assert "context 512 vs 1024" in case.reason and "max_tokens 2048 vs 4096" in case.reason


def test_different_machine_or_device_is_not_compared() -> None:
    head = load("head-slow")
    head["environment"]["cpu"] = "Intel(R) Xeon(R) Platinum 8480+"
    comp = compare([load("base")], [head])
    assert comp.compared == 0
    assert "cpu 'AMD EPYC' vs 'Intel(R) Xeon(R) Platinum 8480+'" in (comp.cases[0].reason or "")
    head = load("head-slow")
    head["settings"]["device"] = "cuda"
    assert "device 'cpu' vs 'cuda'" in (compare([load("base")], [head]).cases[0].reason or "")


def test_batch_size_difference_stops_runtime_but_not_perplexity() -> None:
    head = load("head-slow")
    head["settings"]["workload"]["batch_size"] = 8
    comp = compare([load("base")], [head])
    assert set(verdicts(comp, "runtime_s").values()) == {"not compared"}
    assert set(verdicts(comp, "perplexity").values()) == {"unchanged"}
    assert comp.regressions() == []


def test_insufficient_rounds_is_said_and_not_called() -> None:
    # the real run has one timed round per case
    comp = compare([load("base")], [load("real-cpu-0001")])
    assert set(verdicts(comp, "runtime_s").values()) == {"insufficient rounds"}
    slow = load("real-cpu-0001")
    for c in slow["cases"]:
        c["runtime"]["rounds_s"] = [v * 1.3 for v in c["runtime"]["rounds_s"]]
    comp = compare([load("base")], [slow])
    assert comp.regressions() == []
    m = next(m for c in comp.cases for m in c.metrics if m.metric == "runtime_s")
    assert m.verdict == "insufficient rounds" and "not called" in m.reason and (m.change_pct or 0) > 25


def test_perplexity_is_judged_by_threshold_only() -> None:
    head = load("head-noise")
    head["cases"][2]["perplexity"]["value"] *= 1.02
    head["cases"][3]["perplexity"]["value"] *= 1.005
    comp = compare([load("base")], [head])
    v = verdicts(comp, "perplexity")
    assert v["smollm2-135m-bnb8"] == "regression" and v["smollm2-135m-bnb4"] == "unchanged"
    m = comp.regressions()[0][1]
    assert m.p_value is None and "threshold only" in m.reason


def _with_energy(run: dict[str, Any], joules: float, per_round: bool, rng: random.Random) -> dict[str, Any]:
    run = copy.deepcopy(run)
    for c in run["cases"]:
        e = joules * c["runtime"]["median_s"]
        c["energy"]["energy_j"] = e
        c["energy"]["j_per_token"] = e / c["perplexity"]["n_scored_tokens"]
        if per_round:
            c["energy"]["rounds_j"] = [e * math.exp(rng.gauss(0, 0.02)) for _ in range(7)]
    return run


def test_energy_needs_per_round_values_or_pooled_runs() -> None:
    rng = random.Random(1)
    base, head = load("base"), load("head-noise")
    # one window per run: a 20% rise cannot be tested
    comp = compare([_with_energy(base, 50, False, rng)], [_with_energy(head, 60, False, rng)])
    assert set(verdicts(comp, "energy_j").values()) == {"insufficient rounds"}
    # per-round energies: tested
    comp = compare([_with_energy(base, 50, True, rng)], [_with_energy(head, 60, True, rng)])
    assert set(verdicts(comp, "energy_j").values()) == {"regression"}
    # three runs pooled per side, one energy value each (3 vs 3 can reach p = 0.05)
    bases = [_with_energy(base, 50 * (1 + 0.01 * i), False, rng) for i in range(3)]
    heads = [_with_energy(head, 60 * (1 + 0.01 * i), False, rng) for i in range(3)]
    comp = compare(bases, heads)
    assert set(verdicts(comp, "energy_j").values()) == {"regression"}


def test_case_missing_on_one_side_and_incomplete_run_are_reported() -> None:
    comp = compare([load("base")], [load("interrupted")])
    by_id = {c.case_id: c for c in comp.cases}
    assert by_id["smollm2-135m-fp32"].compared and not by_id["smollm2-135m-bnb8"].compared
    assert "not measured in the head run (absent)" in (by_id["smollm2-135m-bnb8"].reason or "")
    assert any("interrupted" in n for n in comp.notes)


# --- the U test ---------------------------------------------------------------------------------------------


def brute_force_p(head: list[float], base: list[float], alternative: str) -> float:
    """P-value by enumerating every way to split the pooled values into the two groups."""
    pooled = head + base
    observed = u_statistic(head, base)
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(head)):
        h = [pooled[i] for i in idx]
        b = [pooled[i] for i in range(len(pooled)) if i not in idx]
        u = u_statistic(h, b)
        hits += (u >= observed) if alternative == "greater" else (u <= observed)
        total += 1
    return hits / total


@pytest.mark.parametrize("seed", range(6))
def test_exact_p_value_matches_enumeration(seed: int) -> None:
    rng = random.Random(seed)
    head = [rng.gauss(1.0 + 0.3 * (seed % 3), 0.3) for _ in range(3 + seed % 3)]
    base = [rng.gauss(1.0, 0.3) for _ in range(4)]
    alts: tuple[Literal["greater"], Literal["less"]] = ("greater", "less")
    for alt in alts:
        test = mann_whitney_u(head, base, alt)
        assert test.method == "exact"
        assert test.p_value == pytest.approx(brute_force_p(head, base, alt), abs=1e-12)


def test_normal_approximation_is_close_and_handles_ties() -> None:
    rng = random.Random(3)
    head = [rng.gauss(1.1, 0.2) for _ in range(9)]
    base = [rng.gauss(1.0, 0.2) for _ in range(9)]
    exact = mann_whitney_u(head, base, "greater").p_value
    tied = [round(v, 1) for v in head], [round(v, 1) for v in base]
    approx = mann_whitney_u(*tied, "greater")
    assert approx.method == "normal" and abs(approx.p_value - brute_force_p(*tied, "greater")) < 0.03
    assert 0 < exact < 1
    assert mann_whitney_u([1.0, 1.0], [1.0, 1.0], "greater").p_value == 1.0


def test_smallest_testable_sample_sizes() -> None:
    assert min_p_value(3, 3) == pytest.approx(0.05)
    assert stats.testable(3, 3, 0.05) and not stats.testable(2, 3, 0.05) and not stats.testable(1, 30, 0.05)
    assert mann_whitney_u([2.0, 2.1, 2.2], [1.0, 1.1, 1.2], "greater").p_value == pytest.approx(0.05)
