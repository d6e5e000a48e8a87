"""Frozen configuration objects. They validate in ``__post_init__`` and do nothing else (no I/O).

Strings and dicts live at the edges (pyproject, command line, JSON); inside the suite everything is one of
these dataclasses or enums.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A setting the user gave is invalid; the message says which and why."""


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
    batch_size: int = 4
    prefill_tokens: int = 128
    decode_tokens: int = 16
    min_rounds: int = 3
    min_window_s: float = 0.0
    warmup_rounds: int = 1

    def __post_init__(self) -> None:
        if self.context < 2:
            raise ConfigError(f"context must be at least 2 tokens, got {self.context}")
        if not 1 <= self.stride <= self.context:
            raise ConfigError(f"stride must be in [1, context={self.context}], got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be at least 2 (or unset for the whole split), got {self.max_tokens}")
        for name in ("batch_size", "prefill_tokens", "min_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.decode_tokens < 2:
            raise ConfigError(
                f"decode_tokens must be at least 2 (decode time is a difference), got {self.decode_tokens}"
            )
        if self.min_window_s < 0 or self.warmup_rounds < 0:
            raise ConfigError("min_window_s and warmup_rounds must not be negative")

    def comparable_key(self) -> dict[str, object]:
        """The settings that make two perplexities comparable (the gate compares only equal keys)."""
        return {"dataset": self.dataset, "context": self.context, "stride": self.stride, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Thresholds:
    """Maximum perplexity increase in percent over the model's baseline, per technique name."""

    default_pct: float = 25.0
    per_technique: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in {"default": self.default_pct, **self.per_technique}.items():
            if value < 0:
                raise ConfigError(f"threshold for {name!r} must be >= 0 percent, got {value}")

    def limit_for(self, technique: str) -> float:
        """The exact name first (``distil+bnb4``); for a pipeline without its own entry, the sum of its steps'
        limits (quality losses of successive steps add up roughly); else the default."""
        if technique in self.per_technique:
            return self.per_technique[technique]
        steps = technique.split("+")
        if len(steps) > 1:
            return sum(self.limit_for(step) for step in steps)
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
    students: Mapping[str, str] = field(default_factory=dict)  # extra teacher -> published student names

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("no models selected (--eff-models or [tool.efficiency] models)")
        if not self.techniques:
            raise ConfigError("no techniques selected (--eff-techniques or [tool.efficiency] techniques)")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
