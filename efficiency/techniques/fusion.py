"""Projections that read the same input, fused into one matmul: an attention block's query, key and value
projections, a gated MLP's gate and up projections (what serving engines run: one ``qkv`` GEMV instead of three).

Measured on the H200 (docs/results.md section 5c): batch-1 decode of opt-6.7b spends 10.7 us in each 4096 x 4096
bf16 GEMV (65% of peak bandwidth) and 34 us in each 4096 x 16384 one (82%): three small matmuls cost more than
one three times their size.

How, without touching the model's code: the fused ``nn.Linear`` becomes a child of the block (``qkv_proj``,
``gate_up_proj``), so a later quantisation step quantises it like any linear layer, and the original names
(``q_proj`` ...) become ``ProjectionPart`` modules without weights. The model still calls ``q_proj(x)``,
``k_proj(x)``, ``v_proj(x)`` in turn: the first part computes the fused product, the later ones slice it when
they are called with the same tensor, and the last one drops it. A part called with another tensor computes the
fused product itself: correct, only slower. The outputs are views (slices of the last dimension), which the
models' ``view(..., heads, head_dim)`` accept.

Which groups: projections named as in ``GROUPS``, plain ``nn.Linear`` layers (not quantised yet) with the same
input size, dtype, device and bias or no bias. GPT-2 already has one ``c_attn``; OPT fuses q/k/v; Llama-family
models (SmolLM2) fuse q/k/v and gate/up.
"""

from __future__ import annotations

import torch
from torch import nn

# the fused layer's name -> the projections it replaces, in the order the models call them
GROUPS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                      "gate_up_proj": ("gate_proj", "up_proj")}


class _Product:
    """The fused product of one group, between its first and its last part's call."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None


class ProjectionPart(nn.Module):
    """One projection of a fused group: its slice ``[start, stop)`` of the output features of the block's layer
    ``fused_name``, looked up at each call (a quantisation step may replace that layer by another module)."""

    def __init__(self, block: nn.Module, fused_name: str, product: _Product, start: int, stop: int, first: bool,
                 last: bool) -> None:
        super().__init__()
        # Plain attributes, not submodules: the fused layer is the block's child, counted and quantised once.
        self.__dict__["block"] = block
        self.__dict__["product"] = product
        # No in_features / out_features: this is not a layer, and the FLOP count (measure/roofline.py) counts a
        # linear layer without a weight parameter as in x out weights.
        self.fused_name = fused_name
        self.start, self.stop, self.first, self.last = start, stop, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product: _Product = self.__dict__["product"]
        if self.first or product.input is not x or product.output is None:
            product.input, product.output = x, getattr(self.__dict__["block"], self.fused_name)(x)
        y = product.output[..., self.start:self.stop]
        if self.last:
            product.input = product.output = None
        return y

    def extra_repr(self) -> str:
        return f"features [{self.start}, {self.stop}) of {self.fused_name}"


def _fusable(layers: list[nn.Linear]) -> bool:
    """Plain linear layers alike in input, dtype, device and bias; not offloaded by accelerate (its hooks move
    each layer's weights in at call time, so the weights may not be here, and a new layer would have no hook)."""
    if not all(type(m) is nn.Linear and not hasattr(m, "_hf_hook") and m.weight.device.type != "meta"
               for m in layers):
        return False
    first = layers[0]
    return all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
               for m in layers)


def fuse_projections(model: nn.Module) -> dict[str, int]:
    """Fuse every group of ``GROUPS`` found in ``model``, in place; returns how many of each were fused."""
    fused_counts: dict[str, int] = {}
    for module in list(model.modules()):
        for fused_name, group in GROUPS.items():
            found = [getattr(module, part, None) for part in group]
            layers: list[nn.Linear] = [m for m in found if isinstance(m, nn.Linear)]
            if len(layers) != len(group) or not _fusable(layers):
                continue
            first = layers[0]
            sizes = [m.out_features for m in layers]
            # built on the meta device (no initialisation to throw away), then given the concatenated weights
            fused = nn.Linear(first.in_features, sum(sizes), bias=first.bias is not None, device="meta")
            grad = first.weight.requires_grad
            with torch.no_grad():
                fused.weight = nn.Parameter(torch.cat([m.weight for m in layers], dim=0), requires_grad=grad)
                if first.bias is not None:
                    fused.bias = nn.Parameter(torch.cat([m.bias for m in layers], dim=0), requires_grad=grad)
            module.add_module(fused_name, fused)
            product = _Product()
            start = 0
            for i, (part_name, size) in enumerate(zip(group, sizes, strict=True)):
                part = ProjectionPart(module, fused_name, product, start, start + size, first=i == 0,
                                      last=i == len(group) - 1)
                setattr(module, part_name, part)
                start += size
            key = "+".join(group)
            fused_counts[key] = fused_counts.get(key, 0) + 1
    return fused_counts
