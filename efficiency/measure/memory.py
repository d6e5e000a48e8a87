"""Model size, parameter count (quantised layers counted correctly) and peak memory of a measurement."""

from __future__ import annotations

import ctypes
import math
import resource
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


def _quant_state_tensors(param: Any) -> list[torch.Tensor]:
    """Tensors a bitsandbytes parameter keeps beside its data: a 4-bit weight's absmax, code and nested state,
    an 8-bit weight's per-row scales (``SCB``)."""
    found = [t for t in (getattr(param, "SCB", None),) if isinstance(t, torch.Tensor)]
    state = getattr(param, "quant_state", None)
    if state is None:
        return found
    found += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        more = (getattr(nested, "absmax", None), getattr(nested, "code", None))
        found += [t for t in more if isinstance(t, torch.Tensor)]
    return found


def parameters_as_used(model: torch.nn.Module) -> list[Any]:
    """Each weight of ``model`` once, as its layers use it. A parametrized weight (``torch.nn.utils.parametrize``:
    ``compile`` passes torchao's quantised weights to the compiled graphs as their plain inner tensors,
    efficiency.techniques.unwrap.unwrap_weight_subclasses) is the tensor its module computes from its originals
    (torchao's tensor again), not the originals, so that sizes and weight bytes are counted as before the unwrap.
    Tied weights appear once; the order is not meaningful."""
    from torch.nn.utils import parametrize

    used: list[Any] = []
    originals: set[int] = set()
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        parametrizations: Any = module.parametrizations  # a ModuleDict: weight name -> its ParametrizationList
        for name, parametrization in parametrizations.items():
            originals.update(id(p) for p in parametrization.parameters())
            used.append(getattr(module, name))
    used += [p for p in model.parameters() if id(p) not in originals]  # parameters() lists a tied weight once
    return used


SEMI_STRUCTURED_PARTS = ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")


def _semi_structured_bytes(param: Any) -> int | None:
    """Bytes of a PyTorch 2:4 semi-structured tensor as stored (kept values + metadata), None for others."""
    data = getattr(param, "data", param)
    if not type(data).__name__.startswith("SparseSemiStructuredTensor"):
        return None
    parts = [getattr(data, name, None) for name in SEMI_STRUCTURED_PARTS]
    return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))


def _is_wrapper_subclass(param: Any) -> bool:
    """A tensor subclass that stores its data in inner tensors (torchao's Int8Tensor, Int4TilePackedTo4dTensor ...),
    other than PyTorch's 2:4 sparse tensors (counted by :func:`_semi_structured_bytes`)."""
    data = getattr(param, "data", param)
    return hasattr(type(data), "__tensor_flatten__") and _semi_structured_bytes(param) is None


def logical_numel(param: Any) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit parameter packs two in a byte."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)  # packed 4-bit data holds two weights per byte
    return int(param.numel())


def stored_bytes(t: Any) -> int:
    """Bytes a tensor occupies as stored: for tensor subclasses (torchao's quantised tensors), the sum of their
    inner tensors (``__tensor_flatten__``), so packed 4-bit weights count 4 bits, not the logical dtype."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    return int(t.numel() * t.element_size())


def stored_parameter_bytes(param: Any) -> int:
    """Bytes a weight occupies as stored, with what its kernel reads beside it: a torchao tensor's inner tensors,
    a 2:4 sparse tensor's kept values and metadata, a bitsandbytes weight's packed data and quantisation state.
    The one count behind a model's size and the weight bytes its decode reads."""
    if _is_wrapper_subclass(param):
        return stored_bytes(param)
    sparse_bytes = _semi_structured_bytes(param)
    if sparse_bytes is not None:
        return sparse_bytes
    return int(param.numel() * param.element_size()) + sum(t.numel() * t.element_size()
                                                            for t in _quant_state_tensors(param))


@dataclass(frozen=True)
class SizeResult:
    parameters: int  # logical weights (a 4-bit weight counts as one)
    size_bytes: int  # bytes of parameters + buffers + quantisation state as stored
    nonzero_parameters: int

    def to_dict(self) -> dict[str, int]:
        return {"parameters": self.parameters, "size_bytes": self.size_bytes,
                "nonzero_parameters": self.nonzero_parameters}


def model_size(model: torch.nn.Module) -> SizeResult:
    params = 0
    nbytes = 0
    nonzero = 0
    for p in parameters_as_used(model):  # tied weights (embedding = LM head) once
        params += logical_numel(p)
        nbytes += stored_parameter_bytes(p)
        if _is_wrapper_subclass(p):  # torchao's quantised tensors: sparsity is not visible in packed data
            nonzero += int(p.numel())
        elif _semi_structured_bytes(p) is not None:  # 2:4 sparse kernels: half the values are stored
            nonzero += p.numel() // 2
        elif getattr(p, "quant_state", None) is None and p.is_floating_point():
            nonzero += int(torch.count_nonzero(p.detach()))
        else:
            nonzero += logical_numel(p)  # quantised: sparsity is not visible in packed data
    for b in model.buffers():
        nbytes += b.numel() * b.element_size()
    return SizeResult(params, nbytes, nonzero)


@dataclass
class PeakMemory:
    """Peak memory of a block. On CUDA the allocator's peak; on the CPU the peak resident set size during the
    block minus the level at its start (``peak_bytes``), with both levels beside it."""

    peak_bytes: int | None = None
    method: str = ""
    reason: str | None = None
    before_bytes: int | None = None  # CPU: RSS at the start of the block
    peak_rss_bytes: int | None = None  # CPU: highest RSS seen during the block
    # CUDA: the allocator's peak on each GPU of the case ("cuda:0" -> bytes); peak_bytes is their sum
    peak_bytes_by_device: dict[str, int] | None = None
    # CPU, a timed window (no exact peak): its growth in resident memory, a lower bound of its peak
    resident_growth_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "method": self.method, "reason": self.reason,
                "before_bytes": self.before_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "peak_bytes_by_device": self.peak_bytes_by_device, "resident_growth_bytes": self.resident_growth_bytes}


SAMPLE_INTERVAL_S = 0.005


def _rss_high_water_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class _RssSampler:
    """Samples this process's RSS (psutil) on a thread every SAMPLE_INTERVAL_S. A peak shorter than the
    interval is still caught when it set a new process high-water mark (ru_maxrss at the end of the block)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.before = int(self.proc.memory_info().rss)
        self.high_water_before = _rss_high_water_bytes()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="efficiency-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, int(self.proc.memory_info().rss))

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, int(self.proc.memory_info().rss))
        high_water = _rss_high_water_bytes()
        if high_water > self.high_water_before:  # the block set a new high-water mark: that is its exact peak
            self.peak = max(self.peak, high_water)


CPU_METHOD = ("process RSS sampled every 5 ms by psutil during the block (plus ru_maxrss when the block set a new "
              "high-water mark); {field} is the peak minus the RSS at the start of the block")
TRIMMED = "; before the block, the C allocator's free memory was returned to the OS (glibc malloc_trim)"
NOT_TRIMMED = ("; the C allocator's free memory could not be returned to the OS before the block (no glibc "
               "malloc_trim here): allocations it serves from memory freed earlier do not show, so the peak may "
               "read low")
TIMED_WINDOW = ("no exact peak in a timed window on the CPU: returning the C allocator's free memory first would "
                "slow the rounds after it, and without that the RSS cannot see allocations served from memory "
                "freed earlier; resident_growth_bytes is the window's growth in resident memory, a lower bound of "
                "its peak. The case's memory section is the quality pass's, measured after returning that memory")


def release_free_heap() -> bool:
    """Return the C allocator's free memory to the OS (glibc ``malloc_trim(0)``), so that what a block allocates
    raises the process's RSS. Without it, memory an earlier case freed stays resident in the allocator's heap, the
    block's allocations reuse it, and an RSS delta reads them as nothing. Only before untimed blocks: the memory
    comes back as fresh pages and the allocator's state changes; trimmed before every window, SmolLM2's bf16 CPU
    decode ran 7-12% slower, trimmed before the quality pass alone 1.7% (docs/results.md section 11). Garbage is
    collected between cases by the runner; collecting it here too cost 0.19 s per block (median of 10 collections
    in a process with the suite's modules loaded, this 2-core CPU). False where the C library has no
    ``malloc_trim`` (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def tracked_devices(device: str, gpus: Sequence[str] = ()) -> tuple[str, ...]:
    """The CUDA devices whose peaks a block on ``device`` reports: the case's GPUs when it holds several (a model
    split with --eff-device-map), else ``device``."""
    return tuple(gpus) if gpus else (device,)


def cuda_peaks(devices: Sequence[str], torch_mod: Any = torch) -> dict[str, int]:
    """The allocator's peak since the last reset on each device, by device name."""
    def name(d: str) -> str:
        return d if ":" in d else f"cuda:{torch_mod.cuda.current_device()}"

    return {name(d): int(torch_mod.cuda.max_memory_allocated(torch_mod.device(d))) for d in devices}


@contextmanager
def track_peak(device: str, gpus: Sequence[str] = (), exact_cpu_peak: bool = False) -> Iterator[PeakMemory]:
    """Peak memory of the block. CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``) on each GPU of
    the case, and their sum. CPU: the peak RSS during the block as a delta over the level before it, so the
    order of cases does not inflate it. With ``exact_cpu_peak`` (an untimed block) it starts after
    :func:`release_free_heap`, so that memory earlier cases freed does not hide its allocations; otherwise the
    allocator is left alone (a trim slows the rounds after it), ``peak_bytes`` is None with the reason, and the
    window's growth in resident memory, a lower bound, is ``resident_growth_bytes``."""
    result = PeakMemory()
    if device.startswith("cuda"):
        devices = tracked_devices(device, gpus)
        for d in devices:
            torch.cuda.synchronize(torch.device(d))
            torch.cuda.reset_peak_memory_stats(torch.device(d))
        yield result
        for d in devices:
            torch.cuda.synchronize(torch.device(d))
        result.peak_bytes_by_device = cuda_peaks(devices)
        result.peak_bytes = sum(result.peak_bytes_by_device.values())
        summed = f"; peak_bytes is the sum of the {len(devices)} GPUs' peaks (peak_bytes_by_device)"
        result.method = "torch.cuda.max_memory_allocated over the window, reset at its start" + (
            summed if devices[1:] else "")
        return
    try:
        trimmed = release_free_heap() if exact_cpu_peak else False
        sampler = _RssSampler()
    except ImportError:
        yield result
        result.reason = "psutil is not installed: no per-case CPU memory"
        result.method = "none"
        return
    with sampler:
        yield result
    result.before_bytes = sampler.before
    result.peak_rss_bytes = sampler.peak
    growth = max(0, sampler.peak - sampler.before)
    if exact_cpu_peak:
        result.peak_bytes = growth
        result.method = CPU_METHOD.format(field="peak_bytes") + (TRIMMED if trimmed else NOT_TRIMMED)
    else:
        result.resident_growth_bytes, result.reason = growth, TIMED_WINDOW
        result.method = CPU_METHOD.format(field="resident_growth_bytes")
