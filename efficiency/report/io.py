"""Report files: atomic JSON writes, numbering safe under concurrent runs, and a fallback when a target fails.

- :func:`write_atomic` writes a temporary file in the same folder, fsyncs it and ``os.replace``-s it. A report is
  always valid JSON: a non-finite float (NaN, +-inf) is written as ``null`` (the case that produced it is marked
  ``invalid`` by the session, with the reason).
- :func:`reserve_report_path` gives each run its own ``NNNN_<commit>.json``: the number is taken under a lock
  file and the name is created exclusively (``O_EXCL``), retried on collision, so runs started together and
  pytest-xdist workers never share a number.
- :func:`write_with_fallback` writes every target it can, and if one fails writes the report to a fallback file
  of its own in the temporary folder (one per run, reused by its later writes) and says where, so no measurement
  is lost.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from efficiency.files import give_usual_mode
from efficiency.report.schema import SchemaError, upgrade

RESERVE_ATTEMPTS = 1000


class ReportError(ValueError):
    pass


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively through dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Readers see the old file or the new one, never a partial file, even if the process dies mid-write.
    Non-finite floats are written as null (:func:`finite_or_null`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(finite_or_null(data), f, indent=1, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        give_usual_mode(Path(tmp), path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write a report atomically (:func:`write_json_atomic`)."""
    write_json_atomic(path, data)


def write_with_fallback(targets: list[Path], data: dict[str, Any], fallback: Path | None = None,
                        ) -> tuple[list[Path], list[tuple[Path, str]], Path | None]:
    """Write ``data`` to every target. Returns (written, failed as (path, error), fallback path or None): when a
    target fails, the report also goes to ``fallback`` (this run's earlier fallback file) or, the first time, to
    a new unique file ``<tmp>/pytest-efficiency-<target stem>-XXXX.json``, so that the measurements survive and
    no other run's fallback is overwritten; the caller names it and exits non-zero."""
    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for path in targets:
        try:
            write_atomic(path, data)
            written.append(path)
        except OSError as err:
            failed.append((path, f"{type(err).__name__}: {err}"))
    if not failed:
        return written, failed, None
    if fallback is None:
        fd, tmp = tempfile.mkstemp(prefix=f"pytest-efficiency-{failed[0][0].stem}-", suffix=".json")
        os.close(fd)
        fallback = Path(tmp)
    write_atomic(fallback, data)
    return written, failed, fallback


def check_writable(path: Path, is_dir: bool) -> str | None:
    """None when a file can be created in ``path`` (a folder, created if missing) or written at ``path`` (a
    file, which an existing folder is not); else why not. Checked by creating and removing a temporary file, the
    only test that is reliable."""
    if not is_dir and path.is_dir():
        return "it is a folder: give the path of a file"
    folder = path if is_dir else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eff-write-check-")
        os.close(fd)
        os.unlink(tmp)
        if not is_dir and path.exists() and not os.access(path, os.W_OK):
            return f"{path} is not writable"
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"cannot read report {path}: {err}") from err
    try:
        return upgrade(data, path)  # older schema versions are upgraded, unreadable ones refused
    except SchemaError as err:
        raise ReportError(str(err)) from err


def _numbers(reports_dir: Path) -> list[int]:
    return [int(p.name[:4]) for p in reports_dir.glob("[0-9][0-9][0-9][0-9]_*.json") if p.name[:4].isdigit()]


def _tag(commit: str | None, dirty: bool) -> str:
    return (commit or "nogit")[:12] + ("_dirty" if dirty else "")


def next_report_path(reports_dir: Path, commit: str | None, dirty: bool) -> Path:
    """``NNNN_<commit>[_dirty].json`` with a counter one above the highest there (pytest-benchmark's naming).
    Only a proposal: a run takes its number with :func:`reserve_report_path`."""
    n = max(_numbers(reports_dir), default=0) + 1
    return reports_dir / f"{n:04d}_{_tag(commit, dirty)}.json"


@contextlib.contextmanager
def _numbering_lock(reports_dir: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<reports_dir>/.numbering.lock`` (POSIX); elsewhere exclusive create alone
    guards the names."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (Windows)
        yield
        return
    fd = os.open(reports_dir / ".numbering.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def reserve_report_path(reports_dir: Path, commit: str | None, dirty: bool) -> Path:
    """Take the next free number for this run: the file ``NNNN_<commit>[_dirty].json`` is created empty with
    ``O_EXCL`` under the numbering lock, and the next number is tried when the name or the number is taken. The
    run overwrites the empty file with its first report."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    tag = _tag(commit, dirty)
    with _numbering_lock(reports_dir):
        taken = set(_numbers(reports_dir))
        n = max(taken, default=0) + 1
        for _ in range(RESERVE_ATTEMPTS):
            if n not in taken:
                path = reports_dir / f"{n:04d}_{tag}.json"
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                    return path
                except FileExistsError:
                    pass
            n += 1
    raise ReportError(f"could not reserve a report number in {reports_dir} after {RESERVE_ATTEMPTS} attempts")
