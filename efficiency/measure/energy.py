"""Energy meters with explicit windows: NVML for NVIDIA GPUs (nvml.py), RAPL for CPUs (rapl.py), a null meter
otherwise. This module holds the sample, the meter protocol, the window and the null meter, and re-exports the rest.

Use them through `measure_energy(meter, sync)`: it synchronises the device at both edges, ends the window on
success and cancels it on error. A meter never reports a silent zero: unavailable energy is `None` plus a
reason. Every sample carries its method, window length and an uncertainty (see MEASUREMENT.md).

Meter contract: `begin()` may raise when the hardware cannot be read at all (the caller learns before the
workload runs); `end()` raises only on misuse (no open window) and turns a read failure into a sample with
`energy_j=None` and a reason, so a finished workload keeps its timing.

This module does not import torch or pynvml at import time; pynvml is imported when a GPU meter is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

Clock = Callable[[], float]

# MEASUREMENT.md (H100, driver 580): the energy counter and the power reading update about every 100 ms.
NVML_UPDATE_PERIOD_S = 0.1
# RAPL energy-status registers update about every 1 ms.
RAPL_UPDATE_PERIOD_S = 0.001
# One RAPL energy-status unit: 2**-14 J (61 µJ) on most Intel parts, finer on newer ones; per edge, per zone.
RAPL_COUNT_RESOLUTION_J = 2.0**-14
POWERCAP_ROOT: Path = Path("/sys/class/powercap")
_PIP_HINT = "pynvml not installed (pip install nvidia-ml-py)"
_MAY_READ_ZERO = "reading may be 0; uncertainty unknown"


@dataclass(frozen=True)
class EnergySample:
    """Energy of one window. `energy_j=None` means unavailable (never 0 for "unknown")."""

    energy_j: float | None
    window_s: float  # wall-clock length of the window, time.perf_counter
    method: str  # "nvml-total-energy" | "nvml-power-sampling" | "rapl" | "null"
    uncertainty_j: float | None  # absolute uncertainty of energy_j; None when it cannot be estimated
    domains: tuple[str, ...]  # what was summed, e.g. ("gpu:0", "gpu:1") or ("intel-rapl:0",)
    reason: str | None = None  # why energy_j is None, or a caveat on the reading

    def __post_init__(self) -> None:
        if self.energy_j is None and not self.reason:
            raise ValueError("an unavailable energy (energy_j=None) needs a reason")
        if self.energy_j is not None and self.energy_j < 0:
            raise ValueError(f"energy_j must be >= 0, got {self.energy_j}")
        if self.window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {self.window_s}")
        if self.uncertainty_j is not None and self.uncertainty_j < 0:
            raise ValueError(f"uncertainty_j must be >= 0, got {self.uncertainty_j}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict; unavailable values stay None (JSON null)."""
        return {
            "energy_j": self.energy_j,
            "window_s": self.window_s,
            "method": self.method,
            "uncertainty_j": self.uncertainty_j,
            "domains": list(self.domains),
            "reason": self.reason,
        }


class Meter(Protocol):
    method: str
    domains: tuple[str, ...]

    def begin(self) -> None: ...

    def end(self) -> EnergySample: ...

    def cancel(self) -> None: ...


@dataclass
class EnergyWindow:
    """Mutable holder yielded by `measure_energy`; `sample` is set when the window ends normally."""

    method: str
    sample: EnergySample | None = None


@contextmanager
def measure_energy(meter: Meter, sync: Callable[[], None]) -> Iterator[EnergyWindow]:
    """Measure the energy of the `with` body: sync, begin ... sync, end; cancel (and re-raise) on error.

    `sync` is e.g. `torch.cuda.synchronize` on a GPU, or `lambda: None` on CPU. Pass the device sync to CPU
    meters too when the body launches GPU work, so that the CPU window covers the same work.
    """
    window = EnergyWindow(method=meter.method)
    sync()
    meter.begin()
    try:
        yield window
        sync()
    except BaseException:
        meter.cancel()
        raise
    window.sample = meter.end()


class _Window:
    """Start time of an open window; shared bookkeeping of the meters."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._t0: float | None = None

    def open(self) -> float:
        if self._t0 is not None:
            raise RuntimeError("begin() called twice without end() or cancel()")
        self._t0 = self._clock()
        return self._t0

    def close(self) -> tuple[float, float]:
        """(t0, t1) of the window; raises on end() without begin()."""
        if self._t0 is None:
            raise RuntimeError("end() called without begin()")
        t0, self._t0 = self._t0, None
        return t0, self._clock()

    def drop(self) -> None:
        self._t0 = None


class NullMeter:
    """Measures nothing: every window ends with energy_j=None and the reason given here."""

    def __init__(
        self, reason: str, domains: tuple[str, ...] = (), *, clock: Clock = time.perf_counter
    ) -> None:
        if not reason:
            raise ValueError("NullMeter needs a reason")
        self.method = "null"
        self.domains = domains
        self.reason = reason
        self._window = _Window(clock)

    def begin(self) -> None:
        self._window.open()

    def end(self) -> EnergySample:
        t0, t1 = self._window.close()
        return EnergySample(None, t1 - t0, self.method, None, self.domains, self.reason)

    def cancel(self) -> None:
        self._window.drop()


def _short_window_caveat(window_s: float, period_s: float, what: str, effect: str) -> str | None:
    if window_s >= period_s:
        return None
    return f"window shorter than the {what}'s ~{period_s * 1000:g} ms update period; {effect}"


# The meters themselves (imported last: they build on the definitions above).
from efficiency.measure.nvml import (  # noqa: E402
    NvmlEnergyMeter,
    NvmlPowerSamplingMeter,
    power_state,
    select_gpu_meter,
)
from efficiency.measure.rapl import RaplMeter, select_cpu_meter  # noqa: E402

__all__ = [
    "NVML_UPDATE_PERIOD_S", "RAPL_COUNT_RESOLUTION_J", "RAPL_UPDATE_PERIOD_S", "POWERCAP_ROOT", "Clock",
    "EnergySample", "EnergyWindow", "Meter", "NullMeter", "NvmlEnergyMeter", "NvmlPowerSamplingMeter", "RaplMeter",
    "measure_energy", "power_state", "select_cpu_meter", "select_gpu_meter",
]
