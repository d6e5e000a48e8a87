"""Thresholds on perplexity increase -> violations. Pure: the plugin and the CLI both call it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from efficiency.config import Thresholds
from efficiency.score import pct_change


@dataclass(frozen=True)
class Violation:
    case_id: str
    metric: str
    value: float
    limit: float
    message: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_perplexity(
    case_id: str, technique: str, ppl: float, base_ppl: float, baseline: str, limit_pct: float
) -> Violation | None:
    """A violation when the perplexity increase over the baseline is above ``limit_pct`` percent."""
    change = pct_change(ppl, base_ppl)
    assert change is not None, "baseline perplexity must be positive"
    if change <= limit_pct:
        return None
    return Violation(
        case_id, "perplexity_increase_pct", change, limit_pct,
        f"{case_id}: perplexity {ppl:.4g} vs {base_ppl:.4g} for the {baseline} baseline is {change:+.2f}%, "
        f"above the {technique} limit of +{limit_pct:g}%",
    )


def check(cases: Iterable[Mapping[str, Any]], thresholds: Thresholds, baseline: str) -> list[Violation]:
    """Threshold violations over report cases (dicts as in the JSON report). Cases whose perplexity is
    meaningless (random weights) or missing, and baseline cases, are not checked."""
    found: list[Violation] = []
    for case in cases:
        ppl = (case.get("perplexity") or {}).get("value")
        base = (case.get("baseline") or {}).get("perplexity")
        if case.get("is_baseline") or ppl is None or base is None or not case.get("perplexity", {}).get("meaningful"):
            continue
        limit = thresholds.limit_for(case["technique"])
        v = check_perplexity(case["id"], case["technique"], ppl, base, baseline, limit)
        if v is not None:
            found.append(v)
    return found
