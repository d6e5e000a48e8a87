"""The technique interface: a frozen dataclass that is its own config, plus ``apply(model, ctx) -> model``.

A technique registers a name pattern (``bnb4``, ``ah90``, ``sparsegpt-2:4`` ...) and a factory; ``+`` joins
names into a :class:`Pipeline` applied left to right (``distil+ah90+bnb4``, the paper's naming). Whitespace
around ``+`` is allowed. Names round-trip: ``parse(x).name`` is the canonical name (``bnb4-nf4`` -> ``bnb4``)
and ``parse(parse(x).name) == parse(x)``.

Options (``[tool.efficiency.technique."<name>"]`` in pyproject, see :mod:`efficiency.techniques.options`)
set any dataclass field of a step's config, including fields of a nested settings dataclass
(``tokens = 50000`` on ``minitron-w25``). They apply by *canonical step name*: the table
``"bnb4-nf4"`` applies to every ``bnb4`` step, in any pipeline (``ah90+bnb4`` too).

Third-party techniques: a distribution declares an entry point in the group ``pytest_efficiency.techniques``
naming a module; it is imported (registering its names with :func:`register`) on the first parse.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from efficiency.errors import ConfigError, TechniqueUnavailable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from efficiency.data import Corpus

ENTRY_POINT_GROUP = "pytest_efficiency.techniques"

# The old name: still importable from here (and raised as TechniqueUnavailable).
UnsupportedTechnique = TechniqueUnavailable

# In a step's report entry: the dtype its matmuls run in where it is not the model's compute dtype (the int8 / fp8
# GEMMs of dynamic activation quantisation); the perplexity pass's MFU is taken against that dtype's dense peak.
MATMUL_DTYPE_KEY = "matmul_dtype"


def declared_by_steps(info: Mapping[str, Any], key: str) -> list[Any]:
    """What the steps' report entries in ``info`` (``Context.info``) hold under ``key``, in pipeline order, where they
    hold anything: how a step tells later steps and the phases what it needs (``compile``'s asks, the matmul dtype)."""
    return [entry[key] for entry in info.values() if isinstance(entry, dict) and entry.get(key)]


def matmul_dtype(info: Mapping[str, Any]) -> str | None:
    """The matmul dtype the pipeline's last step to declare one declares (:data:`MATMUL_DTYPE_KEY`), else None."""
    declared = declared_by_steps(info, MATMUL_DTYPE_KEY)
    return declared[-1] if declared else None


class UnknownTechnique(ConfigError):
    """A technique name matches no registered pattern, or is malformed: a usage error."""


def _no_log(message: str) -> None:
    return None


@dataclass
class Context:
    """What a technique may use: device, tokenizer, calibration text, a model loader, cache, a progress log,
    and a place to report details. Technique-specific services (a teacher, published students) are not here:
    a technique derives them from ``load_model`` and its own config."""

    device: str
    tokenizer: Any
    model_name: str
    cache_dir: Path
    calibration: Callable[[], Corpus] | None = None
    load_model: Callable[[str], Any] | None = None  # loads a model by name, in the case's dtype, on device
    log: Callable[[str], None] = _no_log  # progress lines (the runner writes them to the terminal)
    compute_dtype: str | None = None
    seed: int = 0
    progress: bool = True  # False: techniques report no progress at all
    info: dict[str, Any] = field(default_factory=dict)  # per-step details that go into the report
    steps_done: int = 0  # pipeline steps applied so far: 0 means the model in hand is still the original

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def say(self, message: str) -> None:
        """Log ``message`` unless progress is off."""
        if self.progress:
            self.log(message)


class Technique(Protocol):
    @property
    def name(self) -> str:
        """The canonical registry name, as written in a pipeline (``bnb4``, ``ah90``)."""

    def check(self, ctx: Context) -> None:
        """Raise :class:`TechniqueUnavailable` with the reason if this context cannot run it."""

    def load_dtype(self, ctx: Context) -> torch.dtype | None:
        """The float dtype the model should be loaded in before this step, or None for no preference."""

    def apply(self, model: Any, ctx: Context) -> Any:
        """Return the transformed model (in place where possible)."""


class TechniqueBase:
    """Defaults for the optional parts of :class:`Technique`."""

    # The step leaves every layer's shape as it found it (a dtype, quantised weights), so the model's config tells
    # the steps after it which layers they will meet (Pipeline.check_layers); False: it may change them (pruning
    # heads or neurons, a distilled student).
    preserves_layer_shapes = False

    def check(self, ctx: Context) -> None:
        return None

    def check_layers(self, skeleton: Callable[[], nn.Module]) -> None:
        """Raise :class:`TechniqueUnavailable` when the model's layers rule this step out. ``skeleton()`` builds the
        model from its config on the meta device (no weights; cached per case), so this runs before any load."""
        return None

    def load_dtype(self, ctx: Context) -> torch.dtype | None:
        return None


Factory = Callable[[re.Match[str]], Technique]


@dataclass(frozen=True)
class Registration:
    pattern: re.Pattern[str]
    factory: Factory
    example: str
    examples: tuple[str, ...]  # concrete names, for round-trip tests and `efficiency list`


_PATTERNS: list[Registration] = []
_loaded = {"builtin": False, "plugins": False}


def register(pattern: str, example: str, examples: tuple[str, ...] = ()) -> Callable[[Factory], Factory]:
    """Register a factory for names matching ``pattern`` (full match). ``example`` documents the syntax;
    ``examples`` are concrete names it accepts (each must parse and round-trip)."""

    def deco(factory: Factory) -> Factory:
        _PATTERNS.append(Registration(re.compile(pattern), factory, example, tuple(examples)))
        return factory

    return deco


def registrations() -> list[Registration]:
    _load_all()
    return list(_PATTERNS)


def known_patterns() -> list[str]:
    return [r.example for r in registrations()]


def _load_all() -> None:
    if not _loaded["builtin"]:
        # Importing the modules registers their techniques; kept lazy so that `import efficiency` stays light.
        from efficiency.techniques import builtin  # noqa: F401

        _loaded["builtin"] = True
    if not _loaded["plugins"]:
        _loaded["plugins"] = True
        load_plugins()


def load_plugins() -> list[str]:
    """Import every module named in the ``pytest_efficiency.techniques`` entry-point group; return their
    names. A plugin that fails to import is a ConfigError naming it and its distribution."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
        try:
            ep.load()
        except Exception as err:
            raise ConfigError(
                f"technique plugin {ep.name!r} ({ep.value}, from {origin}) failed to load: "
                f"{type(err).__name__}: {err}; fix or uninstall it"
            ) from err
        loaded.append(ep.name)
    return loaded


def parse_one(name: str) -> Technique:
    _load_all()
    for reg in _PATTERNS:
        m = reg.pattern.fullmatch(name)
        if m:
            return reg.factory(m)
    raise UnknownTechnique(f"unknown technique {name!r}; known: {', '.join(known_patterns())}")


@dataclass(frozen=True)
class Pipeline:
    """Techniques applied left to right. Order matters and is recorded in the report. An execution step
    (``compile``: how the finished model runs, not what it is) goes last and once; another order is refused here,
    when the name is read, so a run refuses it before any model loads."""

    steps: tuple[Technique, ...]

    def __post_init__(self) -> None:
        execution = [i for i, step in enumerate(self.steps) if getattr(step, "family", None) == "execution"]
        if execution and execution != [len(self.steps) - 1]:
            raise UnknownTechnique(f"'{self.steps[execution[0]].name}' must be the last step of a pipeline, and "
                                   f"only once: got {self.name!r} (e.g. 'bf16+compile')")
        names = [step.name for step in self.steps]
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated is not None:
            # Each step's report entry is keyed by its name: a second one would overwrite the first's figures.
            raise UnknownTechnique(f"'{repeated}' appears {names.count(repeated)} times in {self.name!r}: a pipeline "
                                   "names each step once")

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.steps)

    def __iter__(self) -> Iterator[Technique]:
        return iter(self.steps)

    def check(self, ctx: Context) -> None:
        for step in self.steps:
            step.check(ctx)

    def check_layers(self, skeleton: Callable[[], nn.Module]) -> None:
        """Each step's :meth:`TechniqueBase.check_layers`, up to the first step that may change the layers' shapes:
        the config describes the layers the steps before it meet, not the ones after (their own ``apply`` checks
        again on the model in hand)."""
        for step in self.steps:
            check = getattr(step, "check_layers", None)
            if check is not None:
                check(skeleton)
            if not getattr(step, "preserves_layer_shapes", False):
                return

    def load_dtype(self, ctx: Context, default: torch.dtype) -> torch.dtype:
        for step in self.steps:
            dtype = step.load_dtype(ctx)
            if dtype is not None:
                return dtype
        return default

    def fusion_index(self) -> int | None:
        """Before which step the projections that share an input are fused (``techniques/fusion.py``), None: not
        at all. The last step asks for it (``compile``'s ``fuse_projections``); it happens before the first
        quantisation step, which then quantises the fused layers, else before the last step."""
        if not self.steps or not getattr(self.steps[-1], "fuse_projections", False):
            return None
        for i, step in enumerate(self.steps):
            if getattr(step, "family", None) == "quantisation":
                return i
        return len(self.steps) - 1

    def apply(self, model: Any, ctx: Context) -> Any:
        from efficiency.techniques.fusion import fuse_projections

        ctx.info["order"] = [step.name for step in self.steps]
        fuse_at = self.fusion_index()
        for i, step in enumerate(self.steps):
            if i == fuse_at:
                ctx.info["fused_projections"] = fuse_projections(model)
            model = step.apply(model, ctx)
            ctx.steps_done += 1
        return model


def split(name: str) -> list[str]:
    """The step names of a pipeline name (whitespace around '+' dropped); UnknownTechnique if malformed."""
    parts = [p.strip() for p in name.split("+")]
    if not name.strip() or any(not p for p in parts):
        raise UnknownTechnique(f"malformed technique name {name!r} (join names with '+', e.g. 'ah90+bnb4')")
    return parts


def parse(name: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> Pipeline:
    """The pipeline named ``name``, with ``options`` (technique name -> {field: value}) applied to the steps
    whose canonical name matches the canonical form of the option's technique name."""
    from efficiency.techniques.options import apply_options, canonical_options

    steps = [parse_one(p) for p in split(name)]
    if options:
        by_name = canonical_options(options)
        steps = [apply_options(step, by_name[step.name]) if step.name in by_name else step for step in steps]
    return Pipeline(tuple(steps))
