"""The GPU's thermal and power state for the report, read per case before and after its measurements:
power limit and draw, SM/memory clocks and their maxima, temperature, clock throttle reasons (decoded to
names), MIG mode; plus a ``throttled`` flag and a one-line warning when clocks are held down for a reason
other than idleness. And the clocks during each measured window (:class:`ClockSampler`): a GPU at rest before
and after a case runs at its maximum clock, which says nothing of the clock its work ran at. pynvml is
imported only when called."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from efficiency.measure.sample import _PIP_HINT

# nvmlClocksEventReasons (formerly ClocksThrottleReasons) bits, nvml.h.
THROTTLE_REASONS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that are not throttling by the hardware: idle, a user's clock settings, sync boost, the display.
NOT_THROTTLING = frozenset({"gpu_idle", "applications_clocks_setting", "sync_boost", "display_clock_setting"})


def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the set bits of an NVML clocks-event mask, lowest bit first; unknown bits as hex."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    if unknown:
        names.append(f"unknown_0x{unknown:x}")
    return names


def throttle_warning(gpu: dict[str, Any]) -> str | None:
    """One line naming the throttling reasons of one GPU's state, or None when its clocks are not held down."""
    reasons = [r for r in gpu.get("throttle_reasons") or [] if r not in NOT_THROTTLING]
    if not reasons:
        return None

    def mhz(key: str) -> str:
        v = gpu.get(key)
        return "?" if v is None else f"{v:g}"

    temp, limit = gpu.get("temperature_c"), gpu.get("power_limit_w")
    return (f"GPU {gpu.get('index')} clocks throttled ({', '.join(reasons)}): SM {mhz('sm_clock_mhz')}/"
            f"{mhz('max_sm_clock_mhz')} MHz, memory {mhz('mem_clock_mhz')}/{mhz('max_mem_clock_mhz')} MHz, "
            f"{'?' if temp is None else f'{temp:g}'} C, power limit {'?' if limit is None else f'{limit:g}'} W")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _throttle_mask(nvml: Any, handle: Any) -> int | None:
    for fn_name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        fn = getattr(nvml, fn_name, None)
        if fn is None:
            continue
        try:
            return int(fn(handle))
        except nvml.NVMLError:
            return None
    return None


def _mig_enabled(nvml: Any, handle: Any) -> bool | None:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except (AttributeError, nvml.NVMLError):
        return None
    return bool(current)


def power_state(indices: Sequence[int]) -> dict[str, object]:
    """Per GPU (NVML indices): name, power limit and draw (W), SM/memory clocks and their maxima (MHz),
    temperature (C), throttle reasons (names), MIG mode; the driver version; ``throttled`` (any GPU held down
    for a reason other than idleness) and ``warning`` (one line per throttled GPU, or None).

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
    try:
        gpus: list[dict[str, Any]] = []
        for index in indices:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            mask = _throttle_mask(pynvml, h)
            gpus.append(
                {
                    "index": index,
                    "name": _text(pynvml.nvmlDeviceGetName(h)),
                    "power_limit_w": nvml_query(pynvml, "nvmlDeviceGetEnforcedPowerLimit", h, scale=1e-3),
                    "power_w": nvml_query(pynvml, "nvmlDeviceGetPowerUsage", h, scale=1e-3),
                    "sm_clock_mhz": nvml_query(pynvml, "nvmlDeviceGetClockInfo", h, pynvml.NVML_CLOCK_SM),
                    "mem_clock_mhz": nvml_query(pynvml, "nvmlDeviceGetClockInfo", h, pynvml.NVML_CLOCK_MEM),
                    "max_sm_clock_mhz": nvml_query(pynvml, "nvmlDeviceGetMaxClockInfo", h, pynvml.NVML_CLOCK_SM),
                    "max_mem_clock_mhz": nvml_query(pynvml, "nvmlDeviceGetMaxClockInfo", h, pynvml.NVML_CLOCK_MEM),
                    "temperature_c": nvml_query(pynvml, "nvmlDeviceGetTemperature", h, pynvml.NVML_TEMPERATURE_GPU),
                    "throttle_reasons": None if mask is None else decode_throttle_reasons(mask),
                    "mig": _mig_enabled(pynvml, h),
                }
            )
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML query failed: {exc}"}
    finally:
        nvml_close(pynvml)
    warnings = [w for w in (throttle_warning(g) for g in gpus) if w]
    return {"available": True, "driver_version": driver, "gpus": gpus, "throttled": bool(warnings),
            "warning": "; ".join(warnings) or None}


# --- NVML: open, query, close, and a sampling thread (shared with nvml.py's meters) ----------------------


def nvml_open(indices: Sequence[int]) -> tuple[Any, list[Any]]:
    """Import pynvml, init NVML (reference counted) and return (module, handles); shut down again if a handle
    cannot be had."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
    except BaseException:
        nvml_close(pynvml)
        raise


def nvml_close(nvml: Any) -> None:
    """Shut NVML down (reference counted), best effort: a failed shutdown must not lose a reading."""
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError:
        pass


def nvml_query(nvml: Any, fn_name: str, *args: Any, scale: float = 1.0) -> float | None:
    """``fn_name(*args) * scale`` as a float; None where this pynvml lacks the query or the GPU refuses it."""
    fn = getattr(nvml, fn_name, None)
    if fn is None:
        return None
    try:
        return float(fn(*args)) * scale
    except nvml.NVMLError:
        return None


class SamplingThread:
    """Calls ``sample`` every ``interval_s`` seconds in a daemon thread, from :meth:`start` to :meth:`stop`. The
    first exception ends the sampling and is kept in ``error`` (``"<what> sampling failed during the window:
    ..."``), for the caller's reading to report instead of losing it. Shared by the samplers of NVML power
    (nvml.NvmlPowerSamplingMeter) and clocks (ClockSampler)."""

    def __init__(self, sample: Callable[[], None], interval_s: float, name: str, what: str) -> None:
        self._sample, self.interval_s, self.name, self._what = sample, interval_s, name, what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as exc:  # reported by the caller's end(), not lost
                self.error = f"{self._what} sampling failed during the window: {exc!r}"
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(1.0, 10 * self.interval_s))
        self._thread = None

    def cancel(self, nvml: Any) -> None:
        """Stop without a last sample and shut ``nvml`` down (a window that ended by an error)."""
        self.stop()
        nvml_close(nvml)

    def finish(self, nvml: Any, last_sample: bool = True) -> str | None:
        """Stop, take the window's last sample (unless ``last_sample`` is False) and shut ``nvml`` down; the error
        that ended the sampling, or the last read's, None when every sample was read."""
        self.stop()
        error = self.error
        try:
            if last_sample:
                self._sample()
        except nvml.NVMLError as exc:
            error = f"NVML read failed: {exc}"
        finally:
            nvml_close(nvml)
        return error


# --- the GPU's clocks during a measured window -------------------------------------------------------------

# How often the clock sampler reads: NVML's readings update about this often (sample.NVML_UPDATE_PERIOD_S).
CLOCK_SAMPLE_INTERVAL_S = 0.1
# Reasons that hold the clock down because the GPU draws its power limit (what a busy datacenter GPU does).
POWER_CAP_REASONS = frozenset({"sw_power_cap", "hw_power_brake_slowdown"})


def summarise_clock_samples(index: int, samples: Sequence[tuple[float | None, float | None, int | None]],
                            max_sm_clock_mhz: float | None, power_limit_w: float | None) -> dict[str, Any]:
    """One GPU's clocks over a window from its samples ``(SM clock MHz, power W, clocks-event mask)`` (a field
    the GPU did not report is None): median / min / max SM clock, median power, and for each clocks-event reason
    the share of the samples that read the reasons (``reason_samples``) that carried it; ``power_capped_share``:
    the share held down by the power limit. ``reason`` says why there is no clock."""
    sm = [s for s, _, _ in samples if s is not None]
    power = [p for _, p, _ in samples if p is not None]
    reasons = [set(decode_throttle_reasons(m)) for _, _, m in samples if m is not None]
    counts: dict[str, int] = {}
    for names in reasons:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    why = None if sm else ("no sample: the window was shorter than the sampling interval" if not samples
                           else f"NVML gave no SM clock in the window's {len(samples)} samples")
    return {
        "index": index,
        "samples": len(samples),
        "sm_clock_mhz_median": statistics.median(sm) if sm else None,
        "sm_clock_mhz_min": min(sm) if sm else None,
        "sm_clock_mhz_max": max(sm) if sm else None,
        "max_sm_clock_mhz": max_sm_clock_mhz,
        "power_w_median": statistics.median(power) if power else None,
        "power_limit_w": power_limit_w,
        "reason_samples": len(reasons),
        "reasons_share": {name: n / len(reasons) for name, n in counts.items()} if reasons else None,
        "power_capped_share": (sum(1 for names in reasons if POWER_CAP_REASONS & names) / len(reasons)
                               if reasons else None),
        "reason": why,
    }


class ClockSampler:
    """Samples each GPU's SM clock, power draw and clocks-event reasons every ``interval_s`` in a thread, from
    :meth:`begin` to :meth:`end`, so that a report says at what clock a window's work ran: an H100 at its 700 W
    limit runs a long matmul-bound pass far below its maximum clock (docs/results.md 5r), which a reading before
    and after the case (at rest) does not show. Only the thread's samples count: a reading at either edge would
    be taken at rest, outside the work."""

    def __init__(self, indices: Sequence[int], interval_s: float = CLOCK_SAMPLE_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.indices = tuple(indices)
        self.interval_s = interval_s
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._max_clock_and_limit: list[tuple[float | None, float | None]] = []  # (MHz, W) per GPU
        self._samples: list[list[tuple[float | None, float | None, int | None]]] = []
        self._lock = threading.Lock()
        self._sampler: SamplingThread | None = None

    def _sample(self) -> None:
        nvml = self._nvml
        row = [(nvml_query(nvml, "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_SM),
                nvml_query(nvml, "nvmlDeviceGetPowerUsage", h, scale=1e-3), _throttle_mask(nvml, h))
               for h in self._handles]
        with self._lock:
            for per_gpu, sample in zip(self._samples, row, strict=True):
                per_gpu.append(sample)

    def begin(self) -> None:
        if self._sampler is not None:
            raise RuntimeError("begin() called twice without end() or cancel()")
        self._nvml, self._handles = nvml_open(self.indices)
        nvml = self._nvml
        self._max_clock_and_limit = [(nvml_query(nvml, "nvmlDeviceGetMaxClockInfo", h, nvml.NVML_CLOCK_SM),
                                      nvml_query(nvml, "nvmlDeviceGetEnforcedPowerLimit", h, scale=1e-3))
                                     for h in self._handles]
        self._samples = [[] for _ in self._handles]
        self._sampler = SamplingThread(self._sample, self.interval_s, "nvml-clock-sampler", "clock")
        self._sampler.start()

    def end(self) -> dict[str, Any]:
        """``{"interval_s", "gpus": [one summary per GPU (summarise_clock_samples)], "reason": None}``, or
        ``gpus`` None with the reason when sampling failed."""
        if self._sampler is None:
            raise RuntimeError("end() called without begin()")
        error, self._sampler = self._sampler.finish(self._nvml, last_sample=False), None
        if error is not None:
            return {"interval_s": self.interval_s, "gpus": None, "reason": error}
        with self._lock:
            samples = [list(s) for s in self._samples]
        gpus = [summarise_clock_samples(i, s, mx, limit)
                for i, s, (mx, limit) in zip(self.indices, samples, self._max_clock_and_limit, strict=True)]
        return {"interval_s": self.interval_s, "gpus": gpus, "reason": None}

    def cancel(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel(self._nvml)
            self._sampler = None


@contextmanager
def sample_clocks(indices: Sequence[int]) -> Iterator[dict[str, Any]]:
    """Sample the GPUs' clocks over the ``with`` body; the yielded dict receives the summary
    (:meth:`ClockSampler.end`) under ``"gpu_clocks"`` when the body ends normally, or ``{"gpus": None,
    "reason": ...}`` when NVML is missing, fails to start or fails at the end: a failing sampler never fails
    the measured work."""
    out: dict[str, Any] = {}
    sampler = ClockSampler(indices)
    unavailable = None
    try:
        sampler.begin()
    except ImportError:
        unavailable = _PIP_HINT
    except Exception as exc:  # pynvml.NVMLError and the like: the window still runs, without clocks
        unavailable = f"NVML failed to start: {exc}"
    if unavailable is not None:  # outside the except blocks: the body's own errors are not chained to this one
        out["gpu_clocks"] = {"interval_s": None, "gpus": None, "reason": unavailable}
        yield out
        return
    try:
        yield out
    except BaseException:
        sampler.cancel()
        raise
    try:
        out["gpu_clocks"] = sampler.end()
    except Exception as exc:
        out["gpu_clocks"] = {"interval_s": sampler.interval_s, "gpus": None,
                             "reason": f"clock sampling failed at the window's end: {exc!r}"}
