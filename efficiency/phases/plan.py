"""Which phases a case runs, in order. One place: adding a workload means adding its phase here (enabled by
its settings)."""

from __future__ import annotations

from typing import Any

from efficiency.config import SuiteConfig
from efficiency.phases.latency import DecodePhase, FirstTokenPhase, PrefillPhase
from efficiency.phases.perplexity import QualityPhase, TimedPassPhase

# Phases whose failure (e.g. a transformed model that cannot generate) leaves the rest of the case measured:
# their section says why instead.
OPTIONAL_GROUPS: dict[str, tuple[str, ...]] = {"latency": ("prefill", "first_token", "decode")}


def case_phases(cfg: SuiteConfig, random_weights: bool) -> list[Any]:
    return [QualityPhase(random_weights=random_weights), TimedPassPhase(), PrefillPhase(), FirstTokenPhase(),
            DecodePhase()]
