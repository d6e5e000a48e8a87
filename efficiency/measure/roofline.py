"""Roofline figures: how close a measured time comes to what the device could do at most.

- **Decode** (batch 1) is bound by memory: every generated token reads every weight once. The achieved weight
  bandwidth is ``bytes of weights read per token / seconds per token``; its fraction of the device's peak
  memory bandwidth is the roofline fraction, and ``weight bytes / peak bandwidth`` is the floor per token.
- **Perplexity pass** is bound by arithmetic. Its model FLOPs (:func:`pass_flops`): a multiply and an add per
  weight per token, ``2 x (parameters - LM head) x tokens processed`` (window overlap counted), plus the LM head
  only at the positions whose logits are computed (``2 x head x logit positions``: the pass asks for the scored
  positions' logits alone), plus causal attention (:func:`attention_flops`: ``QK^T`` and ``AV``, ``4 x width``
  per query and attended key, a query at position i attending to i + 1 keys). Achieved FLOP/s over the dense
  peak of the compute dtype is the model FLOP utilisation (MFU).

Peaks are datasheet figures (dense, i.e. without 2:4 sparsity), one row per device with its source. A device
missing from the table gets the achieved figure and no fraction, with the reason. The functions are pure;
:func:`weights_read_per_token` is the one that looks at a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TERA = 1e12


@dataclass(frozen=True)
class DevicePeak:
    name: str
    pattern: str  # regex searched (case-insensitive) in the device name torch reports
    memory_bytes_per_s: float
    dense_flops_per_s: Mapping[str, float] = field(default_factory=dict)  # compute dtype -> FLOP/s, dense
    source: str = ""


_H100_SXM = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), H100 SXM column"
_H100_PCIE = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), H100 PCIe column"
_H100_NVL = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), H100 NVL column"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), H200 SXM column"
_H200_NVL = "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), H200 NVL column"
_GH200 = "NVIDIA GH200 Grace Hopper Superchip datasheet (nvidia.com/en-us/data-center/grace-hopper-superchip)"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100)"
_L4 = "NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/l4)"
_L40S = "NVIDIA L40S GPU datasheet (nvidia.com/en-us/data-center/l40s)"


def _tf(fp32: float, tf32: float, half: float, fp8: float | None, int8: float) -> dict[str, float]:
    """Dense TFLOP/s (TOPS for int8) per compute dtype; datasheets print tensor-core figures with sparsity,
    the dense figure is half of it."""
    d = {"float32": fp32 * TERA, "tf32": tf32 * TERA, "bfloat16": half * TERA, "float16": half * TERA,
         "int8": int8 * TERA}
    if fp8 is not None:
        d["float8"] = fp8 * TERA
    return d


# Order matters: the first pattern that matches the device name wins (NVL / PCIe before the plain H100, GH200
# before H200: its Hopper GPU has the H100 SXM's compute and, by memory, 4.0 TB/s (96 GB HBM3) or 4.9 TB/s
# (144 GB HBM3e)).
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("GH200 144GB HBM3e", r"GH200.*(HBM3e|144G)", 4.9 * TERA, _tf(67, 494.5, 989.5, 1979, 1979), _GH200),
    DevicePeak("GH200 96GB HBM3", r"GH200", 4.0 * TERA, _tf(67, 494.5, 989.5, 1979, 1979), _GH200),
    DevicePeak("H200 NVL", r"H200 NVL", 4.8 * TERA, _tf(60, 417.5, 835.5, 1670.5, 1670.5), _H200_NVL),
    DevicePeak("H100 NVL", r"H100 NVL", 3.9 * TERA, _tf(60, 417.5, 835.5, 1670.5, 1670.5), _H100_NVL),
    DevicePeak("H100 PCIe", r"H100 PCIe", 2.0 * TERA, _tf(51, 378, 756.5, 1513, 1513), _H100_PCIE),
    DevicePeak("H100 SXM", r"H100", 3.35 * TERA, _tf(67, 494.5, 989.5, 1979, 1979), _H100_SXM),
    DevicePeak("H200", r"H200", 4.8 * TERA, _tf(67, 494.5, 989.5, 1979, 1979), _H200),
    DevicePeak("A100 80GB PCIe", r"A100.*80GB.*PCIe|A100.*PCIe.*80GB", 1.935 * TERA,
               _tf(19.5, 156, 312, None, 624), _A100),
    DevicePeak("A100 80GB SXM", r"A100.*80GB", 2.039 * TERA, _tf(19.5, 156, 312, None, 624), _A100),
    DevicePeak("A100 40GB", r"A100", 1.555 * TERA, _tf(19.5, 156, 312, None, 624), _A100),
    DevicePeak("L40S", r"L40S", 0.864 * TERA, _tf(91.6, 183, 362.05, 733, 733), _L40S),
    DevicePeak("L4", r"\bL4\b", 0.300 * TERA, _tf(30.3, 60, 121, 242.5, 242.5), _L4),
)


def device_name(device: str) -> str:
    """The name torch reports for a CUDA device ("NVIDIA H100 80GB HBM3"), "cpu" otherwise."""
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    return "cpu"


def lookup(device_name: str | None) -> DevicePeak | None:
    if not device_name:
        return None
    for peak in PEAKS:
        if re.search(peak.pattern, device_name, re.IGNORECASE):
            return peak
    return None


def _unknown(device_name: str | None) -> str:
    return (f"device {device_name!r} is not in the peak table (efficiency.measure.roofline.PEAKS): the achieved "
            "figure is reported without a fraction")


def decode_roofline(weight_bytes: int | None, s_per_token: float | None, device_name: str | None) -> dict[str, Any]:
    """Achieved weight bandwidth of batch-1 decode and its fraction of the device's peak memory bandwidth."""
    out: dict[str, Any] = {"weight_bytes_per_token": weight_bytes, "weight_bytes_per_s": None,
                           "roofline_fraction": None, "floor_s_per_token": None, "peak_bytes_per_s": None,
                           "device_peak": None, "peak_source": None, "reason": None}
    if not weight_bytes or not s_per_token or s_per_token <= 0:
        out["reason"] = "decode time per token or weight bytes not measured"
        return out
    out["weight_bytes_per_s"] = weight_bytes / s_per_token
    peak = lookup(device_name)
    if peak is None:
        out["reason"] = _unknown(device_name)
        return out
    out.update(peak_bytes_per_s=peak.memory_bytes_per_s, device_peak=peak.name, peak_source=peak.source,
               roofline_fraction=out["weight_bytes_per_s"] / peak.memory_bytes_per_s,
               floor_s_per_token=weight_bytes / peak.memory_bytes_per_s)
    return out


def pass_flops(parameters: int, tokens_processed: int, head_parameters: int = 0,
               logit_positions: int | None = None, attention: float = 0.0) -> float:
    """Model FLOPs of forward passes over ``tokens_processed`` tokens: ``2 x (parameters - head) x tokens`` +
    ``2 x head x logit_positions`` (all tokens when None) + ``attention`` (:func:`attention_flops`)."""
    positions = tokens_processed if logit_positions is None else logit_positions
    return 2.0 * (parameters - head_parameters) * tokens_processed + 2.0 * head_parameters * positions + attention


def attention_flops(config: Any, window_lengths: list[int]) -> float | None:
    """FLOPs of causal self-attention's two matrix products over windows of the given lengths: per layer and
    window of L tokens, ``4 x width x L(L+1)/2`` (``QK^T`` and ``AV``, 2 x width each per query-key pair; query
    i attends to i + 1 keys). Width = heads x head dimension. None when the config does not say its layers
    and width."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not layers or not heads or not head_dim:
        return None
    width = int(heads) * int(head_dim)
    return float(sum(4 * width * length * (length + 1) // 2 for length in window_lengths) * int(layers))


def _head_weight(model: Any) -> Any:
    """The LM head's weight (the output embedding), None when the model has none."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(out_emb, "weight", None)


def head_parameters(model: Any) -> int:
    """Logical weights of the LM head, 0 when the model has none."""
    weight = _head_weight(model)
    return int(weight.numel()) if weight is not None else 0


def evaluator_flops(parameters: int | None, model: Any, evaluator: Any) -> tuple[float | None, bool]:
    """(model FLOPs of one perplexity pass of ``evaluator`` (efficiency.measure.perplexity) over ``model`` with
    ``parameters`` logical weights (:func:`weights_read_per_token`), whether causal attention is counted).
    After a pass, when the evaluator knows whether the model computed only the kept logits."""
    if not parameters or not evaluator.n_processed_tokens:
        return None, False
    attention = attention_flops(getattr(model, "config", None), evaluator.window_lengths)
    flops = pass_flops(parameters, evaluator.n_processed_tokens, head_parameters(model),
                       evaluator.n_logit_positions, attention or 0.0)
    return flops, attention is not None


def dtype_key(dtype: Any) -> str:
    """'bfloat16', 'float16', 'float32', 'float8', 'int8' from a torch dtype or its name."""
    name = str(dtype).removeprefix("torch.")
    if name.startswith("float8"):
        return "float8"
    return name


def mfu(flops: float | None, seconds: float | None, dtype: Any, device_name: str | None) -> dict[str, Any]:
    """Achieved FLOP/s of a pass of ``flops`` model FLOPs (:func:`pass_flops`) and its fraction of the device's
    dense peak for ``dtype`` (MFU)."""
    key = dtype_key(dtype)
    out: dict[str, Any] = {"flops": None, "achieved_flops_per_s": None, "mfu": None, "peak_flops_per_s": None,
                           "compute_dtype": key, "device_peak": None, "peak_source": None, "reason": None}
    if not flops or not seconds or seconds <= 0:
        out["reason"] = "FLOPs or pass time not measured"
        return out
    out["flops"] = flops
    out["achieved_flops_per_s"] = out["flops"] / seconds
    peak = lookup(device_name)
    if peak is None:
        out["reason"] = _unknown(device_name)
        return out
    dense = peak.dense_flops_per_s.get(key)
    out.update(device_peak=peak.name, peak_source=peak.source)
    if dense is None:
        out["reason"] = f"no dense {key} peak for {peak.name} in the table"
        return out
    out.update(peak_flops_per_s=dense, mfu=out["achieved_flops_per_s"] / dense)
    return out


# --- what a model reads per token ------------------------------------------------------------------------

def weights_read_per_token(model: Any) -> tuple[int, int]:
    """(bytes, parameters) of the weights one token's forward pass reads: every parameter once (tied weights
    once), except embedding tables that are only gathered (input tokens, positions) and not used as the LM
    head; plus matrix buffers (packed weights that some kernels keep as buffers). Quantised tensors count as
    stored, and weights that ``compile`` unwrapped as they were before (memory.parameters_as_used). ``parameters``
    counts logical weights (the FLOPs side)."""
    from torch import nn
    from torch.nn.utils import parametrize

    from efficiency.measure.memory import logical_numel, parameters_as_used, stored_bytes, stored_parameter_bytes

    head_weight = _head_weight(model)
    gathered: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) and mod.weight is not head_weight:
            gathered.add(id(mod.weight))
    seen: set[int] = set()
    nbytes = params = 0
    for p in parameters_as_used(model):
        if id(p) in gathered:
            continue
        seen.add(id(p))
        nbytes += stored_parameter_bytes(p)
        params += logical_numel(p)
    for b in model.buffers():  # packed weights some kernels keep as buffers (gemlite)
        if id(b) not in seen and b.dim() >= 2:
            seen.add(id(b))
            nbytes += stored_bytes(b)
    for mod in model.modules():  # their logical weights: a linear layer without a weight parameter
        w = getattr(mod, "weight", None)
        n_in, n_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        if not isinstance(w, nn.Parameter) and not parametrize.is_parametrized(mod, "weight") \
                and isinstance(n_in, int) and isinstance(n_out, int):
            params += n_in * n_out
    return nbytes, params
