"""A linear layer's bias and the activation after it, fused into the matmul's epilogue (what inference engines do:
cuBLASLt applies bias + ReLU or bias + GELU to the GEMM's output tile before writing it, so the activation costs no
kernel and no extra pass over the hidden states).

Why: in a compiled perplexity pass the activation is a kernel of its own over the MLP's widest tensor. Measured on
the H200 (docs/results.md section 5c's kernel tables, GPU time per pass): opt-1.3b's ReLU took 23.7 ms of 586 ms,
gpt2-xl's tanh-GELU 54.6 ms of 884 ms.

How, without touching the model's code: the linear layer becomes :class:`LinearWithActivation` (the layer stays
its child, so its weights are counted and read once) calling ``torch._addmm_activation``, which inductor keeps as
one call to ATen (a fallback op, not decomposed), and the activation module becomes ``nn.Identity``.

Which pairs (``PAIRS``): OPT's ``fc1`` / ``activation_fn``, GPT-2's ``c_fc`` / ``act``; the layer a plain
``nn.Linear`` or GPT-2's ``Conv1D`` with a bias and plain (not quantised) weights; the activation ReLU, or GELU's
tanh form on a GPU only (``_addmm_activation``'s GELU is the tanh form on CUDA and the erf form on the CPU). Gated
MLPs (SiLU of gate times up) have no such epilogue and are left alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from efficiency.techniques.bnb import is_conv1d

# (linear layer, activation after it) as the models name them: OPT's decoder layer, GPT-2's MLP
PAIRS: tuple[tuple[str, str], ...] = (("fc1", "activation_fn"), ("c_fc", "act"))

_GELU_TANH_NAMES = frozenset({"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh"})


def activation_kind(act: nn.Module) -> str | None:
    """'relu', 'gelu_tanh' or None (no epilogue for it) for an activation module."""
    if type(act) is nn.ReLU:
        return "relu"
    if type(act).__name__ in _GELU_TANH_NAMES or (type(act) is nn.GELU and act.approximate == "tanh"):
        return "gelu_tanh"
    return None


def _transposed(layer: nn.Module) -> bool | None:
    """Whether the layer stores its weight as (in, out) (GPT-2's Conv1D) or (out, in) (nn.Linear); None: neither
    kind of layer."""
    if type(layer) is nn.Linear:
        return False
    return True if is_conv1d(layer) else None


class LinearWithActivation(nn.Module):
    """``activation(layer(x))`` as one ``torch._addmm_activation``: bias and activation in the matmul's epilogue."""

    def __init__(self, layer: nn.Module, kind: str, transposed: bool) -> None:
        super().__init__()
        self.layer = layer
        self.kind = kind
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.layer.weight, self.layer.bias
        assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
        matrix = weight if self.transposed else weight.t()
        rows = x.reshape(-1, x.shape[-1])
        y = torch._addmm_activation(bias, rows, matrix, use_gelu=self.kind == "gelu_tanh")
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"bias + {self.kind} in the matmul's epilogue"


def _fusable(layer: nn.Module, act: nn.Module) -> tuple[str, bool] | None:
    """(activation kind, weight transposed) when ``layer`` and ``act`` can be fused, else None."""
    transposed = _transposed(layer)
    kind = activation_kind(act)
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if transposed is None or kind is None or hasattr(layer, "_hf_hook"):
        return None
    # plain tensors only: a quantised weight (a tensor subclass, a parametrization) has its own kernel
    if type(weight) is not nn.Parameter or type(bias) is not nn.Parameter or parametrize.is_parametrized(layer):
        return None
    if kind == "gelu_tanh" and weight.device.type != "cuda":  # the CPU's _addmm_activation computes erf's GELU
        return None
    return kind, transposed


def fuse_bias_activations(model: nn.Module) -> dict[str, int]:
    """Fuse every pair of ``PAIRS`` found in ``model`` that qualifies, in place; returns how many of each
    ("fc1+activation_fn (relu)": 24)."""
    fused_counts: dict[str, int] = {}
    for module in list(model.modules()):
        for layer_name, act_name in PAIRS:
            layer, act = getattr(module, layer_name, None), getattr(module, act_name, None)
            if not isinstance(layer, nn.Module) or not isinstance(act, nn.Module):
                continue
            found = _fusable(layer, act)
            if found is None:
                continue
            kind, transposed = found
            setattr(module, layer_name, LinearWithActivation(layer, kind, transposed))
            setattr(module, act_name, nn.Identity())
            key = f"{layer_name}+{act_name} ({kind})"
            fused_counts[key] = fused_counts.get(key, 0) + 1
    return fused_counts
