"""One view-model of a run's cases for the three renderers (terminal table, Markdown summary, HTML page).

Columns come from the metric registry (``Metric.short``); each change against the baseline is shown with the
rounds behind it and their spread, and marked ``~`` when it is not significant within the run: fewer rounds
than the test needs, or a one-sided Mann-Whitney U test of the case's rounds against the baseline's above
alpha 0.05 (rounds of one run are compared with rounds of the same run here; across runs, ``efficiency
compare`` uses independent runs).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from efficiency.metrics import METRICS, Metric

ALPHA = 0.05
SCORE_KEYS = ("energy", "runtime", "balanced")


@dataclass(frozen=True)
class Cell:
    value: str
    change: str = ""  # "+12.3%" with rounds/spread/"~" where the metric has rounds


@dataclass(frozen=True)
class CaseRow:
    id: str
    status: str
    cells: dict[str, Cell]  # metric name -> formatted value and change
    score_values: tuple[str, ...]  # the energy, runtime and balanced priorities' scores, formatted; () unscored
    runtime_only_score: str
    pareto: bool
    gate: str  # "base" | "ok" | "FAIL" | "-" | status for unmeasured
    notes: list[str] = field(default_factory=list)

    def scores(self, between: str = "/") -> str:
        """The E/R/B scores in one cell, ``between`` them (a value may be "n/a", so never split this again)."""
        return between.join(self.score_values)


def _spread_pct(samples: list[float]) -> float | None:
    if len(samples) < 2:
        return None
    med = statistics.median(samples)
    return (max(samples) - min(samples)) / 2 / med * 100 if med else None


UNTESTED = "?"  # after a change's rounds: no test was possible within the run (UNTESTED_NOTE says why)
UNTESTED_NOTE = ("'?' = a change that cannot be tested within this run: the baseline's rounds of that metric are "
                 "not in it (an eager decode is a difference of medians, or the baseline case is not in the report)")


def significance(metric: Metric, case: Mapping[str, Any], base: Mapping[str, Any] | None) -> str:
    """``n=R ±S%`` for a metric with rounds, with ``~`` appended when the change is not significant and ``?``
    when it cannot be tested: the baseline is not in the report or has no rounds of the metric. (Before, such a
    change carried no mark, which the legend reads as significant.)"""
    samples = metric.round_samples(case)
    if not samples:
        return ""
    spread = _spread_pct(samples)
    text = f"n={len(samples)}" + (f" ±{spread:.1f}%" if spread is not None else "")
    if base is case:
        return text
    base_samples = metric.round_samples(base) if base is not None else []
    if not base_samples:
        return f"{text} {UNTESTED}"
    from efficiency.report.stats import mann_whitney_u, testable

    if not testable(len(samples), len(base_samples), ALPHA):
        return text + " ~"
    cv, bv = statistics.median(samples), statistics.median(base_samples)
    test = mann_whitney_u(samples, base_samples, "greater" if cv > bv else "less")
    return text + (" ~" if test.p_value > ALPHA else "")


def _score(s: Mapping[str, Any] | None) -> str:
    s = s or {}
    if s.get("status") in ("ok", "free"):
        return f"{s['value']:.3g}"
    return {"no-saving": "none", "unavailable": "n/a"}.get(str(s.get("status")), "")


def _gate(case: Mapping[str, Any]) -> str:
    if case.get("is_baseline"):
        return "base"
    th = case.get("threshold") or {}
    if not th.get("checked"):
        return "-"
    return "ok" if th.get("passed") else "FAIL"


def rows(report: Mapping[str, Any]) -> list[CaseRow]:
    cases = list(report.get("cases") or [])
    bases = {c["model"]: c for c in cases if c.get("is_baseline") and c.get("status") == "measured"}
    out: list[CaseRow] = []
    for c in cases:
        if c.get("status") != "measured":
            out.append(CaseRow(c["id"], str(c.get("status")), {}, (), "", False, str(c.get("status")),
                               [f"{c['id']}: {c.get('status')}: {c.get('reason')}"]))
            continue
        base = bases.get(c["model"])
        deltas = c.get("deltas") or {}
        cells: dict[str, Cell] = {}
        untested = False
        for m in METRICS:
            value = m.format(m.value(c))
            if m.name == "perplexity" and not (c.get("perplexity") or {}).get("meaningful"):
                value = m.format((c.get("perplexity") or {}).get("value")) + "*"
            change = None if c.get("is_baseline") or m.value(c) is None else deltas.get(m.name)
            text = "" if change is None else f"{change:+.1f}%"
            extra = significance(m, c, base) if change is not None and not c.get("is_baseline") else ""
            if extra.endswith(UNTESTED):
                untested = True
            cells[m.name] = Cell(value, f"{text} ({extra})" if text and extra else text)
        energy = c.get("energy") or {}
        if energy.get("energy_j") is not None and energy.get("uncertainty_j") is not None:
            cells["energy_j"] = Cell(f"{energy['energy_j']:.3g}±{energy['uncertainty_j']:.2g}",
                                     cells["energy_j"].change)
        scores = c.get("scores") or {}
        notes: list[str] = []
        if energy.get("energy_j") is None and energy.get("reason"):
            notes.append(f"{c['id']}: energy unavailable: {energy['reason']}")
        if not (c.get("perplexity") or {}).get("meaningful"):
            notes.append(f"{c['id']}: * {(c.get('perplexity') or {}).get('reason')}")
        memory = c.get("memory") or {}
        if memory.get("peak_bytes") is not None and memory.get("method"):
            notes.append(f"peak memory: {memory['method']}")
        for key in ("round_cap",):
            if (c.get("runtime") or {}).get(key):
                notes.append(f"{c['id']}: {c['runtime'][key]}")
        if (c.get("latency") or {}).get("prompt_note"):
            notes.append(f"{c['id']}: {c['latency']['prompt_note']}")
        for warning in (c.get("conditions") or {}).get("warnings") or []:
            notes.append(f"{c['id']}: {warning}")
        if untested:
            notes.append(f"{c['id']}: {UNTESTED_NOTE}")
        out.append(CaseRow(
            c["id"], "measured", cells,
            tuple(_score(scores.get(k)) for k in SCORE_KEYS) if scores else (),
            _score(scores.get("runtime_only")),
            bool((c.get("pareto") or {}).get("on_front")), _gate(c), notes))
    return out


def terminal_metrics() -> list[Metric]:
    return [m for m in METRICS if m.short]


def unique_notes(case_rows: list[CaseRow]) -> list[str]:
    """Notes once each (the same reason for several cases is said once)."""
    seen: set[str] = set()
    out: list[str] = []
    for row in case_rows:
        for note in row.notes:
            key = note.split(": ", 1)[-1]
            if key not in seen:
                seen.add(key)
                out.append(note)
    return out


def settings_line(report: Mapping[str, Any]) -> str:
    settings = report.get("settings") or {}
    wl = settings.get("workload") or {}
    return (f"device {settings.get('device')}, baseline {settings.get('baseline')}, {wl.get('dataset')} "
            f"context {wl.get('context')} stride {wl.get('stride')} max_tokens {wl.get('max_tokens')}; "
            f"status {report.get('status')}; opt: lower is better (see report settings.score_convention); "
            "'~' = change not significant within this run (n rounds, ± half-range spread)")
