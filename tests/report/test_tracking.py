"""The plugin's end of a run: history, --eff-compare and --eff-fail-on-regression, through stored reports
(no model is loaded). The gate fails closed: no usable baseline, or an inconclusive verdict, fails the session
under --eff-fail-on-regression; a regression is called only on pooled independent runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import make_reports
from efficiency.errors import ConfigError
from efficiency.report import history
from efficiency.report.compare import MIN_RUNS
from efficiency.report.tracking import check_baseline_spec, check_fail_pct, finish

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures" / "reports"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def history_with(db: Path, *runs: dict[str, Any]) -> None:
    conn = history.connect(db)
    for run in runs:
        history.add_report(conn, run)
    conn.close()


def pooled(slow: float | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """MIN_RUNS runs of a base commit and MIN_RUNS runs of a head commit (bnb8 slowed by ``slow``)."""
    mr = make_reports()
    base = mr.repeated_runs("a1", MIN_RUNS, 31, "2026-11-20T10:00:00+00:00")
    head = mr.repeated_runs("c3", MIN_RUNS, 32, "2026-11-22T10:00:00+00:00",
                            slow={"bnb8": slow} if slow else None)
    return base, head


def test_regression_on_pooled_runs_fails_and_the_run_is_recorded(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite"
    base, head = pooled(1.15)
    history_with(db, *base, *head[:-1])
    lines, failed = finish(head[-1], tmp_path, None, None, 5.0)
    text = "\n".join(lines)
    assert failed, text
    assert f"Comparison: this run and {MIN_RUNS - 1} more of its commit vs last (chosen per case)" in text
    assert "REGRESSION: 1 significant regression(s)" in text and "smollm2-135m-bnb8" in text
    assert "--eff-fail-on-regression 5: the session fails: 1 significant regression(s)" in text
    assert f"history: run {2 * MIN_RUNS} added to {db}" in text


def test_pooled_noise_passes(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite"
    base, head = pooled(None)
    history_with(db, *base, *head[:-1], load("dirty"))  # a newer dirty run is never the baseline
    lines, failed = finish(head[-1], tmp_path, None, None, 5.0)
    assert not failed, lines
    assert any("no significant regression (4 of 4 case(s) compared)" in ln for ln in lines)
    assert not any("INCONCLUSIVE" in ln for ln in lines)


def test_one_run_against_one_is_inconclusive_and_fails_closed(tmp_path: Path) -> None:
    lines, failed = finish(load("head-slow"), tmp_path, "off", str(FIXTURES / "base.json"), 5.0)
    text = "\n".join(lines)
    assert failed and "INCONCLUSIVE: 4 verdict(s) could not be decided" in text
    assert "runtime_s: insufficient runs: 1 vs 1 run(s)" in text
    assert "the session fails: 4 inconclusive verdict(s)" in text
    assert "REGRESSION" not in text  # the planted slowdown is not called on one run a side


def test_compare_alone_never_fails(tmp_path: Path) -> None:
    lines, failed = finish(load("head-slow"), tmp_path, "off", str(FIXTURES / "base.json"), None)
    assert not failed and any("INCONCLUSIVE" in ln for ln in lines)
    assert not (tmp_path / "history.sqlite").exists()  # --eff-history off


@pytest.mark.parametrize("problem", ["empty history", "missing file", "unreadable file", "history off"])
def test_no_usable_baseline_fails_the_session_with_one_line(tmp_path: Path, problem: str) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text("{ not json")
    spec, hist = {"empty history": (None, None), "missing file": (str(tmp_path / "nope.json"), None),
                  "unreadable file": (str(junk), None), "history off": (None, "off")}[problem]
    lines, failed = finish(load("head-slow"), tmp_path, hist, spec, 5.0)
    assert failed, lines
    fail_lines = [ln for ln in lines if "the session fails" in ln]
    assert len(fail_lines) == 1 and "no usable baseline" in fail_lines[0]
    why = {"empty history": "no complete run on a clean tree", "missing file": "does not exist",
           "unreadable file": "cannot read report", "history off": "--eff-history off"}[problem]
    assert why in fail_lines[0]


def test_bad_compare_target_without_gating_is_reported_not_raised(tmp_path: Path) -> None:
    lines, failed = finish(load("head-slow"), tmp_path, "off", "last", None)
    assert not failed and lines == ["compare: no baseline: --eff-history off: cannot look up 'last' in the "
                                    "history: nothing compared"]
    lines, failed = finish(load("head-slow"), tmp_path, None, str(tmp_path / "nope.json"), None)
    assert not failed and "does not exist" in lines[-1]


def test_what_the_baseline_needs_is_checked_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, these failed only at the run's end, after the whole grid was measured."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.json").write_text("{}")
    db = tmp_path / "history.sqlite"
    for ok in ((None, "base.json", 5.0), ("off", str(tmp_path / "base.json"), 5.0), (None, "last", None),
               (None, None, 5.0), ("off", None, None)):
        check_baseline_spec(*ok, tmp_path)
    history_with(db, load("base"))
    check_baseline_spec(None, "a1b2c3", None, tmp_path)  # a commit: looked up at the end, in an existing history
    for (hist, spec, pct), message in (
            (("off", None, 5.0), r"--eff-fail-on-regression \(without --eff-compare: 'last'\): 'last' is looked up in "
                                 r"the history, but --eff-history is off"),
            (("off", "last", None), r"--eff-compare last: 'last' is looked up in the history, but --eff-history is "
                                    r"off"),
            ((None, "nope.json", None), r"--eff-compare nope.json: report nope.json does not exist"),
            ((None, "old/run", None), r"report old/run does not exist"),  # a path separator: a file, not a commit
            ((None, "a1b2c3", None), r"'a1b2c3' is not a report file, and there is no history at .*other"),
            # before: an empty spec was taken for no --eff-compare, and the run compared with nothing, silently
            ((None, "", None), r"--eff-compare takes a report file, 'last' or a commit of the history, got ''"),
            ((None, "  ", 5.0), r"--eff-compare takes a report file, 'last' or a commit of the history, got '  '"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_baseline_spec(hist, spec, pct, tmp_path / "other")
    check_fail_pct(0.0)
    for bad in (float("nan"), -5.0, float("inf")):
        with pytest.raises(ConfigError, match=r"--eff-fail-on-regression takes a finite percentage >= 0"):
            check_fail_pct(bad)


def test_case_missing_from_the_baseline_fails_closed(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite"
    base, head = pooled(None)
    for run in base:  # the baseline commit never measured bnb4
        run["cases"] = [c for c in run["cases"] if c["technique"] != "bnb4"]
    history_with(db, *base, *head[:-1])
    lines, failed = finish(head[-1], tmp_path, None, None, 5.0)
    assert failed
    assert any("smollm2-135m-bnb4: not compared: not measured in the base run (absent)" in ln for ln in lines)


CONFTEST = """
import json
import pytest
from efficiency.plugin import session_key


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    # plant a stored run as this session's report: the plugin then finishes, records and compares it
    session.config.stash[session_key].report = json.loads(open({path!r}).read())
"""


@pytest.mark.parametrize(("slow", "ret", "expected"), [
    (1.15, 1, "REGRESSION: 1 significant regression(s)"),
    (None, 0, "no significant regression (4 of 4 case(s) compared)"),
])
def test_plugin_options_end_to_end(pytester: pytest.Pytester, slow: float | None, ret: int,
                                   expected: str) -> None:
    base, head = pooled(slow)
    history_with(pytester.path / "reports" / "history.sqlite", *base, *head[:-1])
    (pytester.path / "head.json").write_text(json.dumps(head[-1]))
    pytester.makeconftest(CONFTEST.format(path=str(pytester.path / "head.json")))
    pytester.makepyfile(test_nothing="def test_ok():\n    pass\n")
    result = pytester.runpytest(f"--rootdir={pytester.path}", "--eff-device=cpu", "--eff-fail-on-regression=5",
                                "-p", "no:cacheprovider")
    assert result.ret == ret
    result.stdout.fnmatch_lines(["*pytest-efficiency*", "smollm2-135m-bnb8*",
                                 f"history: run {2 * MIN_RUNS} added to "
                                 f"{pytester.path / 'reports' / 'history.sqlite'}",
                                 "Comparison: this run and 4 more of its commit vs last (chosen per case)",
                                 f"*{expected}*"])


def test_plugin_fails_closed_on_a_single_run(pytester: pytest.Pytester) -> None:
    for name, target in (("head-slow", "head.json"), ("base", "base.json")):
        shutil.copy(FIXTURES / f"{name}.json", pytester.path / target)
    pytester.makeconftest(CONFTEST.format(path=str(pytester.path / "head.json")))
    pytester.makepyfile(test_nothing="def test_ok():\n    pass\n")
    # option=value: a separate path argument would take part in choosing the rootdir
    result = pytester.runpytest(f"--rootdir={pytester.path}", "--eff-device=cpu", "--eff-compare=base.json",
                                "--eff-fail-on-regression=5", "-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*INCONCLUSIVE: 4 verdict(s) could not be decided*",
                                 "*the session fails: 4 inconclusive verdict(s)*"])
