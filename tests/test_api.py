"""The Python API measures one case against its baseline without pytest."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import save_tiny_gpt2


def test_measure_case_on_a_tiny_local_model(tmp_path: Path, one_thread: None) -> None:
    from efficiency.api import measure_case

    save_tiny_gpt2(tmp_path / "m" / "t", n_positions=64, n_embd=32)
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    case = measure_case("t", "bnb4", root=tmp_path, model_dir=str(tmp_path / "m"), dataset=str(tmp_path / "text.txt"),
                        device="cpu", max_tokens="200", context=32, stride=32, rounds=2, decode_tokens=3,
                        prefill_tokens=8, cache_dir=str(tmp_path / "cache"))
    assert case["status"] == "measured" and case["technique"] == "bnb4" and not case["is_baseline"]
    assert case["baseline"]["technique"] == "fp32"
    assert case["deltas"]["perplexity"] == pytest.approx(
        (case["metrics"]["perplexity"] / case["baseline"]["perplexity"] - 1) * 100)
    assert case["metrics"]["size_bytes"] > 0 and case["scores"]["runtime_only"]["status"] in ("ok", "free",
                                                                                               "no-saving")
