from __future__ import annotations

from typing import Any

import pytest
import torch

from efficiency.measure.perplexity import PerplexityEvaluator, hf_recipe_perplexity, windows


@pytest.mark.parametrize("n_tokens,context,stride,batch", [(300, 64, 32, 4), (257, 64, 64, 3), (100, 32, 7, 8)])
def test_batched_equals_one_window_loop(tiny: Any, n_tokens: int, context: int, stride: int, batch: int) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (n_tokens,))
    result = PerplexityEvaluator(ids, context, stride, batch).run(tiny, "cpu")
    expected, n_scored = hf_recipe_perplexity(tiny, ids, context, stride)
    assert abs(result.perplexity - expected) / expected < 1e-5
    assert result.n_scored_tokens == n_scored


def test_windows_cover_every_token_once() -> None:
    plan = windows(1000, 128, 48)
    scored = [t for w in plan for t in range(w.end - w.n_scored, w.end)]
    assert scored == list(range(1, 1000))


def test_too_few_tokens_is_an_error() -> None:
    with pytest.raises(ValueError, match="too few"):
        PerplexityEvaluator(torch.tensor([5]), 16, 8, 2)


def test_a_perfect_model_scores_perplexity_one() -> None:
    class Oracle(torch.nn.Module):
        """Puts all probability on the next token of a known sequence (logits_to_keep unsupported on purpose)."""

        def __init__(self, ids: torch.Tensor) -> None:
            super().__init__()
            self.ids = ids

        def forward(self, batch: torch.Tensor, use_cache: bool = False) -> Any:
            nxt = torch.roll(batch, -1, dims=1)
            logits = torch.full((*batch.shape, 16), -1e4)
            logits.scatter_(2, nxt.unsqueeze(-1), 1e4)
            return type("Out", (), {"logits": logits})()

    ids = torch.arange(40) % 16
    result = PerplexityEvaluator(ids, 10, 5, 3).run(Oracle(ids), "cpu")
    assert result.perplexity == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_nll_sum_is_the_float32_cross_entropy(dtype: torch.dtype) -> None:
    """The fused form (logsumexp - label logit, float32) equals cross_entropy on the float32 logits, also for a
    strided view of bf16 logits (the evaluator passes the slice without copying it)."""
    import torch.nn.functional as F

    from efficiency.measure.perplexity import nll_function, token_nll_sum

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 9, 50, generator=g) * 4).to(dtype)[:, :-1]  # (3, 8, 50), not contiguous
    labels = torch.randint(0, 50, (3, 8), generator=g)
    expected = F.cross_entropy(logits.float().reshape(-1, 50), labels.reshape(-1), reduction="sum")
    got = token_nll_sum(logits, labels)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert nll_function("cpu") is token_nll_sum  # eager on the CPU
