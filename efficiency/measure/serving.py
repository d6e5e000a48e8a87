"""Batched generation as a serving workload: B prompts of equal length, exactly N new tokens each.

Every sequence does the same work: the prompts are B different equal-length slices of the evaluation tokens
(no padding at all, so no left-padding question arises; the attention mask is all ones), and generation is
greedy with ``min_new_tokens = max_new_tokens = N`` (an end-of-sequence token cannot stop a row early; the
output length is checked). The time to the first token is read inside the same ``generate`` call by a
streamer that synchronises the device when the first new tokens arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def short_text(input_tokens: int, text_tokens: int, source: str = "") -> str | None:
    """Why prompts of ``input_tokens`` cannot be cut from ``text_tokens`` evaluation tokens, or None: the rows of a
    batch wrap around the text (:func:`prompts`), so at any batch size it must hold one prompt. ``source`` says where
    ``text_tokens`` comes from, for the message. The serving phase applies it to the tokens it has, the checks
    before loading (efficiency.checks) to the token budget, ``--eff-max-tokens``."""
    if text_tokens >= input_tokens:
        return None
    return (f"serving prompts need {input_tokens} tokens (--eff-input-tokens); the evaluation text has "
            f"{text_tokens}{source}")


def prompts(tokens: Any, batch_size: int, input_tokens: int, device: str) -> Any:
    """(batch_size, input_tokens) ids: row i starts at i * input_tokens of the evaluation tokens (wrapping
    around when the text is shorter than the batch needs; :func:`short_text` when it cannot hold one prompt)."""
    import torch

    n = len(tokens)
    problem = short_text(input_tokens, n)
    if problem:
        raise ValueError(problem)
    starts = [(i * input_tokens) % (n - input_tokens + 1) for i in range(batch_size)]
    return torch.stack([tokens[s:s + input_tokens] for s in starts]).to(device)


class FirstTokenClock:
    """A ``generate`` streamer that notes when the first new tokens exist (device synchronised)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.calls = 0
        self.first_at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt, call 2 the first generated tokens
            self.sync()
            self.first_at = time.perf_counter()

    def end(self) -> None:
        return None


@dataclass
class Generation:
    """One configured batched ``generate``; each call appends its time to the first token."""

    model: Any
    ids: Any
    new_tokens: int
    pad_token_id: int | None
    sync: Callable[[], None]

    def __post_init__(self) -> None:
        self.first_token_s: list[float] = []

    def __call__(self) -> Any:
        import torch

        clock = FirstTokenClock(self.sync)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False,
                min_new_tokens=self.new_tokens, max_new_tokens=self.new_tokens, pad_token_id=self.pad_token_id,
                streamer=clock,
            )
        if clock.first_at is not None:
            self.first_token_s.append(clock.first_at - t0)
        return out

    def check(self, out: Any) -> None:
        want = (self.ids.shape[0], self.ids.shape[1] + self.new_tokens)
        if tuple(out.shape) != want:
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {want}: output lengths differ")


def pad_id(tokenizer: Any) -> int | None:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
