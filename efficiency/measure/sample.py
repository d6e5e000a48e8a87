"""The base of the energy meters: the sample, the meter protocol, the measurement window, the null meter,
and the rules every reading obeys (no silent zero, implausible power refused, stated uncertainty).

nvml.py and rapl.py build on this module; energy.py re-exports all of them. Nothing here imports torch or
pynvml, and this module imports nothing of the suite, so every meter module imports on its own.

Use meters through `measure_energy(meter, sync)`: it synchronises the device at both edges, ends the window on
success and cancels it on error. Meter contract: `begin()` may raise when the hardware cannot be read at all
(the caller learns before the workload runs); `end()` raises only on misuse (no open window) and turns a read
failure into a sample with `energy_j=None` and a reason, so a finished workload keeps its timing.
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

# Plausibility bounds: the highest mean power one domain can draw. A reading above it is a counter reset or
# wrap misread (a RAPL reset reads as a whole wrap range, ~262 kJ: 128 kW over a 2 s window) and is refused.
# One GPU: the largest board power shipping today is ~1.4 kW (B300); 2 kW leaves headroom.
MAX_GPU_POWER_W = 2000.0
# One CPU package: the largest server parts are ~500 W TDP; 1 kW leaves headroom.
MAX_CPU_PACKAGE_POWER_W = 1000.0

_PIP_HINT = "pynvml not installed (pip install nvidia-ml-py)"
_SHORT_WINDOW_EFFECT = "one tick may be in it or none: uncertainty unknown"


@dataclass(frozen=True)
class EnergySample:
    """Energy of one window. `energy_j=None` means unavailable (never 0 for "unknown"); a 0 J reading from a
    real meter (method other than "null") must say why in `reason`."""

    energy_j: float | None
    window_s: float  # wall-clock length of the window, time.perf_counter
    method: str  # "nvml-total-energy" | "nvml-power-sampling" | "rapl" | "null"
    uncertainty_j: float | None  # absolute uncertainty of energy_j; None when it cannot be estimated
    domains: tuple[str, ...]  # what was summed, e.g. ("gpu:0", "gpu:1") or ("intel-rapl:0",)
    reason: str | None = None  # why energy_j is None, or a caveat on the reading

    def __post_init__(self) -> None:
        if self.energy_j is None and not self.reason:
            raise ValueError("an unavailable energy (energy_j=None) needs a reason")
        if self.energy_j == 0 and not self.reason:
            raise ValueError("a 0 J reading needs a reason (never a silent zero)")
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


def counter_uncertainty_j(energy_j: float, window_s: float, period_s: float) -> float:
    """Uncertainty of an energy counter that updates every ``period_s``, read at both edges of a window.

    A read returns the energy up to the counter's last update, which lies up to one period before the read
    (this is also the lag of the power reading the counter integrates). So each edge misses up to
    ``period_s`` of energy at that edge's power, and the two errors cancel only when the edge powers are
    equal, which they are not (idle before the workload, loaded at its end). The bound is
    ``period_s * (p_begin + p_end)``; with the mean window power ``p = energy_j / window_s`` standing in for
    the edge powers::

        U = 2 * period_s * energy_j / window_s        relative: U / E = 2 * period_s / window_s

    NVML (100 ms): 2% at a 10 s window (not 1%: the quantisation of *both* edges counts), 1% at 20 s.
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    return 2.0 * period_s * energy_j / window_s


def implausible_power(
    energy_j: float, window_s: float, period_s: float, max_power_w: float, n_domains: int
) -> str | None:
    """The reason to refuse a reading whose mean power exceeds ``max_power_w`` per domain, else None.

    The window is widened by one update period per edge so that one honest counter tick in a short window is
    never refused; what remains above the bound is a counter reset or wrap misread, not energy."""
    span_s = window_s + 2.0 * period_s
    limit_j = max_power_w * max(1, n_domains) * span_s
    if energy_j <= limit_j:
        return None
    return (f"reading refused: {energy_j:.4g} J in {window_s:.3g} s is {energy_j / span_s:.4g} W, above the "
            f"plausible {max_power_w:g} W per domain x {max(1, n_domains)}: a counter reset or wrap misread")


def no_tick_reason(what: str, window_s: float, period_s: float) -> str:
    """Why a 0 J reading of a window shorter than one update period is no reading: the counter did not tick, so the
    window's energy is unknown, not 0 (a per-unit energy of 0 would score as a 100% saving)."""
    return (f"{what} did not tick in the {window_s * 1000:.3g} ms window, shorter than its ~{period_s * 1000:g} ms "
            "update period: the energy is unknown, not 0 (a longer --eff-min-window measures it)")


def zero_energy_reason(what: str, window_s: float, period_s: float) -> str:
    """Why a real meter's 0 J reading is refused: a counter stuck over at least one update period, or one that did
    not tick in a shorter window."""
    reason = zero_reading_reason if window_s >= period_s else no_tick_reason
    return reason(what, window_s, period_s)


def zero_reading_reason(what: str, window_s: float, period_s: float) -> str:
    """Why a real meter read exactly 0 J over at least one update period."""
    return (f"{what} did not advance in {window_s:.3g} s (update period ~{period_s * 1000:g} ms): a powered "
            "device always draws energy, so the counter is stuck or not updating; reading refused")
