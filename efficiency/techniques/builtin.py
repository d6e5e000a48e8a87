"""Importing this module registers the built-in techniques (each module registers its own names)."""

from efficiency.techniques import bnb, distil, heads, magnitude, minitron, precision, sparsegpt  # noqa: F401
from efficiency.techniques import compile, gemlite_quant, torchao_quant  # noqa: F401
