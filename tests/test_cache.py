from __future__ import annotations

import os
from pathlib import Path

from efficiency.cache import cached_build, damaged, entry_dir


def test_a_concurrent_builders_temporary_folder_is_left_alone(tmp_path: Path) -> None:
    # Before: every build removed all <key>.tmp-* folders, including one another process was still filling.
    parts = {"k": 1}
    final = entry_dir(tmp_path, "kind", parts)
    final.parent.mkdir(parents=True)
    live = final.parent / f"{final.name}.tmp-{os.getpid()}-abc"  # this process is alive: a build in progress
    live.mkdir()
    dead = final.parent / f"{final.name}.tmp-999999999-xyz"  # no such process: left by an interrupted build
    dead.mkdir()
    old_layout = final.parent / f"{final.name}.tmp-q1w2e3"
    old_layout.mkdir()

    def build(folder: Path) -> None:
        (folder / "x").write_text("1")

    entry, hit = cached_build(tmp_path, "kind", parts, build)
    assert not hit and (entry / "x").read_text() == "1" and (entry / "meta.json").is_file()
    assert live.is_dir() and not dead.exists() and not old_layout.exists()
    assert cached_build(tmp_path, "kind", parts, build) == (entry, True)


def test_the_first_finished_build_wins(tmp_path: Path) -> None:
    parts = {"k": 2}

    def build_racing(folder: Path) -> None:
        (folder / "who").write_text("second")
        # another builder finishes first, while this one is still building
        winner = entry_dir(tmp_path, "kind", parts)
        winner.mkdir()
        (winner / "who").write_text("first")
        (winner / "meta.json").write_text("{}")

    entry, hit = cached_build(tmp_path, "kind", parts, build_racing)
    assert (entry / "who").read_text() == "first"
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_a_truncated_entry_is_built_again_not_served(tmp_path: Path) -> None:
    """Before: an entry whose weights file was cut short (a full disk while copying a cache) was a hit, and every
    later run failed loading it with an error that named no file, until the cache was deleted by hand."""
    parts = {"k": 3}
    builds: list[int] = []

    def build(folder: Path) -> None:
        builds.append(1)
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"w" * 1000)

    entry, hit = cached_build(tmp_path, "kind", parts, build)
    assert not hit and damaged(entry) is None
    assert cached_build(tmp_path, "kind", parts, build) == (entry, True) and len(builds) == 1
    with open(entry / "sub" / "weights.bin", "r+b") as f:
        f.truncate(500)
    assert "sub/weights.bin (500 bytes, built 1000)" in (damaged(entry) or "")
    entry2, hit = cached_build(tmp_path, "kind", parts, build)
    assert entry2 == entry and not hit and len(builds) == 2
    assert (entry / "sub" / "weights.bin").stat().st_size == 1000 and damaged(entry) is None


def test_an_entry_from_before_the_manifest_is_still_served(tmp_path: Path) -> None:
    parts = {"k": 4}
    old = entry_dir(tmp_path, "kind", parts)
    old.mkdir(parents=True)
    (old / "x").write_text("1")
    (old / "meta.json").write_text('{"k": 4}')

    def build(folder: Path) -> None:
        raise AssertionError("an entry without a manifest is trusted as before")

    assert cached_build(tmp_path, "kind", parts, build) == (old, True)


def test_a_new_entry_is_readable_by_others_as_a_plain_mkdir_would_leave_it(tmp_path: Path) -> None:
    """Before: the entry was mkdtemp's folder renamed into place, 0o700 whatever the umask, so a teammate or a CI
    job sharing --eff-cache-dir could not read a cached SparseGPT or distillation result."""
    import stat

    previous = os.umask(0o022)
    try:
        entry, _ = cached_build(tmp_path, "kind", {"k": 3}, lambda folder: (folder / "x").write_text("1"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
