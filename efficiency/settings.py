"""From the edges (``[tool.efficiency]`` in pyproject.toml, environment, ``--eff-*`` options) to a SuiteConfig.

Precedence: command line > environment > pyproject > built-in defaults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from efficiency.config import ConfigError, SuiteConfig, Thresholds, Workload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULTS: dict[str, Any] = {
    "models": ["smollm2-135m"],
    "techniques": ["fp32", "bf16", "bnb8", "bnb4"],
    "gpu_techniques": ["fp16", "bf16", "bnb8", "bnb4"],
    "baseline_cpu": "fp32",
    "baseline_gpu": "fp16",
    "dataset": "wikitext2",
    "context": 1024,
    "context_cpu": 512,
    "stride": 512,
    "max_tokens_cpu": 2048,
    "max_tokens_gpu": None,
    "batch_size": 4,
    "prefill_tokens": 128,
    "decode_tokens": 16,
    "min_rounds": 3,
    "min_window_s_gpu": 10.0,
    "thresholds": {"default": 25.0},
}


def read_pyproject(root: Path) -> dict[str, Any]:
    path = root / "pyproject.toml"
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        data = tomllib.load(f)
    table = data.get("tool", {}).get("efficiency", {})
    return dict(table) if isinstance(table, dict) else {}


def split_names(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(s.strip() for s in items if s.strip()))


def parse_thresholds(table: Mapping[str, Any], cli: list[str]) -> Thresholds:
    """``cli`` entries are ``NAME=PCT`` (one technique) or ``PCT`` (the default for all)."""
    per = {str(k): float(v) for k, v in table.items() if k != "default"}
    default = float(table.get("default", DEFAULTS["thresholds"]["default"]))
    for item in cli:
        name, sep, value = item.rpartition("=")
        try:
            pct = float(value)
        except ValueError:
            raise ConfigError(f"--eff-threshold takes NAME=PCT or PCT, got {item!r}") from None
        if sep:
            per[name] = pct
        else:
            default = pct
    return Thresholds(default, per)


def resolve_device(requested: str | None) -> str:
    if requested in (None, "", "auto"):
        try:
            import torch
        except ImportError:
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    assert requested is not None
    if requested.startswith("cuda"):
        try:
            import torch
        except ImportError:
            raise ConfigError(f"--eff-device {requested}: torch is not installed") from None
        if not torch.cuda.is_available():
            raise ConfigError(f"--eff-device {requested} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use --eff-device cpu or auto")
    return requested


def _path(value: Any) -> Path | None:
    return Path(value).expanduser() if value not in (None, "") else None


def build_config(opts: Mapping[str, Any], table: Mapping[str, Any], root: Path) -> SuiteConfig:
    """``opts``: option values by name without the ``eff_`` prefix (None = not given)."""
    t = {**DEFAULTS, **table}

    def pick(name: str, fallback: Any) -> Any:
        value = opts.get(name)
        return fallback if value is None else value

    device = resolve_device(pick("device", t.get("device")))
    gpu = device.startswith("cuda")
    default_techniques = t["gpu_techniques"] if gpu else t["techniques"]
    baseline = pick("baseline", t["baseline_gpu"] if gpu else t["baseline_cpu"])
    max_tokens = pick("max_tokens", t["max_tokens_gpu"] if gpu else t["max_tokens_cpu"])
    if isinstance(max_tokens, str):
        max_tokens = None if max_tokens.lower() in ("all", "none", "0") else int(max_tokens)
    context = int(pick("context", t["context"] if gpu else t.get("context_cpu", t["context"])))
    # A default stride longer than a chosen context means "non-overlapping"; an explicit one is validated.
    stride = int(opts["stride"]) if opts.get("stride") is not None else min(int(t["stride"]), context)
    workload = Workload(
        dataset=str(pick("dataset", t["dataset"])),
        context=context,
        stride=stride,
        max_tokens=max_tokens,
        batch_size=int(pick("batch_size", t["batch_size"])),
        prefill_tokens=int(pick("prefill_tokens", t["prefill_tokens"])),
        decode_tokens=int(pick("decode_tokens", t["decode_tokens"])),
        min_rounds=int(pick("rounds", t["min_rounds"])),
        min_window_s=float(pick("min_window", t["min_window_s_gpu"] if gpu else 0.0)),
    )
    env = os.environ
    return SuiteConfig(
        models=split_names(pick("models", t["models"])),
        techniques=split_names(pick("techniques", default_techniques)),
        baseline=str(baseline),
        workload=workload,
        thresholds=parse_thresholds(t.get("thresholds", {}), list(opts.get("threshold") or [])),
        device=device,
        model_dir=_path(pick("model_dir", env.get("EFFICIENCY_MODEL_DIR") or t.get("model_dir"))),
        data_dir=_path(pick("data_dir", env.get("EFFICIENCY_DATA_DIR") or t.get("data_dir"))),
        calibration_path=_path(pick("calibration", t.get("calibration"))),
        cache_dir=_path(pick("cache_dir", env.get("EFFICIENCY_CACHE_DIR") or t.get("cache_dir")))
        or Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pytest-efficiency",
        report_path=_path(opts.get("report")),
        reports_dir=_path(pick("reports_dir", t.get("reports_dir"))) or root / "reports",
        random_weights=bool(opts.get("random_weights")),
        strict=bool(opts.get("strict")),
        compute_dtype=pick("compute_dtype", t.get("compute_dtype")),
        students={str(k): str(v) for k, v in dict(t.get("students", {})).items()},
    )
