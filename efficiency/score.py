"""Pure functions that decide: percentage changes, the paper's optimisation score, the Pareto front.

Sign convention (the paper, arXiv 2502.00046, leaves it open; this is ours, also written in every report):

    Pc = max(0, perplexity increase in %)            quality cost, (ppl - ppl_base) / ppl_base * 100
    Tc = runtime reduction in %                      (t_base - t) / t_base * 100
    Ec = energy reduction in %                       (e_base - e) / e_base * 100
    opt = Pc^1.5 / (alpha * Tc + beta * Ec)          LOWER is better: quality cost per percent saved

Edge cases, each with its own status so that nothing is silently ranked:
- ``free``: perplexity did not get worse (Pc = 0) and the weighted saving is positive: opt = 0, the best.
- ``no-saving``: the weighted saving alpha*Tc + beta*Ec <= 0 (the technique saves nothing or costs more):
  opt is undefined (None); such a case ranks after every case with a score.
- ``unavailable``: a needed input (energy, a meaningful perplexity) was not measured; the reason says which.
The raw percentage changes stay in the report so any reader can recompute another convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from efficiency.config import Priority

CONVENTION = (
    "opt = max(0, ppl_increase_pct)^1.5 / (alpha*runtime_reduction_pct + beta*energy_reduction_pct); lower is "
    "better; 0 = no quality cost ('free'); None with status 'no-saving' when the weighted saving <= 0"
)


def pct_change(value: float | None, base: float | None) -> float | None:
    """(value - base) / base * 100, or None when either is missing or the base is 0."""
    if value is None or base is None or base == 0:
        return None
    return (value - base) / base * 100.0


@dataclass(frozen=True)
class Score:
    priority: str
    value: float | None
    status: str  # "ok" | "free" | "no-saving" | "unavailable"
    reason: str | None = None
    weighted_saving_pct: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def opt(ppl_pct: float | None, runtime_pct: float | None, energy_pct: float | None, priority: Priority) -> Score:
    """The paper's score for one case; the inputs are percentage changes against the baseline (+ = larger)."""
    name = priority.name.lower()
    missing = [n for n, v, w in (("perplexity", ppl_pct, 1.0), ("runtime", runtime_pct, priority.alpha),
                                 ("energy", energy_pct, priority.beta)) if v is None and w > 0]
    if missing:
        return Score(name, None, "unavailable", f"{' and '.join(missing)} change not measured")
    assert ppl_pct is not None
    saving = priority.alpha * -(runtime_pct or 0.0) + priority.beta * -(energy_pct or 0.0)
    if saving <= 0:
        return Score(name, None, "no-saving",
                     f"weighted saving {saving:.2f}% <= 0: saves nothing under the {name} priority", saving)
    cost = max(0.0, ppl_pct)
    if cost == 0:
        return Score(name, 0.0, "free", "perplexity did not increase", saving)
    return Score(name, cost**1.5 / saving, "ok", None, saving)


def rank_key(score: Score) -> tuple[int, float]:
    """Sort key: scored cases by value (lower first), then no-saving, then unavailable."""
    order = {"free": 0, "ok": 0, "no-saving": 1, "unavailable": 2}
    return order[score.status], score.value if score.value is not None else float("inf")


def pareto_front(points: Sequence[Sequence[float | None]]) -> list[bool]:
    """For points whose coordinates are all to be minimised, True where no other point dominates it
    (<= in every coordinate, < in one). Points with a missing coordinate are never on the front."""
    flags: list[bool] = []
    for i, p in enumerate(points):
        if any(v is None for v in p):
            flags.append(False)
            continue
        dominated = False
        for j, q in enumerate(points):
            if i == j or any(v is None for v in q):
                continue
            if all(b <= a for a, b in zip(p, q, strict=True)) and any(b < a for a, b in zip(p, q, strict=True)):  # type: ignore[operator]
                dominated = True
                break
        flags.append(not dominated)
    return flags


def number_at(d: Mapping[str, object], *path: str) -> float | None:
    """The number at ``d[path[0]][path[1]]...`` of a report dict, or None where the path or number is missing."""
    cur: object = d
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return float(cur) if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


def case_deltas(case: dict[str, object], base: dict[str, object]) -> dict[str, float | None]:
    """Percentage changes of a case's numbers against its model's baseline case (report dicts)."""

    ppl_section = case.get("perplexity")
    meaningful = isinstance(ppl_section, dict) and bool(ppl_section.get("meaningful"))
    fields = {
        "runtime_pct": ("runtime", "median_s"),
        "energy_pct": ("energy", "energy_j"),
        "j_per_token_pct": ("energy", "j_per_token"),
        "prefill_pct": ("latency", "prefill_s"),
        "decode_per_token_pct": ("latency", "decode_s_per_token"),
        "peak_memory_pct": ("memory", "peak_bytes"),
        "size_pct": ("size", "size_bytes"),
        "parameters_pct": ("size", "parameters"),
    }
    out: dict[str, float | None] = {
        "perplexity_pct": pct_change(number_at(case, "perplexity", "value"), number_at(base, "perplexity", "value"))
        if meaningful else None
    }
    for name, path in fields.items():
        out[name] = pct_change(number_at(case, *path), number_at(base, *path))
    return out


def case_scores(deltas: dict[str, float | None]) -> dict[str, dict[str, object]]:
    return {
        p.name.lower(): opt(deltas["perplexity_pct"], deltas["runtime_pct"], deltas["energy_pct"], p).to_dict()
        for p in Priority
    }
