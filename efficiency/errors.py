"""One error hierarchy for the suite.

``Unavailable`` and its subclasses mean "something needed is not available here": the case is skipped with the
reason (or fails under ``--eff-strict``). ``ConfigError`` means bad user input: a usage error.
"""

from __future__ import annotations


class EfficiencyError(Exception):
    """Root of every error pytest-efficiency raises on purpose."""


class Unavailable(EfficiencyError):
    """Something the case needs is not available here; the message says what to provide."""


class ModelUnavailable(Unavailable):
    """The model cannot be found or loaded here; the message says exactly what to provide."""


class DataUnavailable(Unavailable):
    """The corpus cannot be found; the message says what to provide."""


class FetchError(Unavailable):
    """A download failed (PyPI wheel, hub file)."""


class TechniqueUnavailable(Unavailable):
    """The technique cannot run here (missing library, unsupported device or model)."""


class MeterUnavailable(Unavailable):
    """An energy meter cannot be read here."""


class ConfigError(EfficiencyError, ValueError):
    """A setting the user gave is invalid; the message says which and why."""
