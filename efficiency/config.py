"""Frozen configuration objects. They validate in ``__post_init__`` and do nothing else (no I/O).

Strings and dicts live at the edges (pyproject, command line, JSON); inside the suite everything is one of
these dataclasses or enums.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficiency import defaults
from efficiency.errors import ConfigError
from efficiency.phases.quality_settings import KldSettings, ServingSettings, TasksSettings

__all__ = ["ConfigError", "Priority", "SuiteConfig", "Thresholds", "Workload"]


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")


class Priority(enum.Enum):
    """Weights of the paper's score opt = Pc^1.5 / (alpha*Tc + beta*Ec) (arXiv 2502.00046)."""

    ENERGY = (0.1, 0.9)
    RUNTIME = (0.9, 0.1)
    BALANCED = (0.5, 0.5)

    @property
    def alpha(self) -> float:
        return self.value[0]

    @property
    def beta(self) -> float:
        return self.value[1]


@dataclass(frozen=True)
class Workload:
    """What is measured for every case, and how.

    Perplexity follows the sliding-window recipe: windows of ``context`` tokens advanced by ``stride``; only the
    tokens not scored by an earlier window count. ``max_tokens`` limits the evaluated prefix of the corpus
    (``None`` = the whole split).
    """

    dataset: str = "wikitext2"
    context: int = 1024
    stride: int = 512
    max_tokens: int | None = None
    batch_size: int | None = 4  # windows per forward pass; None = automatic (from the model and free memory)
    prefill_tokens: int = 128
    decode_tokens: int = 16
    min_rounds: int = 3
    min_window_s: float = defaults.MIN_WINDOW_S

    def __post_init__(self) -> None:
        _finite("min_window_s", self.min_window_s)
        if self.context < 2:
            raise ConfigError(f"context must be at least 2 tokens, got {self.context}")
        if not 1 <= self.stride <= self.context:
            raise ConfigError(f"stride must be in [1, context={self.context}], got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be at least 2 (or unset for the whole split), got {self.max_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 (or 'auto'), got {self.batch_size}")
        for name in ("prefill_tokens", "min_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.decode_tokens < 2:
            raise ConfigError(
                f"decode_tokens must be at least 2 (decode time is a difference), got {self.decode_tokens}"
            )
        if self.min_window_s < 0:
            raise ConfigError(f"min_window_s must not be negative, got {self.min_window_s}")

    def prompt_caps(self, positions: int) -> list[tuple[str, int]]:
        """What caps the latency prompt, as (what, tokens): the prompt is the first evaluation tokens, so at most the
        perplexity window (``--eff-context``), the token budget (``--eff-max-tokens``) and the model's
        ``positions``."""
        budget = [(f"--eff-max-tokens {self.max_tokens}", self.max_tokens)] if self.max_tokens is not None else []
        return [(f"--eff-context {self.context}", self.context), *budget, (f"the model's {positions} positions",
                                                                           positions)]

    def prompt_tokens(self, positions: int) -> int:
        """The latency prompt's length for a model of ``positions``: ``prefill_tokens`` within :meth:`prompt_caps`.
        The one rule of the latency phases (phases/latency.py) and of the check before loading (efficiency.checks).
        """
        return min(self.prefill_tokens, *(tokens for _, tokens in self.prompt_caps(positions)))

    def prompt_note(self, used: int, positions: int) -> str | None:
        """Why a latency prompt of ``used`` tokens is shorter than ``prefill_tokens`` (what capped it), or None."""
        if used >= self.prefill_tokens:
            return None
        caps = [what for what, tokens in self.prompt_caps(positions) if tokens == used]
        return (f"latency prompt of {used} tokens, not --eff-prefill-tokens {self.prefill_tokens}: capped at "
                f"{' and '.join(caps) or f'the {used} tokens of the evaluation text'}")


@dataclass(frozen=True)
class Thresholds:
    """Maximum perplexity increase in percent over the model's baseline, per technique name."""

    default_pct: float = defaults.THRESHOLD_PCT
    per_technique: Mapping[str, float] = field(default_factory=dict)
    # (table, the names it gives a limit) for each pyproject table of thresholds: two spellings of one technique in
    # one table contradict each other (checked with the registry, settings.canonical_config)
    tables: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name, value in {"default": self.default_pct, **self.per_technique}.items():
            _finite(f"threshold for {name!r}", value)
            if value < 0:
                raise ConfigError(f"threshold for {name!r} must be >= 0 percent, got {value}")

    def limit_for(self, technique: str) -> float:
        """The exact name first (``distil+bnb4``); for a pipeline without its own entry, the sum of its steps'
        limits (quality losses of successive steps add up roughly); a step with a compute dtype (``bnb4@bf16``)
        without its own entry has its quantiser's limit; else the default. The settings put the built-in
        step limits (``compile``: 1) in ``per_technique`` under the user's entries (settings.parse_thresholds)."""
        if technique in self.per_technique:
            return self.per_technique[technique]
        steps = technique.split("+")
        if len(steps) > 1:
            return sum(self.limit_for(step) for step in steps)
        quantiser, at, _compute_dtype = technique.partition("@")  # bnb4@bf16: bnb4's limit, unless given its own
        if at:
            return self.limit_for(quantiser)
        return self.default_pct


@dataclass(frozen=True)
class SuiteConfig:
    """Everything one run of the suite needs, resolved from pyproject, environment and command line."""

    models: tuple[str, ...]
    techniques: tuple[str, ...]
    baseline: str
    workload: Workload
    thresholds: Thresholds
    device: str = "cpu"
    model_dir: Path | None = None
    data_dir: Path | None = None
    calibration_path: Path | None = None
    cache_dir: Path = Path(".eff-cache")
    report_path: Path | None = None
    reports_dir: Path = Path("reports")
    random_weights: bool = False
    strict: bool = False
    compute_dtype: str | None = None
    # Per-technique tunables from [tool.efficiency.technique."<name>"] (techniques.base.parse applies them).
    technique_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Quality beyond perplexity and serving (phases/quality_settings.py): on when their settings say so.
    tasks: TasksSettings = field(default_factory=TasksSettings)
    kld: KldSettings = field(default_factory=KldSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    device_map: str | None = None  # --eff-device-map: split each model across the GPUs this process sees

    @property
    def students(self) -> Mapping[str, str]:
        """Extra teacher -> published student names (technique_options["distil"]["students"])."""
        return dict(self.technique_options.get("distil", {}).get("students", {}))

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("no models selected (--eff-models or [tool.efficiency] models)")
        if not self.techniques:
            raise ConfigError("no techniques selected (--eff-techniques or [tool.efficiency] techniques)")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        from efficiency.devices import DEVICE_MAP_MODES

        if self.device_map is not None and self.device_map not in DEVICE_MAP_MODES:
            raise ConfigError(f"--eff-device-map {self.device_map!r}: use one of {', '.join(DEVICE_MAP_MODES)}")
