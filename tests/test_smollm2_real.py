"""Slow: the README's main job on the real SmolLM2-135M (fetched from PyPI once, cached), tiny token budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

BUDGET = ["--eff-max-tokens", "384", "--eff-context", "128", "--eff-stride", "128", "--eff-rounds", "1",
          "--eff-prefill-tokens", "32", "--eff-decode-tokens", "3", "--benchmark-disable", "--eff-quiet"]


def run_benchmarks(pytester: pytest.Pytester, shared_data: Path, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    report = pytester.path / "run.json"
    result = pytester.runpytest_subprocess(
        str(REPO / "benchmarks"), "-p", "no:cacheprovider", "-k", "smollm2-135m", "--eff-data-dir", str(shared_data),
        "--eff-reports-dir", str(pytester.path / "reports"), "--eff-report", str(report), *BUDGET, *args,
        timeout=1200,
    )
    return result, json.loads(report.read_text())


def test_smollm2_grid_on_cpu_and_the_threshold_gate(pytester: pytest.Pytester, shared_data: Path) -> None:
    result, report = run_benchmarks(pytester, shared_data, "--eff-threshold", "bnb4=1000")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*pytest-efficiency*", "smollm2-135m-fp32 *", "smollm2-135m-bnb4 *"])
    cases = {c["technique"]: c for c in report["cases"]}
    assert list(cases) == ["fp32", "bf16", "bnb8", "bnb4"]
    for c in cases.values():
        assert c["source"].startswith("pypi-gguf") and c["perplexity"]["meaningful"]
        assert 5 < c["perplexity"]["value"] < 200  # a real language model on English text, not a random one
        assert c["runtime"]["median_s"] > 0 and c["memory"]["peak_bytes"] > 0
        assert c["energy"]["energy_j"] is None and c["energy"]["reason"]
    sizes = [cases[t]["size"]["size_bytes"] for t in ("bnb4", "bnb8", "fp32")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    increase = cases["bnb4"]["deltas"]["perplexity"]
    assert increase > 0

    result, report = run_benchmarks(pytester, shared_data, "--eff-techniques", "bnb4",
                                    "--eff-threshold", f"bnb4={increase / 2:.6f}")
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*smollm2-135m-bnb4: perplexity * vs * for the fp32 baseline is +*above the bnb4 limit*"]
    )
    assert report["violations"][0]["case_id"] == "smollm2-135m-bnb4"


def test_the_converted_copy_is_readable_as_a_plain_mkdir_would_leave_it(smollm2_folder: Path, tmp_path: Path) -> None:
    """Before: the safetensors copy was mkdtemp's folder renamed into place, 0o700 whatever the umask, so others
    sharing --eff-cache-dir could not load it. Converted again here from the cached GGUF, in a fresh cache."""
    import os
    import stat

    from efficiency.smollm2 import ensure_dequantised, gguf_path

    fresh = tmp_path / "cache"
    gguf_path(fresh).parent.mkdir(parents=True)
    gguf_path(fresh).symlink_to(gguf_path(smollm2_folder.parent.parent).resolve())
    previous = os.umask(0o022)
    try:
        out = ensure_dequantised(fresh, log=lambda msg: None)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_the_positions_known_before_the_download_are_those_of_the_fetched_model(smollm2_folder: Path) -> None:
    """smollm2.MAX_POSITIONS stands for the model's config in the checks made before it is fetched."""
    from transformers import AutoConfig

    from efficiency.models import max_positions
    from efficiency.smollm2 import MAX_POSITIONS

    assert max_positions(AutoConfig.from_pretrained(smollm2_folder)) == MAX_POSITIONS
