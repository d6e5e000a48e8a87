"""The ``efficiency`` command: gate exit codes and listings, compare / history / report output."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from efficiency.cli import main
from efficiency.report import history

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "reports"


def f(name: str) -> str:
    return str(FIXTURES / f"{name}.json")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gate_clean_run_exits_0_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "gate", f("base"))
    assert code == 0 and "GATE PASSED" in out and "regressions not checked" in out


def test_gate_lists_threshold_violations(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "gate", f("violation"))
    assert code == 1
    assert "GATE: 1 threshold violation(s):" in out
    assert ("smollm2-135m-bnb4: perplexity 38.42 vs 29.98 for the fp32 baseline is +28.15%, above the bnb4 "
            "limit of +20%") in out
    assert out.rstrip().endswith("GATE FAILED")


def test_gate_lists_regressions_against_a_baseline_report(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "gate", f("head-slow"), "--baseline", f("base"))
    assert code == 1
    assert "GATE: 1 regression(s):" in out and "smollm2-135m-bnb8: runtime (s) +14.00% beyond ±5%" in out
    code, out, _ = run(capsys, "gate", f("head-slow"), "--baseline", f("base"), "--fail-on-regression", "20")
    assert code == 0 and "GATE PASSED" in out
    code, out, _ = run(capsys, "gate", f("head-noise"), "--baseline", f("base"))
    assert code == 0 and "no significant regression (4 of 4 case(s) compared)" in out


def test_gate_fails_an_unfinished_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "gate", f("interrupted"))
    assert code == 1 and "the run is 'interrupted', not complete" in out


def test_gate_fails_when_nothing_was_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_json = json.loads(Path(f("base")).read_text())
    run_json["cases"] = [{"id": "opt-125m-fp32", "model": "opt-125m", "technique": "fp32", "status": "skipped",
                          "reason": "ModelUnavailable: offline and not in the cache"}]
    path = tmp_path / "skipped.json"
    path.write_text(json.dumps(run_json))
    code, out, _ = run(capsys, "gate", str(path))
    assert code == 1 and "no case was measured" in out and "opt-125m-fp32: skipped: ModelUnavailable" in out


def test_gate_against_the_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "h.sqlite")
    code, out, _ = run(capsys, "gate", f("head-slow"), "--baseline", "last", "--db", db)
    assert code == 0 and "no baseline run" in out  # no history yet: thresholds only, said so
    assert run(capsys, "history", "import", f("base"), f("dirty"), "--db", db)[0] == 0
    code, out, _ = run(capsys, "gate", f("head-slow"), "--baseline", "last", "--db", db)
    assert code == 1 and "vs last: run 1 (a1a1a1a1a1a1, complete)" in out  # the dirty run is newer, not used
    code, out, _ = run(capsys, "gate", f("head-slow"), "--baseline", "a1a1a1", "--db", db)
    assert code == 1 and "smollm2-135m-bnb8: runtime" in out


def test_gate_writes_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = tmp_path / "summary.md"
    md.write_text("before\n")
    assert run(capsys, "gate", f("violation"), "--baseline", f("base"), "--markdown", str(md))[0] == 1
    text = md.read_text()
    assert text.startswith("before\n### pytest-efficiency gate") and "- smollm2-135m-bnb4: perplexity" in text
    assert "| case | metric | base | head |" in text


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "gate", f("base"), "--baseline", str(tmp_path / "missing.json"))
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "gate", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read report" in err
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**json.loads(Path(f("base")).read_text()), "schema_version": 99}))
    code, _, err = run(capsys, "gate", str(newer))
    assert code == 2 and "schema version 99" in err
    db = tmp_path / "h.sqlite"
    history.connect(db).close()
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE schema_version SET version = 99")
    raw.close()
    code, _, err = run(capsys, "history", "--db", str(db))
    assert code == 2 and "schema version 99, newer than this pytest-efficiency" in err
    with pytest.raises(SystemExit):
        main(["compare", f("base")])


def test_compare_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", f("base"), f("head-settings"))
    assert code == 0 and "not compared: settings differ: context 512 vs 1024" in out
    assert "nothing compared" in out
    code, out, _ = run(capsys, "compare", f("base"), f("real-cpu-0001"), "--format", "markdown")
    assert "| smollm2-135m-fp32 | runtime (s) |" in out and "insufficient rounds" in out


def test_history_command_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    db, png = str(tmp_path / "h.sqlite"), tmp_path / "trend.png"
    names = ["base", "head-noise", "head-slow", "dirty"]
    code, out, _ = run(capsys, "history", "import", *(f(n) for n in names), "--db", db)
    assert code == 0 and out.count("added as run") == 4
    code, out, _ = run(capsys, "history", "import", f("base"), "--db", db)
    assert "already stored as run 1" in out
    code, out, _ = run(capsys, "history", "--db", db, "--technique", "bnb8", "--png", str(png))
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["run", "commit", "dirty", "status", "started", "case", "runtime_s", "settings"]
    assert lines[1].endswith("wikitext2 512/512/2048 AMD EPYC")
    assert [ln.split()[1][:2] for ln in lines[1:5]] == ["a1", "b2", "c3", "b2"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "history", "--db", db, "--metric", "perplexity", "--baseline-only")
    assert "12 point(s)" in out  # 3 clean complete runs x 4 cases


def test_report_command_writes_html_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    code, _, _ = run(capsys, "report", f("head-slow"), "-o", str(html), "--markdown", str(md),
                     "--compare", f("base"))
    assert code == 0
    assert html.read_text().count("data:image/png;base64,") == 3
    text = md.read_text()
    assert text.startswith("## pytest-efficiency") and "| smollm2-135m-bnb8 |" in text
    assert "REGRESSION: 1 significant regression(s)" in text


def test_cli_imports_neither_torch_nor_matplotlib() -> None:
    code = ("import sys, efficiency.cli, efficiency.report.tracking, efficiency.report.history; "
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
