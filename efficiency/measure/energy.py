"""Energy meters with explicit windows: NVML for NVIDIA GPUs (nvml.py), RAPL for CPUs (rapl.py), a null meter
otherwise; which ones a run uses is chosen in one place (meters.py). This module re-exports the public names.

The sample, the meter protocol, the window and the reading rules live in sample.py (so that nvml.py and rapl.py
import without this module: no import cycle). A meter never reports a silent zero: unavailable energy is `None`
plus a reason. Every sample carries its method, window length and an uncertainty (docs/measurement.md).

Importing this module does not import torch or pynvml; pynvml is imported when a GPU meter is used.
"""

from __future__ import annotations

from efficiency.measure.gpustate import power_state
from efficiency.measure.nvml import NvmlEnergyMeter, NvmlPowerSamplingMeter, select_gpu_meter
from efficiency.measure.rapl import RaplMeter, select_cpu_meter
from efficiency.measure.sample import (
    MAX_CPU_PACKAGE_POWER_W,
    MAX_GPU_POWER_W,
    NVML_UPDATE_PERIOD_S,
    POWERCAP_ROOT,
    RAPL_COUNT_RESOLUTION_J,
    RAPL_UPDATE_PERIOD_S,
    Clock,
    EnergySample,
    EnergyWindow,
    Meter,
    NullMeter,
    counter_uncertainty_j,
    measure_energy,
)

__all__ = [
    "MAX_CPU_PACKAGE_POWER_W", "MAX_GPU_POWER_W", "NVML_UPDATE_PERIOD_S", "RAPL_COUNT_RESOLUTION_J",
    "RAPL_UPDATE_PERIOD_S", "POWERCAP_ROOT", "Clock", "EnergySample", "EnergyWindow", "Meter", "NullMeter",
    "NvmlEnergyMeter", "NvmlPowerSamplingMeter", "RaplMeter", "counter_uncertainty_j", "measure_energy",
    "power_state", "select_cpu_meter", "select_gpu_meter",
]
