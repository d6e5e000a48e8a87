"""gemlite's Triton low-bit kernels (CUDA only): ``gemlite-int4`` (int4 weights, round-to-nearest, asymmetric,
group 128 by default; ``gemlite-int4-g64``) and ``gemlite-fp8wo`` (fp8 e4m3 weights, per channel), both with bf16
activations. The transformer's linear layers (not the LM head) become ``GemLiteLinearTriton`` modules; gemlite
picks its kernel per shape (GEMV / split-K for batch-1 decode, GEMM for the perplexity pass) and the report names
the kernel family. On the CPU these skip: gemlite's kernels are Triton GPU kernels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, register
from efficiency.techniques.bnb import default_filter, swap_modules
from efficiency.techniques.torchao_quant import conv1d_to_linear, input_widths, refuse_misfit_groups


def require_gemlite() -> Any:
    try:
        import gemlite
        from gemlite import helper
    except Exception as err:
        raise UnsupportedTechnique(f"gemlite is not usable here: {type(err).__name__}: {err}") from err
    return gemlite, helper


GEMV_KERNELS = ("GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK")  # gemlite's kernels for batches of up to 4 rows


def configure_autotune(gemlite: Any, gemv_setting: str, cuda_graph: bool) -> None:
    """Set gemlite's autotuning of its GEMV kernels, the GEMM ones on "fast" (a process-wide setting: gemlite
    reloads its kernel modules, so set it before the first call of a layer)."""
    gemlite.set_autotune({"GEMM": "fast", "GEMM_SPLITK": "fast", **dict.fromkeys(GEMV_KERNELS, gemv_setting)},
                         use_cuda_graph=cuda_graph)


def rtn_asymmetric(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest asymmetric quantisation per group of ``group_size`` inputs: (W_q uint8 (out, in),
    scales (out, in/group), zeros (out, in/group)) with W ~ (W_q - zeros) * scales."""
    out_f, in_f = weight.shape
    w = weight.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    qmax = 2**bits - 1
    scales = ((hi - lo) / qmax).clamp(min=1e-8)
    zeros = (-lo / scales).round()
    w_q = (w / scales + zeros).round().clamp(0, qmax).to(torch.uint8)
    return w_q.reshape(out_f, in_f), scales.squeeze(-1), zeros.squeeze(-1)


GEMLITE_GROUP_SIZES = (64, 128)  # the gemlite-int4[-gNN] names the registry takes


@dataclass(frozen=True)
class GemliteQuant(TechniqueBase):
    kind: str  # int4 | fp8wo
    group_size: int = 128
    # gemlite's choice of block sizes per matrix shape for its GEMV kernels (batches of up to 4 rows: decode),
    # made at the first call of each shape: "fast" (gemlite's default, a short list of candidates), "max" (its
    # full grid, about 20 s per shape), "default" (one config, no tuning). Its GEMM kernels (prefill, perplexity
    # pass) keep "fast": their full grid takes minutes per shape. ``cuda_graph_autotune`` times the candidates
    # inside CUDA graphs (as compiled decode runs them) instead of as single launches. Defaults: gemlite's own,
    # kept until measured otherwise (docs/results.md 5d).
    gemv_autotune: Literal["fast", "max", "default"] = "fast"
    cuda_graph_autotune: bool = False
    family = "quantisation"
    preserves_layer_shapes = True

    @property
    def name(self) -> str:
        suffix = f"-g{self.group_size}" if self.kind == "int4" and self.group_size != 128 else ""
        return f"gemlite-{self.kind}{suffix}"

    def check(self, ctx: Context) -> None:
        if not ctx.is_cuda:
            raise UnsupportedTechnique(f"{self.name}: gemlite's kernels are Triton GPU kernels (CUDA only)")
        require_gemlite()
        if self.kind == "fp8wo" and torch.cuda.get_device_capability(ctx.device) < (8, 9):
            raise UnsupportedTechnique(f"{self.name}: fp8 needs compute capability >= 8.9")

    def load_dtype(self, ctx: Context) -> torch.dtype | None:
        return torch.bfloat16

    def check_layers(self, skeleton: Callable[[], nn.Module]) -> None:
        """int4: every layer's inputs a multiple of the group, read from the model's config before it loads."""
        if self.kind == "int4":
            self._refuse_misfit_groups(skeleton())

    def _refuse_misfit_groups(self, model: nn.Module) -> None:
        refuse_misfit_groups(self.name, input_widths(model), self.group_size, GEMLITE_GROUP_SIZES, "gemlite-int4")

    def apply(self, model: Any, ctx: Context) -> Any:
        gemlite, helper = require_gemlite()
        configure_autotune(gemlite, self.gemv_autotune, self.cuda_graph_autotune)
        dtype = torch.bfloat16
        model = model.to(dtype)
        conv1d_to_linear(model)
        if self.kind == "int4":  # the config check's rule, on the model in hand (a pruning step may come first)
            self._refuse_misfit_groups(model)
        device = ctx.device

        def make(mod: nn.Module, name: str) -> nn.Module:
            lin: Any = mod
            weight = lin.weight.detach()
            raw_bias = lin.bias
            bias = raw_bias.detach() if raw_bias is not None else None
            if self.kind == "fp8wo":
                return helper.A16W8_FP8(device=device, dtype=dtype).from_weights(weight, bias)
            w_q, scales, zeros = rtn_asymmetric(weight, 4, self.group_size)
            return helper.A16Wn(device=device, dtype=dtype).from_weights(
                w_q, scales.to(dtype), zeros.to(dtype), 4, self.group_size, bias)

        n = swap_modules(model, make, lambda m, name: isinstance(m, nn.Linear) and default_filter(m, name))
        if n == 0:
            raise UnsupportedTechnique(f"{self.name}: the model has no linear layers to quantise")
        ctx.info[self.name] = {
            "library": f"gemlite {getattr(gemlite, '__version__', '?')}",
            "kernel": "gemlite Triton (GEMV / split-K GEMV for batch-1 decode, GEMM for batches; autotuned per "
                      "shape)" + (", int4 weights packed, RTN asymmetric" if self.kind == "int4" else
                                  ", fp8 e4m3 weights per channel"),
            "quantised_layers": n,
            "group_size": self.group_size if self.kind == "int4" else None,
            "gemv_autotune": self.gemv_autotune,
            "cuda_graph_autotune": self.cuda_graph_autotune,
        }
        return model


@register(r"gemlite-(int4|fp8wo)(?:-g(64|128))?", "gemlite-int4[-g64] | gemlite-fp8wo (CUDA)",
          ("gemlite-int4", "gemlite-int4-g64", "gemlite-fp8wo"))
def _gemlite(m: re.Match[str]) -> GemliteQuant:
    return GemliteQuant(m.group(1), int(m.group(2) or 128))
