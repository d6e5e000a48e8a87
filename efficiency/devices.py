"""Where a run's cases execute when there is more than one GPU: one GPU (or GPU group) per pytest-xdist worker
(``--eff-devices``), and one model split across the GPUs a process sees (``--eff-device-map``).

Pure decisions only (no torch at import, no pytest): the plugin and the runner call them.

``--eff-devices cuda:0,cuda:1`` pins worker ``gw0`` to the first entry, ``gw1`` to the second, ... through the
worker's ``CUDA_VISIBLE_DEVICES`` (set in the worker process before anything imports torch: pytest-xdist's
``--tx popen//env:CUDA_VISIBLE_DEVICES=N`` spec). Ordinals are the controller's CUDA ordinals, so they are read
through the controller's own ``CUDA_VISIBLE_DEVICES`` (``CUDA_VISIBLE_DEVICES=2,3`` and ``cuda:1`` pin to
physical GPU ``3``). An entry may be a GPU group ``cuda:0+cuda:1`` (a worker that splits each model across two
GPUs with ``--eff-device-map``), or ``cpu`` (a worker that sees no GPU: CPU runs, and tests without CUDA).
A GPU in two entries would run two measured cases on one GPU at once: refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from efficiency.errors import ConfigError

DEVICE_MAP_MODES = ("auto", "balanced")  # accelerate / transformers device_map strategies we offer
# Share of each GPU's free memory left out of ``max_memory`` when a model is split: room for the activations
# of the perplexity pass (accelerate otherwise fills the first GPUs to the brim).
DEVICE_MAP_HEADROOM_FRACTION = 0.10
ENV = "CUDA_VISIBLE_DEVICES"
SHARED_CPU_REASON = ("CPU package energy (RAPL) is shared by {n} concurrent pytest-xdist workers: it cannot be "
                     "attributed to one case")


@dataclass(frozen=True)
class Slot:
    """One ``--eff-devices`` entry: the devices one worker gets. ``ordinals`` are the controller's CUDA
    ordinals; empty for a ``cpu`` entry."""

    entry: str
    ordinals: tuple[int, ...]

    @property
    def is_cpu(self) -> bool:
        return not self.ordinals


@dataclass(frozen=True)
class Assignment:
    """What one worker runs on: its ``CUDA_VISIBLE_DEVICES`` value and the device its cases use there."""

    worker: str  # gw0, gw1, ...
    entry: str  # the --eff-devices entry
    cuda_visible_devices: str  # "" hides every GPU
    device: str  # "cpu", "cuda:0" (one GPU) or "cuda" (a GPU group: the model is split over all it sees)

    def to_dict(self) -> dict[str, str]:
        return {"worker": self.worker, "entry": self.entry, "cuda_visible_devices": self.cuda_visible_devices,
                "device": self.device}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Assignment:
        return cls(str(d["worker"]), str(d["entry"]), str(d["cuda_visible_devices"]), str(d["device"]))


def _ordinal(item: str, entry: str) -> int:
    kind, _, index = item.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise ConfigError(f"--eff-devices: {entry!r} is not cpu, cuda:N or a group cuda:N+cuda:M")
    return int(index)


def parse_devices(value: str, visible_gpus: Callable[[], int] | None = None) -> tuple[Slot, ...]:
    """``auto`` (one slot per visible GPU, counted by ``visible_gpus``) or a comma-separated list of ``cpu``,
    ``cuda:N`` and ``cuda:N+cuda:M`` entries. A GPU in two entries, mixed cpu and GPU entries, or an empty list
    are usage errors."""
    text = value.strip()
    if text == "auto":
        count = visible_gpus() if visible_gpus is not None else _visible_gpu_count()
        if count < 1:
            raise ConfigError("--eff-devices auto: no CUDA GPU is visible here (use cpu entries to test on the CPU)")
        return tuple(Slot(f"cuda:{i}", (i,)) for i in range(count))
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ConfigError("--eff-devices needs 'auto' or a list such as cuda:0,cuda:1")
    slots = [Slot(e, ()) if e == "cpu" else Slot(e, tuple(_ordinal(i.strip(), e) for i in e.split("+")))
             for e in entries]
    if len({s.is_cpu for s in slots}) > 1:
        raise ConfigError("--eff-devices mixes cpu and GPU entries: the workers would measure with different "
                          "workload defaults; use only GPU entries or only cpu")
    seen: dict[int, str] = {}
    for s in slots:
        for i in s.ordinals:
            if i in seen:
                raise ConfigError(f"--eff-devices: cuda:{i} is in {seen[i]!r} and {s.entry!r}: two measured cases "
                                  "would share one GPU at the same time")
            seen[i] = s.entry
    return tuple(slots)


def _visible_gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def physical_ids(ordinals: Iterable[int], parent_visible: str | None) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` items of the controller's CUDA ordinals: the parent's own list read by index
    when it has one (indices, UUIDs or MIG ids), else the ordinals themselves."""
    ordinals = list(ordinals)
    if parent_visible is None or not parent_visible.strip():
        return [str(i) for i in ordinals]
    items = [x.strip() for x in parent_visible.split(",") if x.strip()]
    outside = [i for i in ordinals if i >= len(items)]
    if outside:
        raise ConfigError(f"--eff-devices: cuda:{outside[0]} does not exist: {ENV}={parent_visible!r} makes "
                          f"{len(items)} GPU(s) visible (cuda:0 to cuda:{len(items) - 1})")
    return [items[i] for i in ordinals]


def plan(slots: tuple[Slot, ...], workers: int, environ: Mapping[str, str] | None = None) -> list[Assignment]:
    """Worker ``gw{i}`` gets slot ``i``. More workers than slots would put two workers on one device: refused."""
    env = os.environ if environ is None else environ
    if workers < 1:
        raise ConfigError("--eff-devices pins pytest-xdist workers to devices: give -n N (N >= 1) as well")
    if workers > len(slots):
        raise ConfigError(f"-n {workers} workers but --eff-devices gives {len(slots)} device entr"
                          f"{'y' if len(slots) == 1 else 'ies'} ({','.join(s.entry for s in slots)}): two workers "
                          f"would measure on one device at the same time; use -n {len(slots)} or fewer")
    parent = env.get(ENV)
    out = []
    for i, s in enumerate(slots[:workers]):
        visible = ",".join(physical_ids(s.ordinals, parent))
        device = "cpu" if s.is_cpu else ("cuda:0" if len(s.ordinals) == 1 else "cuda")
        out.append(Assignment(f"gw{i}", s.entry, visible, device))
    return out


def controller_device(slots: tuple[Slot, ...]) -> str:
    """The device the controller's settings name (workload defaults for GPU or CPU; it measures nothing)."""
    return "cpu" if slots[0].is_cpu else "cuda"


def pinned_tx(tx: list[str], assignments: list[Assignment]) -> list[str]:
    """pytest-xdist's worker specs with each worker's ``CUDA_VISIBLE_DEVICES`` added (execnet sets it in the new
    process before pytest, conftest files or torch are imported). ``tx`` has one spec per worker."""
    if len(tx) != len(assignments):
        raise ConfigError(f"--eff-devices: {len(tx)} pytest-xdist worker specs for {len(assignments)} devices")
    out = []
    for spec, a in zip(tx, assignments, strict=True):
        if f"env:{ENV}=" in spec:
            raise ConfigError(f"--tx {spec!r} sets {ENV} itself; --eff-devices sets it per worker")
        out.append(f"{spec}//env:{ENV}={a.cuda_visible_devices}")
    return out


def required_dist(dist: str) -> str:
    """``--eff-devices`` keeps one model's cases on one worker (its baseline measured once, on the GPU its
    technique cases use): xdist's default ``load`` becomes ``loadgroup``; other modes are refused."""
    if dist in ("load", "loadgroup"):
        return "loadgroup"
    raise ConfigError(f"--eff-devices needs --dist loadgroup (one model's cases on one worker, its baseline measured "
                      f"once); got --dist {dist}")


def assignment_for_env(assignments: list[Assignment], visible: str | None) -> Assignment | None:
    """The assignment whose ``CUDA_VISIBLE_DEVICES`` a worker spec carries (a restarted worker gets a new id but
    its spec, hence its device, is the same)."""
    return next((a for a in assignments if visible is not None and a.cuda_visible_devices == visible), None)


def worker_count(environ: Mapping[str, str] | None = None) -> int:
    """Concurrent pytest-xdist workers of this run (1 outside xdist)."""
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        return 1


# --- a model split across GPUs (--eff-device-map) -------------------------------------------------------

def model_gpus(model: Any) -> tuple[int, ...]:
    """CUDA ordinals (this process's numbering) that hold part of a model dispatched with a device map, from
    ``hf_device_map``; () for a model that was not split."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return ()
    return placement_gpus(device_map)


def placement_gpus(device_map: Mapping[str, Any]) -> tuple[int, ...]:
    gpus: set[int] = set()
    for where in device_map.values():
        if isinstance(where, int) and not isinstance(where, bool):
            gpus.add(where)
        elif isinstance(where, str) and where.startswith("cuda"):
            _, _, index = where.partition(":")
            gpus.add(int(index) if index else 0)
    return tuple(sorted(gpus))


def offloaded_modules(device_map: Mapping[str, Any]) -> list[str]:
    """Modules a device map put on the CPU or disk (accelerate offload): not a GPU measurement."""
    return [name for name, where in device_map.items() if where in ("cpu", "disk")]


# Technique steps verified to keep a split model's placement (they only cast dtypes in place).
SPLIT_SAFE_STEPS = ("fp32", "fp16", "bf16")
_SPLIT_REASONS = (
    ("bnb", "bitsandbytes quantisation here rebuilds each linear layer on the case's one device, which undoes the "
            "split"),
    ("ah", "head pruning moves the whole model to the case's one device"),
    ("mag", "magnitude pruning is not verified on a split model (2:4 kernels are placed per device)"),
    ("sparsegpt", "SparseGPT calibrates layer by layer on the case's one device"),
    ("minitron", "Minitron pruning rebuilds and retrains layers on the case's one device"),
    ("distil", "distillation trains a student on the case's one device"),
    ("torchao", "torchao quantisation is not verified on a model dispatched across GPUs"),
)


def split_unsupported(steps: Iterable[str]) -> str | None:
    """Why a pipeline (its step names) cannot run on a model split across GPUs, or None when every step can."""
    for step in steps:
        if step in SPLIT_SAFE_STEPS:
            continue
        reason = next((why for prefix, why in _SPLIT_REASONS if step.startswith(prefix)),
                      "not verified on a model split across GPUs")
        return f"{step}: cannot run on a model split across GPUs (--eff-device-map): {reason}"
    return None


def max_memory(free_bytes: Mapping[int, int], headroom: float = DEVICE_MAP_HEADROOM_FRACTION) -> dict[int, int]:
    """accelerate's ``max_memory`` for the GPUs given (no ``cpu`` key: nothing is offloaded), leaving
    ``headroom`` of each GPU's free memory for activations."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    return {i: int(free * (1 - headroom)) for i, free in free_bytes.items()}


def placement(meter_set: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Where a case ran, for its ``conditions``: the device, the xdist worker and its ``CUDA_VISIBLE_DEVICES``,
    and each metered GPU's CUDA ordinal -> NVML index mapping (energy per GPU is traceable to the board)."""
    env = os.environ if environ is None else environ
    return {"device": meter_set.device, "worker": env.get("PYTEST_XDIST_WORKER"), "workers": worker_count(env),
            "cuda_visible_devices": env.get(ENV), "gpus": [m.to_dict() for m in meter_set.mappings]}
