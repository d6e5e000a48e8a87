"""Atomic JSON report files: write a temporary file in the same folder, fsync it, ``os.replace`` it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from efficiency.report.schema import SchemaError, upgrade


class ReportError(ValueError):
    pass


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never a partial file, even if the process dies mid-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"cannot read report {path}: {err}") from err
    try:
        return upgrade(data, path)  # older schema versions are upgraded, unreadable ones refused
    except SchemaError as err:
        raise ReportError(str(err)) from err


def next_report_path(reports_dir: Path, commit: str | None, dirty: bool) -> Path:
    """``NNNN_<commit>[_dirty].json`` with a counter one above the highest there (pytest-benchmark's naming)."""
    numbers = [int(p.name[:4]) for p in reports_dir.glob("[0-9][0-9][0-9][0-9]_*.json") if p.name[:4].isdigit()]
    n = max(numbers, default=0) + 1
    tag = (commit or "nogit")[:12] + ("_dirty" if dirty else "")
    return reports_dir / f"{n:04d}_{tag}.json"
