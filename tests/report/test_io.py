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


def test_non_finite_numbers_are_written_as_null_and_the_report_stays_valid_json(tmp_path: Path) -> None:
    # Before: a NaN made every later write raise, and the run lost its report.
    path = tmp_path / "x.json"
    io.write_atomic(path, {"schema_version": 1, "v": float("nan"), "rounds": [1.0, float("inf")],
                           "nested": {"w": -float("inf"), "ok": 2.5}})
    assert json.loads(path.read_text()) == {"schema_version": 1, "v": None, "rounds": [1.0, None],
                                            "nested": {"w": None, "ok": 2.5}}


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


def _reserve_many(args: tuple[str, int]) -> list[str]:
    folder, n = args
    return [io.reserve_report_path(Path(folder), "abc", False).name for _ in range(n)]


def test_concurrent_runs_never_share_a_report_number(tmp_path: Path) -> None:
    # Before: every run took max+1 without reserving it, so runs started together wrote the same 0001 file.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        names = [n for batch in pool.map(_reserve_many, [(str(tmp_path), 10)] * 4) for n in batch]
    assert len(names) == 40 and len({n[:4] for n in names}) == 40
    assert sorted(int(n[:4]) for n in names) == list(range(1, 41))


def test_reserve_skips_numbers_taken_by_another_commit(tmp_path: Path) -> None:
    (tmp_path / "0001_other.json").write_text("{}")
    assert io.reserve_report_path(tmp_path, "abc", True).name == "0002_abc_dirty.json"
    assert io.reserve_report_path(tmp_path, "abc", True).name == "0003_abc_dirty.json"


def test_write_with_fallback_keeps_the_report_when_a_target_fails(tmp_path: Path) -> None:
    good = tmp_path / "ok.json"
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    data = {"schema_version": SCHEMA_VERSION, "cases": [1]}
    written, failed, fallback = io.write_with_fallback([blocked / "r.json", good], data)
    assert written == [good] and [p for p, _ in failed] == [blocked / "r.json"] and failed[0][1]
    assert fallback is not None and json.loads(fallback.read_text()) == data
    # the same run's next write reuses its fallback; another run's gets its own (before: one fixed name in the
    # temporary folder, so a second run's fallback overwrote the first's measurements)
    assert io.write_with_fallback([blocked / "r.json"], {"run": 2}, fallback)[2] == fallback
    other = io.write_with_fallback([blocked / "r.json"], {"run": "B"})[2]
    assert other is not None and other != fallback and json.loads(fallback.read_text()) == {"run": 2}
    fallback.unlink()
    other.unlink()
    assert io.write_with_fallback([good], data) == ([good], [], None)


def test_check_writable_names_the_problem(tmp_path: Path) -> None:
    assert io.check_writable(tmp_path / "new" / "reports", is_dir=True) is None
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert io.check_writable(blocked / "reports", is_dir=True)
    assert io.check_writable(blocked / "r.json", is_dir=False)
    # a file target that is an existing folder: before, accepted up front and the write failed after the run
    assert io.check_writable(tmp_path / "new", is_dir=False) == "it is a folder: give the path of a file"
    assert io.check_writable(tmp_path / "new" / "r.json", is_dir=False) is None


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_new_report_gets_the_mode_open_would_give_and_a_rewritten_one_keeps_its_own(
        tmp_path: Path, umask: int) -> None:
    """Before: every report was 0o600 (tempfile.mkstemp's mode) whatever the umask, so an artifact uploader or a
    web server running as another user could not read it, and a report given 0o644 by hand lost it when rewritten."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        new = tmp_path / "new.json"
        io.write_atomic(new, {"schema_version": SCHEMA_VERSION, "status": "running", "cases": []})
        assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o640)
        io.write_atomic(kept, {"schema_version": SCHEMA_VERSION, "status": "complete", "cases": []})
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(previous)
