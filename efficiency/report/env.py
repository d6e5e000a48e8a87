"""The environment a run was measured in: code version, packages, machine, device and its power state, and how
busy the machine was (:func:`load_snapshot`, :func:`busy_warning`)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from efficiency import defaults

# the kernels a case runs depend on the quantisation libraries' versions too (torchao 0.18 changed int8wo's CPU
# matmul; docs/results.md section 5k), so they are recorded with the rest
PACKAGES = ("pytest-efficiency", "torch", "transformers", "bitsandbytes", "torchao", "gemlite", "triton",
            "accelerate", "gguf", "datasets", "lm-eval", "nvidia-ml-py", "pytest", "pytest-benchmark", "numpy")


def git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = bool(status) if status is not None else None
    return {"commit": commit, "dirty": dirty, "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's brand string from py-cpuinfo; /proc/cpuinfo or platform when it is not installed."""
    try:
        import cpuinfo

        brand = cpuinfo.get_cpu_info().get("brand_raw")
        if brand:
            return str(brand)
    except Exception:  # py-cpuinfo missing or failing on an unusual machine: fall back
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    """Device name, CUDA version and (through NVML) driver, power limit, clocks and temperature."""
    info: dict[str, Any] = {"device": device}
    if device.startswith("cuda"):
        import torch

        from efficiency.measure.energy import power_state

        index = torch.device(device).index or 0
        info.update(name=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(index))))
        info["power_state"] = power_state([index])
    else:
        info["name"] = cpu_name()
    return info


OTHER_BUSY_PCT = 5.0  # a process using more than this share of one CPU counts as busy
CPU_SAMPLE_S = 0.2


def load_snapshot() -> dict[str, Any]:
    """How busy the machine is now: load average, this process's threads (and torch's when torch is imported),
    and the other processes using the CPU (psutil, sampled over CPU_SAMPLE_S). Missing figures are None with
    the reason."""
    snap: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        one, five, fifteen = os.getloadavg()
        snap["load_avg"] = {"1m": one, "5m": five, "15m": fifteen}
    except (AttributeError, OSError):
        snap["load_avg"] = None
    torch = sys.modules.get("torch")
    snap["torch_threads"] = torch.get_num_threads() if torch is not None else None
    try:
        import psutil
    except ImportError:
        snap.update(process_threads=None, other_busy_processes=None, other_cpu_pct=None,
                    reason="psutil is not installed")
        return snap
    me = psutil.Process()
    snap["process_threads"] = me.num_threads()
    procs = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid == me.pid:
            continue
        try:
            proc.cpu_percent(None)
            procs.append(proc)
        except (psutil.Error, OSError):
            continue
    import time

    time.sleep(CPU_SAMPLE_S)
    busy: list[dict[str, Any]] = []
    total = 0.0
    for proc in procs:
        try:
            pct = proc.cpu_percent(None)
        except (psutil.Error, OSError):
            continue
        total += pct
        if pct > OTHER_BUSY_PCT:
            busy.append({"pid": proc.pid, "name": proc.info.get("name"), "cpu_pct": round(pct, 1)})
    snap["other_busy_processes"] = len(busy)
    snap["other_cpu_pct"] = round(total, 1)  # percent of one CPU, summed over the other processes
    snap["busiest"] = sorted(busy, key=lambda p: -p["cpu_pct"])[:5]
    return snap


def busy_warning(snapshot: dict[str, Any]) -> str | None:
    """One line when other work competed for the CPU while measuring (runtimes are then not comparable)."""
    cpus = snapshot.get("cpu_count") or 1
    reasons = []
    other = snapshot.get("other_cpu_pct")
    if other is not None and other > defaults.BUSY_OTHER_CPU_PCT:
        reasons.append(f"other processes used {other:.0f}% of a CPU ({snapshot.get('other_busy_processes')} busy)")
    load = (snapshot.get("load_avg") or {}).get("1m")
    own = (snapshot.get("torch_threads") or 1)
    if load is not None and other is None and load - own > defaults.BUSY_LOAD_PER_CPU * cpus:
        reasons.append(f"load average {load:.1f} on {cpus} CPUs")
    if not reasons:
        return None
    return "machine busy while measuring: " + "; ".join(reasons) + " (runtimes and energy may not be comparable)"


def capture(root: Path, device: str) -> dict[str, Any]:
    try:
        load = load_snapshot()
    except Exception as err:  # a report must still be written when the machine cannot be inspected
        load = {"error": f"{type(err).__name__}: {err}"}
    return {
        "git": git_state(root),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": _safe_device_info(device),
        "load": load,
    }


def _safe_device_info(device: str) -> dict[str, Any]:
    try:
        return device_info(device)
    except Exception as err:  # a report must still be written when the device cannot be queried
        return {"device": device, "error": f"{type(err).__name__}: {err}"}
