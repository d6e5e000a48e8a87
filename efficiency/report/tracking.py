"""What the plugin does with a finished run: add it to the history, compare it with a baseline
(``--eff-compare``) and fail the session on a significant regression (``--eff-fail-on-regression``).

The history defaults to ``<reports-dir>/history.sqlite`` (``--eff-history PATH`` elsewhere, ``off`` to
disable); every run with at least one case is added, whatever its status: interrupted, failed and
dirty-tree runs are stored but never chosen as a baseline. ``--eff-fail-on-regression`` without
``--eff-compare`` compares with ``last``. The baseline is looked up before this run is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from efficiency.report import history
from efficiency.report.compare import Criteria, compare
from efficiency.report.gating import Baseline, resolve
from efficiency.report.io import ReportError
from efficiency.report.summary import comparison_lines

lines_key = pytest.StashKey[list[str]]()


def history_path(value: str | None, reports_dir: Path) -> Path | None:
    if value is None or value == "":
        return Path(reports_dir) / "history.sqlite"
    return None if value.lower() in ("off", "none", "no") else Path(value).expanduser()


def finish(report: dict[str, Any], reports_dir: Path, history_opt: str | None, compare_spec: str | None,
           fail_pct: float | None) -> tuple[list[str], bool]:
    """Returns the summary lines and whether the session must fail (a significant regression beyond
    ``fail_pct``)."""
    lines: list[str] = []
    db = history_path(history_opt, reports_dir)
    if fail_pct is not None and not compare_spec:
        compare_spec = "last"
    baseline: Baseline | None = None
    lookup_failed = False
    if compare_spec:
        try:
            if db is None and not Path(compare_spec).is_file():
                raise history.HistoryError(
                    f"--eff-history off: cannot look up {compare_spec!r} in the history")
            baseline = resolve(compare_spec, report, db or Path(reports_dir) / "history.sqlite")
        except (history.HistoryError, ReportError, ValueError) as err:
            lines.append(f"compare: {err}")
            lookup_failed = True
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
    if compare_spec and baseline is None and not lookup_failed:
        lines.append("compare: no complete run on a clean tree with the same settings and machine in the "
                     "history yet: nothing compared")
    if baseline is not None:
        crit = Criteria(runtime_pct=fail_pct if fail_pct is not None else 5.0)
        comp = compare(baseline.runs, [report], crit, baseline.label, "this run")
        lines += comparison_lines(comp, verbose=False, gated_only=True)
        if fail_pct is not None and comp.regressions():
            failed = True
            lines.append(f"--eff-fail-on-regression {fail_pct:g}: the session fails")
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
