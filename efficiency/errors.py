"""The error hierarchy of the suite: one root, an ``Unavailable`` branch the skip policy catches in one
``except``, and ``ConfigError`` for bad user input (a usage error, never a skip).

Old names stay importable from their old modules as aliases (``models.ModelUnavailable``,
``data.DataUnavailable``, ``smollm2.FetchError``, ``techniques.base.UnsupportedTechnique``,
``config.ConfigError``).
"""

from __future__ import annotations


class EfficiencyError(Exception):
    """Root of every error this package raises on purpose."""


class Unavailable(EfficiencyError):
    """Something the case needs is not available here (model, data, download, technique, meter): the case is
    skipped with this reason."""


class ModelUnavailable(Unavailable):
    """The model cannot be loaded here (not cached offline, unknown to the hub, missing library)."""


class DataUnavailable(Unavailable):
    """The evaluation or calibration data is missing or unusable."""


class FetchError(Unavailable):
    """A download failed (network, checksum)."""


class TechniqueUnavailable(Unavailable):
    """The technique cannot run in this context (device, dtype, missing library, model family)."""


class MeterUnavailable(Unavailable):
    """An energy meter cannot be read here."""


class ConfigError(EfficiencyError, ValueError):
    """Bad user input (an option, a pyproject key, a technique name or its options): a usage error."""


__all__ = [
    "ConfigError", "DataUnavailable", "EfficiencyError", "FetchError", "MeterUnavailable", "ModelUnavailable",
    "TechniqueUnavailable", "Unavailable",
]
