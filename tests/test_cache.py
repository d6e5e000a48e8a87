from __future__ import annotations

import os
from pathlib import Path

from efficiency.cache import cached_build, entry_dir


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
