"""Compare two runs case by case: the change of every metric and a verdict that needs two kinds of evidence.

A metric measured in repeated rounds (runtime, energy where per-round values exist, prefill latency) is
called a **regression** only when BOTH hold:

1. practical: its median changed by more than the threshold (default 5%), and
2. statistical: a one-sided Mann-Whitney U test on the rounds gives p <= alpha (default 0.05).

It is an **improvement** under the mirrored conditions. Verdicts, in the order they are decided:
``n/a`` (a value is missing on one side), ``not compared`` (settings that matter for this metric differ),
``insufficient rounds`` (the test cannot reach alpha with this many values: stats.testable), ``unchanged``
(within the threshold), ``not significant`` (beyond the threshold but p > alpha), ``regression``,
``improvement``.
Deterministic metrics (perplexity, model size, peak memory) are judged by the threshold alone.

Energy is read over one window spanning all rounds, so a report holds one energy value per run: it is tested
only on per-round values (``energy.rounds_j``, when a runner records them) or on several runs pooled from the
history; a single run against a single run is ``insufficient rounds``.

Whole cases are not compared when the settings that make numbers comparable differ (workload dataset, context,
stride, max_tokens; device; machine; random weights): the reason names the differing keys.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from efficiency.report.stats import mann_whitney_u, testable
from efficiency.score import number_at, pct_change

Report = dict[str, Any]
Case = dict[str, Any]

REGRESSION, IMPROVEMENT = "regression", "improvement"


@dataclass(frozen=True)
class Criteria:
    """Practical thresholds in percent and the test's alpha."""

    runtime_pct: float = 5.0  # runtime and energy
    perplexity_pct: float = 1.0
    info_pct: float = 5.0  # latency, memory, size (reported, not gated)
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if min(self.runtime_pct, self.perplexity_pct, self.info_pct) < 0:
            raise ValueError("thresholds must be >= 0 percent")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


def _list(case: Case, *path: str) -> list[float]:
    cur: Any = case
    for key in path:
        cur = cur.get(key) if isinstance(cur, dict) else None
    return [float(v) for v in cur] if isinstance(cur, list) else []


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    value: Callable[[Case], float | None]
    samples: Callable[[Case], list[float]] | None  # None: deterministic, threshold only
    gated: bool  # counts for regressions (gate, --eff-fail-on-regression)
    workload_keys: tuple[str, ...] = ()  # further workload settings that must match for this metric
    unit: str = ""


def _ppl(c: Case) -> float | None:
    return number_at(c, "perplexity", "value") if (c.get("perplexity") or {}).get("meaningful") else None


def _runtime(c: Case) -> float | None:
    rounds = _list(c, "runtime", "rounds_s")
    return statistics.median(rounds) if rounds else number_at(c, "runtime", "median_s")


def _energy_samples(c: Case) -> list[float]:
    per_round = _list(c, "energy", "rounds_j")
    if per_round:
        return per_round
    value = number_at(c, "energy", "energy_j")
    return [value] if value is not None else []


def _per_case_memory(c: Case) -> float | None:
    method = str((c.get("memory") or {}).get("method") or "")
    return None if "not per case" in method else number_at(c, "memory", "peak_bytes")


METRICS: tuple[Metric, ...] = (
    Metric("perplexity", "perplexity", _ppl, None, True),
    Metric("runtime_s", "runtime (s)", _runtime, lambda c: _list(c, "runtime", "rounds_s"), True,
           ("batch_size",), "s"),
    Metric("energy_j", "energy (J)", lambda c: number_at(c, "energy", "energy_j"), _energy_samples, True,
           ("batch_size",), "J"),
    Metric("j_per_token", "energy per token (J)", lambda c: number_at(c, "energy", "j_per_token"), None, False,
           ("batch_size",), "J"),
    Metric("prefill_s", "prefill latency (s)", lambda c: number_at(c, "latency", "prefill_s"),
           lambda c: _list(c, "latency", "prefill_s_all"), False, ("prefill_tokens",), "s"),
    Metric("decode_s_per_token", "decode per token (s)", lambda c: number_at(c, "latency", "decode_s_per_token"),
           lambda c: [v] if (v := number_at(c, "latency", "decode_s_per_token")) is not None else [], False,
           ("prefill_tokens", "decode_tokens"), "s"),
    Metric("peak_bytes", "peak memory", _per_case_memory, None, False, ("batch_size",), "B"),
    Metric("size_bytes", "size", lambda c: number_at(c, "size", "size_bytes"), None, False, (), "B"),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    base: float | None
    head: float | None
    change_pct: float | None
    threshold_pct: float
    verdict: str
    reason: str
    gated: bool
    p_value: float | None = None
    n_base: int = 0
    n_head: int = 0


@dataclass(frozen=True)
class CaseComparison:
    case_id: str
    compared: bool
    reason: str | None = None
    metrics: tuple[MetricComparison, ...] = ()

    def with_verdict(self, verdict: str, gated_only: bool = True) -> list[MetricComparison]:
        return [m for m in self.metrics if m.verdict == verdict and (m.gated or not gated_only)]


@dataclass(frozen=True)
class Comparison:
    base_label: str
    head_label: str
    criteria: Criteria
    cases: tuple[CaseComparison, ...]
    notes: tuple[str, ...] = field(default=())

    def regressions(self) -> list[tuple[str, MetricComparison]]:
        return [(c.case_id, m) for c in self.cases for m in c.with_verdict(REGRESSION)]

    def improvements(self) -> list[tuple[str, MetricComparison]]:
        return [(c.case_id, m) for c in self.cases for m in c.with_verdict(IMPROVEMENT)]

    @property
    def compared(self) -> int:
        return sum(c.compared for c in self.cases)


def machine_of(report: Report) -> dict[str, Any]:
    """The machine fingerprint: device kind and name, GPU driver, CPU model."""
    env = report.get("environment") or {}
    dev = env.get("device") or {}
    power = dev.get("power_state") or {}
    return {"device": (report.get("settings") or {}).get("device"), "device_name": dev.get("name"),
            "driver": power.get("driver_version"), "cpu": env.get("cpu")}


def comparable_key(report: Report) -> dict[str, Any]:
    """What must be equal for two runs' cases to be compared at all."""
    settings = report.get("settings") or {}
    wl = settings.get("workload") or {}
    return {**{k: wl.get(k) for k in ("dataset", "context", "stride", "max_tokens")},
            "random_weights": bool(settings.get("random_weights")), **machine_of(report)}


def _mismatch(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str]) -> list[str]:
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _judge(metric: Metric, base: Sequence[Case], head: Sequence[Case], crit: Criteria,
           workload_diff: list[str]) -> MetricComparison:
    bv = [v for c in base if (v := metric.value(c)) is not None]
    hv = [v for c in head if (v := metric.value(c)) is not None]
    threshold = (crit.perplexity_pct if metric.name == "perplexity" else
                 crit.runtime_pct if metric.gated else crit.info_pct)

    def out(verdict: str, reason: str, change: float | None = None, **kw: Any) -> MetricComparison:
        b = statistics.median(bv) if bv else None
        h = statistics.median(hv) if hv else None
        return MetricComparison(metric.name, b, h, change, threshold, verdict, reason, metric.gated, **kw)

    if not bv or not hv:
        side = "base" if not bv else "head"
        return out("n/a", f"no value in the {side} run (not measured, or perplexity not meaningful)")
    change = pct_change(statistics.median(hv), statistics.median(bv))
    if change is None:
        return out("n/a", "base value is 0")
    if workload_diff:
        return out("not compared", "workload differs: " + "; ".join(workload_diff), change)
    beyond = abs(change) > threshold
    direction = REGRESSION if change > 0 else IMPROVEMENT
    if metric.samples is None:
        if not beyond:
            return out("unchanged", f"within ±{threshold:g}% (deterministic: threshold only)", change)
        return out(direction, f"{change:+.2f}% beyond ±{threshold:g}% (deterministic: threshold only)",
                   change)
    bs = [v for c in base for v in metric.samples(c)]
    hs = [v for c in head for v in metric.samples(c)]
    n: dict[str, Any] = {"n_base": len(bs), "n_head": len(hs)}
    if not testable(len(hs), len(bs), crit.alpha):
        where = "within" if not beyond else "beyond"
        return out("insufficient rounds", f"{len(bs)} vs {len(hs)} values cannot reach alpha {crit.alpha:g} "
                   f"({change:+.2f}%, {where} ±{threshold:g}%; not called)", change, **n)
    test = mann_whitney_u(hs, bs, "greater" if change > 0 else "less")
    n["p_value"] = test.p_value
    if not beyond:
        return out("unchanged", f"within ±{threshold:g}% (p={test.p_value:.3g})", change, **n)
    if test.p_value > crit.alpha:
        return out("not significant", f"{change:+.2f}% but p={test.p_value:.3g} > {crit.alpha:g} "
                   f"(Mann-Whitney U, {test.method}): within run-to-run noise", change, **n)
    return out(direction, f"{change:+.2f}% beyond ±{threshold:g}% and p={test.p_value:.3g} <= {crit.alpha:g} "
               f"(one-sided Mann-Whitney U, {test.method}, {len(bs)} vs {len(hs)} rounds)", change, **n)


def _cases_by_id(runs: Sequence[Report]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for run in runs:
        for case in run.get("cases") or []:
            out.setdefault(case["id"], []).append(case)
    return out


def _group_key(runs: Sequence[Report]) -> tuple[dict[str, Any] | None, str | None]:
    keys = [comparable_key(r) for r in runs]
    if any(k != keys[0] for k in keys[1:]):
        return None, "the pooled runs do not share settings and machine"
    return keys[0], None


def compare(base_runs: Sequence[Report], head_runs: Sequence[Report], criteria: Criteria | None = None,
            base_label: str = "base", head_label: str = "head") -> Comparison:
    """Compare every case id present in either side. Several runs on a side (one commit measured more than
    once) are pooled: their rounds are joined, and their energies become one value per run."""
    crit = criteria or Criteria()
    if not base_runs or not head_runs:
        raise ValueError("each side needs at least one run")
    bkey, berr = _group_key(base_runs)
    hkey, herr = _group_key(head_runs)
    notes: list[str] = []
    run_reason = berr or herr
    if bkey is not None and hkey is not None and run_reason is None:
        diff = _mismatch(bkey, hkey, list(dict.fromkeys([*bkey, *hkey])))
        if diff:
            run_reason = "settings differ: " + "; ".join(diff)
    bwl = (base_runs[0].get("settings") or {}).get("workload") or {}
    hwl = (head_runs[0].get("settings") or {}).get("workload") or {}
    for run, side in ((base_runs[0], "base"), (head_runs[0], "head")):
        if run.get("status") != "complete":
            notes.append(f"the {side} run is {run.get('status')!r}, not complete")
        if ((run.get("environment") or {}).get("git") or {}).get("dirty"):
            notes.append(f"the {side} run was measured on a dirty working tree")
    bcases, hcases = _cases_by_id(base_runs), _cases_by_id(head_runs)
    results: list[CaseComparison] = []
    for case_id in list(dict.fromkeys([*bcases, *hcases])):
        b = [c for c in bcases.get(case_id, []) if c.get("status") == "measured"]
        h = [c for c in hcases.get(case_id, []) if c.get("status") == "measured"]
        if run_reason:
            results.append(CaseComparison(case_id, False, run_reason))
            continue
        if not b or not h:
            missing = "base" if not b else "head"
            found = (bcases if missing == "base" else hcases).get(case_id)
            why = f"{found[0].get('status')}: {found[0].get('reason')}" if found else "absent"
            results.append(CaseComparison(case_id, False, f"not measured in the {missing} run ({why})"))
            continue
        metrics = tuple(_judge(m, b, h, crit, _mismatch(bwl, hwl, m.workload_keys)) for m in METRICS)
        results.append(CaseComparison(case_id, True, None, metrics))
    return Comparison(base_label, head_label, crit, tuple(results), tuple(notes))
