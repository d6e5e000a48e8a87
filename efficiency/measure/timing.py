"""Latency of prefill and decode, with warm-up and device synchronisation at both edges of every window."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


def make_sync(device: str) -> Callable[[], None]:
    """A function that waits for all queued work on ``device`` (a no-op on the CPU, which runs eagerly)."""
    if device.startswith("cuda"):
        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds of one call of ``fn``, synchronised before and after."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@dataclass(frozen=True)
class LatencyResult:
    prefill_s: float  # median forward pass over the prompt, no cache reuse
    decode_s_per_token: float | None  # (t(generate N) - t(generate 1)) / (N - 1), medians; None if unresolved
    prompt_tokens: int
    new_tokens: int
    rounds: int
    prefill_s_all: tuple[float, ...]
    reason: str | None = None
    method: str = "median of rounds after 1 warm-up; perf_counter with device sync at both edges; greedy decode"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def measure_latency(
    model: Any, prompt: torch.Tensor, new_tokens: int, device: str, rounds: int, pad_token_id: int | None
) -> LatencyResult:
    """``prompt`` has shape (1, P). Decode generates exactly ``new_tokens`` (min_new_tokens = max_new_tokens)."""
    sync = make_sync(device)
    prompt = prompt.to(device)
    mask = torch.ones_like(prompt)

    def prefill() -> None:
        model(prompt, attention_mask=mask, use_cache=False)

    def generate(n: int) -> Callable[[], None]:
        return lambda: model.generate(
            prompt, attention_mask=mask, do_sample=False, min_new_tokens=n, max_new_tokens=n,
            pad_token_id=pad_token_id,
        )

    for fn in (prefill, generate(2)):  # warm-up: kernels, caches, allocator
        timed(fn, sync)
    pre = [timed(prefill, sync) for _ in range(rounds)]
    one = [timed(generate(1), sync) for _ in range(rounds)]
    many = [timed(generate(new_tokens), sync) for _ in range(rounds)]
    per_token = (statistics.median(many) - statistics.median(one)) / (new_tokens - 1)
    reason = None
    if per_token <= 0:  # timing noise larger than the decode work: say so instead of reporting 0
        reason = f"generate({new_tokens}) was not slower than generate(1) (noise); use more --eff-decode-tokens"
    return LatencyResult(
        prefill_s=statistics.median(pre),
        decode_s_per_token=per_token if per_token > 0 else None,
        reason=reason,
        prompt_tokens=prompt.shape[1],
        new_tokens=new_tokens,
        rounds=rounds,
        prefill_s_all=tuple(pre),
    )
