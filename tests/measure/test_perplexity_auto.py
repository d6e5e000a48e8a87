"""Automatic batch of perplexity windows: same perplexity as the one-window loop, batch from memory."""

from __future__ import annotations

from typing import Any

import torch

from conftest import tiny_model
from efficiency.measure.perplexity import (
    AUTO_MAX_BATCH,
    CPU_AUTO_BATCH,
    PerplexityEvaluator,
    auto_batch_size,
    window_bytes,
)


def test_auto_batch_gives_the_one_window_perplexity_in_fp32() -> None:
    model = tiny_model("opt")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (500,))
    one = PerplexityEvaluator(ids, 64, 32, 1).run(model, "cpu")
    auto = PerplexityEvaluator(ids, 64, 32, None).run(model, "cpu")
    assert auto.batch_size == CPU_AUTO_BATCH and auto.batch_size_auto and not one.batch_size_auto
    assert abs(auto.perplexity - one.perplexity) / one.perplexity < 1e-5


def test_auto_batch_on_a_gpu_follows_free_memory() -> None:
    model = tiny_model("opt")
    per_window = window_bytes(model.config, 1024, 513, 4)
    # room for 10 windows in half the free memory -> 8 (a power of two)
    assert auto_batch_size(model, 1024, 512, "cuda", 1000, free_bytes=per_window * 20) == 8
    assert auto_batch_size(model, 1024, 512, "cuda", 1000, free_bytes=per_window * 10**6) == AUTO_MAX_BATCH
    assert auto_batch_size(model, 1024, 512, "cuda", 3, free_bytes=per_window * 10**6) == 2  # only 3 windows
    assert auto_batch_size(model, 1024, 512, "cuda", 1000, free_bytes=0) == 1


def test_window_bytes_by_hand() -> None:
    model: Any = tiny_model("opt")  # hidden 32, ffn 64, vocab 128
    assert window_bytes(model.config, 10, 3, 2) == 10 * (8 * 32 + 2 * 64) * 2 + 3 * 128 * (2 + 8)
