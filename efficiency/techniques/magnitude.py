"""Magnitude pruning: ``magNN`` (unstructured, NN% of each layer's weights) and ``mag-2:4`` (semi-structured).

Unstructured: in every chosen layer the ``round(p * numel)`` weights of smallest ``|w|`` are set to zero.
N:M (``mag-2:4``): in every output row, each group of M consecutive input weights keeps its N largest ``|w|``.

Only float linear layers inside the transformer blocks are touched (embeddings, LM head and the
OPT projections in/out of the blocks stay), chosen by a ``filter_fn(module, name)`` as in :mod:`bnb`.
On a CUDA GPU with compute capability >= 8.0 and fp16/bf16 weights, 2:4-pruned ``nn.Linear`` weights are
converted with ``torch.sparse.to_sparse_semi_structured`` so PyTorch's semi-structured kernels run; anywhere
else the masked weights stay dense (same numbers, no speed-up). The pruning helpers here (layer discovery,
masks, the kernel conversion) are shared with :mod:`sparsegpt` and :mod:`heads`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, register
from efficiency.techniques.bnb import FilterFn, is_conv1d

NO_SPEEDUP = "masked dense weights: no speed-up expected on this device"


@dataclass(frozen=True)
class SparsityPattern:
    """Unstructured (``sparsity`` in [0, 1)) or N:M (``n`` kept of every ``m`` consecutive input weights)."""

    sparsity: float = 0.0
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.n is None) != (self.m is None):
            raise ValueError("give both n and m for an N:M pattern")
        if self.n is not None and self.m is not None:
            if not 0 < self.n < self.m:
                raise ValueError(f"N:M needs 0 < N < M, got {self.n}:{self.m}")
        elif not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def label(self) -> str:
        """``50`` or ``2:4``, the suffix of the technique names."""
        return f"{self.n}:{self.m}" if self.is_nm else f"{round(self.sparsity * 100):02d}"

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.n is not None and self.m is not None else self.sparsity

    @classmethod
    def from_suffix(cls, percent: str | None, n: str | None, m: str | None) -> SparsityPattern:
        if n is not None and m is not None:
            return cls(n=int(n), m=int(m))
        return cls(sparsity=int(percent or 0) / 100)


# ----------------------------------------------------------------------------------------- finding the layers


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, list) of the transformer blocks: the ModuleList with ``config.num_hidden_layers``
    entries (``transformer.h`` in GPT-2, ``model.decoder.layers`` in OPT, ``model.layers`` in Llama)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and mod]
    for name, mod in lists:
        if len(mod) == n_layers:
            return name, mod
    if lists:  # no config: the longest list is the stack of blocks
        return max(lists, key=lambda item: len(item[1]))
    raise UnsupportedTechnique(f"{type(model).__name__}: no list of transformer blocks found")


def is_linear(module: nn.Module) -> bool:
    """A linear layer of any kind (including quantised subclasses of ``nn.Linear``) or a GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def block_filter(model: nn.Module) -> FilterFn:
    """The default filter: linear layers inside the transformer blocks (embeddings and LM head excluded)."""
    prefix = decoder_layers(model)[0] + "."

    def filter_fn(module: nn.Module, name: str) -> bool:
        return is_linear(module) and name.startswith(prefix)

    return filter_fn


def ensure_float_layer(module: Any, name: str, technique: str) -> None:
    """Pruning edits float weights: a quantised layer (bitsandbytes' ``Linear8bitLt`` ...) is refused."""
    exact = type(module) is nn.Linear or is_conv1d(module)
    if not exact or not module.weight.dtype.is_floating_point:
        raise UnsupportedTechnique(
            f"{technique}: layer {name} is {type(module).__name__} ({module.weight.dtype}), not a float "
            f"linear layer; prune before quantising (e.g. '{technique}+bnb8', not 'bnb8+{technique}')"
        )


def prunable_layers(model: nn.Module, filter_fn: FilterFn, technique: str) -> list[tuple[str, nn.Module]]:
    layers = [(name, mod) for name, mod in model.named_modules() if name and filter_fn(mod, name)]
    if not layers:
        raise UnsupportedTechnique(f"{technique}: the filter chose no linear layers")
    for name, mod in layers:
        ensure_float_layer(mod, name, technique)
    return layers


def weight_view(module: Any) -> torch.Tensor:
    """The weight as (out, in), a view: writing into it writes the layer (GPT-2 Conv1D stores (in, out))."""
    weight = module.weight.data
    return weight.t() if is_conv1d(module) else weight


# ---------------------------------------------------------------------------------------------------- masks


def unstructured_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = kept) that drops exactly ``round(sparsity * numel)`` entries of smallest score."""
    k = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep.view_as(scores)


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask for scores (rows, cols): in each row every group of ``m`` consecutive columns keeps its ``n``
    largest. Needs ``cols % m == 0``."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features are not a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)
    return keep.view(rows, cols)


def pattern_keep(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    if pattern.n is not None and pattern.m is not None:
        return nm_keep(scores, pattern.n, pattern.m)
    return unstructured_keep(scores, pattern.sparsity)


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if in each row of weight (out, in) every ``m`` consecutive inputs hold <= ``n`` nonzeros."""
    rows, cols = weight.shape
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(-1)
    return bool((nonzero <= n).all())


# -------------------------------------------------------------------------------------- sparse kernels (CUDA)


def semi_structured_unavailable(model: nn.Module, ctx: Context, pattern: SparsityPattern) -> str | None:
    """Why PyTorch's 2:4 kernels cannot run here, or None if they can."""
    if (pattern.n, pattern.m) != (2, 4):
        return f"{pattern.label} is not 2:4; " + NO_SPEEDUP
    if not ctx.is_cuda or not torch.cuda.is_available():
        return NO_SPEEDUP
    capability = torch.cuda.get_device_capability(ctx.device)
    if capability < (8, 0):
        return f"compute capability {capability[0]}.{capability[1]} < 8.0; " + NO_SPEEDUP
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        return f"weights are {name}, the 2:4 kernels need fp16/bf16; " + NO_SPEEDUP
    return None


def sparse_kernel_report(model: nn.Module, layers: list[tuple[str, Any]], ctx: Context, pattern: SparsityPattern,
                         semi_structured: bool) -> dict[str, Any]:
    """What the report says about kernels: N:M layers go to the 2:4 sparse kernels when asked and possible;
    otherwise the weights stay masked dense and no speed-up is expected."""
    if pattern.is_nm and semi_structured:
        return to_semi_structured(model, layers, ctx, pattern)
    return {"sparse_kernels": False, "reason": NO_SPEEDUP}


def to_semi_structured(model: nn.Module, layers: list[tuple[str, Any]], ctx: Context,
                       pattern: SparsityPattern) -> dict[str, Any]:
    """Swap 2:4-pruned ``nn.Linear`` weights for ``SparseSemiStructuredTensor`` where the device allows it.

    Running the sparse kernels is not the same as being faster: on an H100 with torch 2.11 (cuSPARSELt 0.8)
    every sparse linear cost a fixed ~0.45 ms whatever its size (dense: 0.015-0.19 ms), so a 4-layer,
    2048-wide model took 20.8 ms instead of 5.9 ms for an 8 x 512 prefill (measured 2026-11-22). The timing
    of the case shows what this build does. A later pipeline step that reads weights (``mag-2:4+bnb8``) cannot
    read swapped ones: such pipelines want ``semi_structured=False``."""
    reason = semi_structured_unavailable(model, ctx, pattern)
    if reason is not None:
        return {"sparse_kernels": False, "reason": reason}
    from torch.sparse import to_sparse_semi_structured

    converted, failed, backends = 0, {}, set()
    for name, module in layers:
        if is_conv1d(module):
            failed[name] = "GPT-2 Conv1D multiplies by the transposed weight; only nn.Linear is converted"
            continue
        try:
            sparse = to_sparse_semi_structured(module.weight.data)
            module.weight = nn.Parameter(sparse, requires_grad=False)
            converted += 1
            backends.add(type(sparse).__name__)
        except Exception as err:  # shape or dtype the kernels do not take: this layer stays dense
            failed[name] = f"{type(err).__name__}: {str(err)[:160]}"
    info: dict[str, Any] = {"sparse_kernels": converted > 0, "sparse_layers": converted,
                            "sparse_backend": sorted(backends)}
    if failed:
        info["dense_layers"] = failed
    if converted == 0:
        info["reason"] = "no layer could be converted; " + NO_SPEEDUP
    return info


def sparsity_report(layers: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    zeros = sum(int((weight_view(m) == 0).sum()) for _, m in layers)
    total = sum(weight_view(m).numel() for _, m in layers)
    return {"pruned_layers": len(layers), "weights": total, "zeros": zeros,
            "sparsity": round(zeros / total, 6)}


# ----------------------------------------------------------------------------------------------- technique


@dataclass(frozen=True)
class MagnitudePruning(TechniqueBase):
    """Zero the smallest-magnitude weights of each chosen layer (per layer; per row and group for N:M)."""

    pattern: SparsityPattern
    semi_structured: bool = True  # convert 2:4 weights for PyTorch's sparse kernels where the device allows
    preserves_layer_shapes = True  # zeroed weights, the same layers

    @property
    def name(self) -> str:
        return f"mag-{self.pattern.label}" if self.pattern.is_nm else f"mag{self.pattern.label}"

    @torch.no_grad()
    def apply(self, model: Any, ctx: Context, filter_fn: FilterFn | None = None) -> Any:
        layers = prunable_layers(model, filter_fn or block_filter(model), self.name)
        skipped: dict[str, str] = {}
        pruned: list[tuple[str, nn.Module]] = []
        for name, module in layers:
            weight = weight_view(module)  # (out, in)
            if self.pattern.m is not None and weight.shape[1] % self.pattern.m:
                skipped[name] = f"{weight.shape[1]} inputs are not a multiple of {self.pattern.m}"
                continue
            weight.mul_(pattern_keep(weight.abs().float(), self.pattern))
            pruned.append((name, module))
        if not pruned:
            raise UnsupportedTechnique(f"{self.name}: no layer has a shape this pattern can prune")
        info = {"pattern": self.pattern.label, "target_sparsity": self.pattern.target_sparsity,
                "selection": "per row, per group" if self.pattern.is_nm else "per layer",
                **sparsity_report(pruned)}
        if skipped:
            info["skipped_layers"] = skipped
        info.update(sparse_kernel_report(model, pruned, ctx, self.pattern, self.semi_structured))
        ctx.info[self.name] = info
        return model


@register(r"mag(\d{2})|mag-([1-9]):([1-9])", "magNN | mag-2:4", examples=("mag50", "mag-2:4", "mag-1:4"))
def _magnitude(m: re.Match[str]) -> MagnitudePruning:
    return MagnitudePruning(SparsityPattern.from_suffix(m.group(1), m.group(2), m.group(3)))
