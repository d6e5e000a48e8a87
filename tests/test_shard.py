"""Sharding the grid across machines and merging the shard reports: the union of the shards is the grid, no case
twice, a model's cases together, balanced; the merged report gates like the unsharded one; reports of another
commit, settings or machine, and a case measured twice, are refused with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from efficiency.cli import main
from efficiency.report import history
from efficiency.report.gating import gate
from efficiency.report.schema import upgrade
from efficiency.shard import MergeError, assignment, merge, parse_shard, shard

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reports"
MODELS = ("smollm2-135m", "opt-125m", "gpt2", "opt-350m", "distilgpt2")


def grid(sizes: dict[str, int]) -> dict[str, list[str]]:
    return {m: [f"{m}-t{i}" for i in range(n)] for m, n in sizes.items()}


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_union_of_shards_is_the_grid_with_no_case_twice_and_models_together(count: int) -> None:
    g = grid({"a": 5, "b": 4, "c": 4, "d": 2, "e": 1, "f": 1, "g": 3})
    parts = [shard(g, i, count) for i in range(1, count + 1)]
    every = [cid for p in parts for cid in p]
    assert sorted(every) == sorted(cid for cids in g.values() for cid in cids) and len(every) == len(set(every))
    for model, cids in g.items():
        assert sum(set(cids) <= set(p) for p in parts) == 1, model  # all its cases in exactly one shard
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= max(len(c) for c in g.values())  # balanced up to one model
    # deterministic: every machine computes the same split, whatever order it lists the grid in
    assert assignment(g, count) == assignment(dict(reversed(list(g.items()))), count)


def test_balance_by_case_count() -> None:
    owner = assignment(grid({"big": 6, "m1": 3, "m2": 3, "s": 1}), 2)
    assert owner == {"big": 1, "m1": 2, "m2": 2, "s": 1}  # 7 against 6, not 9 against 4 (grid order)


def test_shard_spec() -> None:
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "x", "1/2/3", "1-2"):
        with pytest.raises(ValueError, match="--eff-shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="between 1 and 3"):
        shard(grid({"a": 1}), 4, 3)


def grid_report(name: str = "violation") -> dict[str, Any]:
    """A real fixture run widened to several models (each a copy of the measured one under another name)."""
    run = upgrade(json.loads((FIXTURES / f"{name}.json").read_text()))
    cases = []
    for model in MODELS:
        for case in run["cases"]:
            c = copy.deepcopy(case)
            c["model"], c["id"] = model, f"{model}-{case['technique']}"
            cases.append(c)
    run["cases"] = cases
    run["settings"]["models"] = list(MODELS)
    run["violations"] = [{**v, "case": f"{m}-bnb4", "message": v["message"].replace("smollm2-135m", m)}
                         for m in MODELS for v in run["violations"]]
    return run


def split(run: dict[str, Any], count: int) -> list[dict[str, Any]]:
    by_model: dict[str, list[str]] = {}
    for c in run["cases"]:
        by_model.setdefault(c["model"], []).append(c["id"])
    out = []
    for i in range(1, count + 1):
        ids = set(shard(by_model, i, count))
        part = copy.deepcopy(run)
        part["cases"] = [c for c in part["cases"] if c["id"] in ids]
        part["violations"] = [v for v in part["violations"] if v["case"] in ids]
        part["settings"]["shard"] = {"index": i, "count": count}
        part["environment"]["hostname"] = f"runner-{i}"
        out.append(part)
    return out


def test_merged_report_equals_the_unsharded_one_and_gates_like_it() -> None:
    whole = grid_report()
    merged = merge(split(whole, 3), ["s1.json", "s2.json", "s3.json"])
    assert merged["status"] == "complete" and merged["schema_version"] == whole["schema_version"]
    assert [c["id"] for c in merged["cases"]] == [c["id"] for c in whole["cases"]]  # the grid's order
    assert merged["cases"] == whole["cases"] and merged["settings"] == whole["settings"]
    assert sorted(v["message"] for v in merged["violations"]) == sorted(v["message"] for v in whole["violations"])
    assert [m["source"] for m in merged["merged_from"]] == ["s1.json", "s2.json", "s3.json"]
    g_whole, g_merged = gate(whole), gate(merged)
    assert not g_whole.ok and g_merged.ok == g_whole.ok
    assert sorted(g_merged.violations) == sorted(g_whole.violations) and g_merged.failures == g_whole.failures


@pytest.mark.parametrize(("change", "reason"), [
    (lambda r: r["environment"]["git"].update(commit="9" * 40), "commit"),
    (lambda r: r["settings"]["workload"].update(context=1024), "settings.workload.context: 512 vs 1024"),
    (lambda r: r["environment"].update(cpu="Intel Xeon"), "machine.cpu: 'AMD EPYC' vs 'Intel Xeon'"),
    (lambda r: r["environment"]["packages"].update(torch="2.0.0"), "packages.torch"),
])
def test_merge_refuses_shards_of_another_run_with_the_reason(change: Any, reason: str) -> None:
    parts = split(grid_report(), 2)
    change(parts[1])
    with pytest.raises(MergeError, match="b.json is not a shard of the same run as a.json") as err:
        merge(parts, ["a.json", "b.json"])
    assert reason in str(err.value)


def _recorded_settings(root: Path, table: dict[str, Any] | None = None, **opts: Any) -> dict[str, Any]:
    """The settings a run records (EfficiencySession.settings) for these options and pyproject table."""
    from efficiency.session import EfficiencySession
    from efficiency.settings import build_config

    cfg = build_config({"models": "smollm2-135m", "techniques": "fp32,bnb4", **opts}, table or {}, root,
                       device="cpu")
    return EfficiencySession(cfg, root).settings()


@pytest.mark.parametrize(("table", "opts", "reason"), [
    ({}, {"compute_dtype": "bf16"}, "settings.compute_dtype: None vs 'bf16'"),
    # options are recorded by the canonical name of the step they set (bnb4-nf4 is bnb4), as a case's steps say
    ({"technique": {"bnb4-nf4": {"double_quant": True}}}, {}, "settings.technique_options.bnb4: None vs "
                                                               "{'double_quant': True}"),
    ({}, {"kld_tokens": "512"}, "settings.kld.tokens: 4096 vs 512"),
    ({}, {"batch_sizes": "1,8"}, "settings.serving.batch_sizes: [] vs [1, 8]"),
])
def test_merge_refuses_shards_run_with_other_technique_or_phase_settings(tmp_path: Path, table: dict[str, Any],
                                                                         opts: dict[str, Any], reason: str) -> None:
    """The review's reproduction: shard 2/2 run with --eff-compute-dtype bf16 merged into 'status complete' because
    the report did not record the compute dtype (nor technique options, calibration, device map, kld/tasks/serving)."""
    parts = split(grid_report(), 2)
    for part, settings in zip(parts, (_recorded_settings(tmp_path), _recorded_settings(tmp_path, table, **opts)),
                              strict=True):
        part["settings"] = {**settings, "shard": part["settings"]["shard"]}
    with pytest.raises(MergeError, match="b.json is not a shard of the same run as a.json") as err:
        merge(parts, ["a.json", "b.json"])
    assert reason in str(err.value)


def test_recorded_settings_name_what_the_techniques_and_phases_ran_with(tmp_path: Path) -> None:
    settings = _recorded_settings(tmp_path, {"technique": {"bnb4-nf4": {"double_quant": True}}}, compute_dtype="bf16",
                                  calibration=str(tmp_path / "calib.txt"))
    assert settings["compute_dtype"] == "bf16" and settings["calibration_path"] == str(tmp_path / "calib.txt")
    assert settings["technique_options"] == {"bnb4": {"double_quant": True}} and settings["device_map"] is None
    assert settings["kld"]["tokens"] > 0 and settings["serving"]["batch_sizes"] == []
    assert settings["tasks"]["tasks"] == [] and settings["accuracy_thresholds"] == {}
    json.dumps(settings, allow_nan=False)  # JSON as written


def test_merge_refuses_a_case_measured_twice_and_marks_a_missing_shard() -> None:
    parts = split(grid_report(), 3)
    with pytest.raises(MergeError, match=r"case .* is in both a.json and b.json"):
        merge([parts[0], parts[0]], ["a.json", "b.json"])
    partial = merge(parts[:2])
    assert partial["status"] == "incomplete" and "shard(s) 3 of 3 missing" in partial["merge_notes"][0]
    parts[1]["status"] = "interrupted"
    assert merge(parts)["status"] == "interrupted"


def test_merge_command_end_to_end_gate_and_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = grid_report()
    paths = []
    for i, part in enumerate(split(whole, 2)):
        paths.append(tmp_path / f"shard-{i + 1}.json")
        paths[-1].write_text(json.dumps(part))
    (tmp_path / "whole.json").write_text(json.dumps(whole))
    out = tmp_path / "run.json"
    assert main(["merge", *map(str, paths), "-o", str(out)]) == 0
    assert f"{out}: {len(whole['cases'])} case(s) from 2 shard report(s), status complete" in capsys.readouterr().out
    assert main(["gate", str(tmp_path / "whole.json"), "--no-pool"]) == 1
    whole_out = capsys.readouterr().out
    assert main(["gate", str(out), "--no-pool"]) == 1
    assert capsys.readouterr().out == whole_out  # the merged run gates exactly like the unsharded one
    db = tmp_path / "h.sqlite"
    assert main(["history", "import", str(out), "--db", str(db)]) == 0
    conn = history.connect(db, create=False)
    assert len(history.trend(conn, "runtime_s")) == len(whole["cases"])
    conn.close()
    paths[1].write_text(json.dumps({**json.loads(paths[1].read_text()), "environment": {
        **whole["environment"], "git": {"commit": "9" * 40, "dirty": False}}}))
    capsys.readouterr()
    assert main(["merge", *map(str, paths), "-o", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert f"{paths[1]} is not a shard of the same run" in err and "commit" in err
    assert not (tmp_path / "bad.json").exists()


def test_merged_report_names_every_shards_missing_cases() -> None:
    parts = split(grid_report(), 3)
    parts[1]["status"], parts[1]["missing"] = "incomplete", [parts[1]["cases"].pop()["id"]]
    merged = merge(parts)
    assert merged["status"] == "incomplete" and merged["missing"] == parts[1]["missing"]
    assert "missing" not in merge(split(grid_report(), 3))


def _shards_and_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, list[Path], Path]:
    """A history holding a baseline run (commit a1) and the two shard reports of a run of commit c3, each added as
    its pytest session adds it; the shards' files and the report merged from them (not stored)."""
    db = tmp_path / "h.sqlite"
    conn = history.connect(db)
    history.add_report(conn, grid_report("base"))
    paths = []
    for i, part in enumerate(split(grid_report("head-slow"), 2)):
        paths.append(tmp_path / f"shard-{i + 1}.json")
        paths[-1].write_text(json.dumps(part))
        history.add_report(conn, part, str(paths[-1]))
    conn.close()
    merged = tmp_path / "merged.json"
    assert main(["merge", *map(str, paths), "-o", str(merged)]) == 0
    capsys.readouterr()
    return db, paths, merged


def test_a_merged_run_and_its_shard_reports_are_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the shard reports (each added to the history by its session) and the report merged from them were
    counted as independent runs. ``gate merged.json --baseline a1a1`` said "this run and 2 more of its commit" and
    "1 vs 2 run(s)" for a case one shard measured; ``history import merged.json`` stored it beside its shards, so
    ``history`` listed every case twice, and pooling commit c3 (``--baseline c3c3``, ``last``) counted each case
    twice. Now a merged report and the reports in its ``merged_from`` are one run: never pooled together, and where
    both are stored only the merged one (the one with the most cases) counts."""
    db, paths, merged = _shards_and_merged(tmp_path, capsys)
    code = main(["gate", str(merged), "--baseline", "a1a1", "--db", str(db)])
    out = capsys.readouterr().out
    assert code == 0 and "this run and" not in out and "1 vs 2 run(s)" not in out, out
    assert "Comparison: this run vs" in out and "insufficient runs: 1 vs 1 run(s)" in out
    # given as files, a shard and the report merged from it are refused as two runs of one side
    assert main(["gate", str(merged), str(paths[0]), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert f"{paths[0]} and {merged} hold the same measurement" in err, err
    assert main(["compare", f"{merged},{paths[1]}", str(merged), "--db", str(db)]) == 2
    assert f"{paths[1]} and {merged} hold the same measurement" in capsys.readouterr().err
    assert main(["history", "import", str(merged), "--db", str(db)]) == 0
    assert "added as run 4; the same measurement as run(s) 2, 3: counted once, as run 4" in capsys.readouterr().out
    assert main(["history", "--db", str(db), "--technique", "bnb8"]) == 0
    assert f"{2 * len(MODELS)} point(s)" in capsys.readouterr().out  # a1 and c3, each case once
    conn = history.connect(db, create=False)
    assert [r.id for r in history.at_commit(conn, "c3c3")] == [4]
    later = grid_report("head-noise")
    later["environment"]["git"]["commit"], later["started_at"] = "9" * 40, "2026-11-30T10:00:00+00:00"
    per_case = history.last_per_case(conn, [later])
    assert {len(runs) for runs, _ in per_case.values()} == {1}
    assert all("c3c3c3c3c3c3" in label for _, label in per_case.values())
    # a shard gated with the merged run stored: the merged run, and through it the other shard, are this run
    assert history.same_commit_runs(conn, json.loads(paths[0].read_text())) == []
    conn.close()


def test_a_shard_gated_alone_counts_the_other_shard_as_other_cases(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a shard's session (or ``gate shard-1.json``) titled its comparison "this run and 1 more of its
    commit", as if the other shard were one more sample of its cases; it measured other cases."""
    db, paths, _ = _shards_and_merged(tmp_path, capsys)
    code = main(["gate", str(paths[0]), "--baseline", "a1a1", "--db", str(db)])
    out = capsys.readouterr().out
    assert code == 0 and "this run and" not in out, out
    assert "Comparison: this run (with 1 run of its commit that measured other cases) vs" in out, out


def test_a_version_3_history_learns_which_of_its_runs_were_merged(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Shards and the report merged from them, stored by a pytest-efficiency before the history kept measurement
    keys (schema 3), count once after the database is opened (the keys are filled from the stored reports)."""
    import sqlite3

    from efficiency.report.compare import comparable_key

    db, paths, merged = _shards_and_merged(tmp_path / "made", capsys)
    old = tmp_path / "v3.sqlite"
    conn = sqlite3.connect(old, isolation_level=None)
    history.migrate(conn, target=3)
    for path in [*paths, merged]:
        run = upgrade(json.loads(path.read_text()))
        git = run["environment"]["git"]
        cur = conn.execute(
            "INSERT INTO runs (report_hash, source, added_at, git_commit, dirty, status, started_at, settings_key, "
            "report) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (history.report_hash(run), str(path), "2026-12-01T00:00:00+00:00", git["commit"], int(git["dirty"]),
             run["status"], run["started_at"], json.dumps(comparable_key(run), sort_keys=True), json.dumps(run)))
        conn.executemany("INSERT INTO cases (run_id, case_id, model, technique, status) VALUES (?, ?, ?, ?, ?)",
                         [(cur.lastrowid, c["id"], c["model"], c["technique"], c["status"]) for c in run["cases"]])
    conn.close()
    conn = history.connect(old, create=False)
    assert [r.id for r in history.at_commit(conn, "c3c3")] == [3]  # the merged run, not also its two shards
    assert len(history.trend(conn, "runtime_s")) == len(grid_report()["cases"])
    conn.close()


def test_a_shard_compared_with_the_whole_grid_leaves_the_other_shards_cases_out() -> None:
    """Before: a shard compared with a run of the whole grid (``--eff-compare whole.json``, a commit, ``gate
    shard-1.json --baseline``) listed each case of the other shard as "not compared: not measured in the head run
    (absent)", an inconclusive verdict, so ``--eff-fail-on-regression`` failed every shard (and every ``-k`` run).
    A case the head did not select (its report's ``selected``) is now outside the comparison, named in one note;
    one it selected and lost stays inconclusive, as does every absent case of a head that does not record what it
    selected: cases measured through ``eff_measure`` (the review's: a selected test that skipped before measuring
    left a ``complete`` run without ``missing``), and a merge that lacks a shard."""
    from efficiency.report.compare import compare

    whole, parts = grid_report("base"), split(grid_report("head-slow"), 2)
    for part in parts:
        part["selected"] = [c["id"] for c in part["cases"]]
    part = parts[0]
    other = sorted({c["id"] for c in whole["cases"]} - {c["id"] for c in part["cases"]})
    comp = compare([whole], [part])
    assert other and [c.case_id for c in comp.cases] == [c["id"] for c in part["cases"]]
    assert not [x for x in comp.inconclusive() if "not measured" in x]
    assert [n for n in comp.notes if n.startswith(f"{len(other)} case(s) of the base not selected in the head run "
                                                  "(deselected, or another shard's): not compared (")]
    assert merge(parts)["selected"] == sorted(c["id"] for c in whole["cases"])
    lost = copy.deepcopy(part)
    gone = lost["cases"].pop()["id"]
    lost["status"], lost["missing"] = "incomplete", [gone]
    comp = compare([whole], [lost])
    assert f"{gone}: not compared: not measured in the head run (absent)" in comp.inconclusive()
    assert len(comp.cases) == len(part["cases"])

    def absent(head: dict[str, Any]) -> int:
        return len([x for x in compare([whole], [head]).inconclusive()
                    if x.endswith("not measured in the head run (absent)")])

    skipped = copy.deepcopy(part)  # complete, no ``missing``: a selected case that never measured
    del skipped["selected"]
    skipped["cases"].pop()
    assert absent(skipped) == len(other) + 1
    alone = merge([parts[0]])  # shard 2 of 2 lost: its cases were selected by a shard that did not report
    assert "selected" not in alone and absent(alone) == len(other)
