"""Importing this module registers the built-in techniques (each module registers its own names)."""

from efficiency.techniques import bnb, distil, heads, magnitude, minitron, precision, sparsegpt  # noqa: F401
