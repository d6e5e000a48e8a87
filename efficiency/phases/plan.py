"""Which phases a case runs, in order. One place: adding a workload means adding its phase here (enabled by
its settings)."""

from __future__ import annotations

from typing import Any

from efficiency.config import SuiteConfig
from efficiency.phases.latency import DecodePhase, FirstTokenPhase, PrefillPhase
from efficiency.phases.perplexity import QualityPhase, TimedPassPhase

# Phases whose failure (e.g. a transformed model that cannot generate) leaves the rest of the case measured:
# their section says why instead.
OPTIONAL_GROUPS: dict[str, tuple[str, ...]] = {
    "latency": ("prefill", "first_token", "decode"),
    "kld": ("kld",),  # e.g. no baseline reference in this session, another tokenizer
    "tasks": ("tasks",),  # e.g. a task's data neither local nor reachable: the rest of the case goes on
}
# Optional groups whose phases are named by a prefix (one phase per batch size).
OPTIONAL_PREFIXES: dict[str, str] = {"serving": "serving_b"}


def group_of(phase_name: str) -> str | None:
    """The optional group a phase belongs to (None: the phase is required)."""
    for group, names in OPTIONAL_GROUPS.items():
        if phase_name in names:
            return group
    return next((g for g, prefix in OPTIONAL_PREFIXES.items() if phase_name.startswith(prefix)), None)


def case_phases(cfg: SuiteConfig, random_weights: bool) -> list[Any]:
    return [QualityPhase(random_weights=random_weights), TimedPassPhase(), PrefillPhase(), FirstTokenPhase(),
            DecodePhase(), *quality_and_serving_phases(cfg, random_weights)]


def quality_and_serving_phases(cfg: SuiteConfig, random_weights: bool) -> list[Any]:
    """KL divergence, lm-eval tasks and the serving sweep, each where its settings enable it
    (``SuiteConfig.kld`` / ``.tasks`` / ``.serving``; absent settings: off)."""
    from efficiency.phases.kld import KldPhase
    from efficiency.phases.serving import ServingPhase
    from efficiency.phases.tasks import TasksPhase

    phases: list[Any] = []
    kld = getattr(cfg, "kld", None)
    if kld is not None and kld.enabled:
        phases.append(KldPhase(kld, random_weights=random_weights))
    tasks = getattr(cfg, "tasks", None)
    if tasks is not None and tasks.enabled:
        phases.append(TasksPhase(tasks, random_weights=random_weights))
    serving = getattr(cfg, "serving", None)
    if serving is not None and serving.enabled:
        sizes = sorted(serving.batch_sizes)
        phases += [ServingPhase(b, serving, last=b == sizes[-1]) for b in sizes]
    return phases
