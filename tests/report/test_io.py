from __future__ import annotations

import json
from pathlib import Path

import pytest

from efficiency.report import io
from efficiency.report.schema import SCHEMA_VERSION


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "r" / "run.json"
    io.write_atomic(path, {"schema_version": SCHEMA_VERSION, "status": "running", "cases": []})
    assert io.read(path)["status"] == "running"
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]


def test_a_failed_write_leaves_the_old_report_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.json"
    io.write_atomic(path, {"schema_version": SCHEMA_VERSION, "status": "running", "cases": [1]})

    def dump_half_then_die(obj: object, f: object, **kw: object) -> None:
        f.write('{"schema_version": 1, "status": "comp')  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(io.json, "dump", dump_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.write_atomic(path, {"schema_version": SCHEMA_VERSION, "status": "complete", "cases": [1, 2]})
    monkeypatch.undo()
    assert json.loads(path.read_text())["cases"] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_nan_is_refused_rather_than_written_as_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        io.write_atomic(tmp_path / "x.json", {"schema_version": 1, "v": float("nan")})


def test_read_refuses_newer_schema_and_non_reports(tmp_path: Path) -> None:
    newer = tmp_path / "new.json"
    newer.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(io.ReportError, match="schema version"):
        io.read(newer)
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    with pytest.raises(io.ReportError, match="not a pytest-efficiency report"):
        io.read(other)


def test_next_report_path_counts_up(tmp_path: Path) -> None:
    assert io.next_report_path(tmp_path, "abcdef1234567890", False).name == "0001_abcdef123456.json"
    (tmp_path / "0007_x.json").write_text("{}")
    assert io.next_report_path(tmp_path, None, True).name == "0008_nogit_dirty.json"
