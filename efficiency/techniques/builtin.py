"""Importing this module registers the built-in techniques (each module registers its own names)."""

from efficiency.techniques import (  # noqa: F401
    bnb,
    compile,
    distil,
    gemlite_quant,
    heads,
    magnitude,
    minitron,
    precision,
    sparsegpt,
    torchao_quant,
)
