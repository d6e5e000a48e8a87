"""--eff-shard end to end: shards of a two-model grid, run as separate pytest runs, merge into one report that
holds every case once and gates like an unsharded run (tiny GPT-2 copies, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_plugin import run_grid, tiny_dir  # noqa: F401  (tiny_dir is a fixture)


def test_shards_cover_the_grid_once_and_merge_into_a_gated_run(pytester: pytest.Pytester,
                                                               tiny_dir: Path) -> None:  # noqa: F811
    from efficiency.cli import main

    models = tiny_dir / "models"
    if not (models / "tiny-gpt2b").exists():
        shutil.copytree(models / "tiny-gpt2", models / "tiny-gpt2b")
    import subprocess

    pytester.makepyfile(test_grid="")  # the tree a CI job would check out: merge needs one commit
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit",
                                                "-qm", "grid"]):
        subprocess.run(["git", *cmd], cwd=pytester.path, check=True)
    reports = []
    for i in (1, 2):
        result, report = run_grid(pytester, tiny_dir, "--eff-models", "tiny-gpt2,tiny-gpt2b", "--eff-techniques",
                                  "fp32,bnb4", "--eff-shard", f"{i}/2", "--eff-history", "off")
        result.assert_outcomes(passed=2)
        path = pytester.path / f"shard{i}.json"
        path.write_text(json.dumps(report))
        reports.append(path)
        assert report["settings"]["shard"] == {"index": i, "count": 2}
    ids = [c["id"] for r in reports for c in json.loads(r.read_text())["cases"]]
    assert sorted(ids) == sorted(["tiny-gpt2-fp32", "tiny-gpt2-bnb4", "tiny-gpt2b-fp32", "tiny-gpt2b-bnb4"])
    merged = pytester.path / "merged.json"
    assert main(["merge", *map(str, reports), "-o", str(merged)]) == 0
    assert json.loads(merged.read_text())["status"] == "complete"
    assert main(["gate", str(merged)]) == 0


def test_a_bad_shard_is_a_usage_error(pytester: pytest.Pytester, tiny_dir: Path) -> None:  # noqa: F811
    result, _ = run_grid(pytester, tiny_dir, "--eff-shard", "3/2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--eff-shard*"])
