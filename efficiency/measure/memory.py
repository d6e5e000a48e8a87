"""Model size, parameter count (quantised layers counted correctly) and peak memory of a measurement."""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


def _quant_state_tensors(param: Any) -> list[torch.Tensor]:
    """Tensors a bitsandbytes 4-bit parameter keeps beside its packed data (absmax, code, nested state)."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return []
    found = [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        more = (getattr(nested, "absmax", None), getattr(nested, "code", None))
        found += [t for t in more if isinstance(t, torch.Tensor)]
    return found


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


def _logical_numel(param: Any) -> int:
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)  # packed 4-bit data holds two weights per byte
    return int(param.numel())


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
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:  # tied weights (embedding = LM head) are stored once
            continue
        seen.add(id(p))
        params += _logical_numel(p)
        if _is_wrapper_subclass(p):  # torchao's quantised tensors: their inner tensors as stored
            from efficiency.measure.roofline import stored_bytes

            nbytes += stored_bytes(p)
            nonzero += int(p.numel())  # quantised: sparsity is not visible in packed data
            continue
        sparse_bytes = _semi_structured_bytes(p)
        if sparse_bytes is not None:  # 2:4 sparse kernels: half the values are stored, plus metadata
            nbytes += sparse_bytes
            nonzero += p.numel() // 2
            continue
        nbytes += p.numel() * p.element_size()
        nbytes += sum(t.numel() * t.element_size() for t in _quant_state_tensors(p))
        if getattr(p, "quant_state", None) is None and p.is_floating_point():
            nonzero += int(torch.count_nonzero(p.detach()))
        else:
            nonzero += _logical_numel(p)  # quantised: sparsity is not visible in packed data
    for b in model.buffers():
        nbytes += b.numel() * b.element_size()
    return SizeResult(params, nbytes, nonzero)


@dataclass
class PeakMemory:
    peak_bytes: int | None = None
    method: str = ""
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "method": self.method, "reason": self.reason}


def _rss_high_water_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


@contextmanager
def track_peak(device: str) -> Iterator[PeakMemory]:
    """Peak device memory of the block (CUDA allocator). On the CPU, the process's resident high-water mark,
    which includes everything the process held before; the report says so."""
    result = PeakMemory()
    if device.startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield result
        torch.cuda.synchronize(dev)
        result.peak_bytes = int(torch.cuda.max_memory_allocated(dev))
        result.method = "torch.cuda.max_memory_allocated over the perplexity pass"
    else:
        yield result
        result.peak_bytes = _rss_high_water_bytes()
        result.method = "process ru_maxrss (CPU high-water mark since process start, not per case)"
        result.reason = "no per-case allocator statistics on CPU"
