"""The plugin's end of a run: history, --eff-compare and --eff-fail-on-regression, through stored reports
(no model is loaded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from efficiency.report import history
from efficiency.report.tracking import finish

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "reports"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def test_regression_fails_and_the_run_is_recorded(tmp_path: Path) -> None:
    lines, failed = finish(load("head-slow"), tmp_path, None, str(FIXTURES / "base.json"), 5.0)
    assert failed
    text = "\n".join(lines)
    assert "REGRESSION: 1 significant regression(s)" in text
    assert "--eff-fail-on-regression 5: the session fails" in text
    assert f"history: run 1 added to {tmp_path / 'history.sqlite'}" in text
    conn = history.connect(tmp_path / "history.sqlite", create=False)
    assert [r.commit for r in history.runs(conn)] == ["c3" * 20]
    conn.close()


def test_noise_passes_and_compare_alone_never_fails(tmp_path: Path) -> None:
    assert finish(load("head-noise"), tmp_path, "off", str(FIXTURES / "base.json"), 5.0)[1] is False
    lines, failed = finish(load("head-slow"), tmp_path, "off", str(FIXTURES / "base.json"), None)
    assert not failed and any("REGRESSION" in ln for ln in lines)
    assert not (tmp_path / "history.sqlite").exists()  # --eff-history off


def test_fail_on_regression_uses_the_last_clean_run(tmp_path: Path) -> None:
    db = str(tmp_path / "h.sqlite")
    lines, failed = finish(load("base"), tmp_path, db, None, 5.0)  # empty history: nothing to compare
    assert not failed and any("nothing compared" in ln for ln in lines)
    assert not finish(load("dirty"), tmp_path, db, None, 5.0)[1]  # dirty: stored, compared with base
    lines, failed = finish(load("head-slow"), tmp_path, db, None, 5.0)
    assert failed, lines  # against base (the newer dirty run is never a baseline)
    assert any("vs last: run 1 (a1a1a1a1a1a1, complete)" in ln for ln in lines)


def test_bad_compare_target_is_reported_not_raised(tmp_path: Path) -> None:
    lines, failed = finish(load("head-slow"), tmp_path, "off", "last", None)
    assert not failed and lines == ["compare: --eff-history off: cannot look up 'last' in the history"]
    lines, failed = finish(load("head-slow"), tmp_path, None, str(tmp_path / "nope.json"), 5.0)
    assert not failed and "does not exist" in lines[0]


CONFTEST = """
import json
import pytest
from efficiency.plugin import session_key


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    # plant a stored run as this session's report: the plugin then finishes, records and compares it
    session.config.stash[session_key].report = json.loads(open({path!r}).read())
"""


@pytest.mark.parametrize(("head", "ret", "expected"), [
    ("head-slow", 1, "REGRESSION: 1 significant regression(s)"),
    ("head-noise", 0, "no significant regression (4 of 4 case(s) compared)"),
])
def test_plugin_options_end_to_end(pytester: pytest.Pytester, head: str, ret: int, expected: str) -> None:
    for name, target in ((head, "head.json"), ("base", "base.json")):
        shutil.copy(FIXTURES / f"{name}.json", pytester.path / target)
    pytester.makeconftest(CONFTEST.format(path=str(pytester.path / "head.json")))
    pytester.makepyfile(test_nothing="def test_ok():\n    pass\n")
    # option=value: a separate path argument would take part in choosing the rootdir
    result = pytester.runpytest(f"--rootdir={pytester.path}", "--eff-device=cpu", "--eff-compare=base.json",
                                "--eff-fail-on-regression=5", "-p", "no:cacheprovider")
    assert result.ret == ret
    result.stdout.fnmatch_lines(["*pytest-efficiency*", "smollm2-135m-bnb8*",
                                 f"history: run 1 added to {pytester.path / 'reports' / 'history.sqlite'}",
                                 "Comparison: this run vs base.json", f"*{expected}*"])
    assert (pytester.path / "reports" / "history.sqlite").is_file()
