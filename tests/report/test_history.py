"""The SQLite history: insert and import, baseline selection rules, migrations, a newer database refused."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from efficiency.report import history

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
    rows = conn.execute("SELECT technique, runtime_s FROM cases WHERE run_id = ?", (run_id,)).fetchall()
    cases = dict(rows)
    assert set(cases) == {"fp32", "bf16", "bnb8", "bnb4"}
    assert cases["bnb8"] == pytest.approx(load("head-slow")["cases"][2]["runtime"]["median_s"])
    assert history.load(conn, run_id) == load("head-slow")


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


def test_migration_from_version_1_backfills_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _v1_database(path)
    with sqlite3.connect(path) as raw:
        assert history.db_version(raw) == 1
        assert "prefill_s" not in [r[1] for r in raw.execute("PRAGMA table_info(cases)")]
    conn = history.connect(path)
    assert history.db_version(conn) == history.LATEST == 2
    prefill = dict(conn.execute("SELECT technique, prefill_s FROM cases").fetchall())
    assert prefill["bnb4"] == pytest.approx(load("base")["cases"][3]["latency"]["prefill_s"])
    assert history.add_report(conn, load("head-noise"))[1]  # usable after the migration
    assert len(history.runs(conn)) == 2


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
