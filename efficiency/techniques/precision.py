"""Floating-point precision: ``fp32``, ``fp16``, ``bf16`` (the model is loaded in, or cast to, that dtype)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from efficiency.defaults import COMPUTE_DTYPES
from efficiency.techniques.base import Context, TechniqueBase, UnsupportedTechnique, register

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
assert tuple(DTYPES) == COMPUTE_DTYPES, "defaults.COMPUTE_DTYPES names the dtypes the settings accept"
DTYPE_PATTERN = "|".join(COMPUTE_DTYPES)  # a dtype name in a technique name's pattern


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def check_dtype_on_device(dtype: torch.dtype, ctx: Context) -> None:
    if ctx.is_cuda:
        if not torch.cuda.is_available():
            raise UnsupportedTechnique(f"{ctx.device} requested but CUDA is not available")
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(ctx.device)
            raise UnsupportedTechnique(f"bf16 is not supported on {name} (needs compute capability >= 8.0)")


@dataclass(frozen=True)
class Precision(TechniqueBase):
    name: str
    preserves_layer_shapes = True  # a dtype

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def check(self, ctx: Context) -> None:
        check_dtype_on_device(self.dtype, ctx)

    def load_dtype(self, ctx: Context) -> torch.dtype | None:
        return self.dtype

    def apply(self, model: Any, ctx: Context) -> Any:
        ctx.info["dtype"] = self.name
        return model.to(self.dtype)


@register(DTYPE_PATTERN, " | ".join(COMPUTE_DTYPES), examples=COMPUTE_DTYPES)
def _precision(m: re.Match[str]) -> Precision:
    return Precision(m.group(0))
