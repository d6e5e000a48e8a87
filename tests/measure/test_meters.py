"""select_meters: CUDA ordinal -> NVML index by PCI bus id (CUDA_VISIBLE_DEVICES), MIG, the CPU fallback, and
idle power; on fake pynvml and torch objects (no GPU here)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from efficiency.measure import meters as meters_mod
from efficiency.measure.meters import (
    MIG_CAVEAT,
    CaveatMeter,
    MeterSet,
    cuda_ordinal,
    cuda_pci_bus_id,
    idle_power_w,
    map_cuda_to_nvml,
    select_meters,
)
from efficiency.measure.nvml import NvmlEnergyMeter
from efficiency.measure.sample import EnergySample, NullMeter

# Four GPUs in PCI bus order (NVML indices 0..3); the CUDA process sees only the last two, swapped.
BUSES = ["00000000:18:00.0", "00000000:3b:00.0", "00000000:86:00.0", "00000000:af:00.0"]


def fake_nvml(mig: set[int] | None = None) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801
        pass

    def by_bus(bus: str) -> int:
        if bus.lower() not in BUSES:
            raise NVMLError("Not Found")
        return BUSES.index(bus.lower())

    mod.__dict__.update(
        NVMLError=NVMLError, NVMLError_NotSupported=NVMLError_NotSupported,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: len(BUSES),
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetHandleByPciBusId=by_bus,
        nvmlDeviceGetIndex=lambda h: h, nvmlDeviceGetTotalEnergyConsumption=lambda h: 1000,
        nvmlDeviceGetPowerUsage=lambda h: 100_000,
        nvmlDeviceGetMigMode=lambda h: (1, 1) if h in (mig or set()) else (0, 0),
    )
    return mod


def fake_torch(visible: list[int]) -> Any:
    """torch whose CUDA ordinal i is physical GPU visible[i] (what CUDA_VISIBLE_DEVICES does)."""

    def props(i: int) -> Any:
        domain, bus, dev = BUSES[visible[i]].split(":")
        return types.SimpleNamespace(pci_domain_id=int(domain, 16), pci_bus_id=int(bus, 16),
                                     pci_device_id=int(dev.split(".")[0], 16))

    cuda = types.SimpleNamespace(get_device_properties=props, current_device=lambda: 1)
    return types.SimpleNamespace(cuda=cuda)


@pytest.fixture
def no_rapl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from efficiency.measure import rapl

    monkeypatch.setattr(meters_mod, "select_cpu_meter", lambda: rapl.select_cpu_meter(tmp_path / "none"))


def test_pci_bus_id_in_nvml_format() -> None:
    assert cuda_pci_bus_id(0, fake_torch([2, 3])) == "00000000:86:00.0"
    assert cuda_ordinal("cuda:3") == 3
    assert cuda_ordinal("cuda", fake_torch([0])) == 1


def test_cuda_ordinal_maps_to_nvml_index_by_bus_id_under_visible_devices(
    monkeypatch: pytest.MonkeyPatch, no_rapl: None
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    torch = fake_torch([3, 2])  # CUDA_VISIBLE_DEVICES=3,2
    env = {"CUDA_VISIBLE_DEVICES": "3,2"}
    ms = select_meters("cuda:0", bus_id_of=lambda i: cuda_pci_bus_id(i, torch), environ=env)
    assert isinstance(ms.gpu, NvmlEnergyMeter) and ms.gpu.indices == (3,)  # not NVML index 0
    assert ms.primary is ms.gpu and ms.nvml_indices == (3,)
    assert ms.gpu_mapping is not None and ms.gpu_mapping.how == "pci-bus-id"
    ms1 = select_meters("cuda:1", bus_id_of=lambda i: cuda_pci_bus_id(i, torch), environ=env)
    assert ms1.nvml_indices == (2,)


def test_no_bus_id_with_hidden_devices_is_not_metered(monkeypatch: pytest.MonkeyPatch, no_rapl: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    ms = select_meters("cuda:0", bus_id_of=lambda i: None, environ={"CUDA_VISIBLE_DEVICES": "2"})
    assert isinstance(ms.gpu, NullMeter) and "CUDA_VISIBLE_DEVICES" in ms.gpu.reason
    # nothing hidden: the ordinal is the NVML index
    ms = select_meters("cuda:1", bus_id_of=lambda i: None, environ={})
    assert ms.nvml_indices == (1,) and ms.gpu_mapping is not None and ms.gpu_mapping.how == "ordinal"


def test_unknown_bus_id_gives_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    m = map_cuda_to_nvml(0, "00000000:99:00.0", {})
    assert m.nvml_index is None and m.reason is not None and "99:00.0" in m.reason


def test_mig_is_detected_and_every_sample_says_whole_gpu(monkeypatch: pytest.MonkeyPatch, no_rapl: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(mig={2}))
    torch = fake_torch([2])
    ms = select_meters("cuda:0", bus_id_of=lambda i: cuda_pci_bus_id(i, torch), environ={})
    assert ms.gpu_mapping is not None and ms.gpu_mapping.mig is True
    assert isinstance(ms.gpu, CaveatMeter) and ms.gpu.domains == ("gpu:2(mig:whole-gpu)",)
    assert ms.notes == (MIG_CAVEAT,)
    ms.gpu.begin()
    sample = ms.gpu.end()
    assert sample.reason is not None and "MIG" in sample.reason and "whole GPU" in sample.reason


def test_cpu_run_primary_is_the_cpu_meter(no_rapl: None) -> None:
    ms = select_meters("cpu")
    assert isinstance(ms.gpu, NullMeter) and ms.primary is ms.cpu and ms.nvml_indices == ()


def test_pynvml_missing_gpu_not_metered(monkeypatch: pytest.MonkeyPatch, no_rapl: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    ms = select_meters("cuda:0", bus_id_of=lambda i: "00000000:18:00.0", environ={})
    assert isinstance(ms.gpu, NullMeter) and "pynvml" in ms.gpu.reason


class ConstantMeter:
    method, domains = "fake", ("x",)

    def __init__(self) -> None:
        self.t = 0.0

    def begin(self) -> None:
        self.t = 0.0

    def end(self) -> EnergySample:
        return EnergySample(40.0, 2.0, self.method, 0.4, self.domains)

    def cancel(self) -> None:
        pass


def test_idle_power_is_mean_power_of_the_primary_meter() -> None:
    meter = ConstantMeter()
    ms = MeterSet("cuda:0", meter, NullMeter("no rapl"), meter)
    slept: list[float] = []
    idle = idle_power_w(ms, 2.0, sleep=slept.append)
    assert slept == [2.0] and idle.power_w == pytest.approx(20.0) and idle.uncertainty_w == pytest.approx(0.2)


def test_idle_power_without_a_meter_is_none_with_reason(no_rapl: None) -> None:
    idle = idle_power_w(select_meters("cpu"), 5.0, sleep=lambda s: pytest.fail("must not sleep"))
    assert idle.power_w is None and idle.reason is not None and "powercap" in idle.reason
