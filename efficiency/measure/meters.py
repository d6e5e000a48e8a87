"""The one place that chooses a run's energy meters: :func:`select_meters` (the runner and distillation both
call it), plus :func:`idle_power_w` for net-vs-gross energy.

GPU meter: the CUDA ordinal of ``device`` is mapped to the NVML index by PCI bus id. CUDA ordinals count only
the devices in ``CUDA_VISIBLE_DEVICES`` (torch applies it), in CUDA's order; NVML indices count every GPU in
PCI bus order, so the ordinal is the NVML index only when nothing is hidden or reordered. Without a PCI bus id
(old torch, or no pynvml lookup by bus id) the ordinal is used only when ``CUDA_VISIBLE_DEVICES`` is unset;
otherwise the GPU is not metered and the reason says why.

MIG: on a GPU in MIG mode NVML's energy counter and power reading are the whole GPU's (every slice and any
other tenants), not the slice's. The meter still reads it, its domain says ``gpu:N(mig:whole-gpu)`` and every
sample carries that caveat in its reason.

CPU meter: RAPL package counters where readable, else a NullMeter with the reason. Under pytest-xdist with
more than one worker the package counter also counts the other workers' cases: it is still read, but its energy
is null with the reason (:class:`SharedMeter`). ``MeterSet.primary`` is the meter whose energy the score uses:
the GPU's on a CUDA run, the CPU's otherwise.

A model split across GPUs (``--eff-device-map``) is metered over exactly the GPUs holding it: ``ordinals``
gives their CUDA ordinals; each is mapped to its NVML index and the meter sums them. If one cannot be mapped,
the sum would be partial: the GPU energy is null with the reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from efficiency.measure.gpustate import nvml_close
from efficiency.measure.nvml import select_gpu_meter
from efficiency.measure.rapl import select_cpu_meter
from efficiency.measure.sample import _PIP_HINT, EnergySample, Meter, NullMeter, measure_energy

MIG_CAVEAT = ("MIG: NVML energy and power on a MIG slice are the whole GPU's (all slices and their tenants), "
              "not this slice's")


@dataclass(frozen=True)
class GpuMapping:
    """How one CUDA ordinal was matched to an NVML index (``nvml_index`` None: not matched, see ``reason``)."""

    cuda_index: int
    nvml_index: int | None
    pci_bus_id: str | None
    how: str  # "pci-bus-id" | "ordinal" | "none"
    mig: bool = False
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"cuda_index": self.cuda_index, "nvml_index": self.nvml_index, "pci_bus_id": self.pci_bus_id,
                "how": self.how, "mig": self.mig, "reason": self.reason}


@dataclass(frozen=True)
class MeterSet:
    """The meters of one run. ``gpu`` is a NullMeter on a CPU run; ``primary`` feeds the score."""

    device: str
    gpu: Meter
    cpu: Meter
    primary: Meter
    gpu_mapping: GpuMapping | None = None
    notes: tuple[str, ...] = field(default=())
    gpu_mappings: tuple[GpuMapping, ...] = field(default=())  # every metered GPU (a split model: several)

    @property
    def mappings(self) -> tuple[GpuMapping, ...]:
        if self.gpu_mappings:
            return self.gpu_mappings
        return () if self.gpu_mapping is None else (self.gpu_mapping,)

    @property
    def nvml_indices(self) -> tuple[int, ...]:
        """NVML indices of the metered GPU(s), for :func:`efficiency.measure.gpustate.power_state`."""
        return tuple(m.nvml_index for m in self.mappings if m.nvml_index is not None)

    def all(self) -> tuple[Meter, ...]:
        return (self.gpu, self.cpu)


class CaveatMeter:
    """A meter whose samples all carry a caveat (MIG) and whose domains say so."""

    def __init__(self, inner: Meter, caveat: str, domains: tuple[str, ...]) -> None:
        self.inner, self.caveat = inner, caveat
        self.method, self.domains = inner.method, domains

    def begin(self) -> None:
        self.inner.begin()

    def end(self) -> EnergySample:
        s = self.inner.end()
        reason = f"{s.reason}; {self.caveat}" if s.reason else self.caveat
        return EnergySample(s.energy_j, s.window_s, s.method, s.uncertainty_j, self.domains, reason)

    def cancel(self) -> None:
        self.inner.cancel()


class SharedMeter:
    """A meter whose counter other processes' work also moves (the CPU package under concurrent pytest-xdist
    workers): the window is read, but the energy is not this case's, so ``energy_j`` is None and the reason
    carries the whole reading."""

    def __init__(self, inner: Meter, reason: str) -> None:
        self.inner, self.reason = inner, reason
        self.method, self.domains = f"{inner.method}(shared)", inner.domains

    def begin(self) -> None:
        self.inner.begin()

    def end(self) -> EnergySample:
        s = self.inner.end()
        whole = f"; the whole package read {s.energy_j:.3f} J over the window" if s.energy_j is not None else ""
        return EnergySample(None, s.window_s, self.method, None, self.domains, f"{self.reason}{whole}")

    def cancel(self) -> None:
        self.inner.cancel()


def cuda_ordinal(device: str, torch_mod: Any = None) -> int:
    """The CUDA ordinal of ``cuda`` / ``cuda:N`` (``cuda`` is the current device)."""
    _, _, index = device.partition(":")
    if index:
        return int(index)
    if torch_mod is None:
        import torch as torch_mod
    return int(torch_mod.cuda.current_device())


def cuda_pci_bus_id(cuda_index: int, torch_mod: Any = None) -> str | None:
    """PCI bus id (``dddddddd:bb:dd.0``, NVML's format) of a CUDA ordinal, or None when torch does not say."""
    if torch_mod is None:
        import torch as torch_mod
    props = torch_mod.cuda.get_device_properties(cuda_index)
    try:
        return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except AttributeError:
        return None


def map_cuda_to_nvml(
    cuda_index: int, bus_id: str | None, environ: Mapping[str, str] | None = None
) -> GpuMapping:
    """Match a CUDA ordinal to its NVML index by PCI bus id, and detect MIG mode on that GPU."""
    env = os.environ if environ is None else environ
    hidden = bool(env.get("CUDA_VISIBLE_DEVICES", "").strip())
    try:
        import pynvml
    except ImportError:
        return GpuMapping(cuda_index, None, bus_id, "none", reason=_PIP_HINT)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuMapping(cuda_index, None, bus_id, "none", reason=f"NVML init failed: {exc}")
    try:
        if bus_id is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
                index, how = int(pynvml.nvmlDeviceGetIndex(handle)), "pci-bus-id"
            except pynvml.NVMLError as exc:
                return GpuMapping(cuda_index, None, bus_id, "none",
                                  reason=f"NVML has no GPU at PCI bus id {bus_id}: {exc}")
        elif hidden:
            return GpuMapping(cuda_index, None, None, "none", reason=(
                "CUDA_VISIBLE_DEVICES is set and torch gives no PCI bus id for this GPU, so its NVML index "
                "is unknown (the CUDA ordinal would meter the wrong GPU); not metered"))
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
            index, how = cuda_index, "ordinal"
        try:
            mig = bool(pynvml.nvmlDeviceGetMigMode(handle)[0])
        except (AttributeError, pynvml.NVMLError):  # pre-Ampere GPUs have no MIG mode
            mig = False
        return GpuMapping(cuda_index, index, bus_id, how, mig=mig)
    except pynvml.NVMLError as exc:
        return GpuMapping(cuda_index, None, bus_id, "none", reason=f"NVML query failed: {exc}")
    finally:
        nvml_close(pynvml)


def select_meters(
    device: str,
    *,
    bus_id_of: Callable[[int], str | None] = cuda_pci_bus_id,
    environ: Mapping[str, str] | None = None,
    ordinals: Sequence[int] | None = None,
) -> MeterSet:
    """The meters of a run on ``device`` ("cpu", "cuda", "cuda:N"); the one place that picks them.
    ``ordinals``: the CUDA ordinals of a model split across GPUs (default: the device's one GPU)."""
    from efficiency.devices import SHARED_CPU_REASON, worker_count

    cpu = select_cpu_meter()
    workers = worker_count(environ)
    if workers > 1 and not isinstance(cpu, NullMeter):  # its energy section says why it is null
        cpu = SharedMeter(cpu, SHARED_CPU_REASON.format(n=workers))
    if not device.startswith("cuda"):
        return MeterSet(device, NullMeter("no GPU: the run is on the CPU"), cpu, cpu)
    ords = tuple(ordinals) if ordinals else (cuda_ordinal(device),)
    mappings = tuple(map_cuda_to_nvml(o, bus_id_of(o), environ) for o in ords)
    notes: tuple[str, ...] = ()
    gpu: Meter
    unmapped = [m for m in mappings if m.nvml_index is None]
    if unmapped:
        why = "; ".join(f"cuda:{m.cuda_index}: {m.reason}" for m in unmapped)
        partial = " (a sum over the other GPUs would be partial)" if len(mappings) > 1 else ""
        gpu = NullMeter(f"{why}{partial}")
    else:
        indices = [m.nvml_index for m in mappings if m.nvml_index is not None]
        gpu = select_gpu_meter(indices)
        if any(m.mig for m in mappings):
            gpu = CaveatMeter(gpu, MIG_CAVEAT, tuple(f"gpu:{i}(mig:whole-gpu)" for i in indices))
            notes = (*notes, MIG_CAVEAT)
    return MeterSet(device, gpu, cpu, gpu, mappings[0], notes, gpu_mappings=mappings)


@dataclass(frozen=True)
class IdlePower:
    """Mean power of the primary meter while the process sleeps: subtract ``power_w * window`` from a gross
    energy for the net energy of a workload. ``power_w`` None: not measurable, see ``reason``."""

    power_w: float | None
    uncertainty_w: float | None
    window_s: float
    method: str
    domains: tuple[str, ...]
    reason: str | None

    def to_dict(self) -> dict[str, object]:
        return {"power_w": self.power_w, "uncertainty_w": self.uncertainty_w, "window_s": self.window_s,
                "method": self.method, "domains": list(self.domains), "reason": self.reason}


def idle_power_w(meters: MeterSet, seconds: float = 5.0, *, sleep: Callable[[float], None] = time.sleep) -> IdlePower:
    """Idle power of ``meters.primary`` over ``seconds`` of sleep (nothing else of this process runs).

    Call it between cases, after the device has settled. With a NullMeter primary (CPU without RAPL) it
    returns at once with power None and the meter's reason."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    meter = meters.primary
    if isinstance(meter, NullMeter):
        return IdlePower(None, None, 0.0, meter.method, meter.domains, f"idle power not measurable: {meter.reason}")
    with measure_energy(meter, lambda: None) as window:
        sleep(seconds)
    s = window.sample
    assert s is not None
    if s.energy_j is None or s.window_s <= 0:
        return IdlePower(None, None, s.window_s, s.method, s.domains, s.reason or "no energy reading")
    u = None if s.uncertainty_j is None else s.uncertainty_j / s.window_s
    return IdlePower(s.energy_j / s.window_s, u, s.window_s, s.method, s.domains, s.reason)
