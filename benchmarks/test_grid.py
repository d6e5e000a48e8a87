"""The model x technique grid of this repository: the packaged grid test (efficiency/grid.py), so that this
folder and a user's `pytest --eff-grid` run the same test. Select cases with -k:
`pytest benchmarks/ -k "smollm2-135m and bnb4"`."""

from efficiency.grid import test_efficiency  # noqa: F401
