"""The environment a run was measured in: code version, packages, machine, device and its power state."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("pytest-efficiency", "torch", "transformers", "bitsandbytes", "accelerate", "gguf", "datasets",
            "nvidia-ml-py", "pytest", "pytest-benchmark", "numpy")


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


def cpu_name() -> str:
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


def capture(root: Path, device: str) -> dict[str, Any]:
    import os

    return {
        "git": git_state(root),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": _safe_device_info(device),
    }


def _safe_device_info(device: str) -> dict[str, Any]:
    try:
        return device_info(device)
    except Exception as err:  # a report must still be written when the device cannot be queried
        return {"device": device, "error": f"{type(err).__name__}: {err}"}
