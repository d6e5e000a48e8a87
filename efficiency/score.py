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
from efficiency.metrics import METRICS, pareto_axes

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


def opt(ppl_pct: float | None, runtime_pct: float | None, energy_pct: float | None, priority: Priority,
        runtime_only: bool = False) -> Score:
    """The paper's score for one case; the inputs are percentage changes against the baseline (+ = larger).
    ``runtime_only``: alpha 1, beta 0 (energy ignored), labelled ``runtime_only``."""
    name = "runtime_only" if runtime_only else priority.name.lower()
    alpha, beta = (1.0, 0.0) if runtime_only else (priority.alpha, priority.beta)
    missing = [n for n, v, w in (("perplexity", ppl_pct, 1.0), ("runtime", runtime_pct, alpha),
                                 ("energy", energy_pct, beta)) if v is None and w > 0]
    if missing:
        return Score(name, None, "unavailable", f"{' and '.join(missing)} change not measured")
    assert ppl_pct is not None
    saving = alpha * -(runtime_pct or 0.0) + beta * -(energy_pct or 0.0)
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


def pareto_front(points: Sequence[Sequence[float | None]], tolerances: Sequence[float] | None = None) -> list[bool]:
    """For points whose coordinates are all to be minimised, True where no other point dominates it. ``q``
    dominates ``p`` when, in every coordinate, ``q <= p * (1 + tol)`` and, in one, ``q < p * (1 - tol)``
    (relative tolerances, 0 by default: plain dominance). Points with a missing coordinate are never on the
    front."""
    tols = list(tolerances) if tolerances is not None else [0.0] * (len(points[0]) if points else 0)

    def dominates(q: Sequence[float], p: Sequence[float]) -> bool:
        no_worse = all(b <= a + abs(a) * t for a, b, t in zip(p, q, tols, strict=True))
        better = any(b < a - abs(a) * t for a, b, t in zip(p, q, tols, strict=True))
        return no_worse and better

    flags: list[bool] = []
    for i, p in enumerate(points):
        if any(v is None for v in p):
            flags.append(False)
            continue
        dominated = any(j != i and all(v is not None for v in q) and dominates(q, p)  # type: ignore[arg-type]
                        for j, q in enumerate(points))
        flags.append(not dominated)
    return flags


def case_deltas(case: Mapping[str, object], base: Mapping[str, object]) -> dict[str, float | None]:
    """Percentage change of every registry metric of a case against its model's baseline case (report dicts),
    keyed by metric name."""
    return {m.name: pct_change(m.value(case), m.value(base)) if m.relative else None for m in METRICS}


RUNTIME_ONLY = "runtime_only"


def case_scores(deltas: Mapping[str, float | None]) -> dict[str, dict[str, object]]:
    """The paper's three priorities, plus ``runtime_only`` (alpha 1, beta 0): always computable where runtime
    and perplexity are, so a machine without energy counters still ranks techniques (labelled as such)."""
    ppl, runtime, energy = deltas.get("perplexity"), deltas.get("runtime_s"), deltas.get("energy_j")
    out = {p.name.lower(): opt(ppl, runtime, energy, p).to_dict() for p in Priority}
    only = opt(ppl, runtime, None, Priority.RUNTIME, runtime_only=True)
    out[RUNTIME_ONLY] = only.to_dict()
    return out


def pareto_flags(cases: Sequence[Mapping[str, object]]) -> tuple[list[bool], list[str]]:
    """Pareto flags of a group of cases (one model) over the registry's Pareto axes measured in every case,
    with each axis's noise tolerance: a case is dominated only by one that is better beyond the tolerance in
    some axis and not worse beyond it in any. Returns (flags, axis names)."""
    axes = pareto_axes(cases)
    points = [[m.value(c) for m in axes] for c in cases]
    tolerances = [(m.pareto_tolerance_pct or 0.0) / 100 for m in axes]
    return pareto_front(points, tolerances), [m.name for m in axes]
