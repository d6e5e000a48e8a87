from __future__ import annotations

from pathlib import Path

from conftest import tiny_model
from efficiency.measure.memory import model_size
from efficiency.techniques import Context, parse


def test_size_counts_quantised_weights_and_their_state() -> None:
    fp32 = model_size(tiny_model("opt"))
    q4_model = parse("bnb4").apply(tiny_model("opt"), Context("cpu", None, "t", Path("/tmp")))
    q4 = model_size(q4_model)
    assert q4.parameters == fp32.parameters  # a packed 4-bit weight still counts as one parameter
    assert q4.size_bytes < fp32.size_bytes
    layers = [m for n, m in tiny_model("opt").named_modules()
              if type(m).__name__ == "Linear" and not n.endswith("lm_head")]
    linear = sum(m.weight.numel() for m in layers)
    # Per weight 4 bytes -> 0.5 byte plus a float32 absmax per 64-weight block; per layer a 16-entry float32 code.
    assert fp32.size_bytes - q4.size_bytes == linear * (4 - 0.5 - 4 / 64) - 16 * 4 * len(layers)


def test_tied_weights_counted_once() -> None:
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model_size(model).parameters == sum(p.numel() for p in model.parameters())


def test_cpu_peak_is_per_block_not_the_process_high_water_mark() -> None:
    # Before: ru_maxrss since process start, so a later, smaller case reported the earlier case's peak.
    import numpy as np

    from efficiency.measure.memory import track_peak

    with track_peak("cpu") as big:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block += 1
        del block
    with track_peak("cpu") as small:
        small_block = np.ones(2**20 // 8)  # 1 MiB
        del small_block
    assert big.peak_bytes is not None and small.peak_bytes is not None
    assert big.peak_bytes >= 48 * 2**20, big
    assert small.peak_bytes < 16 * 2**20, small
    assert "psutil" in small.method and small.before_bytes and small.peak_rss_bytes
    assert small.to_dict()["peak_bytes"] == small.peak_bytes
