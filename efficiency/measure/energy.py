"""Energy meters with explicit windows: NVML for NVIDIA GPUs, RAPL for CPUs, a null meter otherwise.

Use them through `measure_energy(meter, sync)`: it synchronises the device at both edges, ends the window on
success and cancels it on error. A meter never reports a silent zero: unavailable energy is `None` plus a
reason. Every sample carries its method, window length and an uncertainty (see MEASUREMENT.md).

Meter contract: `begin()` may raise when the hardware cannot be read at all (the caller learns before the
workload runs); `end()` raises only on misuse (no open window) and turns a read failure into a sample with
`energy_j=None` and a reason, so a finished workload keeps its timing.

This module does not import torch or pynvml at import time; pynvml is imported when a GPU meter is used.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Clock = Callable[[], float]

# MEASUREMENT.md (H100, driver 580): the energy counter and the power reading update about every 100 ms.
NVML_UPDATE_PERIOD_S = 0.1
# RAPL energy-status registers update about every 1 ms.
RAPL_UPDATE_PERIOD_S = 0.001
# One RAPL energy-status unit: 2**-14 J (61 µJ) on most Intel parts, finer on newer ones; per edge, per zone.
RAPL_COUNT_RESOLUTION_J = 2.0**-14
POWERCAP_ROOT = Path("/sys/class/powercap")
# Top-level RAPL zones only: `intel-rapl:0:0` is a sub-zone of package 0 and `intel-rapl-mmio:0` repeats it.
_TOP_LEVEL_ZONE = re.compile(r"intel-rapl:(\d+)")
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


# ---------------------------------------------------------------------------------------------------- NVML


def _nvml_open(indices: Sequence[int]) -> tuple[Any, list[Any]]:
    """Import pynvml, init NVML (reference counted) and return (module, handles)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
    except BaseException:
        pynvml.nvmlShutdown()
        raise


def _nvml_close(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError:  # closing is best effort: a failed shutdown must not lose the reading
        pass


def _short_window_caveat(window_s: float, period_s: float, what: str, effect: str) -> str | None:
    if window_s >= period_s:
        return None
    return f"window shorter than the {what}'s ~{period_s * 1000:g} ms update period; {effect}"


class NvmlEnergyMeter:
    """Sums `nvmlDeviceGetTotalEnergyConsumption` (mJ since driver load) over GPUs (Volta and newer).

    `indices` are NVML indices (PCI bus order). They differ from CUDA ordinals under CUDA_VISIBLE_DEVICES
    or the default CUDA_DEVICE_ORDER; map them (e.g. by PCI bus id) before building the meter.

    Uncertainty: the counter updates about every `NVML_UPDATE_PERIOD_S`, so each edge can be off by one
    period of energy: `2 * period * mean window power`, per GPU, summed. Below one period it is unknown.
    """

    def __init__(self, indices: Sequence[int], *, clock: Clock = time.perf_counter) -> None:
        if not indices:
            raise ValueError("NvmlEnergyMeter needs at least one GPU index")
        self.indices = tuple(indices)
        self.method = "nvml-total-energy"
        self.domains = tuple(f"gpu:{i}" for i in self.indices)
        self._window = _Window(clock)
        self._nvml: Any = None
        self._handles: list[Any] = []  # non-empty while NVML is open for a window
        self._start_mj: list[int] = []

    def _read_mj(self) -> list[int]:
        return [int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]

    def _release(self) -> None:
        if self._handles:
            self._handles = []
            _nvml_close(self._nvml)

    def begin(self) -> None:
        if self._handles:
            raise RuntimeError("begin() called twice without end() or cancel()")
        self._nvml, self._handles = _nvml_open(self.indices)
        try:
            self._window.open()
            self._start_mj = self._read_mj()
        except BaseException:
            self.cancel()
            raise

    def end(self) -> EnergySample:
        t0, t1 = self._window.close()
        window_s = t1 - t0
        try:
            end_mj = self._read_mj()
        except self._nvml.NVMLError as exc:
            return EnergySample(None, window_s, self.method, None, self.domains, f"NVML read failed: {exc}")
        finally:
            self._release()
        deltas_j = [(b - a) / 1000.0 for a, b in zip(self._start_mj, end_mj, strict=True)]
        if any(d < 0 for d in deltas_j):
            reason = "energy counter went backwards (driver reloaded?)"
            return EnergySample(None, window_s, self.method, None, self.domains, reason)
        caveat = _short_window_caveat(window_s, NVML_UPDATE_PERIOD_S, "counter", _MAY_READ_ZERO)
        uncertainty_j = None if caveat else sum(2 * NVML_UPDATE_PERIOD_S * d / window_s for d in deltas_j)
        return EnergySample(sum(deltas_j), window_s, self.method, uncertainty_j, self.domains, caveat)

    def cancel(self) -> None:
        self._release()
        self._window.drop()


class NvmlPowerSamplingMeter:
    """Integrates `nvmlDeviceGetPowerUsage` (mW) sampled by a background thread, for GPUs without the counter.

    Samples are (perf_counter time, summed power) pairs: one at begin(), one every `interval_s`, one at end();
    the energy is their trapezoid integral. Uncertainty (an estimate, not a bound): the power reading lags
    by up to one update period at each edge (`2 * NVML_UPDATE_PERIOD_S * mean power`) plus the integration
    error of straight lines between samples (`largest gap between samples * mean power`).
    """

    def __init__(
        self, indices: Sequence[int], interval_s: float = 0.02, *, clock: Clock = time.perf_counter
    ) -> None:
        if not indices:
            raise ValueError("NvmlPowerSamplingMeter needs at least one GPU index")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.indices = tuple(indices)
        self.interval_s = interval_s
        self.method = "nvml-power-sampling"
        self.domains = tuple(f"gpu:{i}" for i in self.indices)
        self._clock = clock
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._samples: list[tuple[float, float]] = []  # (t_s, summed power_w)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def _sample(self) -> None:
        t_s = self._clock()
        power_w = sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1000.0
        with self._lock:
            self._samples.append((t_s, power_w))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as exc:  # reported by end() as an unavailable reading, not lost
                self._error = f"power sampling failed during the window: {exc!r}"
                return

    def begin(self) -> None:
        if self._thread is not None:
            raise RuntimeError("begin() called twice without end() or cancel()")
        self._nvml, self._handles = _nvml_open(self.indices)
        self._samples, self._error = [], None
        try:
            self._sample()
        except BaseException:
            _nvml_close(self._nvml)
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-power-sampler", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(1.0, 10 * self.interval_s))
        self._thread = None

    def end(self) -> EnergySample:
        if self._thread is None:
            raise RuntimeError("end() called without begin()")
        self._stop_thread()
        try:
            self._sample()
        except self._nvml.NVMLError as exc:
            self._error = f"NVML read failed: {exc}"
        finally:
            _nvml_close(self._nvml)
        with self._lock:
            samples = list(self._samples)
        window_s = samples[-1][0] - samples[0][0]
        if self._error is not None:
            return EnergySample(None, window_s, self.method, None, self.domains, self._error)
        # trapezoid rule: sum of (t1 - t0) * (p0 + p1) / 2 over consecutive samples
        pairs = list(zip(samples, samples[1:], strict=False))
        energy_j = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in pairs)
        max_gap_s = max((t1 - t0 for (t0, _), (t1, _) in pairs), default=0.0)
        reason = (
            f"integrated from sampled power every {self.interval_s * 1000:g} ms "
            f"(no energy counter on this GPU); {len(samples)} samples"
        )
        caveat = _short_window_caveat(window_s, NVML_UPDATE_PERIOD_S, "power reading", "uncertainty unknown")
        if caveat:
            return EnergySample(energy_j, window_s, self.method, None, self.domains, f"{reason}; {caveat}")
        mean_w = energy_j / window_s
        uncertainty_j = mean_w * (2 * NVML_UPDATE_PERIOD_S + max_gap_s)
        return EnergySample(energy_j, window_s, self.method, uncertainty_j, self.domains, reason)

    def cancel(self) -> None:
        if self._thread is None:
            return
        self._stop_thread()
        _nvml_close(self._nvml)


def select_gpu_meter(indices: Sequence[int], *, interval_s: float = 0.02) -> Meter:
    """NVML energy counter if every GPU has it, else sampled power, else a NullMeter with the reason."""
    if not indices:
        return NullMeter("no GPU: no GPU index given")
    try:
        import pynvml
    except ImportError:
        return NullMeter(_PIP_HINT)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NullMeter(f"NVML init failed: {exc}")
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        if count == 0:
            return NullMeter("no GPU: NVML sees 0 devices")
        missing = [i for i in indices if not 0 <= i < count]
        if missing:
            return NullMeter(f"no GPU at NVML index {missing} (NVML sees {count} devices)")
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        if _supports(pynvml, pynvml.nvmlDeviceGetTotalEnergyConsumption, handles):
            return NvmlEnergyMeter(indices)
        if _supports(pynvml, pynvml.nvmlDeviceGetPowerUsage, handles):
            return NvmlPowerSamplingMeter(indices, interval_s)
        return NullMeter(f"GPU {list(indices)}: NVML supports neither the energy counter nor power readings")
    except pynvml.NVMLError as exc:
        return NullMeter(f"NVML query failed: {exc}")
    finally:
        _nvml_close(pynvml)


def _supports(nvml: Any, query: Callable[[Any], object], handles: Sequence[Any]) -> bool:
    try:
        for handle in handles:
            query(handle)
    except nvml.NVMLError_NotSupported:
        return False
    return True


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def power_state(indices: Sequence[int]) -> dict[str, object]:
    """Per-GPU power limit (W), power draw (W), SM/memory clocks (MHz), temperature (C), name; driver version.

    A field the GPU does not report is None. Returns {"available": False, "reason": ...} without NVML.
    """
    if not indices:
        return {"available": False, "reason": "no GPU: no GPU index given"}
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": _PIP_HINT}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML init failed: {exc}"}

    def query(fn: Callable[..., Any], *args: Any, scale: float = 1.0) -> float | None:
        try:
            return float(fn(*args)) * scale
        except pynvml.NVMLError:
            return None

    try:
        gpus: list[dict[str, object]] = []
        for index in indices:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(
                {
                    "index": index,
                    "name": _text(pynvml.nvmlDeviceGetName(h)),
                    "power_limit_w": query(pynvml.nvmlDeviceGetEnforcedPowerLimit, h, scale=1e-3),
                    "power_w": query(pynvml.nvmlDeviceGetPowerUsage, h, scale=1e-3),
                    "sm_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
                    "mem_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM),
                    "temperature_c": query(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
                }
            )
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        return {"available": True, "driver_version": driver, "gpus": gpus}
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML query failed: {exc}"}
    finally:
        _nvml_close(pynvml)


# ---------------------------------------------------------------------------------------------------- RAPL


def _package_zones(root: Path) -> list[Path]:
    """Top-level `intel-rapl:N` zones whose name starts with "package", by N. Never psys or sub-zones."""
    if not root.is_dir():
        return []
    zones = []
    for path in root.iterdir():
        match = _TOP_LEVEL_ZONE.fullmatch(path.name)
        if match is None:
            continue
        try:
            name = (path / "name").read_text().strip()
        except OSError:
            continue
        if name.startswith("package"):
            zones.append((int(match.group(1)), path))
    return [path for _, path in sorted(zones)]


def _read_uj(path: Path) -> int:
    return int(path.read_text().strip())


class RaplMeter:
    """Sums RAPL package zones (`intel-rapl:N/energy_uj`, µJ) under the powercap root.

    Wraparound: when a zone's end reading is below its begin reading, `max_energy_range_uj` is added. A
    window longer than one full wrap period (range / package power, typically tens of minutes) cannot be
    detected and reads short. Uncertainty: one count (`RAPL_COUNT_RESOLUTION_J`) per edge per zone plus one
    update period (`RAPL_UPDATE_PERIOD_S`) of mean power per edge.
    """

    def __init__(self, root: Path = POWERCAP_ROOT, *, clock: Clock = time.perf_counter) -> None:
        self.root = root
        self.method = "rapl"
        self._zones = _package_zones(root)
        self.domains = tuple(zone.name for zone in self._zones)
        self._window = _Window(clock)
        self._start_uj: list[int] = []
        self._range_uj: list[int] = []

    @staticmethod
    def available(root: Path = POWERCAP_ROOT) -> tuple[bool, str]:
        """(True, zones) when every package zone's counter is readable, else (False, why not)."""
        if not root.is_dir():
            return False, f"no powercap directory {root} (RAPL absent: VM, container or not Linux)"
        zones = _package_zones(root)
        if not zones:
            return False, f"no RAPL package zones under {root} (intel-rapl:N with a name package-*)"
        for zone in zones:
            for path in (zone / "energy_uj", zone / "max_energy_range_uj"):
                try:
                    _read_uj(path)
                except PermissionError:
                    return False, (
                        f"permission denied reading {path}: since the 2020 PLATYPUS fix (CVE-2020-8694) "
                        "RAPL energy counters are readable by root only"
                    )
                except (OSError, ValueError) as exc:
                    return False, f"cannot read {path}: {exc}"
        return True, "RAPL package zones: " + ", ".join(zone.name for zone in zones)

    def begin(self) -> None:
        if not self._zones:
            raise RuntimeError(self.available(self.root)[1])
        self._range_uj = [_read_uj(zone / "max_energy_range_uj") for zone in self._zones]
        self._window.open()
        try:
            self._start_uj = [_read_uj(zone / "energy_uj") for zone in self._zones]
        except BaseException:
            self._window.drop()
            raise

    def end(self) -> EnergySample:
        t0, t1 = self._window.close()
        window_s = t1 - t0
        try:
            end_uj = [_read_uj(zone / "energy_uj") for zone in self._zones]
        except (OSError, ValueError) as exc:
            return EnergySample(None, window_s, self.method, None, self.domains, f"RAPL read failed: {exc}")
        total_uj = 0
        for start, stop, range_uj in zip(self._start_uj, end_uj, self._range_uj, strict=True):
            total_uj += stop - start if stop >= start else stop - start + range_uj
        energy_j = total_uj / 1e6
        caveat = _short_window_caveat(window_s, RAPL_UPDATE_PERIOD_S, "RAPL counter", _MAY_READ_ZERO)
        uncertainty_j = None
        if caveat is None:
            mean_w = energy_j / window_s
            resolution_j = 2 * RAPL_COUNT_RESOLUTION_J * len(self._zones)
            uncertainty_j = resolution_j + 2 * RAPL_UPDATE_PERIOD_S * mean_w
        return EnergySample(energy_j, window_s, self.method, uncertainty_j, self.domains, caveat)

    def cancel(self) -> None:
        self._window.drop()


def select_cpu_meter(root: Path = POWERCAP_ROOT) -> Meter:
    """RaplMeter when the package counters are readable, else a NullMeter saying why not."""
    ok, why = RaplMeter.available(root)
    return RaplMeter(root) if ok else NullMeter(why)
