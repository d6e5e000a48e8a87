"""Serving phases: batched generation at each batch size, each batch size in its own measured window
(``serving_b1``, ``serving_b8``, ...), repeated by ``ctx.repeat`` until the window is at least the minimum
window. The last one writes the ``serving`` section: per batch size, output tokens per second, time to first
token, time per output token and joules per output token; ``largest`` repeats the row of the largest batch
(the registry's headline metrics).

Per batch size B with prompts of P tokens and exactly N new tokens per row, from the median round time t
and the median time to first token t1 (read inside the same ``generate`` call):
``tokens_per_s = B N / t``, ``time_per_output_token_s = (t - t1) / (N - 1)`` (one decode step serves all B
rows), ``j_per_token = (window energy / rounds) / (B N)`` (all the energy of the round, prefill included).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from efficiency.phases.base import PhaseContext, PhaseRecord, Rounds
from efficiency.phases.perplexity import energy_per_unit
from efficiency.phases.quality_settings import ServingSettings

PREFIX = "serving_b"
METHOD = ("greedy generate of exactly N new tokens (min = max new tokens) for B equal-length prompts from the "
          "evaluation text (no padding); 1 warm-up; perf_counter with device sync at both edges; time to "
          "first token read by a synchronising streamer in the same call; one energy window per batch size")


@dataclass(frozen=True)
class ServingRun:
    batch_size: int
    input_tokens: int
    output_tokens: int
    rounds: Rounds
    first_token_s: tuple[float, ...]


def phase_name(batch_size: int) -> str:
    return f"{PREFIX}{batch_size}"


@dataclass
class ServingPhase:
    batch_size: int
    settings: ServingSettings
    last: bool = False  # writes the section from every serving record of the case
    name: str = field(init=False)
    _gen: Any = field(default=None, repr=False)
    _estimate_s: float = 0.0

    def __post_init__(self) -> None:
        self.name = phase_name(self.batch_size)

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        import time

        from efficiency.measure.serving import Generation, pad_id, prompts

        s = self.settings
        ids = prompts(ctx.tokens, self.batch_size, s.input_tokens, ctx.device)
        self._gen = Generation(model, ids, s.output_tokens, pad_id(ctx.tokenizer), ctx.sync)
        ctx.sync()
        t0 = time.perf_counter()
        self._gen.check(self._gen())  # warm-up (kernels, cache allocation) and the exact-length check
        ctx.sync()
        self._estimate_s = time.perf_counter() - t0
        self._gen.first_token_s.clear()
        ctx.log(f"{ctx.case_id}: serving batch {self.batch_size} x ({s.input_tokens} in, {s.output_tokens} out)")

    def run(self, model: Any, ctx: PhaseContext) -> ServingRun:
        s = self.settings
        try:
            rounds = ctx.repeat(self._gen, ctx.workload.min_rounds, self._estimate_s)
            return ServingRun(self.batch_size, s.input_tokens, s.output_tokens, rounds,
                              tuple(self._gen.first_token_s))
        finally:
            self._gen = None

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        if not self.last:
            return {}
        rows = [serving_row(r, ctx.primary) for name, r in ctx.records.items() if name.startswith(PREFIX)]
        rows.sort(key=lambda row: row["batch_size"])
        return {"serving": {
            "batches": rows,
            "largest": rows[-1] if rows else None,
            "input_tokens": self.settings.input_tokens,
            "output_tokens": self.settings.output_tokens,
            "method": METHOD,
        }}


def serving_row(record: PhaseRecord, primary: str) -> dict[str, Any]:
    run: ServingRun = record.result
    b, n = run.batch_size, run.output_tokens
    t = run.rounds.median_s
    t1 = statistics.median(run.first_token_s) if run.first_token_s else None
    tpot = (t - t1) / (n - 1) if t1 is not None and t > t1 else None
    energy = energy_per_unit(record.window, run.rounds.n, primary)
    per_round_j = energy["energy_j"]
    return {
        "batch_size": b,
        "tokens_per_s": b * n / t if t > 0 else None,
        "round_s": t,
        "time_to_first_token_s": t1,
        "time_per_output_token_s": tpot,
        "j_per_token": per_round_j / (b * n) if per_round_j is not None else None,
        "energy_reason": energy["reason"],
        "rounds": run.rounds.n,
        "rounds_s": list(run.rounds.times_s),
        "first_token_s_all": list(run.first_token_s),
        "round_cap": run.rounds.note,
        "window_s": record.window.wall_s,
        "peak_bytes": getattr(record.window.peak, "peak_bytes", None),
        "energy": energy,
    }
