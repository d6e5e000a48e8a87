"""The GPU's thermal and power state for the report, read per case before and after its measurements:
power limit and draw, SM/memory clocks and their maxima, temperature, clock throttle reasons (decoded to
names), MIG mode; plus a ``throttled`` flag and a one-line warning when clocks are held down for a reason
other than idleness. pynvml is imported only when called."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    def query(fn: Callable[..., Any], *args: Any, scale: float = 1.0) -> float | None:
        try:
            return float(fn(*args)) * scale
        except (AttributeError, pynvml.NVMLError):
            return None

    try:
        gpus: list[dict[str, Any]] = []
        for index in indices:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            mask = _throttle_mask(pynvml, h)
            gpus.append(
                {
                    "index": index,
                    "name": _text(pynvml.nvmlDeviceGetName(h)),
                    "power_limit_w": query(pynvml.nvmlDeviceGetEnforcedPowerLimit, h, scale=1e-3),
                    "power_w": query(pynvml.nvmlDeviceGetPowerUsage, h, scale=1e-3),
                    "sm_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
                    "mem_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM),
                    "max_sm_clock_mhz": query(getattr(pynvml, "nvmlDeviceGetMaxClockInfo", None) or _missing,
                                              h, pynvml.NVML_CLOCK_SM),
                    "max_mem_clock_mhz": query(getattr(pynvml, "nvmlDeviceGetMaxClockInfo", None) or _missing,
                                               h, pynvml.NVML_CLOCK_MEM),
                    "temperature_c": query(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
                    "throttle_reasons": None if mask is None else decode_throttle_reasons(mask),
                    "mig": _mig_enabled(pynvml, h),
                }
            )
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML query failed: {exc}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    warnings = [w for w in (throttle_warning(g) for g in gpus) if w]
    return {"available": True, "driver_version": driver, "gpus": gpus, "throttled": bool(warnings),
            "warning": "; ".join(warnings) or None}


def _missing(*_args: Any) -> float:
    raise AttributeError("this pynvml has no such query")
