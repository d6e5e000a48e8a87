"""NVIDIA GPU energy: the NVML total-energy counter, integrated sampled power where it is missing, and the
GPU's power state (limit, clocks, temperature) for the report. pynvml is imported only when a meter is used."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from efficiency.measure.gpustate import SamplingThread, nvml_close, nvml_open
from efficiency.measure.sample import (
    _PIP_HINT,
    _SHORT_WINDOW_EFFECT,
    MAX_GPU_POWER_W,
    NVML_UPDATE_PERIOD_S,
    Clock,
    EnergySample,
    Meter,
    NullMeter,
    _short_window_caveat,
    _Window,
    counter_uncertainty_j,
    implausible_power,
    zero_energy_reason,
)


def _refusal(energy_j: float, window_s: float, n_gpus: int, what: str) -> str | None:
    """Why a GPU reading is refused (0 J, or implausible power), else None."""
    if energy_j == 0:
        return zero_energy_reason(what, window_s, NVML_UPDATE_PERIOD_S)
    return implausible_power(energy_j, window_s, NVML_UPDATE_PERIOD_S, MAX_GPU_POWER_W, n_gpus)


class NvmlEnergyMeter:
    """Sums `nvmlDeviceGetTotalEnergyConsumption` (mJ since driver load) over GPUs (Volta and newer).

    `indices` are NVML indices (PCI bus order). They differ from CUDA ordinals under CUDA_VISIBLE_DEVICES
    or the default CUDA_DEVICE_ORDER; map them (e.g. by PCI bus id) before building the meter.

    Uncertainty: :func:`efficiency.measure.sample.counter_uncertainty_j` per GPU, summed: each edge can be off
    by one update period of energy, `2 * period * mean window power` (2% at 10 s). Below one period it is
    unknown. A reading above `MAX_GPU_POWER_W` per GPU, or 0 J over a window of at least one period, is refused.
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
            nvml_close(self._nvml)

    def begin(self) -> None:
        if self._handles:
            raise RuntimeError("begin() called twice without end() or cancel()")
        self._nvml, self._handles = nvml_open(self.indices)
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
        refused = _refusal(sum(deltas_j), window_s, len(deltas_j), "NVML energy counter")
        if refused:
            return EnergySample(None, window_s, self.method, None, self.domains, refused)
        caveat = _short_window_caveat(window_s, NVML_UPDATE_PERIOD_S, "counter", _SHORT_WINDOW_EFFECT)
        uncertainty_j = None if caveat else sum(
            counter_uncertainty_j(d, window_s, NVML_UPDATE_PERIOD_S) for d in deltas_j)
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
        self._sampler: SamplingThread | None = None

    def _sample(self) -> None:
        t_s = self._clock()
        power_w = sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1000.0
        with self._lock:
            self._samples.append((t_s, power_w))

    def begin(self) -> None:
        if self._sampler is not None:
            raise RuntimeError("begin() called twice without end() or cancel()")
        self._nvml, self._handles = nvml_open(self.indices)
        self._samples = []
        try:
            self._sample()
        except BaseException:
            nvml_close(self._nvml)
            raise
        self._sampler = SamplingThread(self._sample, self.interval_s, "nvml-power-sampler", "power")
        self._sampler.start()

    def end(self) -> EnergySample:
        if self._sampler is None:
            raise RuntimeError("end() called without begin()")
        error, self._sampler = self._sampler.finish(self._nvml), None
        with self._lock:
            samples = list(self._samples)
        window_s = samples[-1][0] - samples[0][0]
        if error is not None:
            return EnergySample(None, window_s, self.method, None, self.domains, error)
        # trapezoid rule: sum of (t1 - t0) * (p0 + p1) / 2 over consecutive samples
        pairs = list(zip(samples, samples[1:], strict=False))
        energy_j = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in pairs)
        max_gap_s = max((t1 - t0 for (t0, _), (t1, _) in pairs), default=0.0)
        reason = (
            f"integrated from sampled power every {self.interval_s * 1000:g} ms "
            f"(no energy counter on this GPU); {len(samples)} samples"
        )
        refused = _refusal(energy_j, window_s, len(self.indices), "NVML power reading")
        if refused:
            return EnergySample(None, window_s, self.method, None, self.domains, refused)
        caveat = _short_window_caveat(window_s, NVML_UPDATE_PERIOD_S, "power reading", "uncertainty unknown")
        if caveat:
            return EnergySample(energy_j, window_s, self.method, None, self.domains, f"{reason}; {caveat}")
        mean_w = energy_j / window_s
        uncertainty_j = mean_w * (2 * NVML_UPDATE_PERIOD_S + max_gap_s)
        return EnergySample(energy_j, window_s, self.method, uncertainty_j, self.domains, reason)

    def cancel(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel(self._nvml)
            self._sampler = None


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
        nvml_close(pynvml)


def _supports(nvml: Any, query: Callable[[Any], object], handles: Sequence[Any]) -> bool:
    try:
        for handle in handles:
            query(handle)
    except nvml.NVMLError_NotSupported:
        return False
    return True


