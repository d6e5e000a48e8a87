"""Tests of the energy meters' arithmetic on fake hardware: a fake sysfs tree and a fake pynvml module.

Nothing here touches a real GPU or real RAPL counters; these tests check what we compute from readings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from efficiency.measure.energy import (
    NVML_UPDATE_PERIOD_S,
    RAPL_COUNT_RESOLUTION_J,
    RAPL_UPDATE_PERIOD_S,
    EnergySample,
    NullMeter,
    NvmlEnergyMeter,
    NvmlPowerSamplingMeter,
    RaplMeter,
    measure_energy,
    power_state,
    select_cpu_meter,
    select_gpu_meter,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_RANGE_UJ = 262_143_328_850


class FakeClock:
    """A perf_counter stand-in: advances by `step_s` on every call and by `advance()`; thread-safe."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.now_s = 0.0
        self.step_s = step_s
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.now_s += self.step_s
            return self.now_s

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now_s += seconds


# ---------------------------------------------------------------------------------------------- fake RAPL


def make_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = MAX_RANGE_UJ) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def set_energy(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def window(meter: Any, clock: Any, seconds: float, during: Callable[[], Any] | None = None) -> Any:
    """One energy window of ``seconds`` on a fake clock: begin, what happens inside it, advance, end."""
    meter.begin()
    if during is not None:
        during()
    clock.advance(seconds)
    return meter.end()


def test_rapl_sums_only_top_level_package_zones(tmp_path: Path) -> None:
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    core = make_zone(tmp_path, "intel-rapl:0:0", "core", 500_000)
    psys = make_zone(tmp_path, "intel-rapl:1", "psys", 2_000_000)
    mmio = make_zone(tmp_path, "intel-rapl-mmio:0", "package-0", 1_000_000)  # repeats package 0
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    assert meter.domains == ("intel-rapl:0",)
    meter.begin()
    clock.advance(2.0)
    set_energy(pkg, 6_000_000)  # +5 J
    set_energy(core, 3_500_000)
    set_energy(psys, 12_000_000)
    set_energy(mmio, 6_000_000)
    sample = meter.end()
    assert sample.method == "rapl"
    assert sample.energy_j == pytest.approx(5.0)
    assert sample.window_s == pytest.approx(2.0)
    assert sample.reason is None


def test_rapl_wraparound_adds_max_range(tmp_path: Path) -> None:
    max_uj = 10_000_000
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", max_uj - 1_000_000, max_uj)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    meter.begin()
    clock.advance(1.0)
    set_energy(pkg, 2_000_000)  # wrapped: 1 J to the top, then 2 J
    sample = meter.end()
    assert sample.energy_j == pytest.approx(3.0)


def test_rapl_sums_two_packages_in_index_order(tmp_path: Path) -> None:
    p0 = make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    p1 = make_zone(tmp_path, "intel-rapl:1", "package-1", 100)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    assert meter.domains == ("intel-rapl:0", "intel-rapl:1")
    meter.begin()
    clock.advance(1.0)
    set_energy(p0, 7_000_000)
    set_energy(p1, 3_000_100)
    assert meter.end().energy_j == pytest.approx(10.0)


def test_rapl_uncertainty_formula(tmp_path: Path) -> None:
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, clock=clock)
    meter.begin()
    clock.advance(2.0)
    set_energy(pkg, 100_000_000)  # 100 J in 2 s = 50 W
    sample = meter.end()
    expected = 2 * RAPL_COUNT_RESOLUTION_J + 2 * RAPL_UPDATE_PERIOD_S * 50.0
    assert sample.uncertainty_j == pytest.approx(expected)


def test_rapl_missing_dir_selects_null_meter(tmp_path: Path) -> None:
    meter = select_cpu_meter(tmp_path / "no-such-powercap")
    assert isinstance(meter, NullMeter)
    assert "no powercap directory" in meter.reason
    meter.begin()
    sample = meter.end()
    assert sample.energy_j is None
    assert sample.reason == meter.reason


def test_rapl_psys_only_is_not_available(tmp_path: Path) -> None:
    make_zone(tmp_path, "intel-rapl:0", "psys", 0)
    ok, why = RaplMeter.available(tmp_path)
    assert not ok
    assert "no RAPL package zones" in why


def test_rapl_unreadable_counter_gives_reason(tmp_path: Path) -> None:
    zone = make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (zone / "energy_uj").unlink()
    (zone / "energy_uj").mkdir()  # reading a directory fails even as root
    ok, why = RaplMeter.available(tmp_path)
    assert not ok
    assert "cannot read" in why and "energy_uj" in why
    meter = select_cpu_meter(tmp_path)
    assert isinstance(meter, NullMeter)
    assert meter.reason == why


def test_rapl_permission_denied_mentions_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    real_read_text = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self)

    monkeypatch.setattr(Path, "read_text", read_text)
    ok, why = RaplMeter.available(tmp_path)
    assert not ok
    assert "permission denied" in why and "PLATYPUS" in why and "root" in why


def test_rapl_readable_tree_selects_rapl_meter(tmp_path: Path) -> None:
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    assert isinstance(select_cpu_meter(tmp_path), RaplMeter)


# ---------------------------------------------------------------------------------------------- NullMeter


def test_null_meter_reports_none_with_reason_never_zero() -> None:
    meter = NullMeter("no GPU")
    meter.begin()
    sample = meter.end()
    assert sample.energy_j is None and sample.uncertainty_j is None
    assert sample.method == "null" and sample.reason == "no GPU"
    data = sample.to_dict()
    assert data["energy_j"] is None
    assert json.loads(json.dumps(data))["energy_j"] is None
    assert '"energy_j": null' in json.dumps(data)


def test_unavailable_sample_without_reason_is_rejected() -> None:
    with pytest.raises(ValueError, match="reason"):
        EnergySample(energy_j=None, window_s=1.0, method="null", uncertainty_j=None, domains=())


def test_end_without_begin_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        NullMeter("x").end()


# ---------------------------------------------------------------------------------------------- fake NVML


class FakeBoard:
    """Fake GPUs: power_w[i](t) in watts; the energy counter integrates it in NVML_UPDATE_PERIOD_S steps."""

    def __init__(
        self,
        clock: FakeClock,
        power_w: list[Callable[[float], float]],
        *,
        has_counter: bool = True,
        has_power: bool = True,
        init_error: str | None = None,
        throttle_mask: int = 0x1,
        mig: int = 0,
    ) -> None:
        self.clock, self.power_w = clock, power_w
        self.has_counter, self.has_power, self.init_error = has_counter, has_power, init_error
        self.throttle_mask, self.mig = throttle_mask, mig
        self.inits = self.shutdowns = 0


def fake_pynvml(board: FakeBoard) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's name
        pass

    def init() -> None:
        if board.init_error:
            raise NVMLError(board.init_error)
        board.inits += 1

    def shutdown() -> None:
        board.shutdowns += 1

    def energy_mj(index: int) -> int:
        if not board.has_counter:
            raise NVMLError_NotSupported("Not Supported")
        steps = math.floor(board.clock.now_s / NVML_UPDATE_PERIOD_S + 1e-9)
        return round(board.power_w[index](0.0) * steps * NVML_UPDATE_PERIOD_S * 1000)

    def power_mw(index: int) -> int:
        if not board.has_power:
            raise NVMLError_NotSupported("Not Supported")
        return round(board.power_w[index](board.clock.now_s) * 1000)

    mod.__dict__.update(
        NVMLError=NVMLError,
        NVMLError_NotSupported=NVMLError_NotSupported,
        NVML_CLOCK_SM=1,
        NVML_CLOCK_MEM=2,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetCount=lambda: len(board.power_w),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetTotalEnergyConsumption=energy_mj,
        nvmlDeviceGetPowerUsage=power_mw,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetClockInfo=lambda h, kind: 1980 if kind == 1 else 2619,
        nvmlDeviceGetMaxClockInfo=lambda h, kind: 1980 if kind == 1 else 2619,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: board.throttle_mask,
        nvmlDeviceGetMigMode=lambda h: (board.mig, board.mig),
        nvmlDeviceGetTemperature=lambda h, kind: 41,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlSystemGetDriverVersion=lambda: "580.65.06",
    )
    return mod


def install(monkeypatch: pytest.MonkeyPatch, board: FakeBoard) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(board))


def constant(watts: float) -> Callable[[float], float]:
    return lambda t: watts


def test_energy_counter_sums_two_gpus_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    board = FakeBoard(clock, [constant(100.0), constant(300.0)])
    install(monkeypatch, board)
    meter = select_gpu_meter([0, 1])
    assert isinstance(meter, NvmlEnergyMeter)
    meter = NvmlEnergyMeter([0, 1], clock=clock)
    meter.begin()
    clock.advance(2.0)
    sample = meter.end()
    assert sample.method == "nvml-total-energy"
    assert sample.domains == ("gpu:0", "gpu:1")
    assert sample.energy_j == pytest.approx(800.0)
    assert sample.window_s == pytest.approx(2.0)
    assert sample.reason is None
    assert board.inits == board.shutdowns  # NVML released after the window and after selection


def test_energy_counter_uncertainty_formula_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    install(monkeypatch, FakeBoard(clock, [constant(100.0), constant(300.0)]))
    meter = NvmlEnergyMeter([0, 1], clock=clock)
    meter.begin()
    clock.advance(2.0)
    sample = meter.end()
    # 2 edges * 0.1 s * mean power, per GPU: 2 * 0.1 * 50 W + 2 * 0.1 * 150 W (mean power = energy / window)
    expected = 2 * NVML_UPDATE_PERIOD_S * (200.0 / 2.0) + 2 * NVML_UPDATE_PERIOD_S * (600.0 / 2.0)
    assert sample.uncertainty_j == pytest.approx(expected) == pytest.approx(80.0)


def test_energy_counter_that_did_not_tick_in_a_short_window_gives_no_reading_on_fake_nvml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the 0 J was kept (with a caveat), became 0 J per token and scored as a 100% energy saving."""
    clock = FakeClock()
    clock.advance(0.01)
    install(monkeypatch, FakeBoard(clock, [constant(100.0)]))
    meter = NvmlEnergyMeter([0], clock=clock)
    meter.begin()
    clock.advance(0.05)
    sample = meter.end()
    assert sample.energy_j is None  # the counter has not ticked: the energy is unknown, not 0
    assert sample.reason is not None and "did not tick" in sample.reason and "update period" in sample.reason
    assert sample.uncertainty_j is None


def test_power_sampling_fallback_when_counter_not_supported_on_fake_nvml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock(step_s=0.01)  # every timestamp advances fake time by 10 ms
    board = FakeBoard(clock, [lambda t: 100.0 + 50.0 * t, constant(200.0)], has_counter=False)
    install(monkeypatch, board)
    assert isinstance(select_gpu_meter([0, 1]), NvmlPowerSamplingMeter)
    meter = NvmlPowerSamplingMeter([0, 1], interval_s=0.002, clock=clock)
    meter.begin()
    deadline = time.monotonic() + 2.0
    while clock.now_s < 0.2 and time.monotonic() < deadline:  # the sampler thread advances the fake clock
        time.sleep(0.002)
    sample = meter.end()
    assert not any(t.name == "nvml-power-sampler" for t in threading.enumerate())
    assert sample.method == "nvml-power-sampling"
    assert sample.reason is not None and "no energy counter" in sample.reason and "2 ms" in sample.reason
    # power is linear in time, so the trapezoid rule is exact: integral of 300 + 50 t over the window
    t_end = clock.now_s
    t_begin = t_end - sample.window_s
    exact = 300.0 * sample.window_s + 25.0 * (t_end**2 - t_begin**2)
    assert sample.energy_j == pytest.approx(exact, rel=1e-6)
    assert sample.energy_j is not None and sample.uncertainty_j is not None
    assert sample.window_s > NVML_UPDATE_PERIOD_S
    assert sample.uncertainty_j >= 2 * NVML_UPDATE_PERIOD_S * sample.energy_j / sample.window_s
    assert board.inits == board.shutdowns


def test_power_sampling_cancel_stops_thread_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    board = FakeBoard(FakeClock(step_s=0.001), [constant(100.0)], has_counter=False)
    install(monkeypatch, board)
    meter = NvmlPowerSamplingMeter([0], interval_s=0.002)
    meter.begin()
    meter.cancel()
    assert not any(t.name == "nvml-power-sampler" for t in threading.enumerate())
    assert board.inits == board.shutdowns


def test_no_counter_and_no_power_gives_null_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeBoard(FakeClock(), [constant(1.0)], has_counter=False, has_power=False))
    meter = select_gpu_meter([0])
    assert isinstance(meter, NullMeter)
    assert "neither" in meter.reason


def test_nvml_init_failure_gives_null_reason_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeBoard(FakeClock(), [constant(1.0)], init_error="Driver Not Loaded"))
    meter = select_gpu_meter([0])
    assert isinstance(meter, NullMeter)
    assert meter.reason == "NVML init failed: Driver Not Loaded"
    assert power_state([0]) == {"available": False, "reason": "NVML init failed: Driver Not Loaded"}


def test_pynvml_missing_and_no_gpu_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "no GPU" in getattr(select_gpu_meter([]), "reason", "")
    install(monkeypatch, FakeBoard(FakeClock(), []))
    assert "NVML sees 0 devices" in getattr(select_gpu_meter([0]), "reason", "")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    meter = select_gpu_meter([0])
    assert isinstance(meter, NullMeter)
    assert "pynvml not installed" in meter.reason


def test_power_state_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeBoard(FakeClock(), [constant(123.0)]))
    state = power_state([0])
    assert state["available"] is True and state["driver_version"] == "580.65.06"
    assert state["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "power_limit_w": 700.0,
            "power_w": 123.0,
            "sm_clock_mhz": 1980.0,
            "mem_clock_mhz": 2619.0,
            "max_sm_clock_mhz": 1980.0,
            "max_mem_clock_mhz": 2619.0,
            "temperature_c": 41.0,
            "throttle_reasons": ["gpu_idle"],
            "mig": False,
        }
    ]
    assert state["throttled"] is False and state["warning"] is None


# ---------------------------------------------------------------------------------------------- window


class RecordingMeter:
    method = "recording"
    domains: tuple[str, ...] = ()

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def begin(self) -> None:
        self.calls.append("begin")

    def end(self) -> EnergySample:
        self.calls.append("end")
        return EnergySample(1.5, 2.0, self.method, 0.1, ())

    def cancel(self) -> None:
        self.calls.append("cancel")


def test_measure_energy_syncs_at_both_edges() -> None:
    calls: list[str] = []
    with measure_energy(RecordingMeter(calls), lambda: calls.append("sync")) as window:
        calls.append("work")
    assert calls == ["sync", "begin", "work", "sync", "end"]
    assert window.sample is not None and window.sample.energy_j == 1.5


def test_measure_energy_cancels_and_reraises() -> None:
    calls: list[str] = []
    with pytest.raises(KeyError, match="boom"):
        with measure_energy(RecordingMeter(calls), lambda: calls.append("sync")) as window:
            raise KeyError("boom")
    assert calls == ["sync", "begin", "cancel"]
    assert window.sample is None


def test_measure_energy_cancel_releases_nvml_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    board = FakeBoard(FakeClock(), [constant(100.0)])
    install(monkeypatch, board)
    with pytest.raises(RuntimeError):
        with measure_energy(NvmlEnergyMeter([0]), lambda: None):
            raise RuntimeError("workload failed")
    assert board.inits == board.shutdowns == 1


def test_importing_energy_does_not_import_torch_or_pynvml() -> None:
    code = "import sys, efficiency.measure.energy; assert not {'torch', 'pynvml'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# ------------------------------------------------------------------------- throttling, uncertainty, refusals


def test_power_state_warns_when_clocks_are_throttled_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeBoard(FakeClock(), [constant(690.0)], throttle_mask=0x4 | 0x40))
    state = power_state([0])
    gpu = state["gpus"][0]  # type: ignore[index]
    assert gpu["throttle_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    assert state["throttled"] is True
    warning = str(state["warning"])
    assert "GPU 0 clocks throttled (sw_power_cap, hw_thermal_slowdown)" in warning and "700 W" in warning


def test_idle_or_app_clock_reasons_are_not_throttling() -> None:
    from efficiency.measure.gpustate import decode_throttle_reasons, throttle_warning

    assert decode_throttle_reasons(0x1 | 0x2 | 0x10) == ["gpu_idle", "applications_clocks_setting", "sync_boost"]
    assert decode_throttle_reasons(0x1000) == ["unknown_0x1000"]
    assert throttle_warning({"index": 0, "throttle_reasons": ["gpu_idle", "sync_boost"]}) is None
    assert throttle_warning({"index": 1, "throttle_reasons": ["hw_slowdown"]}) is not None


def test_counter_uncertainty_is_two_update_periods_of_mean_power() -> None:
    from efficiency.measure.energy import counter_uncertainty_j

    # 10 s at 100 ms: each edge may miss one period -> 2 * 0.1 / 10 = 2% (not 1%)
    assert counter_uncertainty_j(5000.0, 10.0, NVML_UPDATE_PERIOD_S) / 5000.0 == pytest.approx(0.02)
    assert counter_uncertainty_j(5000.0, 20.0, NVML_UPDATE_PERIOD_S) / 5000.0 == pytest.approx(0.01)
    with pytest.raises(ValueError):
        counter_uncertainty_j(1.0, 0.0, NVML_UPDATE_PERIOD_S)


def test_energy_counter_at_ten_seconds_reports_two_percent_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    install(monkeypatch, FakeBoard(clock, [constant(500.0)]))
    meter = NvmlEnergyMeter([0], clock=clock)
    meter.begin()
    clock.advance(10.0)
    sample = meter.end()
    assert sample.energy_j == pytest.approx(5000.0)
    assert sample.uncertainty_j is not None and sample.uncertainty_j / sample.energy_j == pytest.approx(0.02)


def test_zero_reading_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="0 J"):
        EnergySample(0.0, 10.0, "rapl", 0.0, ("intel-rapl:0",))


def test_energy_counter_stuck_over_a_long_window_is_refused_on_fake_nvml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    install(monkeypatch, FakeBoard(clock, [constant(0.0)]))
    meter = NvmlEnergyMeter([0], clock=clock)
    meter.begin()
    clock.advance(2.0)
    sample = meter.end()
    assert sample.energy_j is None
    assert sample.reason is not None and "did not advance" in sample.reason


def test_energy_counter_implausible_power_is_refused_on_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    install(monkeypatch, FakeBoard(clock, [constant(50_000.0)]))  # 50 kW: a misread, not a GPU
    sample = window(NvmlEnergyMeter([0], clock=clock), clock, 2.0)
    assert sample.energy_j is None and sample.reason is not None and "reading refused" in sample.reason


def test_rapl_counter_reset_is_refused_not_read_as_a_wrap(tmp_path: Path) -> None:
    clock = FakeClock()
    zone = make_zone(tmp_path, "intel-rapl:0", "package-0", 5_000_000)
    # reset: end below begin, read as a wrap of ~262 kJ
    meter = RaplMeter(tmp_path, clock=clock)
    sample = window(meter, clock, 2.0, lambda: (zone / "energy_uj").write_text("1000000\n"))
    assert sample.energy_j is None
    assert sample.reason is not None and "reading refused" in sample.reason and "reset" in sample.reason


def test_rapl_zero_over_a_long_window_is_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    make_zone(tmp_path, "intel-rapl:0", "package-0", 5_000_000)
    sample = window(RaplMeter(tmp_path, clock=clock), clock, 1.0)
    assert sample.energy_j is None and sample.reason is not None and "did not advance" in sample.reason


def test_rapl_zero_in_a_short_window_is_no_reading(tmp_path: Path) -> None:
    clock = FakeClock()
    make_zone(tmp_path, "intel-rapl:0", "package-0", 5_000_000)
    sample = window(RaplMeter(tmp_path, clock=clock), clock, 0.0005)
    assert sample.energy_j is None and sample.reason is not None and "did not tick" in sample.reason


def test_one_counter_tick_in_a_short_window_is_not_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    zone = make_zone(tmp_path, "intel-rapl:0", "package-0", 5_000_000)
    # 0.3 mJ in 0.5 ms: one honest tick
    meter = RaplMeter(tmp_path, clock=clock)
    sample = window(meter, clock, 0.0005, lambda: (zone / "energy_uj").write_text("5000300\n"))
    assert sample.energy_j == pytest.approx(0.0003)
