"""The technique interface: a frozen dataclass that is its own config, plus ``apply(model, ctx) -> model``.

A technique registers a name pattern (``bnb4``, ``ah90``, ``sparsegpt-2:4`` ...) and a factory; ``+`` joins
names into a :class:`Pipeline` applied left to right (``distil+ah90+bnb4``, the paper's naming).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

    from efficiency.data import Corpus


class UnsupportedTechnique(Exception):
    """The technique cannot run in this context (device, dtype, missing library); the case is skipped."""


class UnknownTechnique(ValueError):
    pass


@dataclass
class Context:
    """What a technique may use: device, tokenizer, calibration text, cache, and a place to report details."""

    device: str
    tokenizer: Any
    model_name: str
    cache_dir: Path
    calibration: Callable[[], Corpus] | None = None
    teacher: Callable[[], Any] | None = None  # loads the original model again (for distillation)
    load_model: Callable[[str], Any] | None = None  # loads another model by name (published students)
    students: Mapping[str, str] = field(default_factory=dict)  # teacher -> published student ([tool.efficiency])
    compute_dtype: str | None = None
    seed: int = 0
    progress: bool = True
    info: dict[str, Any] = field(default_factory=dict)  # per-step details that go into the report
    steps_done: int = 0  # pipeline steps applied so far: 0 means the model in hand is still the original

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


class Technique(Protocol):
    @property
    def name(self) -> str:
        """The registry name, as written in a pipeline (``bnb4``, ``ah90``)."""

    def check(self, ctx: Context) -> None:
        """Raise :class:`UnsupportedTechnique` with the reason if this context cannot run it."""

    def load_dtype(self, ctx: Context) -> torch.dtype | None:
        """The float dtype the model should be loaded in before this step, or None for no preference."""

    def apply(self, model: Any, ctx: Context) -> Any:
        """Return the transformed model (in place where possible)."""


class TechniqueBase:
    """Defaults for the optional parts of :class:`Technique`."""

    family: ClassVar[str] = "other"

    def check(self, ctx: Context) -> None:
        return None

    def load_dtype(self, ctx: Context) -> torch.dtype | None:
        return None


Factory = Callable[[re.Match[str]], Technique]
_PATTERNS: list[tuple[re.Pattern[str], Factory, str]] = []


def register(pattern: str, example: str) -> Callable[[Factory], Factory]:
    """Register a factory for names matching ``pattern`` (full match). ``example`` documents the syntax."""

    def deco(factory: Factory) -> Factory:
        _PATTERNS.append((re.compile(pattern), factory, example))
        return factory

    return deco


def known_patterns() -> list[str]:
    _load_builtin()
    return [example for _, _, example in _PATTERNS]


def _load_builtin() -> None:
    # Importing the modules registers their techniques; kept lazy so that `import efficiency` stays light.
    from efficiency.techniques import builtin  # noqa: F401


def parse_one(name: str) -> Technique:
    _load_builtin()
    for pattern, factory, _ in _PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return factory(m)
    raise UnknownTechnique(f"unknown technique {name!r}; known: {', '.join(known_patterns())}")


@dataclass(frozen=True)
class Pipeline:
    """Techniques applied left to right. Order matters and is recorded in the report."""

    steps: tuple[Technique, ...]

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.steps)

    def __iter__(self) -> Iterator[Technique]:
        return iter(self.steps)

    def check(self, ctx: Context) -> None:
        for step in self.steps:
            step.check(ctx)

    def load_dtype(self, ctx: Context, default: torch.dtype) -> torch.dtype:
        for step in self.steps:
            dtype = step.load_dtype(ctx)
            if dtype is not None:
                return dtype
        return default

    def apply(self, model: Any, ctx: Context) -> Any:
        ctx.info["order"] = [step.name for step in self.steps]
        for step in self.steps:
            model = step.apply(model, ctx)
            ctx.steps_done += 1
        return model


def parse(name: str) -> Pipeline:
    parts = [p.strip() for p in name.split("+")]
    if not name or any(not p for p in parts):
        raise UnknownTechnique(f"malformed technique name {name!r} (join names with '+', e.g. 'ah90+bnb4')")
    return Pipeline(tuple(parse_one(p) for p in parts))
