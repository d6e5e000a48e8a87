"""The history of runs: an embedded SQLite database (stdlib ``sqlite3``), default ``reports/history.sqlite``.

Every run is stored whole (its JSON report) with the keys it is looked up by: git commit and dirty flag,
status, machine fingerprint (device, device name, GPU driver, CPU), the comparable workload settings, and
one row per case (model, technique and each metric's value). A report is stored once (keyed by the hash of
its content).

Baseline rule: runs that are interrupted or failed (status other than ``complete``) or measured on a dirty
working tree (or outside git: no commit, the code version is unknown) are stored but never chosen as a
baseline unless the caller asks (``include_incomplete`` / ``include_dirty``).

The schema is versioned: table ``schema_version`` holds one number, ``MIGRATIONS[i]`` brings a database from
version i to i+1, and opening runs the missing ones in one transaction. A database written by a newer
pytest-efficiency (a version above ``LATEST``) is refused with a message, never modified.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efficiency.report.compare import METRICS, comparable_key, machine_of
from efficiency.report.io import read

DEFAULT_DB = Path("reports") / "history.sqlite"
Report = dict[str, Any]


class HistoryError(RuntimeError):
    """The database cannot be used; the message says why and what to do."""


def _v1(conn: sqlite3.Connection) -> None:
    conn.executescript("""
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            report_hash TEXT NOT NULL UNIQUE,
            source TEXT,
            added_at TEXT NOT NULL,
            git_commit TEXT,
            dirty INTEGER,
            branch TEXT,
            status TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            device TEXT,
            device_name TEXT,
            driver TEXT,
            cpu TEXT,
            settings_key TEXT NOT NULL,
            report TEXT NOT NULL
        );
        CREATE TABLE cases (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            case_id TEXT NOT NULL,
            model TEXT NOT NULL,
            technique TEXT NOT NULL,
            status TEXT NOT NULL,
            perplexity REAL,
            runtime_s REAL,
            energy_j REAL,
            peak_bytes REAL,
            size_bytes REAL,
            PRIMARY KEY (run_id, case_id)
        );
    """)


def _v2(conn: sqlite3.Connection) -> None:
    """Per-token energy and latency columns, back-filled from the stored reports; lookup indexes."""
    for column in ("j_per_token", "prefill_s", "decode_s_per_token"):
        conn.execute(f"ALTER TABLE cases ADD COLUMN {column} REAL")
    conn.execute("CREATE INDEX runs_commit ON runs (git_commit)")
    conn.execute("CREATE INDEX cases_model_technique ON cases (model, technique)")
    for run_id, text in conn.execute("SELECT id, report FROM runs").fetchall():
        for case in json.loads(text).get("cases") or []:
            values = _metric_values(case, ("j_per_token", "prefill_s", "decode_s_per_token"))
            conn.execute("UPDATE cases SET j_per_token = ?, prefill_s = ?, decode_s_per_token = ? "
                         "WHERE run_id = ? AND case_id = ?", (*values.values(), run_id, case["id"]))


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]
LATEST = len(MIGRATIONS)
CASE_COLUMNS = ("perplexity", "runtime_s", "energy_j", "peak_bytes", "size_bytes", "j_per_token", "prefill_s",
                "decode_s_per_token")


def _metric_values(case: dict[str, Any], names: Sequence[str]) -> dict[str, float | None]:
    by_name = {m.name: m for m in METRICS}
    measured = case.get("status") == "measured"
    return {n: by_name[n].value(case) if measured else None for n in names}


def db_version(conn: sqlite3.Connection) -> int:
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if not has:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection, target: int = LATEST, path: object = "the database") -> int:
    """Apply the missing migrations up to ``target`` in one transaction; returns the version reached."""
    version = db_version(conn)
    if version > LATEST:
        raise HistoryError(f"{path} has history schema version {version}, newer than this pytest-efficiency "
                           f"understands (<= {LATEST}): upgrade pytest-efficiency, or use another --db")
    if version >= target:
        return version
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for step in MIGRATIONS[version:target]:
            step(conn)
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))
    return target


def connect(path: Path, create: bool = True) -> sqlite3.Connection:
    """Open (and migrate) the history at ``path``; ``create=False`` refuses a missing file."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise HistoryError(f"no history database at {path} (runs are added by pytest at session end, or "
                               "with `efficiency history import REPORT.json ...`)")
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level="DEFERRED")
    conn.execute("PRAGMA foreign_keys = ON")
    try:
        migrate(conn, LATEST, path)
    except (HistoryError, sqlite3.DatabaseError) as err:
        conn.close()
        if isinstance(err, HistoryError):
            raise
        raise HistoryError(f"{path} is not a usable history database: {err}") from err
    return conn


def report_hash(report: Report) -> str:
    """Hash of the report's content in the current schema (a version-1 file and its upgrade are one run)."""
    from efficiency.report.schema import upgrade

    return hashlib.sha256(json.dumps(upgrade(report), sort_keys=True).encode()).hexdigest()


def _key_json(report: Report) -> str:
    return json.dumps(comparable_key(report), sort_keys=True)


@dataclass(frozen=True)
class Run:
    id: int
    commit: str | None
    dirty: bool | None
    status: str
    started_at: str | None
    settings_key: str
    source: str | None

    @property
    def settings(self) -> str:
        """The comparable settings in short: dataset, context, stride, max_tokens, device name."""
        k = json.loads(self.settings_key)
        return (f"{k.get('dataset')} {k.get('context')}/{k.get('stride')}/{k.get('max_tokens')} "
                f"{k.get('device_name')}")

    @property
    def label(self) -> str:
        tag = (self.commit or "nogit")[:12] + ("+dirty" if self.dirty else "")
        return f"run {self.id} ({tag}, {self.status})"

    def baseline_ok(self, include_dirty: bool = False, include_incomplete: bool = False) -> bool:
        clean = self.dirty is False and self.commit is not None  # no commit: the code version is unknown
        return (include_incomplete or self.status == "complete") and (include_dirty or clean)


_RUN_COLUMNS = "id, git_commit, dirty, status, started_at, settings_key, source"
_ORDER = "ORDER BY COALESCE(started_at, added_at), id"


def _run(row: Sequence[Any]) -> Run:
    return Run(int(row[0]), row[1], None if row[2] is None else bool(row[2]), row[3], row[4], row[5], row[6])


def add_report(conn: sqlite3.Connection, report: Report, source: str | None = None) -> tuple[int, bool]:
    """Store a run; returns (run id, True) or, for a report stored before, (its id, False)."""
    digest = report_hash(report)
    old = conn.execute("SELECT id FROM runs WHERE report_hash = ?", (digest,)).fetchone()
    if old:
        return int(old[0]), False
    env = report.get("environment") or {}
    git = env.get("git") or {}
    machine = machine_of(report)
    dirty = git.get("dirty")
    with conn:
        cur = conn.execute(
            "INSERT INTO runs (report_hash, source, added_at, git_commit, dirty, branch, status, started_at, "
            "finished_at, device, device_name, driver, cpu, settings_key, report) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (digest, source, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             git.get("commit"),
             None if dirty is None else int(bool(dirty)), git.get("branch"), str(report.get("status")),
             report.get("started_at"), report.get("finished_at"), machine["device"], machine["device_name"],
             machine["driver"], machine["cpu"], _key_json(report), json.dumps(report)))
        run_id = int(cur.lastrowid or 0)
        for case in report.get("cases") or []:
            values = _metric_values(case, CASE_COLUMNS)
            conn.execute(
                "INSERT OR REPLACE INTO cases (run_id, case_id, model, technique, status, "
                f"{', '.join(values)}) "
                f"VALUES (?, ?, ?, ?, ?, {', '.join('?' * len(values))})",
                (run_id, case["id"], case["model"], case["technique"], case.get("status", "?"),
                 *values.values()))
    return run_id, True


def import_files(conn: sqlite3.Connection, paths: Iterable[Path]) -> list[tuple[Path, int, bool]]:
    return [(Path(p), *add_report(conn, read(Path(p)), str(p))) for p in paths]


def runs(conn: sqlite3.Connection, commit: str | None = None) -> list[Run]:
    """All runs, oldest first; ``commit``: those whose commit starts with this prefix."""
    if commit is None:
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs {_ORDER}").fetchall()
    else:
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE git_commit LIKE ? {_ORDER}",
                            (commit.lower() + "%",)).fetchall()
    return [_run(r) for r in rows]


def load(conn: sqlite3.Connection, run_id: int) -> Report:
    row = conn.execute("SELECT report FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise HistoryError(f"no run {run_id} in the history")
    report: Report = json.loads(row[0])
    return report


def last_baseline(conn: sqlite3.Connection, like: Report, include_dirty: bool = False,
                  include_incomplete: bool = False) -> Run | None:
    """The most recent baseline-eligible run with the same settings and machine as ``like``, other than
    ``like`` itself (and not one started after it)."""
    key, digest = _key_json(like), report_hash(like)
    started = like.get("started_at")
    found = None
    for run in runs(conn):
        if run.settings_key != key or not run.baseline_ok(include_dirty, include_incomplete):
            continue
        same = conn.execute("SELECT report_hash FROM runs WHERE id = ?", (run.id,)).fetchone()[0] == digest
        if same or (started and run.started_at and run.started_at > started):
            continue
        found = run
    return found


def at_commit(conn: sqlite3.Connection, commit: str, include_dirty: bool = False,
              include_incomplete: bool = False) -> list[Run]:
    """The baseline-eligible runs of one commit (a prefix of at least 4 characters), all with the settings and
    machine of the most recent one, so that they can be pooled."""
    if len(commit) < 4:
        raise HistoryError(f"commit {commit!r}: give at least 4 characters")
    every = runs(conn, commit)
    commits = {r.commit for r in every}
    if len(commits) > 1:
        names = ", ".join(sorted(c or "" for c in commits))
        raise HistoryError(f"commit prefix {commit!r} is ambiguous: {names}")
    usable = [r for r in every if r.baseline_ok(include_dirty, include_incomplete)]
    if not usable:
        why = f" ({len(every)} stored, none complete on a clean tree; see --include-dirty / " \
              "--include-incomplete)" if every else ""
        raise HistoryError(f"no usable run of commit {commit!r} in the history{why}")
    return [r for r in usable if r.settings_key == usable[-1].settings_key]


@dataclass(frozen=True)
class TrendPoint:
    run: Run
    case_id: str
    value: float | None


def trend(conn: sqlite3.Connection, metric: str, model: str | None = None, technique: str | None = None,
          baseline_only: bool = False) -> list[TrendPoint]:
    """One point per stored run and case, oldest run first."""
    if metric not in CASE_COLUMNS:
        raise HistoryError(f"unknown metric {metric!r}; one of {', '.join(CASE_COLUMNS)}")
    where, args = ["c.status = 'measured'"], []
    for column, value in (("c.model", model), ("c.technique", technique)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    rows = conn.execute(
        f"SELECT r.id, r.git_commit, r.dirty, r.status, r.started_at, r.settings_key, r.source, c.case_id, "
        f"c.{metric} FROM cases c JOIN runs r ON r.id = c.run_id WHERE {' AND '.join(where)} "
        f"ORDER BY COALESCE(r.started_at, r.added_at), r.id, c.case_id", args).fetchall()
    points = [TrendPoint(_run(r[:7]), r[7], r[8]) for r in rows]
    return [p for p in points if p.run.baseline_ok()] if baseline_only else points
