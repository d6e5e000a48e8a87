"""The Python API measures one case against its baseline without pytest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import SHARED_DATA, save_tiny_gpt2


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


def test_a_case_that_calibrates_records_the_hash_of_the_text_it_read(tmp_path: Path, one_thread: None) -> None:
    """Compare tells such cases apart by this hash (report.compare.case_identity), not by the file's path."""
    import hashlib

    from efficiency.api import measure_case

    save_tiny_gpt2(tmp_path / "m" / "t", n_positions=64, n_embd=32)
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    calibration = "A different text to calibrate on, of a few hundred tokens. " * 30
    (tmp_path / "calib.txt").write_text(calibration)
    (tmp_path / "pyproject.toml").write_text('[tool.efficiency.technique."ah90"]\nn_sequences = 2\nseq_len = 16\n')
    case = measure_case("t", "ah90", root=tmp_path, model_dir=str(tmp_path / "m"), dataset=str(tmp_path / "text.txt"),
                        calibration=str(tmp_path / "calib.txt"), device="cpu", max_tokens="200", context=32,
                        stride=32, rounds=2, decode_tokens=3, prefill_tokens=8, cache_dir=str(tmp_path / "cache"))
    assert case["status"] == "measured"
    assert case["technique_info"]["calibration_sha256"] == hashlib.sha256(calibration.encode()).hexdigest()


@pytest.mark.parametrize(("options", "message"), [
    ({"decode_tokens": 3000}, r"model 'opt-125m' takes at most 2048 positions, but the latency workload needs"),
    ({"tasks": "nosuchtask"}, r"unknown lm-eval task\(s\) nosuchtask"),
    ({"batch_sizes": "4", "input_tokens": 2000},
     r"model 'opt-125m' takes at most 2048 positions, but the serving sweep needs 2000 input tokens"),
], ids=["decode-beyond-positions", "unknown-task", "serving-beyond-positions"])
def test_measure_case_refuses_bad_input_before_loading_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               options: dict[str, Any], message: str) -> None:
    """The checks the plugin makes before any model loads (efficiency.checks), with their messages; before, the
    api loaded the baseline and measured on (a positions error stopped it later; an unknown task or a serving sweep
    past the positions came back buried in the case, after two models had loaded)."""
    from efficiency.api import measure_case
    from efficiency.config import ConfigError
    from efficiency.runner import Runner

    if "tasks" in options:
        pytest.importorskip("lm_eval")

    def loads(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Runner, "measure", loads)
    with pytest.raises(ConfigError, match=message):
        measure_case("opt-125m", "bf16", root=tmp_path, data_dir=str(SHARED_DATA),
                     model_dir=str(SHARED_DATA / "architectures"), random_weights=True, device="cpu",
                     cache_dir=str(tmp_path / "cache"), **options)
