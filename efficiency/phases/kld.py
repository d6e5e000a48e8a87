"""The ``kld`` phase: KL divergence of the case's next-token distribution from the baseline's on the first N
evaluation tokens (efficiency.measure.kld). The baseline case computes and stores its reference in the untimed
setup, then, like every case, is compared with it inside the window (so the baseline reads ~0: a check of
determinism, not a tautology)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from efficiency.phases.base import PhaseContext, PhaseRecord
from efficiency.phases.quality_settings import KldSettings

STORE_KEY = "kld_reference"
RANDOM_REASON = "random weights: the output distribution of an untrained model is near uniform (not meaningful)"


@dataclass
class KldPhase:
    settings: KldSettings
    random_weights: bool = False
    name: ClassVar[str] = "kld"

    def _ids(self, ctx: PhaseContext) -> Any:
        return ctx.tokens[: self.settings.tokens]

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        from efficiency.data import DataUnavailable
        from efficiency.measure.kld import reference

        if ctx.is_baseline:
            ctx.log(f"{ctx.case_id}: KL-divergence reference over {len(self._ids(ctx))} tokens "
                    f"(top {self.settings.top_k})")
            ctx.store[STORE_KEY] = reference(model, self._ids(ctx), ctx.context, ctx.device, self.settings.top_k)
        if ctx.store.get(STORE_KEY) is None:
            raise DataUnavailable("KL divergence: the baseline's reference is not in this session (the baseline "
                                  "case of this model did not run first, or failed)")

    def run(self, model: Any, ctx: PhaseContext) -> Any:
        from efficiency.measure.kld import compare

        return compare(model, self._ids(ctx), ctx.store[STORE_KEY], ctx.device)

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        ref = ctx.store[STORE_KEY]
        return {"kld": {
            **record.result.to_dict(),
            "meaningful": not self.random_weights,
            "reason": RANDOM_REASON if self.random_weights else None,
            "reference_bytes": ref.nbytes,
            "wall_s": record.window.wall_s,
            "method": "KL(baseline || case) per position on the baseline's top-k tokens plus one bin for the "
                      "rest (a lower bound, exact when k covers the vocabulary; tail_mass_mean says how much "
                      "the rest bin holds); windows of the perplexity context",
        }}
