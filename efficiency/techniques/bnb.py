"""bitsandbytes quantisation of the transformer's linear layers: ``bnb8`` (LLM.int8), ``bnb4`` (NF4),
``bnb4-fp4``; ``@bf16`` / ``@fp16`` / ``@fp32`` after the name picks the compute dtype (``bnb4@bf16``).

torchao's shape: one config object, one module-swap entry point with a ``filter_fn(module, name)`` that
chooses which layers it touches (default: every linear layer but the LM head). GPT-2's ``Conv1D`` layers
(weights stored transposed) are handled as linear layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, register
from efficiency.techniques.precision import DTYPE_PATTERN, check_dtype_on_device, dtype_from_name

FilterFn = Callable[[nn.Module, str], bool]


def is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def default_filter(module: nn.Module, name: str) -> bool:
    """Every Linear (or GPT-2 Conv1D) layer except the LM head, as transformers' bitsandbytes integration chooses
    by default: the blocks' layers and, in OPT models whose embedding width differs from the hidden size
    (opt-350m), ``project_in`` / ``project_out`` too; embeddings and the LM head stay."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not name.endswith("lm_head")


def linear_weight(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight of shape (out, in), bias) of a Linear or a transposed GPT-2 Conv1D."""
    weight = module.weight.detach()
    if is_conv1d(module):
        weight = weight.t()
    bias = module.bias.detach() if module.bias is not None else None
    return weight, bias


def swap_modules(model: nn.Module, make: Callable[[nn.Module, str], nn.Module], filter_fn: FilterFn) -> int:
    """Replace every module chosen by ``filter_fn`` with ``make(module, name)``; return how many were replaced."""
    targets = [(name, mod) for name, mod in model.named_modules() if name and filter_fn(mod, name)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod, name))
    return len(targets)


def _require_bnb() -> Any:
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or a broken native library
        raise UnsupportedTechnique(f"bitsandbytes is not usable here: {type(err).__name__}: {err}") from err
    return bitsandbytes


@dataclass(frozen=True)
class BnbQuant(TechniqueBase):
    """``bits`` 8 (LLM.int8 with outlier threshold) or 4 (``quant_type`` nf4 / fp4)."""

    bits: int
    quant_type: str = "nf4"
    compute: str | None = None  # None: the model's own float dtype
    threshold: float = 6.0
    double_quant: bool = False
    preserves_layer_shapes = True  # quantised weights, the same layers

    @property
    def name(self) -> str:
        base = "bnb8" if self.bits == 8 else ("bnb4" if self.quant_type == "nf4" else "bnb4-fp4")
        return base + (f"@{self.compute}" if self.compute else "")

    def _compute_dtype(self, ctx: Context) -> torch.dtype | None:
        name = self.compute or ctx.compute_dtype
        return dtype_from_name(name) if name else None

    def check(self, ctx: Context) -> None:
        _require_bnb()
        dtype = self._compute_dtype(ctx)
        if dtype is not None:
            check_dtype_on_device(dtype, ctx)

    def load_dtype(self, ctx: Context) -> torch.dtype | None:
        return self._compute_dtype(ctx)

    def apply(self, model: Any, ctx: Context, filter_fn: FilterFn = default_filter) -> Any:
        bnb = _require_bnb()
        compute = self._compute_dtype(ctx) or next(model.parameters()).dtype
        device = torch.device(ctx.device)

        def make(module: nn.Module, name: str) -> nn.Module:
            weight, bias = linear_weight(module)
            out_f, in_f = weight.shape
            # Quantisation happens when the parameter moves to the device, so build it on the CPU first.
            w_cpu = weight.to("cpu", compute)
            new: nn.Module
            if self.bits == 8:
                new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                          threshold=self.threshold, device="meta")
                new.weight = bnb.nn.Int8Params(w_cpu, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute,
                                        compress_statistics=self.double_quant, quant_type=self.quant_type,
                                        device="meta")
                new.weight = bnb.nn.Params4bit(w_cpu, requires_grad=False, quant_type=self.quant_type,
                                               compress_statistics=self.double_quant)
            if bias is not None:
                new.bias = nn.Parameter(bias.to("cpu", compute), requires_grad=False)
            # A new module starts in training mode; bitsandbytes picks its inference kernels (on CPU the
            # packed AVX-512 path that from_pretrained(quantization_config=...) models use) only in eval mode.
            new.train(module.training)
            new = new.to(device)
            state = getattr(new.weight, "quant_state", None)
            if device.type == "cpu" and state is not None and in_f % state.blocksize:
                # bitsandbytes' packed CPU kernel reshapes absmax to (out, in / blocksize) and fails on other
                # widths (so does from_pretrained(quantization_config=...) for them): its reference kernel.
                setattr(new, "support_avx512bf16_for_cpu", False)  # noqa: B010 (nn.Module attribute typing)
                reference.append(name)
            return new

        reference: list[str] = []
        model = model.to(compute)
        n = swap_modules(model, make, filter_fn)
        if n == 0:
            raise UnsupportedTechnique(f"{self.name}: the model has no linear layers to quantise")
        ctx.info[self.name] = {
            "quantised_layers": n, "compute_dtype": str(compute).removeprefix("torch."),
            "bitsandbytes": bnb.__version__,
            "path": "module swap of the loaded model; same layers, threshold and compute dtype as transformers' "
                    "BitsAndBytesConfig, and the same outputs (tests/techniques/test_bnb.py)",
        }
        if reference:
            ctx.info[self.name]["cpu_reference_kernel_layers"] = reference
        return model


@register(rf"bnb8(?:@({DTYPE_PATTERN}))?", "bnb8[@fp16|@bf16|@fp32]",
          examples=("bnb8", "bnb8@fp16", "bnb8@bf16", "bnb8@fp32"))
def _bnb8(m: re.Match[str]) -> BnbQuant:
    return BnbQuant(8, compute=m.group(1))


@register(rf"bnb4(-fp4|-nf4)?(?:@({DTYPE_PATTERN}))?", "bnb4 | bnb4-fp4 [@fp16|@bf16|@fp32]",
          examples=("bnb4", "bnb4-nf4", "bnb4-fp4", "bnb4@bf16", "bnb4-fp4@fp16", "bnb4-nf4@fp32"))
def _bnb4(m: re.Match[str]) -> BnbQuant:
    return BnbQuant(4, quant_type="fp4" if m.group(1) == "-fp4" else "nf4", compute=m.group(2))
