from __future__ import annotations

import pytest

from efficiency.config import Priority
from efficiency.score import case_deltas, opt, pareto_front, pct_change, rank_key


def test_pct_change() -> None:
    assert pct_change(110.0, 100.0) == pytest.approx(10.0)
    assert pct_change(None, 100.0) is None
    assert pct_change(1.0, 0.0) is None


def test_opt_ordinary_case_matches_the_formula() -> None:
    # ppl +4%, runtime -10%, energy -50%: balanced saving 0.5*10 + 0.5*50 = 30
    s = opt(4.0, -10.0, -50.0, Priority.BALANCED)
    assert s.status == "ok"
    assert s.value == pytest.approx(4.0**1.5 / 30.0)
    assert s.weighted_saving_pct == pytest.approx(30.0)


def test_priorities_weight_runtime_and_energy_differently() -> None:
    fast_but_hungry = (5.0, -40.0, +10.0)
    assert opt(*fast_but_hungry, Priority.RUNTIME).status == "ok"  # 0.9*40 - 0.1*10 > 0
    assert opt(*fast_but_hungry, Priority.ENERGY).status == "no-saving"  # 0.1*40 - 0.9*10 < 0


def test_perplexity_that_improves_is_free() -> None:
    s = opt(-2.0, -10.0, -10.0, Priority.ENERGY)
    assert (s.status, s.value) == ("free", 0.0)


def test_no_saving_or_a_cost_has_no_score() -> None:
    for runtime, energy in [(0.0, 0.0), (204.0, 10.0), (5.0, 5.0)]:
        s = opt(0.3, runtime, energy, Priority.BALANCED)
        assert s.status == "no-saving" and s.value is None and "saves nothing" in (s.reason or "")


def test_missing_energy_makes_score_unavailable_not_zero() -> None:
    s = opt(1.0, -20.0, None, Priority.BALANCED)
    assert s.status == "unavailable" and s.value is None and "energy" in (s.reason or "")


def test_rank_orders_scored_then_no_saving_then_unavailable() -> None:
    scores = [opt(1.0, 0, None, Priority.ENERGY), opt(1.0, 5, 5, Priority.ENERGY),
              opt(4.0, -10, -10, Priority.ENERGY), opt(0.0, -1, -1, Priority.ENERGY)]
    ranked = sorted(scores, key=rank_key)
    assert [s.status for s in ranked] == ["free", "ok", "no-saving", "unavailable"]


def test_pareto_front() -> None:
    points = [(10.0, 5.0), (12.0, 3.0), (11.0, 6.0), (10.0, 5.0), (9.0, None)]
    assert pareto_front(points) == [True, True, False, True, False]


def test_case_deltas_skip_meaningless_perplexity() -> None:
    base = {"perplexity": {"value": 20.0, "meaningful": True}, "runtime": {"median_s": 2.0},
            "energy": {"energy_j": 10.0, "j_per_token": 0.1}}
    case = {"perplexity": {"value": 25.0, "meaningful": False}, "runtime": {"median_s": 1.0},
            "energy": {"energy_j": None, "j_per_token": None}}
    d = case_deltas(case, base)
    assert d["perplexity"] is None and d["runtime_s"] == pytest.approx(-50.0) and d["energy_j"] is None
    case["perplexity"]["meaningful"] = True
    assert case_deltas(case, base)["perplexity"] == pytest.approx(25.0)
