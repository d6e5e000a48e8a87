"""What the plugin does with a finished run: add it to the history, compare it with a baseline
(``--eff-compare``) and fail the session on a significant regression or an inconclusive check
(``--eff-fail-on-regression``: the gate fails closed).

The history defaults to ``<reports-dir>/history.sqlite`` (``--eff-history PATH`` elsewhere, ``off`` to
disable); every run with at least one case is added, whatever its status: interrupted, failed and
dirty-tree runs are stored but never chosen as a baseline. ``--eff-fail-on-regression`` without
``--eff-compare`` compares with ``last`` (per case, the latest eligible commit that measured it). The head is
this run pooled with the stored runs of its commit (a verdict needs independent runs, efficiency.report.compare);
the baseline and the head are looked up before this run is added.

With ``--eff-fail-on-regression`` the session fails on: a significant regression beyond the threshold; a
missing or unreadable baseline (one line says why); any inconclusive verdict (insufficient runs, not compared,
a case missing from the baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from efficiency.defaults import HISTORY_FILENAME
from efficiency.errors import ConfigError
from efficiency.report import history
from efficiency.report.compare import Criteria, compare
from efficiency.report.gating import Baseline, head_label, head_runs, no_baseline_reason, report_files, resolve
from efficiency.report.io import ReportError
from efficiency.report.summary import comparison_lines

lines_key = pytest.StashKey[list[str]]()


def history_path(value: str | None, reports_dir: Path) -> Path | None:
    if value is None or value == "":
        return Path(reports_dir) / HISTORY_FILENAME
    return None if value.lower() in ("off", "none", "no") else Path(value).expanduser()


def check_fail_pct(fail_pct: float) -> None:
    """``--eff-fail-on-regression PCT``, checked at start-up by the rule the comparison applies (Criteria)."""
    try:
        Criteria(runtime_pct=fail_pct)
    except ValueError:
        raise ConfigError(f"--eff-fail-on-regression takes a finite percentage >= 0 (the runtime/energy increase "
                          f"that fails the session), got {fail_pct:g}") from None


def check_baseline_spec(history_opt: str | None, compare_spec: str | None, fail_pct: float | None,
                        reports_dir: Path) -> None:
    """What can be known before the run about the baseline of ``--eff-compare`` / ``--eff-fail-on-regression``
    (which compares with ``last`` by default): the report files a spec names exist (gating.report_files), and
    ``last`` or a commit has a history to be looked up in. The lookup itself waits for the run's end."""
    if compare_spec is not None and not compare_spec.strip():
        raise ConfigError(f"--eff-compare takes a report file, 'last' or a commit of the history, got "
                          f"{compare_spec!r}: give one, or leave the option out")
    spec = compare_spec or ("last" if fail_pct is not None else None)
    if not spec:
        return
    what = f"--eff-compare {spec}" if compare_spec else "--eff-fail-on-regression (without --eff-compare: 'last')"
    try:
        files = report_files(spec)
    except history.HistoryError as err:
        raise ConfigError(f"{what}: {err}; give an existing report file, 'last' or a commit of the history") \
            from None
    if files is not None:
        return
    db = history_path(history_opt, reports_dir)
    if db is None:
        raise ConfigError(f"{what}: {spec!r} is looked up in the history, but --eff-history is off: drop "
                          "--eff-history off, or compare with a report file (--eff-compare PATH.json)")
    if spec != "last" and not db.exists():
        raise ConfigError(f"{what}: {spec!r} is not a report file, and there is no history at {db} to look it up "
                          "as a commit")


def finish(report: dict[str, Any], reports_dir: Path, history_opt: str | None, compare_spec: str | None,
           fail_pct: float | None, criteria: Criteria | None = None) -> tuple[list[str], bool]:
    """Returns the summary lines and whether the session must fail (``fail_pct`` given: a significant
    regression beyond it, no usable baseline, or an inconclusive verdict)."""
    lines: list[str] = []
    db = history_path(history_opt, reports_dir)
    gating = fail_pct is not None
    if gating and not compare_spec:
        compare_spec = "last"
    baseline: Baseline | None = None
    head = [report]
    problem: str | None = None  # why there is no usable baseline
    if compare_spec:
        lookup_db = db or Path(reports_dir) / HISTORY_FILENAME
        try:
            if db is None and report_files(compare_spec) is None:
                raise history.HistoryError(f"--eff-history off: cannot look up {compare_spec!r} in the history")
            if compare_spec == "last" and db is not None and not db.exists():
                baseline = None  # this run is the first of the history it is added to below: nothing to compare yet
            else:
                baseline = resolve(compare_spec, report, lookup_db)
            head = head_runs([report], db)
            if baseline is None:
                problem = no_baseline_reason(lookup_db, [report])
        except (history.HistoryError, ReportError, ValueError) as err:
            problem = str(err)
    if db is not None:
        try:
            conn = history.connect(db)
            try:
                run_id, added = history.add_report(conn, report, None)
            finally:
                conn.close()
            lines.append(f"history: run {run_id} {'added to' if added else 'already in'} {db}")
        except history.HistoryError as err:
            lines.append(f"history: not recorded: {err}")
    failed = False
    if problem is not None:
        lines.append(f"compare: no baseline: {problem}: nothing compared")
        if gating:
            failed = True
            lines.append(f"--eff-fail-on-regression: the session fails: no usable baseline ({problem})")
    if baseline is not None:
        crit = criteria or (Criteria(runtime_pct=fail_pct) if fail_pct is not None else Criteria())
        comp = compare(baseline.runs, head, crit, baseline.label, head_label(head), baseline.per_case)
        lines += comparison_lines(comp, verbose=False, gated_only=True)
        inconclusive = comp.inconclusive()
        if inconclusive:
            lines.append(f"INCONCLUSIVE: {len(inconclusive)} verdict(s) could not be decided:")
            lines += [f"  {x}" for x in inconclusive]
        if gating and (comp.regressions() or inconclusive):
            failed = True
            why = [f"{len(comp.regressions())} significant regression(s)"] if comp.regressions() else []
            why += [f"{len(inconclusive)} inconclusive verdict(s)"] if inconclusive else []
            lines.append(f"--eff-fail-on-regression {fail_pct:g}: the session fails: {', '.join(why)}")
    return lines, failed


def on_sessionfinish(session: pytest.Session, report: dict[str, Any], reports_dir: Path) -> None:
    """Called by the plugin after the run's report is final."""
    config = session.config
    if not report or not report.get("cases") or hasattr(config, "workerinput"):
        return
    opt = config.getoption
    lines, failed = finish(report, reports_dir, opt("eff_history", None), opt("eff_compare", None),
                           opt("eff_fail_on_regression", None))
    config.stash[lines_key] = lines
    if failed and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def terminal_lines(config: pytest.Config) -> list[str]:
    return config.stash.get(lines_key, [])
