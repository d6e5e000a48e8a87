"""Release gate of one run: threshold breaches (efficiency.gate.check with the thresholds recorded in the
run's own settings), an unfinished run or errored cases, significant regressions against a baseline, and the
inconclusive verdicts (insufficient runs, not compared, a case missing from the baseline, no baseline), which
are named in the headline and fail the gate when ``fail_on_inconclusive`` (the gate fails closed).
Shared by ``efficiency gate`` and the plugin's ``--eff-fail-on-regression``.

A verdict needs several independent runs per side (efficiency.report.compare): the head is the gated run
pooled with the other stored runs of its commit (:func:`head_runs`), the baseline ``last`` is chosen per case
(history.last_per_case), a commit pools its runs, and report files can be given several per side.
"""

from __future__ import annotations

import glob
import os
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficiency.config import Thresholds
from efficiency.gate import check
from efficiency.report import history
from efficiency.report.compare import Comparison, Criteria, compare
from efficiency.report.structure import read_checked
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
    per_case: Mapping[str, tuple[list[Report], str]] | None = None  # ``last``: case id -> (its runs, label)


def report_files(spec: str) -> list[Path] | None:
    """The report files a spec names: one path, a glob pattern, or several joined by commas; None when the spec
    is not a file spec (a commit or 'last'). A named file that does not exist is an error: a part that ends with
    ``.json`` or holds a path separator names a file (a commit or 'last' never does); so is an existing folder
    whose name cannot be a commit (prefix) or 'last'. An empty spec is an error: it
    is what an unset environment variable gives, and taking it for "no baseline" would turn the check off."""
    if not spec.strip():
        raise history.HistoryError("the report file, 'last' or commit to compare with is an empty value (probably an "
                                   "unset environment variable)")
    parts = [p for p in spec.split(",") if p]
    paths: list[Path] = []
    for part in parts:
        if glob.has_magic(part):
            found = sorted(Path(p) for p in glob.glob(part))
            if not found:
                raise history.HistoryError(f"no report file matches {part!r}")
            paths += found
        elif Path(part).is_file():
            paths.append(Path(part))
        elif Path(part).is_dir() and not (part == "last" or re.fullmatch(r"[0-9a-fA-F]{4,40}", part)):
            raise history.HistoryError(f"{part} is a folder, not a report file or a commit: give its reports, e.g. "
                                       f"'{Path(part) / '*.json'}' (quoted), or a commit or 'last'")
        elif Path(part).suffix == ".json" or len(parts) > 1 or "/" in part or os.sep in part:
            raise history.HistoryError(f"report {part} " + ("is not a file" if Path(part).exists() else
                                                              "does not exist"))
        else:
            return None
    return paths or None


class PoolError(ValueError):
    """Runs given as samples of one side that cannot be; the message names the file and why."""


def distinct_runs(reports: Sequence[Report], names: Sequence[str]) -> None:
    """Refuse two given runs that hold one measurement (history.same_measurement: a shard report and the report
    merged from it): as two samples of one side they would count it twice."""
    for j, later in enumerate(reports):
        for i in range(j):
            if history.same_measurement(reports[i], later):
                raise PoolError(f"{names[j]} and {names[i]} hold the same measurement (a shard report and the "
                                "report merged from it, or two reports merged from one shard): they are one run, "
                                "give one of them")


def files_side(files: Sequence[Path], label: str) -> Baseline:
    """The runs of report files as one side, each one sample (:func:`distinct_runs`)."""
    reports = [read_checked(p) for p in files]
    distinct_runs(reports, [str(p) for p in files])
    return Baseline(reports, label)


def _open(db: Path) -> sqlite3.Connection:
    return history.connect(Path(db), create=False)


def resolve(spec: str, head: Sequence[Report] | Report | None, db: Path, include_dirty: bool = False,
            include_incomplete: bool = False) -> Baseline | None:
    """Report file(s) (a path, a glob, or several joined by commas), ``last`` (per case, the latest eligible
    commit in the history that measured it, with the settings and machine of ``head``; None when the history
    has none) or a commit (prefix) in the history, its runs pooled. A history database that does not exist is
    an error for ``last`` as for a commit: a mistyped or uncached path must not pass as "no baseline yet"."""
    files = report_files(spec)
    if files is not None:
        return files_side(files, spec)
    if not Path(db).exists():
        if spec == "last":
            raise history.HistoryError(f"'last' is looked up in the history, but there is no history database at "
                                       f"{db} (a mistyped path, or a history not restored?)")
        raise history.HistoryError(f"{spec!r} is not a report file, and there is no history database at {db} "
                                   "to look it up as a commit")
    conn = _open(db)
    try:
        if spec == "last":
            if not head:
                raise history.HistoryError("'last' needs the run it is compared with")
            like = [head] if isinstance(head, dict) else list(head)
            per_case = history.last_per_case(conn, like, include_dirty, include_incomplete)
            return Baseline([], "last (chosen per case)", per_case) if per_case else None
        rows = history.at_commit(conn, spec, include_dirty, include_incomplete)
        label = f"{spec} ({len(rows)} runs pooled)" if len(rows) > 1 else rows[0].label
        return Baseline([history.load(conn, r.id) for r in rows], label)
    finally:
        conn.close()


def _code(report: Report) -> str:
    """The code a run measured: its commit, and whether the working tree was dirty."""
    git = (report.get("environment") or {}).get("git") or {}
    commit = git.get("commit") or "none (outside git)"
    dirty = git.get("dirty")
    return commit + (" on a dirty tree" if dirty else "" if dirty is False else " (dirty flag not recorded)")


def head_runs(reports: Sequence[Report], db: Path | None, names: Sequence[str] | None = None) -> list[Report]:
    """The head side: the given runs and the other stored runs of the first one's commit (clean, complete, same
    settings and machine), each once, without their cases that measured other weights or technique options than
    the first run's (history.same_cases_only). The given runs are more runs of the first one's code: one of
    another commit or dirty flag, or two holding one measurement, are refused (PoolError naming them, ``names``
    the given runs' files); a stored run holding one of their measurements (a shard of a merged head, the run
    merged from a shard) is the head itself, not one more run."""
    labels = list(names or [f"run {i + 1}" for i in range(len(reports))])
    for report, name in zip(reports[1:], labels[1:], strict=True):
        if _code(report) != _code(reports[0]):
            raise PoolError(f"{name} is a run of commit {_code(report)}, not of {labels[0]}'s commit "
                            f"{_code(reports[0])}: only more runs of the gated run's code are pooled with it")
    distinct_runs(reports, labels)
    out = list(reports)
    if db is None or not Path(db).exists() or not reports:
        return out
    conn = _open(db)
    try:
        seen = {history.report_hash(r) for r in out}
        for run in history.same_commit_runs(conn, reports[0], reports[1:]):
            digest = history.report_hash(run)
            if digest not in seen:
                seen.add(digest)
                out.append(history.same_cases_only(run, reports[0]))
    finally:
        conn.close()
    return out


def head_label(head: Sequence[Report]) -> str:
    """What the head side is, in the comparison's title: this run, the other runs of its commit that measured some
    of its cases again (samples pooled with it), and apart those that measured only other cases (the other shard of
    a sharded run, say: they add cases, not samples)."""
    mine = {c["id"] for c in head[0].get("cases") or []} if head else set()
    repeats = sum(1 for r in head[1:] if mine & {c["id"] for c in r.get("cases") or []})
    others = len(head) - 1 - repeats
    label = "this run" + (f" and {repeats} more of its commit" if repeats else "")
    return label + (f" (with {others} run{'s' if others > 1 else ''} of its commit that measured other cases)"
                    if others else "")


def no_baseline_reason(db: Path, head: Sequence[Report]) -> str:
    """Why ``last`` found no baseline for ``head`` in ``db``. Where the history holds runs of the head's own commit
    (clean, same settings and machine) it says that those are more runs of the head's code, pooled with it and
    never its baseline: the plain "no run" read as if the run stored a minute ago had been lost."""
    plain = f"no complete run on a clean tree with the same settings and machine in {db}"
    if not head or not Path(db).exists():
        return plain
    conn = _open(db)
    try:
        same = history.same_commit_runs(conn, head[0])
    finally:
        conn.close()
    if not same:
        return plain
    commit = str(((head[0].get("environment") or {}).get("git") or {}).get("commit") or "")[:12]
    return (f"no complete run of an earlier commit on a clean tree with the same settings and machine in {db}: its "
            f"{len(same)} run(s) of this commit {commit} are more runs of this code, pooled with this run, never "
            "its baseline")


@dataclass(frozen=True)
class GateResult:
    violations: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    inconclusive: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    comparison: Comparison | None = None
    fail_on_inconclusive: bool = False

    @property
    def ok(self) -> bool:
        return not (self.violations or self.failures or self.regressions
                    or (self.fail_on_inconclusive and self.inconclusive))

    def headline(self) -> str:
        parts = [f"{len(items)} {title}" for title, items in (
            ("threshold violation(s)", self.violations), ("failure(s)", self.failures),
            ("significant regression(s)", self.regressions)) if items]
        inconclusive = f"{len(self.inconclusive)} inconclusive verdict(s)" if self.inconclusive else ""
        if not self.ok:
            why = parts + ([inconclusive + " (--fail-on-inconclusive)"]
                           if self.fail_on_inconclusive and inconclusive else [])
            return "GATE FAILED: " + ", ".join(why)
        if inconclusive:
            return (f"GATE PASSED WITH {inconclusive.upper()}: no threshold violation, no failure and no "
                    "significant regression, but the regression check could not decide everything (listed "
                    "above; --fail-on-inconclusive fails on them)")
        return "GATE PASSED: no threshold violation, no failure and no significant regression"

    def lines(self, markdown: bool = False) -> list[str]:
        dash = "- " if markdown else "  "
        out: list[str] = []
        if self.comparison is not None:
            out += comparison_lines(self.comparison, markdown, verbose=False, gated_only=True) + [""]
        for title, items in (("threshold violation", self.violations), ("failure", self.failures),
                             ("regression", self.regressions), ("inconclusive verdict", self.inconclusive)):
            if items:
                out.append(f"GATE: {len(items)} {title}(s):")
                out += [dash + i for i in items]
        out += [f"note: {n}" for n in self.notes]
        out.append(self.headline())
        return out


def gate(report: Report, baseline: Baseline | None = None, fail_pct: float | None = None,
         criteria: Criteria | None = None, fail_on_inconclusive: bool = False,
         head: Sequence[Report] | None = None, no_baseline: str | None = None) -> GateResult:
    """Gate ``report``; ``head``: the runs pooled with it for the regression check (default: it alone);
    ``no_baseline``: why there is no baseline when regressions were asked for (an inconclusive verdict)."""
    settings = report.get("settings") or {}
    cases = report.get("cases") or []
    violations = [v.message for v in check(cases, thresholds_of(report), str(settings.get("baseline")))]
    violations += [v["message"] for c in cases for v in (c.get("threshold") or {}).get("accuracy_violations") or []]
    failures = [f"{c['id']}: {c.get('status')}: {c.get('reason')}" for c in cases
                if c.get("status") in ("error", "invalid", "oom")]
    if report.get("status") != "complete":
        failures.insert(0, f"the run is {report.get('status')!r}, not complete: its cases are not all "
                           "measured")
    notes = [f"{c['id']}: skipped: {c.get('reason')}" for c in cases if c.get("status") == "skipped"]
    if not any(c.get("status") == "measured" for c in cases):
        failures.append("no case was measured: nothing to gate")
    if baseline is None:
        inconclusive = [f"no baseline: {no_baseline}"] if no_baseline else []
        if not no_baseline:
            notes.append("no baseline given: regressions not checked")
        return GateResult(violations, failures, [], inconclusive, notes, None, fail_on_inconclusive)
    crit = criteria or (Criteria(runtime_pct=fail_pct) if fail_pct is not None else Criteria())
    head_side = list(head) if head else [report]
    comp = compare(baseline.runs, head_side, crit, baseline.label, head_label(head_side), baseline.per_case)
    regressions = [f"{cid}: {LABELS[m.metric]} {m.reason}" for cid, m in comp.regressions()]
    return GateResult(violations, failures, regressions, comp.inconclusive(), notes, comp, fail_on_inconclusive)
