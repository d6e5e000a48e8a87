"""Compare runs case by case: the change of every registry metric and a verdict that holds under run-to-run noise.

**Independent runs, not rounds.** Rounds inside one run share the process, the model load, the allocator
state, the clocks and the machine's load at that moment, so they are not independent samples: run-to-run
noise is larger than round-to-round noise, and a test on the rounds of one run against the rounds of another
calls run-to-run noise a regression (11.9% of A/A comparisons at 3% run-to-run noise, below). Here every run
contributes ONE value per case and metric (its median over rounds, the registry metric's value), and the
base runs are compared with the head runs: several runs of one commit pooled from the history, or several
report files per side.

**The verdict** for a metric measured with noise (``Metric.deterministic`` False in the registry: anything read
from a clock, an energy meter or a sampled memory level, or derived from one) needs BOTH:

1. practical: the median over the head runs changed against the median over the base runs by more than the
   threshold (``Criteria.runtime_pct``, default 5%; ``info_pct`` for metrics that are reported, not gated), and
2. statistical: a one-sided Mann-Whitney U test on the run values says the change is BEYOND the threshold
   (head / (1 + t) against base, ranks) at ``alpha`` (default 0.05).

Why this test: it makes no assumption about the shape of run-to-run noise (a run slowed by a busy machine is
one outlier, not a shifted mean as in a t-test), is exact at these sample sizes, and testing against the
threshold (not against "no change") makes a false regression need the data to show a slowdown beyond the
threshold with 95% confidence. Simulated (``python benchmarks/aa/simulate.py``: the simulation of
tests/report/test_compare.py, 3% run-to-run and 1% round noise, 7 rounds, 5 runs per side, 4000 A/A and 2000
planted comparisons): 0.00% false regressions in A/A comparisons (also when 1 run in 10 is slowed 4-10% by a busy
machine; the old rule on rounds of one run: 11.9% and 16.8%); a planted 15% slowdown detected in 99.2% (94.3% with
busy runs), a 10% one in 67%. Why ``MIN_RUNS = 5`` per side: with 4 the
power for 15% falls to about 92% (82% with busy runs), with 3 far lower, and one run per side is never a
verdict.

Fewer runs on a side than ``Criteria.min_runs``: ``insufficient runs`` (the reason says how many are needed),
never called. Deterministic metrics (perplexity, size, parameters, KL divergence, task accuracy) are judged by the
threshold alone (a rerun gives the same number). Verdicts, in the order they are decided: ``n/a`` (no value on
either side), ``not compared`` (a value on one side only, or settings that matter for this metric differ: its
``workload_keys``), ``insufficient runs``, ``unchanged`` (within the threshold), ``not significant`` (beyond the
threshold but not significantly beyond it), ``regression``, ``improvement``. ``insufficient runs`` and ``not
compared`` on a gated metric, and a case that could not be compared, are **inconclusive**: a gate can fail on
them (``--fail-on-inconclusive``).

Whole cases are not compared when the settings that make numbers comparable differ (workload dataset, context,
stride, max_tokens; device; machine; random weights; the run settings every step sees, ``RUN_SETTINGS``: compute
dtype, device map), or when the case itself measured something else (``case_identity``: the model's weights hash
or revision, the technique options of the case's steps, the calibration text they read, by its hash): the reason
names the difference. A case of the base that no head run selected (``-k``, another shard's: each head run
records what it selected, ``selected``, and none lists it) is outside the comparison, one note says so; a case the
head selected and lost, or any absent case of a head that does not record its selection, stays inconclusive.

**Unknown is not different.** A setting or identity part a report does not record (one written before it was
recorded, a local model folder without a revision) is unknown on that side and never a reason to refuse on its
own: old reports stay comparable with new ones on what both record. Runs pooled on one side must agree on what
they record, else that side measured different things and is not compared.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from efficiency.data import CALIBRATION_KEY
from efficiency.defaults import ALPHA, INFO_COMPARE_PCT, PERPLEXITY_COMPARE_PCT, REGRESSION_THRESHOLD_PCT
from efficiency.metrics import METRICS, Metric
from efficiency.report.schema import upgrade
from efficiency.report.stats import mann_whitney_u, testable
from efficiency.score import pct_change

Report = dict[str, Any]
Case = dict[str, Any]

# Thresholds and alpha come from efficiency.defaults; the runs a side needs is this module's decision.
MIN_RUNS = 5  # independent runs per side for a statistical verdict (see the module docstring)

REGRESSION, IMPROVEMENT = "regression", "improvement"
UNCHANGED, NOT_SIGNIFICANT = "unchanged", "not significant"
NA, NOT_COMPARED, INSUFFICIENT = "n/a", "not compared", "insufficient runs"
INCONCLUSIVE = (INSUFFICIENT, NOT_COMPARED)  # on a gated metric: the gate cannot say, it fails closed
# Settings every technique step of a run sees (the compute dtype bitsandbytes computes in, how a model is split
# across GPUs): runs that differ in one measured every case differently. The calibration text is a case's, by its
# hash (case_identity): its file's path says nothing of its content and differs between machines.
RUN_SETTINGS = ("compute_dtype", "device_map")


@dataclass(frozen=True)
class Criteria:
    """Practical thresholds in percent, the test's alpha and the runs each side needs."""

    runtime_pct: float = REGRESSION_THRESHOLD_PCT  # every gated metric measured with noise (runtime, energy)
    perplexity_pct: float = PERPLEXITY_COMPARE_PCT
    info_pct: float = INFO_COMPARE_PCT
    alpha: float = ALPHA
    min_runs: int = MIN_RUNS
    include_busy: bool = False  # let runs the suite flagged "machine busy" count for runtime/energy verdicts

    def __post_init__(self) -> None:
        if not all(0 <= v < float("inf") for v in (self.runtime_pct, self.perplexity_pct, self.info_pct)):
            raise ValueError("thresholds must be finite and >= 0 percent")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_runs < 2:
            raise ValueError(f"min_runs must be >= 2 (a test needs two runs per side), got {self.min_runs}")

    def threshold(self, metric: Metric) -> float:
        return {"quality": self.perplexity_pct, "regression": self.runtime_pct}.get(metric.kind, self.info_pct)

    def describe(self) -> str:
        return (f"runtime/energy ±{self.runtime_pct:g}%, perplexity ±{self.perplexity_pct:g}% (threshold only), "
                f"others ±{self.info_pct:g}% (reported, not gated); one-sided Mann-Whitney U on run medians "
                f"that the change is beyond the threshold, alpha {self.alpha:g}, >= {self.min_runs} runs per side"
                + ("" if self.include_busy else "; runs flagged 'machine busy' do not count for runtime/energy"))


@dataclass(frozen=True)
class MetricComparison:
    metric: str  # the registry metric's name
    base: float | None
    head: float | None
    change_pct: float | None
    threshold_pct: float
    verdict: str
    reason: str
    gated: bool
    p_value: float | None = None
    n_base: int = 0  # runs with a value
    n_head: int = 0

    @property
    def inconclusive(self) -> bool:
        return self.gated and self.verdict in INCONCLUSIVE


@dataclass(frozen=True)
class CaseComparison:
    case_id: str
    compared: bool
    reason: str | None = None
    metrics: tuple[MetricComparison, ...] = ()
    base_label: str | None = None  # where this case's baseline came from, when chosen per case

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

    def inconclusive(self) -> list[str]:
        """One line per case that could not be compared and per gated metric without a verdict."""
        out = [f"{c.case_id}: not compared: {c.reason}" for c in self.cases if not c.compared]
        out += [f"{c.case_id}: {m.metric}: {m.verdict}: {m.reason}" for c in self.cases for m in c.metrics
                if m.inconclusive]
        return out

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
    """What must be equal for two runs' cases to be compared at all: workload, random weights, machine and the
    run settings every technique step sees (:data:`RUN_SETTINGS`). A run setting the report does not record (one
    written before it was recorded) is absent from the key: unknown, see :func:`differing`."""
    settings = report.get("settings") or {}
    wl = settings.get("workload") or {}
    return {**{k: wl.get(k) for k in ("dataset", "context", "stride", "max_tokens")},
            "random_weights": bool(settings.get("random_weights")), **machine_of(report),
            **{k: settings[k] for k in RUN_SETTINGS if k in settings}}


def measurement_settings(report: Report) -> dict[str, Any]:
    """Where a metric's ``workload_keys`` (efficiency.metrics) are looked up: the workload's fields and the other
    settings sections (``baseline``, ``kld``, ``tasks``, ``serving``, ...), so the metric registry alone says which
    settings a metric depends on."""
    settings = report.get("settings") or {}
    return {**{k: v for k, v in settings.items() if k != "workload"}, **(settings.get("workload") or {})}


def differing(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str] | None = None) -> list[str]:
    """The ``keys`` (default: every key) that both sides record with different values, as ``key a vs b``. A key
    one side does not record is unknown there, never a difference on its own: a report written before a setting
    was recorded stays comparable with one that records it."""
    names = list(dict.fromkeys([*a, *b])) if keys is None else keys
    return [f"{k} {a[k]!r} vs {b[k]!r}" for k in names if k in a and k in b and a[k] != b[k]]


def pooled(keys: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """One side's settings from the keys of its runs: each key's value where a run records it (the first), and
    the keys whose recorded values differ between the runs (runs that measured different things: not one side)."""
    merged: dict[str, Any] = {}
    mixed: list[str] = []
    for key in keys:
        for k, v in key.items():
            if k in merged and merged[k] != v and k not in mixed:
                mixed.append(k)
            merged.setdefault(k, v)
    return merged, mixed


def case_identity(report: Report, case: Case) -> dict[str, Any]:
    """What one case measured beyond its run's settings: the model's weights (sha256 over its weight files) and
    revision, the technique options of the case's own steps, and the calibration text they read (its sha256). A
    part the report does not record (no weight files, a local folder without revision, a report from before options
    were recorded, a case that read no calibration text) is absent: unknown."""
    info = case.get("model_info") or {}
    out: dict[str, Any] = {k: str(info[k]) for k in ("weights_sha256", "revision") if info.get(k)}
    options = (report.get("settings") or {}).get("technique_options")
    if isinstance(options, Mapping):
        out["technique_options"] = {s: options[s] for s in case.get("steps") or [] if s in options}
    calibration = (case.get("technique_info") or {}).get(CALIBRATION_KEY)
    if calibration:
        out[CALIBRATION_KEY] = str(calibration)
    return out


# How a part of a case's identity is named, and the reason given when the two sides differ in it.
_IDENTITY_WORDS: dict[str, tuple[str, str]] = {
    "weights_sha256": ("model weights", "model weights differ (sha {0:.12} vs {1:.12})"),
    "revision": ("model revision", "model revisions differ ({0} vs {1})"),
    "technique_options": ("technique options", "technique options of the case's steps differ ({0!r} vs {1!r})"),
    CALIBRATION_KEY: ("calibration text", "calibration texts differ (sha {0:.12} vs {1:.12})"),
}


def identity_mismatch(base: Sequence[Mapping[str, Any]], head: Sequence[Mapping[str, Any]]) -> str | None:
    """Why cases of these identities (:func:`case_identity`, one per run) cannot be compared, None when they can:
    a part both sides record with different values, or that differs among one side's pooled runs."""
    (b, bmixed), (h, hmixed) = pooled(base), pooled(head)
    for side, mixed in (("base", bmixed), ("head", hmixed)):
        if mixed:
            return f"the pooled {side} runs differ in " + ", ".join(_IDENTITY_WORDS[k][0] for k in mixed)
    for k in dict.fromkeys([*b, *h]):
        if k in b and k in h and b[k] != h[k]:
            return _IDENTITY_WORDS[k][1].format(b[k], h[k])
    return None


def busy(case: Case) -> bool:
    """True when the machine was busy while this case was measured: the one rule of report/env.busy_warning,
    applied to the load snapshot the case recorded."""
    from efficiency.report.env import busy_warning

    load = (case.get("conditions") or {}).get("load")
    return isinstance(load, dict) and busy_warning(load) is not None


def _judge(metric: Metric, base: Sequence[Case], head: Sequence[Case], crit: Criteria,
           workload_diff: list[str]) -> MetricComparison:
    excluded = 0
    every_base = [v for c in base if (v := metric.value(c)) is not None]  # busy runs included: shown, not judged
    every_head = [v for c in head if (v := metric.value(c)) is not None]
    if not metric.deterministic and not crit.include_busy:  # a run on a busy machine: no sample of this code's speed
        quiet_base, quiet_head = [c for c in base if not busy(c)], [c for c in head if not busy(c)]
        # only runs that had a value count as left out: a metric no run measured is n/a, busy or not
        excluded = sum(busy(c) and metric.value(c) is not None for c in [*base, *head])
        base, head = quiet_base, quiet_head
    bv = [v for c in base if (v := metric.value(c)) is not None]
    hv = [v for c in head if (v := metric.value(c)) is not None]
    threshold = crit.threshold(metric)
    n = {"n_base": len(bv), "n_head": len(hv)}

    def out(verdict: str, reason: str, change: float | None = None, p: float | None = None) -> MetricComparison:
        # A side whose every run was left out as busy still shows its measured median (the reason says it was not
        # judged; before, it read "n/a" as if nothing had been measured); its run count stays that of judged runs.
        b = statistics.median(bv or every_base) if bv or every_base else None
        h = statistics.median(hv or every_head) if hv or every_head else None
        return MetricComparison(metric.name, b, h, change, threshold, verdict, reason, metric.gated, p, **n)

    if not bv and not hv and excluded:
        return out(INSUFFICIENT, f"every run was flagged 'machine busy' ({excluded}): values shown, no runtime/energy "
                   "verdict (rerun on a quiet machine, or --include-busy)")
    if not bv and not hv:
        return out(NA, "no value in either run (not measured here, or perplexity not meaningful)")
    if not bv or not hv:
        side = "base" if not bv else "head"
        if excluded:
            return out(INSUFFICIENT, f"every {side} run was flagged 'machine busy' ({excluded} left out): values "
                       "shown, no runtime/energy verdict (rerun on a quiet machine, or --include-busy)")
        return out(NOT_COMPARED, f"no value in the {side} run(s) but a value in the other")
    change = pct_change(statistics.median(hv), statistics.median(bv))
    if change is None:
        return out(NA, "base value is 0")
    if workload_diff:
        return out(NOT_COMPARED, "settings differ: " + "; ".join(workload_diff), change)
    beyond = abs(change) > threshold
    direction = REGRESSION if metric.is_worse(change) else IMPROVEMENT
    if metric.deterministic:
        if not beyond:
            return out(UNCHANGED, f"within ±{threshold:g}% (deterministic: threshold only)", change)
        return out(direction, f"{change:+.2f}% beyond ±{threshold:g}% (deterministic: threshold only)", change)
    runs = f"{len(bv)} vs {len(hv)} run(s)" + (f" ({excluded} flagged 'machine busy' left out)" if excluded else "")
    if min(len(bv), len(hv)) < crit.min_runs or not testable(len(hv), len(bv), crit.alpha):
        need = max(crit.min_runs, 3)
        where = "within" if not beyond else "beyond"
        return out(INSUFFICIENT, f"{runs}: a verdict needs >= {need} independent runs per side (rounds inside "
                   f"one run are not independent); {change:+.2f}% {where} ±{threshold:g}%, not called", change)
    if not beyond:
        return out(UNCHANGED, f"within ±{threshold:g}% ({runs})", change)
    if change < 0 and threshold >= 100:
        return out(UNCHANGED, f"a drop cannot be beyond -{threshold:g}%", change)
    up = change > 0
    test = mann_whitney_u(hv, bv, "greater" if up else "less", 1 + (threshold if up else -threshold) / 100)
    if test.p_value > crit.alpha:
        return out(NOT_SIGNIFICANT, f"{change:+.2f}% but not significantly beyond ±{threshold:g}% "
                   f"(p={test.p_value:.3g} > {crit.alpha:g}, {runs}): within run-to-run noise", change,
                   test.p_value)
    return out(direction, f"{change:+.2f}%, significantly beyond ±{threshold:g}% (p={test.p_value:.3g} <= "
               f"{crit.alpha:g}, one-sided Mann-Whitney U on run medians, {runs})", change, test.p_value)


def _cases_by_id(runs: Sequence[Report]) -> dict[str, list[tuple[Report, Case]]]:
    out: dict[str, list[tuple[Report, Case]]] = {}
    for run in runs:
        for case in run.get("cases") or []:
            out.setdefault(case["id"], []).append((run, case))
    return out


def _side_settings(runs: Sequence[Report]) -> tuple[dict[str, Any], list[str]]:
    return pooled([measurement_settings(r) for r in runs])


def _settings_diff(base: tuple[dict[str, Any], list[str]], head: tuple[dict[str, Any], list[str]],
                   keys: Sequence[str]) -> list[str]:
    """The metric's settings (``keys``) that differ between the sides, or among one side's pooled runs."""
    mixed = [f"{k} differs among the pooled {side} runs" for side, (_, m) in (("base", base), ("head", head))
             for k in keys if k in m]
    return mixed + differing(base[0], head[0], keys)


def _notes(runs: Sequence[Report], side: str) -> list[str]:
    notes = []
    for i, run in enumerate(runs):
        name = side if len(runs) == 1 else f"{side} run {i + 1}"
        if run.get("status") != "complete":
            notes.append(f"the {name} is {run.get('status')!r}, not complete")
        if ((run.get("environment") or {}).get("git") or {}).get("dirty"):
            notes.append(f"the {name} was measured on a dirty working tree")
    return notes


def not_selected(case_id: str, head_runs: Sequence[Report]) -> bool:
    """Whether no head run selected ``case_id`` (``-k``, another shard's), for a case none of them has: each records
    the grid cases it selected (``selected``) and none lists it. A case a head run selected and lost stays
    inconclusive, as does every absent case of a run that does not say what it selected (an older report, cases
    measured through ``eff_measure``, a merge that lacks a shard)."""
    return all(isinstance(run.get("selected"), list) and case_id not in run["selected"] for run in head_runs)


def compare(base_runs: Sequence[Report], head_runs: Sequence[Report], criteria: Criteria | None = None,
            base_label: str = "base", head_label: str = "head",
            base_for_case: Mapping[str, tuple[Sequence[Report], str]] | None = None) -> Comparison:
    """Compare every case id present in either side. Each run on a side is one independent sample per case.

    ``base_for_case`` chooses the baseline per case (case id -> (its runs, their label)), overriding
    ``base_runs`` for those cases: the latest eligible runs that measured that case."""
    crit = criteria or Criteria()
    if not head_runs or not (base_runs or base_for_case):
        raise ValueError("each side needs at least one run")
    base_runs = [upgrade(r) for r in base_runs]  # version-1 reports read like the current schema
    head_runs = [upgrade(r) for r in head_runs]
    per_case = {k: ([upgrade(r) for r in runs], label) for k, (runs, label) in (base_for_case or {}).items()}
    every_base = [*base_runs, *(r for runs, _ in per_case.values() for r in runs)]
    run_reason = None
    bkey, bmixed = pooled([comparable_key(r) for r in every_base])
    hkey, hmixed = pooled([comparable_key(r) for r in head_runs])
    for side, mixed in (("base", bmixed), ("head", hmixed)):
        if mixed and run_reason is None:
            run_reason = f"the pooled {side} runs do not share settings and machine ({', '.join(mixed)})"
    diff = differing(bkey, hkey)
    if diff and run_reason is None:
        run_reason = "settings differ: " + "; ".join(diff)
    notes = list(dict.fromkeys([*_notes(list({id(r): r for r in every_base}.values()), "base"),
                                *_notes(head_runs, "head")]))
    bcases, hcases = _cases_by_id(base_runs), _cases_by_id(head_runs)
    base_settings, head_settings = _side_settings(base_runs), _side_settings(head_runs)
    results: list[CaseComparison] = []
    outside: list[str] = []  # baseline cases the head runs did not select
    for case_id in list(dict.fromkeys([*bcases, *per_case, *hcases])):
        if case_id not in hcases and not_selected(case_id, head_runs):
            outside.append(case_id)
            continue
        label = None
        case_settings = base_settings
        if case_id in per_case:
            runs, label = per_case[case_id]
            found_base = _cases_by_id(runs).get(case_id, [])
            case_settings = _side_settings(runs)
        else:
            found_base = bcases.get(case_id, [])
        b = [(r, c) for r, c in found_base if c.get("status") == "measured"]
        h = [(r, c) for r, c in hcases.get(case_id, []) if c.get("status") == "measured"]
        if run_reason:
            results.append(CaseComparison(case_id, False, run_reason, (), label))
            continue
        if not b or not h:
            missing = "base" if not b else "head"
            found = found_base if missing == "base" else hcases.get(case_id)
            why = f"{found[0][1].get('status')}: {found[0][1].get('reason')}" if found else "absent"
            results.append(CaseComparison(case_id, False, f"not measured in the {missing} run ({why})", (),
                                          label))
            continue
        other = identity_mismatch([case_identity(r, c) for r, c in b], [case_identity(r, c) for r, c in h])
        if other:
            results.append(CaseComparison(case_id, False, other, (), label))
            continue
        bc, hc = [c for _, c in b], [c for _, c in h]
        metrics = tuple(_judge(m, bc, hc, crit, _settings_diff(case_settings, head_settings, m.workload_keys))
                        for m in METRICS)
        results.append(CaseComparison(case_id, True, None, metrics, label))
    if outside:
        shown = ", ".join(outside[:6]) + (f" and {len(outside) - 6} more" if len(outside) > 6 else "")
        notes.append(f"{len(outside)} case(s) of the base not selected in the head run (deselected, or another "
                     f"shard's): not compared ({shown})")
    return Comparison(base_label, head_label, crit, tuple(results), tuple(notes))
