"""The SQLite history: insert and import, the long metric table, baseline selection rules (per case, pooled
runs of a commit), atomic migrations (an interrupted one leaves a usable database), concurrent creation, old
reports upgraded or refused, a newer database refused."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from efficiency.metrics import METRICS
from efficiency.report import history
from efficiency.report.schema import upgrade

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "reports"
ALL = ["base", "head-noise", "violation", "head-slow", "head-settings", "dirty", "interrupted",
       "real-cpu-0001"]


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = history.connect(tmp_path / "h.sqlite")
    history.import_files(conn, [FIXTURES / f"{n}.json" for n in ALL])
    yield conn
    conn.close()


def test_insert_is_keyed_and_idempotent(tmp_path: Path) -> None:
    conn = history.connect(tmp_path / "sub" / "h.sqlite")
    run_id, added = history.add_report(conn, load("head-slow"), "head-slow.json")
    assert added and history.add_report(conn, load("head-slow"))[1] is False
    row = conn.execute("SELECT git_commit, dirty, status, device, device_name, cpu, settings_key FROM runs "
                       "WHERE id = ?", (run_id,)).fetchone()
    assert row[:6] == ("c3" * 20, 0, "complete", "cpu", "AMD EPYC", "AMD EPYC")
    assert json.loads(row[6])["context"] == 512
    rows = conn.execute("SELECT c.technique, m.value FROM cases c JOIN metrics m ON m.run_id = c.run_id AND "
                        "m.case_id = c.case_id WHERE c.run_id = ? AND m.metric = 'runtime_s'", (run_id,)).fetchall()
    cases = dict(rows)
    assert set(cases) == {"fp32", "bf16", "bnb8", "bnb4"}
    assert cases["bnb8"] == pytest.approx(load("head-slow")["cases"][2]["runtime"]["median_s"])
    assert history.load(conn, run_id) == upgrade(load("head-slow"))  # stored in the current schema


def test_import_reports_every_file(tmp_path: Path) -> None:
    conn = history.connect(tmp_path / "h.sqlite")
    results = history.import_files(conn, [FIXTURES / f"{n}.json" for n in ALL])
    assert [added for _, _, added in results] == [True] * len(ALL)
    assert len(history.runs(conn)) == len(ALL)
    assert [r.status for r in history.runs(conn) if r.status != "complete"] == ["interrupted"]


def _later(name: str) -> dict[str, Any]:
    run = load(name)
    run["started_at"] = "2026-11-25T10:00:00+00:00"
    run["environment"]["git"]["commit"] = "9" * 40
    return run


def test_baseline_excludes_dirty_and_interrupted_runs(db: sqlite3.Connection) -> None:
    like = _later("base")
    # dirty (11-23) and interrupted (11-24) are newer than head-slow (11-22) but never a baseline by default
    assert history.last_baseline(db, like).commit == "c3" * 20  # type: ignore[union-attr]
    assert history.last_baseline(db, like, include_dirty=True).commit == "b2" * 20  # type: ignore[union-attr]
    assert history.last_baseline(db, like, include_incomplete=True).commit == "e5" * 20  # type: ignore[union-attr]
    # only runs with the same settings and machine: the other workload's run is its own baseline history
    assert history.last_baseline(db, _later("head-settings")).commit == "d4" * 20  # type: ignore[union-attr]
    other = _later("base")
    other["environment"]["cpu"] = "Intel(R) Xeon(R) Platinum 8480+"
    assert history.last_baseline(db, other) is None


def test_baseline_is_never_the_run_itself_nor_a_later_one(db: sqlite3.Connection) -> None:
    found = history.last_baseline(db, load("head-slow"))
    assert found is not None and found.commit == "f6" * 20  # violation.json, 11-21 15:00


def test_runs_of_a_commit(db: sqlite3.Connection) -> None:
    assert [r.commit for r in history.at_commit(db, "b2b2")] == ["b2" * 20]  # the dirty one left out
    assert len(history.at_commit(db, "B2B2", include_dirty=True)) == 2
    with pytest.raises(history.HistoryError, match="none complete on a clean tree"):
        history.at_commit(db, "e5e5")
    with pytest.raises(history.HistoryError, match="at least 4"):
        history.at_commit(db, "b2")
    with pytest.raises(history.HistoryError, match="no usable run"):
        history.at_commit(db, "0123")
    other = load("base")
    other["environment"]["git"]["commit"] = "a1a1" + "0" * 36
    history.add_report(db, other)
    with pytest.raises(history.HistoryError, match="ambiguous"):
        history.at_commit(db, "a1a1")


def test_trend_over_commits(db: sqlite3.Connection) -> None:
    points = history.trend(db, "runtime_s", technique="bnb8")
    assert [p.run.commit[:2] if p.run.commit else None for p in points] == \
        ["a1", "b2", "f6", "c3", "d4", None, "b2"]  # interrupted run stopped before bnb8
    assert points[3].value == pytest.approx(load("head-slow")["cases"][2]["runtime"]["median_s"])
    assert all(p.run.baseline_ok() for p in history.trend(db, "runtime_s", baseline_only=True))
    clean = history.trend(db, "perplexity", model="smollm2-135m", technique="fp32", baseline_only=True)
    assert len(clean) == 5
    with pytest.raises(history.HistoryError, match="unknown metric"):
        history.trend(db, "nonsense")


def test_trend_accepts_every_registry_metric(db: sqlite3.Connection) -> None:
    for m in METRICS:
        points = history.trend(db, m.name, technique="bnb4")
        assert len(points) == 7  # every run but the interrupted one measured bnb4
    tps = history.trend(db, "tokens_per_s", technique="bnb8")
    assert tps[0].value == pytest.approx(load("base")["cases"][2]["runtime"]["tokens_per_s"])
    assert {p.value for p in history.trend(db, "energy_j")} == {None}  # not measured there: n/a, not 0


def _stored(name: str, **changes: Any) -> dict[str, Any]:
    run = load(name)
    run["environment"]["git"].update(changes.pop("git", {}))
    run.update(changes)
    return run


def test_last_is_chosen_per_case_and_pools_the_runs_of_its_commit(tmp_path: Path) -> None:
    conn = history.connect(tmp_path / "h.sqlite")
    base = load("base")  # a1, 11-20, 4 cases
    again = _stored("head-noise", git={"commit": "a1" * 20})  # a second run of a1, 11-21
    partial = _stored("interrupted", status="complete", git={"commit": "e5" * 20})  # 11-24, fp32 and bf16 only
    for run in (base, again, partial):
        history.add_report(conn, run)
    head = _stored("head-slow", started_at="2026-11-25T10:00:00+00:00", git={"commit": "c3" * 20})
    per_case = history.last_per_case(conn, [head])
    assert set(per_case) == {c["id"] for c in head["cases"]}
    fp32_runs, fp32_label = per_case["smollm2-135m-fp32"]
    assert len(fp32_runs) == 1 and "e5e5e5e5e5e5" in fp32_label  # the latest run that measured fp32
    bnb8_runs, bnb8_label = per_case["smollm2-135m-bnb8"]
    assert len(bnb8_runs) == 2 and bnb8_label == "last: a1a1a1a1a1a1, 2 run(s)"  # e5 lacks bnb8: a1, pooled
    # the head's own commit is the head, not its baseline
    same = _stored("head-slow", started_at="2026-11-25T10:00:00+00:00", git={"commit": "e5" * 20})
    assert "a1a1a1a1a1a1" in history.last_per_case(conn, [same])["smollm2-135m-fp32"][1]
    conn.close()


def test_same_commit_runs_pool_only_clean_complete_runs_of_that_commit(tmp_path: Path) -> None:
    conn = history.connect(tmp_path / "h.sqlite")
    one, two = load("base"), _stored("head-noise", git={"commit": "a1" * 20})
    dirty = _stored("dirty", git={"commit": "a1" * 20})
    for run in (one, two, dirty):
        history.add_report(conn, run)
    assert history.same_commit_runs(conn, one) == [upgrade(two)]
    assert history.same_commit_runs(conn, dirty) == []  # a dirty tree's code is not the commit's
    conn.close()


def _v1_database(path: Path) -> None:
    """A database as version 1 of the schema wrote it, with one run."""
    conn = sqlite3.connect(path)
    history.migrate(conn, target=1)
    report = load("base")
    conn.execute("INSERT INTO runs (report_hash, added_at, git_commit, dirty, status, settings_key, report) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (history.report_hash(report), "2026-11-20T10:05:00+00:00",
                                                  "a1" * 20, 0, "complete", "{}", json.dumps(report)))
    for c in report["cases"]:
        conn.execute("INSERT INTO cases (run_id, case_id, model, technique, status, runtime_s) "
                     "VALUES (1, ?, ?, ?, ?, ?)",
                     (c["id"], c["model"], c["technique"], c["status"], c["runtime"]["median_s"]))
    conn.commit()
    conn.close()


def test_migration_from_version_1_backfills_the_long_metric_table(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _v1_database(path)
    with sqlite3.connect(path) as raw:
        assert history.db_version(raw) == 1
    raw.close()
    conn = history.connect(path)
    assert history.db_version(conn) == history.LATEST == 4
    assert "runtime_s" not in [r[1] for r in conn.execute("PRAGMA table_info(cases)")]
    prefill = dict(conn.execute("SELECT case_id, value FROM metrics WHERE metric = 'prefill_s'").fetchall())
    assert prefill["smollm2-135m-bnb4"] == pytest.approx(load("base")["cases"][3]["latency"]["prefill_s"])
    # a metric version 1 never stored is back-filled from the stored report too
    tps = history.trend(conn, "tokens_per_s", technique="bnb4")
    assert tps[0].value == pytest.approx(load("base")["cases"][3]["runtime"]["tokens_per_s"])
    assert history.add_report(conn, load("head-noise"))[1]  # usable after the migration
    assert len(history.runs(conn)) == 2
    conn.close()


def _failing_step(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE half_done (x INTEGER)")
    raise RuntimeError("power cut in the middle of the migration")


def test_a_failed_migration_leaves_the_old_version_usable(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.sqlite"
    _v1_database(path)
    monkeypatch.setattr(history, "MIGRATIONS", [*history.MIGRATIONS[:2], _failing_step])
    with pytest.raises(RuntimeError, match="power cut"):
        history.connect(path)
    with sqlite3.connect(path) as raw:
        assert history.db_version(raw) == 1  # not 2: the _v2 columns were rolled back with the rest
        assert "prefill_s" not in [r[1] for r in raw.execute("PRAGMA table_info(cases)")]
        assert raw.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() is None
    raw.close()
    monkeypatch.undo()
    conn = history.connect(path)  # no "duplicate column name": the next opening migrates
    assert history.db_version(conn) == history.LATEST and len(history.runs(conn)) == 1
    conn.close()


def test_a_process_killed_mid_migration_leaves_a_usable_database(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _v1_database(path)
    killer = textwrap.dedent(f"""
        import os
        from efficiency.report import history
        def die(conn):
            conn.execute("ALTER TABLE cases ADD COLUMN j_per_token REAL")
            os._exit(9)  # no rollback, no cleanup: the journal is left behind
        history.MIGRATIONS[1] = die
        history.connect({str(path)!r})
    """)
    assert subprocess.run([sys.executable, "-c", killer], timeout=60).returncode == 9
    conn = history.connect(path)
    assert history.db_version(conn) == history.LATEST
    assert len(history.runs(conn)) == 1 and history.trend(conn, "runtime_s")
    conn.close()


def _add_from_process(args: tuple[str, str, int]) -> int:
    path, name, commit_byte = args
    conn = history.connect(Path(path))
    run = json.loads((FIXTURES / f"{name}.json").read_text())
    run["environment"]["git"]["commit"] = f"{commit_byte:02x}" * 20
    run_id, _ = history.add_report(conn, run)
    conn.close()
    return run_id


def test_concurrent_processes_create_and_add_without_losing_a_run(tmp_path: Path) -> None:
    path = str(tmp_path / "new" / "h.sqlite")
    jobs = [(path, name, i) for i, name in enumerate(["base", "head-noise", "head-slow", "violation"] * 2)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_add_from_process, jobs)
    assert sorted(ids) == list(range(1, len(jobs) + 1))  # every run stored once, none lost
    conn = history.connect(Path(path))
    assert history.db_version(conn) == history.LATEST and len(history.runs(conn)) == len(jobs)
    assert conn.execute("SELECT COUNT(DISTINCT run_id) FROM metrics").fetchone()[0] == len(jobs)
    conn.close()


def test_old_reports_are_upgraded_or_refused_never_stored_silently(tmp_path: Path) -> None:
    conn = history.connect(tmp_path / "h.sqlite")
    v1 = load("base")
    assert v1["schema_version"] == 1
    run_id, _ = history.add_report(conn, v1)
    assert history.load(conn, run_id)["schema_version"] == 2
    for version in (0, None):
        old = load("head-noise")
        old["schema_version"] = version
        with pytest.raises(history.HistoryError, match="not a pytest-efficiency report of a readable schema"):
            history.add_report(conn, old)
    schema0 = tmp_path / "schema0.json"
    schema0.write_text(json.dumps({**load("head-noise"), "schema_version": 0}))
    from efficiency.report.io import ReportError

    with pytest.raises(ReportError, match=f"{schema0}.*readable schema"):
        history.import_files(conn, [schema0])
    # a stored report no version can read (written by a broken tool) is refused when loaded, not used
    conn.execute("UPDATE runs SET report = ? WHERE id = ?", (json.dumps({"schema_version": 0}), run_id))
    with pytest.raises(history.HistoryError, match=f"stored run {run_id} is not a report"):
        history.load(conn, run_id)
    assert len(history.runs(conn)) == 1
    conn.close()


def test_a_newer_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    history.connect(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE schema_version SET version = ?", (history.LATEST + 1,))
    raw.close()
    before = path.read_bytes()
    with pytest.raises(history.HistoryError, match=r"newer than this pytest-efficiency understands.*upgrade"):
        history.connect(path)
    assert path.read_bytes() == before


def test_unusable_or_missing_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all " * 100)
    with pytest.raises(history.HistoryError, match="not a usable history database"):
        history.connect(junk)
    with pytest.raises(history.HistoryError, match="no history database"):
        history.connect(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()


def _weights(run: dict[str, Any], sha: str, only: str = "") -> dict[str, Any]:
    for c in run["cases"]:
        if c["id"].endswith(only):
            c["model_info"] = {"source": "local-hf:/m", "revision": None, "weights_sha256": sha}
    return run


def test_last_never_picks_a_run_of_other_weights_for_a_case(tmp_path: Path) -> None:
    """Per case: a run that measured bnb4 with other weights is passed over for bnb4 only; its other cases, measured
    with the head's weights, stay the latest baselines."""
    conn = history.connect(tmp_path / "h.sqlite")
    history.add_report(conn, _weights(load("base"), "a" * 64))  # a1, 11-20
    history.add_report(conn, _weights(_weights(load("head-noise"), "a" * 64), "b" * 64, only="bnb4"))  # b2, 11-21
    head = _weights(_stored("head-slow", started_at="2026-11-25T10:00:00+00:00"), "a" * 64)
    per_case = history.last_per_case(conn, [head])
    assert "a1a1a1a1a1a1" in per_case["smollm2-135m-bnb4"][1]
    assert all("b2b2b2b2b2b2" in per_case[f"smollm2-135m-{t}"][1] for t in ("fp32", "bf16", "bnb8"))
    # a head that does not record its weights: unknown, the latest run is its baseline for every case
    assert "b2b2b2b2b2b2" in history.last_per_case(conn, [load("head-slow")])["smollm2-135m-bnb4"][1]
    conn.close()


def test_head_pooling_leaves_out_the_cases_of_other_weights(tmp_path: Path) -> None:
    from efficiency.report.gating import head_runs

    db = tmp_path / "h.sqlite"
    conn = history.connect(db)
    one = _weights(load("base"), "a" * 64)
    two = _weights(_weights(_stored("head-noise", git={"commit": "a1" * 20}), "a" * 64), "b" * 64, only="bnb4")
    history.add_report(conn, two)
    conn.close()
    pooled = head_runs([one], db)
    assert len(pooled) == 2
    assert [c["id"] for c in pooled[1]["cases"]] == [f"smollm2-135m-{t}" for t in ("fp32", "bf16", "bnb8")]


def test_settings_recorded_later_keep_older_runs_baselines_and_stop_differing_ones(tmp_path: Path) -> None:
    """A run stored before the compute dtype was recorded stays a candidate (unknown); a run that records another
    compute dtype is never a baseline, nor pooled with the head."""
    conn = history.connect(tmp_path / "h.sqlite")
    history.add_report(conn, load("base"))  # a1, no compute_dtype recorded
    bf16 = _stored("head-noise")  # b2, 11-21
    bf16["settings"]["compute_dtype"] = "bf16"
    history.add_report(conn, bf16)
    head = _stored("head-slow", started_at="2026-11-25T10:00:00+00:00")
    head["settings"]["compute_dtype"] = None
    per_case = history.last_per_case(conn, [head])
    assert set(per_case) == {c["id"] for c in head["cases"]}
    assert all("a1a1a1a1a1a1" in label for _, label in per_case.values())
    same = _stored("head-noise", git={"commit": "b2" * 20}, started_at="2026-11-25T10:00:00+00:00")
    same["settings"]["compute_dtype"] = None
    assert history.same_commit_runs(conn, same) == []
    conn.close()


def test_a_trend_line_does_not_break_where_the_report_gained_a_setting() -> None:
    """Before, each distinct stored settings key drew a line of its own: the runs written before compute_dtype was
    recorded and those after it were two lines of one case, though compare and the gate compare them."""
    old = {"dataset": "wikitext2", "context": 512, "device": "cpu"}
    new = {**old, "compute_dtype": None}
    other = {**new, "context": 256}

    def point(run_id: int, key: dict[str, Any], case_id: str = "m-fp32") -> history.TrendPoint:
        run = history.Run(run_id, f"{run_id:07d}", False, "complete", None, json.dumps(key), None)
        return history.TrendPoint(run, case_id, float(run_id))

    points = [point(1, old), point(2, new), point(3, other), point(4, new), point(4, new, "m-bnb4")]
    lines = history.trend_series(points)
    assert [(case, [p.run.id for p in group]) for case, group in lines] == [
        ("m-fp32", [1, 2, 4]), ("m-fp32", [3]), ("m-bnb4", [4])]
