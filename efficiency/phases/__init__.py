"""Measurement phases: a case is a list of phases, each run inside one measured window (time, energy of every
meter, peak memory). See :mod:`efficiency.phases.base` for the interface and docs/design.md for adding one."""
