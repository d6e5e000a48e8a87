"""The history of runs: an embedded SQLite database (stdlib ``sqlite3``), default ``reports/history.sqlite``.

Every run is stored whole (its JSON report, in the current report schema) with the keys it is looked up by: git
commit and dirty flag, status, machine fingerprint (device, device name, GPU driver, CPU), the comparable
workload settings, one row per case (model, technique, status) and the metrics in a long table
``metrics (run_id, case_id, metric, value)`` filled by iterating the metric registry (efficiency.metrics), so
a new metric needs no migration. A report is stored once (keyed by the hash of its content). Reports of an
older schema are upgraded before they are stored (efficiency.report.schema.upgrade); unreadable ones
(schema 0, unversioned, newer) are refused, never stored or read silently.

Baseline rule: runs that are interrupted, failed or incomplete (status other than ``complete``) or measured on
a dirty working tree (or outside git: no commit, the code version is unknown) are stored but never chosen as
a baseline unless the caller asks (``include_incomplete`` / ``include_dirty``). ``last`` is chosen per case
(:func:`last_per_case`): for each case, the latest eligible commit that measured it with the same model weights,
revision and technique options (where both runs record them), all its such eligible runs pooled (a verdict needs
several independent runs per side, efficiency.report.compare). Settings match as compare.differing says: on
what both runs record, so a run stored before a setting was recorded stays a candidate.

One measurement, one run: a report merged from shard reports (``efficiency merge``, its ``merged_from``) and
those shard reports are one run, though each may be stored (a shard's session adds it, then the merged report is
imported). Every run has measurement keys (:func:`measurement_keys`: its own and, merged, each shard's; table
``run_parts``); wherever stored runs are counted (baselines, pooling, the trend), of runs sharing a key only one
counts, the one with the most cases (the merged run), the first stored on a tie (:func:`one_per_measurement`),
and a stored run sharing a key with the head is the head, never pooled with it as one more run.

The schema is versioned: table ``schema_version`` holds one number, ``MIGRATIONS[i]`` brings a database from
version i to i+1, and opening runs the missing ones in ONE transaction (``BEGIN IMMEDIATE`` on a connection in
autocommit mode, so that no DDL statement commits on its own): interrupted at any point, the database is left
at its old version, usable, and the next opening migrates it. The version is read again under the write
lock, so two processes creating or migrating one database at once do the work once. A database written by a
newer pytest-efficiency (a version above ``LATEST``) is refused with a message, never modified.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efficiency.defaults import HISTORY_FILENAME, REPORTS_DIRNAME
from efficiency.metrics import METRICS, NAMES
from efficiency.report.compare import case_identity, comparable_key, differing, identity_mismatch, machine_of, pooled
from efficiency.report.schema import STATUSES, SchemaError, upgrade
from efficiency.report.structure import read_checked

DEFAULT_DB = Path(REPORTS_DIRNAME) / HISTORY_FILENAME  # relative: the CLI puts it under the project root
Report = dict[str, Any]


class HistoryError(RuntimeError):
    """The database cannot be used; the message says why and what to do."""


def _v1(conn: sqlite3.Connection) -> None:
    conn.execute("""
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
        )""")
    conn.execute("""
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
        )""")


def _v2(conn: sqlite3.Connection) -> None:
    """Per-token energy and latency columns (superseded by the long table of version 3); lookup indexes."""
    for column in ("j_per_token", "prefill_s", "decode_s_per_token"):
        conn.execute(f"ALTER TABLE cases ADD COLUMN {column} REAL")
    conn.execute("CREATE INDEX runs_commit ON runs (git_commit)")
    conn.execute("CREATE INDEX cases_model_technique ON cases (model, technique)")


def _stored_report(text: str, run_id: object) -> Report | None:
    """A stored report in the current schema; None for one no version can read (kept, never read silently)."""
    try:
        return upgrade(json.loads(text), f"stored run {run_id}")
    except (SchemaError, ValueError):
        return None


def _v3(conn: sqlite3.Connection) -> None:
    """Metrics in a long table (one row per run, case and registry metric): a new metric needs no migration.
    The per-metric columns of ``cases`` go; every stored report's metrics are back-filled from the report."""
    conn.execute("""
        CREATE TABLE cases_v3 (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            case_id TEXT NOT NULL,
            model TEXT NOT NULL,
            technique TEXT NOT NULL,
            status TEXT NOT NULL,
            PRIMARY KEY (run_id, case_id)
        )""")
    conn.execute("INSERT INTO cases_v3 SELECT run_id, case_id, model, technique, status FROM cases")
    conn.execute("DROP TABLE cases")
    conn.execute("ALTER TABLE cases_v3 RENAME TO cases")
    conn.execute("CREATE INDEX cases_model_technique ON cases (model, technique)")
    conn.execute("""
        CREATE TABLE metrics (
            run_id INTEGER NOT NULL,
            case_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            value REAL NOT NULL,
            PRIMARY KEY (run_id, case_id, metric),
            FOREIGN KEY (run_id, case_id) REFERENCES cases(run_id, case_id) ON DELETE CASCADE
        )""")
    conn.execute("CREATE INDEX metrics_metric ON metrics (metric)")
    _fill_from_stored_reports(conn, _insert_metrics)


def _fill_from_stored_reports(conn: sqlite3.Connection,
                              insert: Callable[[sqlite3.Connection, int, Report], None]) -> None:
    """A migration's new table, filled from every stored report that can still be read (``insert(conn, run id,
    report)``)."""
    for run_id, text in conn.execute("SELECT id, report FROM runs").fetchall():
        report = _stored_report(text, run_id)
        if report is not None:
            insert(conn, int(run_id), report)


def _v4(conn: sqlite3.Connection) -> None:
    """The measurement keys of every run (:func:`measurement_keys`), so that a merged run and its shard reports
    count once; filled from every stored report."""
    conn.execute("""
        CREATE TABLE run_parts (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            part TEXT NOT NULL,
            PRIMARY KEY (run_id, part)
        )""")
    conn.execute("CREATE INDEX run_parts_part ON run_parts (part)")
    _fill_from_stored_reports(conn, _insert_parts)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4]
LATEST = len(MIGRATIONS)


def _part_key(git: dict[str, Any], started_at: Any, hostname: Any, shard: Any, case_ids: Iterable[Any]) -> str:
    return json.dumps([git.get("commit"), git.get("dirty"), started_at, hostname, shard, sorted(map(str, case_ids))],
                      sort_keys=True)


def measurement_keys(report: Report) -> set[str]:
    """Keys that every report holding this run's measurement shares: the run's own (commit, dirty flag, start,
    host, shard, case ids) and, for a report merged from others (``merged_from``), each part's, made from what the
    merge recorded of it. Two reports that share a key hold one measurement (a shard report and the report merged
    from it). None for a run that does not record its start: nothing would tell two runs of one commit apart."""
    env = report.get("environment") or {}
    git = env.get("git") or {}
    keys = set()
    if report.get("started_at"):
        keys.add(_part_key(git, report["started_at"], env.get("hostname"), (report.get("settings") or {}).get("shard"),
                           (c.get("id") for c in report.get("cases") or [])))
    for part in report.get("merged_from") or []:
        if isinstance(part, dict) and part.get("started_at"):
            keys.add(_part_key(git, part["started_at"], part.get("hostname"), part.get("shard"),
                               part.get("cases") or []))
    return keys


def same_measurement(a: Report, b: Report) -> bool:
    """``a`` and ``b`` hold one measurement (:func:`measurement_keys`): one is merged from the other, or both from
    one shard report."""
    return bool(measurement_keys(a) & measurement_keys(b))


def _insert_parts(conn: sqlite3.Connection, run_id: int, report: Report) -> None:
    conn.executemany("INSERT OR IGNORE INTO run_parts (run_id, part) VALUES (?, ?)",
                     [(run_id, k) for k in measurement_keys(report)])


def _insert_metrics(conn: sqlite3.Connection, run_id: int, report: Report) -> None:
    rows = [(run_id, case["id"], m.name, v) for case in report.get("cases") or []
            if case.get("status") == "measured" for m in METRICS if (v := m.value(case)) is not None]
    conn.executemany("INSERT OR REPLACE INTO metrics (run_id, case_id, metric, value) VALUES (?, ?, ?, ?)", rows)


def db_version(conn: sqlite3.Connection) -> int:
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if not has:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (``BEGIN IMMEDIATE``: concurrent writers wait for the lock, up to
    the connection's timeout); rolled back on any exception, including KeyboardInterrupt."""
    if conn.in_transaction:
        raise HistoryError("internal: a history write started inside an open transaction")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _too_new(version: int, path: object) -> HistoryError:
    return HistoryError(f"{path} has history schema version {version}, newer than this pytest-efficiency "
                        f"understands (<= {LATEST}): upgrade pytest-efficiency, or use another --db")


def migrate(conn: sqlite3.Connection, target: int = LATEST, path: object = "the database") -> int:
    """Apply the missing migrations up to ``target`` in one transaction; returns the version reached."""
    version = db_version(conn)
    if version > LATEST:
        raise _too_new(version, path)
    if version >= target:
        return version
    with write_transaction(conn):
        version = db_version(conn)  # again under the lock: another process may have migrated meanwhile
        if version > LATEST:
            raise _too_new(version, path)
        if version < target:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for step in MIGRATIONS[version:target]:
                step(conn)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))
    return max(version, target)


def connect(path: Path, create: bool = True) -> sqlite3.Connection:
    """Open (and migrate) the history at ``path``; ``create=False`` refuses a missing file."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise HistoryError(f"no history database at {path} (runs are added by pytest at session end, or "
                               "with `efficiency history import REPORT.json ...`)")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # autocommit mode: transactions are explicit (write_transaction), DDL never commits on its own
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    except sqlite3.Error as err:
        raise HistoryError(f"cannot open the history database {path}: {err}") from err
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, LATEST, path)
    except (HistoryError, sqlite3.Error) as err:
        conn.close()
        if isinstance(err, HistoryError):
            raise
        raise HistoryError(f"{path} is not a usable history database: {err}") from err
    return conn


def _current(report: Report, source: object = "report") -> Report:
    """The report in the current schema; an unreadable one (schema 0, unversioned, newer) is refused."""
    try:
        return upgrade(report, source)
    except SchemaError as err:
        raise HistoryError(str(err)) from err


def report_hash(report: Report) -> str:
    """Hash of the report's content in the current schema (a version-1 file and its upgrade are one run)."""
    return hashlib.sha256(json.dumps(_current(report), sort_keys=True).encode()).hexdigest()


def _key_json(report: Report) -> str:
    return json.dumps(comparable_key(report), sort_keys=True)


def _same_settings(run: Run, key: dict[str, Any]) -> bool:
    """The stored run's settings and machine match ``key`` (compare.comparable_key) on everything both record: a
    run stored before a setting was recorded is not excluded for lacking it (compare.differing)."""
    return not differing(json.loads(run.settings_key), key)


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
    """Store a run (in the current schema); returns (run id, True) or, for a report stored before, (its id,
    False). One transaction: concurrent writers wait for each other, and a run is stored whole or not at all.
    Only a run with at least one case and a run status of the schema (schema.STATUSES) is stored."""
    report = _current(report, source or "report")
    if report.get("status") not in STATUSES:
        raise HistoryError(f"{source or 'report'}: status {report.get('status')!r} is not a run status (one of "
                           f"{', '.join(STATUSES)}): not stored")
    if not report.get("cases"):
        raise HistoryError(f"{source or 'report'} has no case: not stored (the history holds runs with at least one "
                           "case)")
    digest = report_hash(report)
    env = report.get("environment") or {}
    git = env.get("git") or {}
    machine = machine_of(report)
    dirty = git.get("dirty")
    with write_transaction(conn):
        old = conn.execute("SELECT id FROM runs WHERE report_hash = ?", (digest,)).fetchone()
        if old:
            return int(old[0]), False
        cur = conn.execute(
            "INSERT INTO runs (report_hash, source, added_at, git_commit, dirty, branch, status, started_at, "
            "finished_at, device, device_name, driver, cpu, settings_key, report) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (digest, source, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             git.get("commit"),
             None if dirty is None else int(bool(dirty)), git.get("branch"), str(report.get("status")),
             report.get("started_at"), report.get("finished_at"), machine["device"], machine["device_name"],
             machine["driver"], machine["cpu"], _key_json(report), json.dumps(report, allow_nan=False)))
        run_id = int(cur.lastrowid or 0)
        conn.executemany(
            "INSERT OR REPLACE INTO cases (run_id, case_id, model, technique, status) VALUES (?, ?, ?, ?, ?)",
            [(run_id, c["id"], c["model"], c["technique"], c.get("status", "?")) for c in report.get("cases") or []])
        _insert_metrics(conn, run_id, report)
        _insert_parts(conn, run_id, report)
    return run_id, True


def import_files(conn: sqlite3.Connection, paths: Iterable[Path]) -> list[tuple[Path, int, bool]]:
    return [(Path(p), *add_report(conn, read_checked(Path(p)), str(p))) for p in paths]


def runs(conn: sqlite3.Connection, commit: str | None = None) -> list[Run]:
    """All runs, oldest first; ``commit``: those whose commit starts with this prefix."""
    if commit is None:
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs {_ORDER}").fetchall()
    else:
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE git_commit LIKE ? {_ORDER}",
                            (commit.lower() + "%",)).fetchall()
    return [_run(r) for r in rows]


def load(conn: sqlite3.Connection, run_id: int) -> Report:
    """A stored run in the current schema (older stored versions upgraded, unreadable ones refused)."""
    row = conn.execute("SELECT report FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise HistoryError(f"no run {run_id} in the history")
    report = _stored_report(row[0], run_id)
    if report is None:
        raise HistoryError(f"stored run {run_id} is not a report this pytest-efficiency can read (an "
                           "unversioned or newer schema): not used")
    return report


def _hash_of(conn: sqlite3.Connection, run_id: int) -> str:
    return str(conn.execute("SELECT report_hash FROM runs WHERE id = ?", (run_id,)).fetchone()[0])


def _parts(conn: sqlite3.Connection, run_ids: Iterable[int]) -> dict[int, set[str]]:
    ids = list(run_ids)
    out: dict[int, set[str]] = {i: set() for i in ids}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        rows = conn.execute(f"SELECT run_id, part FROM run_parts WHERE run_id IN ({','.join('?' * len(chunk))})",
                            chunk).fetchall()
        for run_id, part in rows:
            out[int(run_id)].add(str(part))
    return out


def _apart_from(conn: sqlite3.Connection, found: Sequence[Run], head: Sequence[Report]) -> list[Run]:
    """``found`` without the runs that hold a measurement of the ``head`` runs, directly (a shard of a merged head,
    the run merged from a shard head) or through another of them (the other shards of that merged run)."""
    parts = _parts(conn, (r.id for r in found))
    keys: set[str] = set().union(*(measurement_keys(r) for r in head))
    out, grew = list(found), True
    while grew:
        joined = [r for r in out if parts[r.id] & keys]
        grew = bool(joined)
        for run in joined:
            keys |= parts[run.id]
        out = [r for r in out if r not in joined]
    return out


def one_per_measurement(conn: sqlite3.Connection, found: Sequence[Run]) -> list[Run]:
    """``found`` (in its order) with each measurement counted once: of runs that share a measurement key (a merged
    run and its shard reports), the one with the most cases is kept, the first stored on a tie."""
    if len(found) < 2:
        return list(found)
    parts = _parts(conn, (r.id for r in found))
    sizes = dict(conn.execute("SELECT run_id, COUNT(*) FROM cases GROUP BY run_id").fetchall())
    taken: set[str] = set()
    kept: set[int] = set()
    for run in sorted(found, key=lambda r: (-int(sizes.get(r.id, 0)), r.id)):
        if not parts[run.id] & taken:
            kept.add(run.id)
            taken |= parts[run.id]
    return [r for r in found if r.id in kept]


def counted_as(conn: sqlite3.Connection, run_id: int) -> tuple[list[int], list[int]]:
    """The other stored runs that hold a measurement of run ``run_id`` (its shards, the run merged from it), and
    which of all these count (:func:`one_per_measurement`)."""
    mine = _parts(conn, [run_id])[run_id]
    others = sorted({int(r[0]) for k in mine for r in conn.execute(
        "SELECT run_id FROM run_parts WHERE part = ? AND run_id != ?", (k, run_id))})
    group = [r for r in runs(conn) if r.id in {run_id, *others}]
    return others, [r.id for r in one_per_measurement(conn, group)]


def _measured(conn: sqlite3.Connection, run_id: int) -> set[str]:
    rows = conn.execute("SELECT case_id FROM cases WHERE run_id = ? AND status = 'measured'", (run_id,))
    return {r[0] for r in rows}


def _candidates(conn: sqlite3.Connection, like: Sequence[Report], include_dirty: bool,
                include_incomplete: bool) -> list[Run]:
    """Baseline-eligible runs, oldest first, for a head of the runs ``like``: same settings and machine, not one
    of them (nor holding one of their measurements: a shard of a merged head), not started after the first of
    them and, for a head on a clean tree, not of the head's commit (those runs are the head); each measurement
    once (:func:`one_per_measurement`)."""
    key = comparable_key(like[0])
    digests = {report_hash(r) for r in like}
    starts = [s for r in like if (s := r.get("started_at"))]
    started = min(starts) if starts else None
    git = (like[0].get("environment") or {}).get("git") or {}
    own_commit = git.get("commit") if git.get("dirty") is False else None
    out = []
    for run in runs(conn):
        if not _same_settings(run, key) or not run.baseline_ok(include_dirty, include_incomplete):
            continue
        if (own_commit and run.commit == own_commit) or _hash_of(conn, run.id) in digests:
            continue
        if started and run.started_at and run.started_at > started:
            continue
        out.append(run)
    return one_per_measurement(conn, _apart_from(conn, out, like))


def last_baseline(conn: sqlite3.Connection, like: Report, include_dirty: bool = False,
                  include_incomplete: bool = False) -> Run | None:
    """The most recent baseline-eligible run with the same settings and machine as ``like`` (see
    :func:`_candidates`); :func:`last_per_case` is what a comparison uses."""
    found = _candidates(conn, [like], include_dirty, include_incomplete)
    return found[-1] if found else None


def last_per_case(conn: sqlite3.Connection, head: Sequence[Report], include_dirty: bool = False,
                  include_incomplete: bool = False) -> dict[str, tuple[list[Report], str]]:
    """``last`` chosen per case: for each case of the head, the latest eligible commit whose runs measured it with
    the head's model weights, revision and technique options where both record them (compare.case_identity),
    with every such eligible run of that commit (pooled: independent runs). A run that measured a case with other
    weights is passed over for that case only: its other cases stay baselines. Cases no eligible run measured
    are absent (the comparison says so)."""
    candidates = _candidates(conn, head, include_dirty, include_incomplete)
    measured = {r.id: _measured(conn, r.id) for r in candidates}
    loaded: dict[int, Report] = {}

    def same_case(run: Run, case_id: str, like: dict[str, Any]) -> bool:
        if case_id not in measured[run.id]:
            return False
        report = loaded.setdefault(run.id, load(conn, run.id))
        case = next(c for c in report.get("cases") or [] if c["id"] == case_id)
        return identity_mismatch([case_identity(report, case)], [like]) is None

    out: dict[str, tuple[list[Report], str]] = {}
    for case_id in dict.fromkeys(c["id"] for r in head for c in r.get("cases") or []):
        like, _ = pooled([case_identity(r, c) for r in head for c in r.get("cases") or [] if c["id"] == case_id])
        latest = next((r for r in reversed(candidates) if same_case(r, case_id, like)), None)
        if latest is None:
            continue
        pooled_runs = [r for r in candidates if r.commit == latest.commit
                       and (latest.commit is not None or r.id == latest.id) and same_case(r, case_id, like)]
        label = (f"last: {(latest.commit or 'nogit')[:12]}, {len(pooled_runs)} run(s)" if len(pooled_runs) > 1
                 else f"last: {latest.label}")
        out[case_id] = ([loaded[r.id] for r in pooled_runs], label)
    return out


def same_commit_runs(conn: sqlite3.Connection, report: Report, head: Sequence[Report] = ()) -> list[Report]:
    """The other stored runs of ``report``'s commit that can be pooled with it as independent runs of the same
    code: complete, on a clean tree, same settings and machine, not ``report`` itself nor a run holding its
    measurement or that of the other ``head`` runs (their shards, the run merged from them: :func:`_apart_from`),
    each measurement once (:func:`one_per_measurement`). None for a run on a dirty tree (its code is not the
    commit's)."""
    git = (report.get("environment") or {}).get("git") or {}
    commit = git.get("commit")
    if not commit or git.get("dirty") is not False:
        return []
    key, digest = comparable_key(report), report_hash(report)
    found = [r for r in runs(conn, commit) if r.commit == commit and r.baseline_ok()
             and _same_settings(r, key) and _hash_of(conn, r.id) != digest]
    return [load(conn, r.id) for r in one_per_measurement(conn, _apart_from(conn, found, [report, *head]))]


def same_cases_only(run: Report, like: Report) -> Report:
    """``run`` without its cases that measured something else than ``like``'s case of the same id (other model
    weights or revision, other technique options: compare.case_identity), so that pooling it with ``like`` as
    another sample of the same code never mixes two experiments; the other cases stay."""
    mine = {c["id"]: case_identity(like, c) for c in like.get("cases") or []}
    cases = run.get("cases") or []
    kept = [c for c in cases
            if c["id"] not in mine or identity_mismatch([case_identity(run, c)], [mine[c["id"]]]) is None]
    return run if len(kept) == len(cases) else {**run, "cases": kept}


def at_commit(conn: sqlite3.Connection, commit: str, include_dirty: bool = False,
              include_incomplete: bool = False) -> list[Run]:
    """The baseline-eligible runs of one commit (a prefix of at least 4 characters), all with the settings and
    machine of the most recent one, so that they can be pooled; each measurement once (:func:`one_per_measurement`)."""
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
    latest = json.loads(usable[-1].settings_key)
    return one_per_measurement(conn, [r for r in usable if _same_settings(r, latest)])


@dataclass(frozen=True)
class TrendPoint:
    run: Run
    case_id: str
    value: float | None


def trend_series(points: Sequence[TrendPoint]) -> list[tuple[str, list[TrendPoint]]]:
    """The lines of a trend plot: per case, the points whose runs measured it the same way, in order. Two runs'
    settings join when nothing both record differs (compare.pooled: a key one run does not record, because it
    was written before the key existed, is unknown, not a difference), as compare and the gate treat them; before,
    each distinct stored key was a line of its own, so a series broke wherever the report gained a setting."""
    lines: list[tuple[str, dict[str, Any], list[TrendPoint]]] = []  # case, its runs' pooled key, its points
    for point in points:
        key = json.loads(point.run.settings_key)
        for i, (case_id, line_key, group) in enumerate(lines):
            if case_id != point.case_id:
                continue
            joined, mixed = pooled([line_key, key])
            if not mixed:
                group.append(point)
                lines[i] = (case_id, joined, group)
                break
        else:
            lines.append((point.case_id, key, [point]))
    return [(case_id, group) for case_id, _, group in lines]


def trend(conn: sqlite3.Connection, metric: str, model: str | None = None, technique: str | None = None,
          baseline_only: bool = False) -> list[TrendPoint]:
    """One point per stored run and measured case, oldest run first, each measurement once
    (:func:`one_per_measurement`: a merged run, not also its shards); any registry metric (None where the run did
    not measure it)."""
    if metric not in NAMES:
        raise HistoryError(f"unknown metric {metric!r}; one of {', '.join(NAMES)}")
    where, args = ["c.status = 'measured'"], [metric]
    for column, value in (("c.model", model), ("c.technique", technique)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    rows = conn.execute(
        "SELECT r.id, r.git_commit, r.dirty, r.status, r.started_at, r.settings_key, r.source, c.case_id, "
        "m.value FROM cases c JOIN runs r ON r.id = c.run_id LEFT JOIN metrics m ON m.run_id = c.run_id "
        f"AND m.case_id = c.case_id AND m.metric = ? WHERE {' AND '.join(where)} "
        "ORDER BY COALESCE(r.started_at, r.added_at), r.id, c.case_id", args).fetchall()
    points = [TrendPoint(_run(r[:7]), r[7], r[8]) for r in rows]
    if baseline_only:
        points = [p for p in points if p.run.baseline_ok()]
    counted = {r.id for r in one_per_measurement(conn, list({p.run.id: p.run for p in points}.values()))}
    return [p for p in points if p.run.id in counted]
