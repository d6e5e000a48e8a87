"""Release gate of one run: threshold breaches (efficiency.gate.check with the thresholds recorded in the
run's own settings), an unfinished run or errored cases, and significant regressions against a baseline run.
Shared by ``efficiency gate`` and the plugin's ``--eff-fail-on-regression``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficiency.config import Thresholds
from efficiency.gate import check
from efficiency.report import history
from efficiency.report.compare import Comparison, Criteria, compare
from efficiency.report.io import read
from efficiency.report.summary import LABELS, comparison_lines

Report = dict[str, Any]


def thresholds_of(report: Report) -> Thresholds:
    table = dict((report.get("settings") or {}).get("thresholds") or {})
    default = float(table.pop("default_pct", Thresholds().default_pct))
    return Thresholds(default, {str(k): float(v) for k, v in table.items()})


@dataclass(frozen=True)
class Baseline:
    runs: list[Report]
    label: str


def resolve(spec: str, run: Report | None, db: Path, include_dirty: bool = False,
            include_incomplete: bool = False) -> Baseline | None:
    """A report file, ``last`` (the latest eligible run in the history with the settings and machine of
    ``run``; None when there is none) or a commit (prefix) in the history, its runs pooled."""
    if Path(spec).is_file():
        return Baseline([read(Path(spec))], spec)
    if spec != "last" and Path(spec).suffix == ".json":
        raise history.HistoryError(f"baseline report {spec} does not exist")
    if not Path(db).exists():
        if spec == "last":
            return None
        raise history.HistoryError(f"{spec!r} is not a report file, and there is no history database at {db} "
                                   "to look it up as a commit")
    conn = history.connect(Path(db), create=False)
    try:
        if spec == "last":
            if run is None:
                raise history.HistoryError("'last' needs the run it is compared with")
            found = history.last_baseline(conn, run, include_dirty, include_incomplete)
            return None if found is None else Baseline([history.load(conn, found.id)], f"last: {found.label}")
        rows = history.at_commit(conn, spec, include_dirty, include_incomplete)
        label = f"{spec} ({len(rows)} runs pooled)" if len(rows) > 1 else rows[0].label
        return Baseline([history.load(conn, r.id) for r in rows], label)
    finally:
        conn.close()


@dataclass(frozen=True)
class GateResult:
    violations: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    comparison: Comparison | None = None

    @property
    def ok(self) -> bool:
        return not (self.violations or self.failures or self.regressions)

    def lines(self, markdown: bool = False) -> list[str]:
        dash = "- " if markdown else "  "
        out: list[str] = []
        if self.comparison is not None:
            out += comparison_lines(self.comparison, markdown, verbose=False, gated_only=True) + [""]
        for title, items in (("threshold violation", self.violations), ("failure", self.failures),
                             ("regression", self.regressions)):
            if items:
                out.append(f"GATE: {len(items)} {title}(s):")
                out += [dash + i for i in items]
        out += [f"note: {n}" for n in self.notes]
        out.append("GATE FAILED" if not self.ok else "GATE PASSED: no threshold violation, no failure and no "
                   "significant regression"
                   + ("" if self.comparison else " (no baseline: regressions not checked)"))
        return out


def gate(report: Report, baseline: Baseline | None = None, fail_pct: float = 5.0,
         criteria: Criteria | None = None) -> GateResult:
    settings = report.get("settings") or {}
    violations = [v.message for v in check(report.get("cases") or [], thresholds_of(report),
                                           str(settings.get("baseline")))]
    failures = [f"{c['id']}: error: {c.get('reason')}" for c in report.get("cases") or []
                if c.get("status") == "error"]
    if report.get("status") != "complete":
        failures.insert(0, f"the run is {report.get('status')!r}, not complete: its cases are not all "
                           "measured")
    notes = [f"{c['id']}: skipped: {c.get('reason')}" for c in report.get("cases") or []
             if c.get("status") == "skipped"]
    if not any(c.get("status") == "measured" for c in report.get("cases") or []):
        failures.append("no case was measured: nothing to gate")
    if baseline is None:
        return GateResult(violations, failures, [], notes, None)
    crit = criteria or Criteria(runtime_pct=fail_pct)
    comp = compare(baseline.runs, [report], crit, baseline.label, "this run")
    regressions = [f"{cid}: {LABELS[m.metric]} {m.reason}" for cid, m in comp.regressions()]
    if comp.compared == 0:
        notes.append("no case could be compared with the baseline (see the reasons above): regressions not "
                     "checked")
    return GateResult(violations, failures, regressions, notes, comp)
