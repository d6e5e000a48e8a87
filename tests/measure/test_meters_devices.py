"""Meters and peak memory for scale-out (issue 13), on fake pynvml / torch objects: a model split across GPUs is
metered over exactly its GPUs (each mapped by PCI bus id), the CPU package counter is shared (null with the
reason) under concurrent xdist workers, and peak memory is reported per GPU."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from test_meters import ConstantMeter, cuda_pci_bus_id, fake_nvml, fake_torch, no_rapl  # noqa: F401

from efficiency.measure import meters as meters_mod
from efficiency.measure.meters import SharedMeter, select_meters
from efficiency.measure.nvml import NvmlEnergyMeter
from efficiency.measure.sample import NullMeter


def test_a_split_model_is_metered_on_exactly_its_gpus(monkeypatch: pytest.MonkeyPatch,
                                                      no_rapl: None) -> None:  # noqa: F811
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(mig={1}))
    torch = fake_torch([3, 2, 0])  # CUDA_VISIBLE_DEVICES=3,2,0: cuda:0 and cuda:1 are NVML 3 and 2
    env = {"CUDA_VISIBLE_DEVICES": "3,2,0"}
    ms = select_meters("cuda", bus_id_of=lambda i: cuda_pci_bus_id(i, torch), environ=env, ordinals=(0, 1))
    assert isinstance(ms.gpu, NvmlEnergyMeter) and ms.gpu.indices == (3, 2)
    assert ms.nvml_indices == (3, 2) and [m.cuda_index for m in ms.mappings] == [0, 1]
    assert ms.primary is ms.gpu


def test_one_unmapped_gpu_of_a_split_model_nulls_the_sum(monkeypatch: pytest.MonkeyPatch,
                                                         no_rapl: None) -> None:  # noqa: F811
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    buses = {0: "00000000:18:00.0", 1: "00000000:99:00.0"}  # NVML knows no GPU at the second bus id
    ms = select_meters("cuda", bus_id_of=buses.get, environ={}, ordinals=(0, 1))
    assert isinstance(ms.gpu, NullMeter)
    assert "cuda:1" in ms.gpu.reason and "partial" in ms.gpu.reason


def test_cpu_package_energy_is_shared_under_concurrent_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meters_mod, "select_cpu_meter", ConstantMeter)
    alone = select_meters("cpu", environ={"PYTEST_XDIST_WORKER_COUNT": "1"})
    assert isinstance(alone.cpu, ConstantMeter)
    ms = select_meters("cpu", environ={"PYTEST_XDIST_WORKER_COUNT": "2"})
    assert isinstance(ms.cpu, SharedMeter) and ms.primary is ms.cpu
    ms.cpu.begin()
    sample = ms.cpu.end()
    assert sample.energy_j is None and sample.reason is not None
    assert "shared by 2 concurrent pytest-xdist workers" in sample.reason and "40.000 J" in sample.reason
    assert sample.method == "fake(shared)"


def test_peak_memory_per_gpu_of_the_case() -> None:
    from efficiency.measure.memory import PeakMemory, cuda_peaks, tracked_devices

    assert tracked_devices("cuda:0") == ("cuda:0",)
    assert tracked_devices("cuda", ["cuda:0", "cuda:1"]) == ("cuda:0", "cuda:1")
    assert tracked_devices("cuda") == ("cuda",)
    peaks = {0: 7 * 2**30, 1: 5 * 2**30}
    fake: Any = types.SimpleNamespace(
        device=lambda d: d, cuda=types.SimpleNamespace(current_device=lambda: 0,
                                                       max_memory_allocated=lambda d: peaks[int(d[-1]) if ":" in d
                                                                                            else 0]))
    assert cuda_peaks(["cuda:0", "cuda:1"], fake) == {"cuda:0": 7 * 2**30, "cuda:1": 5 * 2**30}
    assert cuda_peaks(["cuda"], fake) == {"cuda:0": 7 * 2**30}  # the current device, named by its ordinal
    d = PeakMemory(12 * 2**30, "m", peak_bytes_by_device={"cuda:0": 7 * 2**30, "cuda:1": 5 * 2**30}).to_dict()
    assert d["peak_bytes_by_device"] == {"cuda:0": 7 * 2**30, "cuda:1": 5 * 2**30}
    assert PeakMemory().to_dict()["peak_bytes_by_device"] is None  # CPU runs: no per-GPU figures
