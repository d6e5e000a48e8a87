"""The GPU's clocks during a measured window (efficiency.measure.gpustate.ClockSampler), on a fake pynvml whose
readings follow a script: the report must say at what clock a window's work ran, not only the idle clock
before and after the case (an H100 at its 700 W limit ran the grid's passes at 1,470-1,485 of its 1,980 MHz,
docs/results.md 5r)."""

from __future__ import annotations

import sys
import time
import types
from typing import Any

import pytest

from efficiency.measure.gpustate import ClockSampler, sample_clocks, summarise_clock_samples
from efficiency.phases.base import PhaseContext, PhaseRecord, Rounds, Window, measured_window
from efficiency.phases.perplexity import TimedPass, TimedPassPhase
from efficiency.settings import Workload


class ScriptedBoard:
    """One GPU whose SM clock, power (mW) and clocks-event mask come from a script, one entry per sample; the
    last entry repeats. ``fail`` makes every clock read raise NVML's error (``"nvml"``) or another one."""

    def __init__(self, script: list[tuple[int, int, int]], fail: str | None = None,
                 shutdown_error: bool = False) -> None:
        self.script, self.fail, self.shutdown_error = script, fail, shutdown_error
        self.reads = self.inits = self.shutdowns = 0

    def now(self) -> tuple[int, int, int]:
        return self.script[min(self.reads, len(self.script) - 1)]


def scripted_pynvml(board: ScriptedBoard) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def clock(h: int, kind: int) -> int:
        if board.fail == "nvml":
            raise NVMLError("GPU is lost")
        if board.fail == "other":
            raise RuntimeError("driver returned garbage")
        return board.now()[0]

    def power(h: int) -> int:
        return board.now()[1]

    def mask(h: int) -> int:  # read last in a sample: the next sample reads the next script entry
        value = board.now()[2]
        board.reads += 1
        return value

    def init() -> None:
        board.inits += 1

    def shutdown() -> None:
        board.shutdowns += 1
        if board.shutdown_error:
            raise RuntimeError("shutdown failed oddly")

    mod.__dict__.update(
        NVMLError=NVMLError, NVML_CLOCK_SM=1, nvmlInit=init, nvmlShutdown=shutdown,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetClockInfo=clock, nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetCurrentClocksEventReasons=mask, nvmlDeviceGetMaxClockInfo=lambda h, kind: 1980,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
    )
    return mod


def test_the_clock_summary_by_hand() -> None:
    samples: list[tuple[float | None, float | None, int | None]] = [
        (1410.0, 698.0, 0x4), (1455.0, 697.0, 0x4), (1980.0, 120.0, 0x1), (None, None, None)]
    s = summarise_clock_samples(0, samples, 1980.0, 700.0)
    assert s["samples"] == 4 and s["reason_samples"] == 3 and s["reason"] is None
    assert (s["sm_clock_mhz_median"], s["sm_clock_mhz_min"], s["sm_clock_mhz_max"]) == (1455.0, 1410.0, 1980.0)
    assert s["power_w_median"] == 697.0
    assert s["reasons_share"] == pytest.approx({"sw_power_cap": 2 / 3, "gpu_idle": 1 / 3})
    assert s["power_capped_share"] == pytest.approx(2 / 3)
    assert (s["max_sm_clock_mhz"], s["power_limit_w"]) == (1980.0, 700.0)
    nothing = summarise_clock_samples(1, [(None, None, None)], None, None)
    assert nothing["sm_clock_mhz_median"] is None and nothing["power_capped_share"] is None
    assert nothing["reason"] == "NVML gave no SM clock in the window's 1 samples"
    assert summarise_clock_samples(2, [], None, None)["reason"].startswith("no sample: the window was shorter")


def test_the_sampler_counts_only_the_samples_taken_during_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    board = ScriptedBoard([(1410, 699_000, 0x4)])
    monkeypatch.setitem(sys.modules, "pynvml", scripted_pynvml(board))
    sampled = ClockSampler([0], interval_s=0.01)
    sampled.begin()
    time.sleep(0.2)
    gpu = sampled.end()["gpus"][0]
    assert gpu["samples"] >= 4 and gpu["reason"] is None
    assert gpu["sm_clock_mhz_median"] == 1410.0 and gpu["power_capped_share"] == 1.0
    assert gpu["power_w_median"] == 699.0
    assert board.inits == board.shutdowns == 1
    short = ClockSampler([0], interval_s=3600.0)  # no sample falls inside: none is taken at rest at the edges
    short.begin()
    gpu = short.end()["gpus"][0]
    assert gpu["samples"] == 0 and gpu["sm_clock_mhz_median"] is None and gpu["reason"].startswith("no sample")
    assert board.inits == board.shutdowns == 2


@pytest.mark.parametrize("fail", ["nvml", "other"])
def test_a_failing_clock_read_never_fails_the_window_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                                   fail: str) -> None:
    board = ScriptedBoard([(1410, 699_000, 0x4)], fail=fail)
    monkeypatch.setitem(sys.modules, "pynvml", scripted_pynvml(board))
    with measured_window(_ctx((0,))) as out:
        time.sleep(0.35)
    clocks = out["window"].gpu_clocks
    if fail == "nvml":  # every read refused: samples without a clock, and the reason
        gpu = clocks["gpus"][0]
        assert gpu["sm_clock_mhz_median"] is None and gpu["reason"].startswith("NVML gave no SM clock")
    else:  # another error ends the sampling; the window's other figures stand
        assert clocks["gpus"] is None and "driver returned garbage" in clocks["reason"]
    assert board.inits == board.shutdowns == 1


def test_a_sampler_that_fails_at_its_end_never_fails_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    board = ScriptedBoard([(1410, 699_000, 0x4)], shutdown_error=True)
    monkeypatch.setitem(sys.modules, "pynvml", scripted_pynvml(board))
    with measured_window(_ctx((0,))) as out:
        pass
    assert out["window"].gpu_clocks["gpus"] is None
    assert "shutdown failed oddly" in out["window"].gpu_clocks["reason"]


def test_without_pynvml_the_window_runs_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    with sample_clocks([0]) as out:
        pass
    assert out["gpu_clocks"]["gpus"] is None and "pynvml not installed" in out["gpu_clocks"]["reason"]
    with pytest.raises(ValueError, match="the phase failed") as err, sample_clocks([0]):
        raise ValueError("the phase failed")
    assert err.value.__context__ is None  # not shown as raised while handling the missing pynvml


def test_a_window_that_fails_stops_the_sampler_and_closes_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    board = ScriptedBoard([(1455, 697_000, 0x4)])
    monkeypatch.setitem(sys.modules, "pynvml", scripted_pynvml(board))
    with pytest.raises(ValueError, match="the phase failed"), sample_clocks([0]) as out:
        raise ValueError("the phase failed")
    assert "gpu_clocks" not in out and board.inits == board.shutdowns == 1
    assert not any(t.name == "nvml-clock-sampler" for t in threading.enumerate())


def _ctx(nvml_indices: tuple[int, ...]) -> PhaseContext:
    return PhaseContext("tiny-fp32", "cpu", Workload(min_rounds=1), None, None, 32, 32, {}, "cpu", lambda: None,
                        nvml_indices=nvml_indices)


def test_a_phase_window_on_a_gpu_carries_its_clocks_into_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    board = ScriptedBoard([(1455, 697_000, 0x4)])
    monkeypatch.setitem(sys.modules, "pynvml", scripted_pynvml(board))
    with measured_window(_ctx((0,))) as out:
        time.sleep(0.35)  # three or more of the sampler's 0.1 s samples
    window: Window = out["window"]
    assert window.to_dict()["gpu_clocks"]["gpus"][0]["sm_clock_mhz_median"] == 1455.0
    with measured_window(_ctx(())) as out:  # no GPU metered (a CPU run): no clocks, no key
        pass
    assert out["window"].gpu_clocks is None and "gpu_clocks" not in out["window"].to_dict()


def test_the_pass_reports_its_mfu_next_to_the_clock_it_ran_at() -> None:
    clocks: dict[str, Any] = {"interval_s": 0.1, "reason": None,
                              "gpus": [summarise_clock_samples(0, [(1455.0, 697.0, 0x4)] * 3, 1980.0, 700.0)]}
    timed = TimedPass(Rounds((0.5, 0.5, 0.5)), 1000, 999, 1000, 1, 1000, 4.0e14)
    ctx = _ctx((0,))
    section = TimedPassPhase().section(PhaseRecord("ppl_pass", timed, Window(1.5, {}, None, clocks)), ctx)
    assert section["runtime"]["mfu_sm_clock_mhz"] == 1455.0
    assert section["runtime"]["mfu_power_capped_share"] == 1.0
    cpu = TimedPassPhase().section(PhaseRecord("ppl_pass", timed, Window(1.5, {}, None)), _ctx(()))
    assert cpu["runtime"]["mfu_sm_clock_mhz"] is None and cpu["runtime"]["mfu_power_capped_share"] is None


@pytest.mark.gpu
def test_the_sampler_on_a_real_gpu_reads_the_clock_its_work_ran_at() -> None:
    """On the device: matmuls for about 2 s under the sampler give samples at the thread's rate, a clock no higher
    than the GPU's maximum, and the same median the reasons' shares were taken from."""
    import torch

    a = torch.randn(8192, 8192, device="cuda:0", dtype=torch.bfloat16)
    with sample_clocks([0]) as out:  # NVML's GPU 0: the one GPU of the device machine
        end = time.perf_counter() + 2.0
        while time.perf_counter() < end:
            a @ a
            torch.cuda.synchronize()
    clocks = out["gpu_clocks"]
    assert clocks["reason"] is None, clocks["reason"]
    gpu = clocks["gpus"][0]
    assert gpu["samples"] >= 15  # 2 s at 0.1 s: about 20 (no reading is taken at the edges)
    assert 0 < gpu["sm_clock_mhz_min"] <= gpu["sm_clock_mhz_median"] <= gpu["sm_clock_mhz_max"]
    assert gpu["sm_clock_mhz_max"] <= gpu["max_sm_clock_mhz"]
    assert gpu["power_w_median"] > 0 and gpu["reasons_share"] is not None
