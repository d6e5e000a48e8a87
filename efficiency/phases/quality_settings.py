"""Settings of the accuracy-task, KL-divergence and serving phases (issue 12), validated at construction.

The plugin and ``[tool.efficiency]`` fill them (``SuiteConfig.tasks`` / ``.kld`` / ``.serving``); a phase is
enabled when its settings say so (``TasksSettings.enabled``: tasks named; ``KldSettings.enabled``: tokens > 0;
``ServingSettings.enabled``: batch sizes named). One place for each default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficiency.defaults import DEFAULT_INPUT_TOKENS, DEFAULT_KLD_TOKENS, DEFAULT_KLD_TOP_K, DEFAULT_OUTPUT_TOKENS
from efficiency.errors import ConfigError


@dataclass(frozen=True)
class TasksSettings:
    """lm-evaluation-harness tasks run on every case (``--eff-tasks``), from lm-eval's registry and/or a local
    folder of task YAMLs (``--eff-tasks-dir``); ``limit`` caps the documents per task (``--eff-task-limit``);
    ``thresholds`` maps a task to the largest accuracy drop it may show, in points (``--eff-accuracy-threshold
    TASK=POINTS``)."""

    tasks: tuple[str, ...] = ()
    tasks_dir: Path | None = None
    limit: int | None = None
    batch_size: int = 8
    thresholds: Mapping[str, float] = field(default_factory=dict)
    metric: str = "acc"  # the metric the thresholds judge (lm-eval's name)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"task limit must be at least 1 (or unset for every document), got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"task batch size must be at least 1, got {self.batch_size}")
        if self.tasks_dir is not None and not Path(self.tasks_dir).is_dir():
            raise ConfigError(f"tasks dir {self.tasks_dir} is not a folder")
        for task, points in self.thresholds.items():
            if not points >= 0:
                raise ConfigError(f"accuracy threshold for {task} must be a non-negative number of points, "
                                  f"got {points}")
        unknown = set(self.thresholds) - set(self.tasks)
        if unknown:
            raise ConfigError(f"accuracy thresholds name tasks that are not run: {', '.join(sorted(unknown))}")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """What the report's settings record: what decides the accuracies measured (the thresholds judge them and
        are recorded apart, so that changing one leaves the accuracies comparable)."""
        return {"tasks": list(self.tasks), "tasks_dir": str(self.tasks_dir) if self.tasks_dir else None,
                "limit": self.limit, "batch_size": self.batch_size, "metric": self.metric}


def parse_thresholds(items: list[str] | tuple[str, ...]) -> dict[str, float]:
    """``["arc_easy=2", "eff_facts=5.5"]`` -> ``{"arc_easy": 2.0, "eff_facts": 5.5}`` (ConfigError otherwise)."""
    out: dict[str, float] = {}
    for item in items:
        task, sep, value = item.partition("=")
        if not sep or not task.strip():
            raise ConfigError(f"accuracy threshold {item!r} must be TASK=POINTS")
        try:
            out[task.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"accuracy threshold {item!r}: {value!r} is not a number of points") from None
    return out


@dataclass(frozen=True)
class KldSettings:
    """KL divergence of each case's next-token distribution from the baseline's on the first ``tokens``
    evaluation tokens (``--eff-kld-tokens``; 0 turns it off)."""

    tokens: int = DEFAULT_KLD_TOKENS
    top_k: int = DEFAULT_KLD_TOP_K

    def __post_init__(self) -> None:
        if self.tokens != 0 and self.tokens < 2:
            raise ConfigError(f"kld tokens must be 0 (off) or at least 2, got {self.tokens}")
        if self.top_k < 1:
            raise ConfigError(f"kld top_k must be at least 1, got {self.top_k}")

    @property
    def enabled(self) -> bool:
        return self.tokens > 0

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "top_k": self.top_k}


@dataclass(frozen=True)
class ServingSettings:
    """Batched generation at each batch size (``--eff-batch-sizes 1,8,32``) with prompts of ``input_tokens``
    and exactly ``output_tokens`` new tokens (``--eff-input-tokens`` / ``--eff-output-tokens``)."""

    batch_sizes: tuple[int, ...] = ()
    input_tokens: int = DEFAULT_INPUT_TOKENS
    output_tokens: int = DEFAULT_OUTPUT_TOKENS

    def __post_init__(self) -> None:
        if any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be at least 1, got {list(self.batch_sizes)}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ConfigError(f"batch sizes repeat: {list(self.batch_sizes)}")
        if self.input_tokens < 1:
            raise ConfigError(f"input tokens must be at least 1, got {self.input_tokens}")
        if self.output_tokens < 2:
            raise ConfigError(f"output tokens must be at least 2 (time per output token is a difference), "
                              f"got {self.output_tokens}")

    @property
    def enabled(self) -> bool:
        return bool(self.batch_sizes)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens}


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)`` (ConfigError on anything else)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{text!r} must be comma-separated integers, e.g. 1,8,32") from None
