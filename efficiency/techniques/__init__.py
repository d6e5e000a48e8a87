"""Compression techniques. Each module defines frozen-dataclass techniques and registers their names."""

from efficiency.techniques.base import (
    Context,
    Pipeline,
    Technique,
    UnknownTechnique,
    UnsupportedTechnique,
    parse,
    register,
)

__all__ = ["Context", "Pipeline", "Technique", "UnknownTechnique", "UnsupportedTechnique", "parse", "register"]
