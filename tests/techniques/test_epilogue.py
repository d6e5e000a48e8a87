"""Bias and activation in the matmul's epilogue (techniques/epilogue.py): the same outputs as the separate layer
and activation, the same weights read, only plain layers before a ReLU (or a tanh-GELU on a GPU) fused, and the
compile step saying what it fused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import tiny_model
from efficiency.measure.roofline import weights_read_per_token
from efficiency.techniques.base import Context
from efficiency.techniques.compile import Compile
from efficiency.techniques.epilogue import LinearWithActivation, activation_kind, fuse_bias_activations


def _ctx() -> Context:
    ctx = Context(device="cpu", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    ctx.info["order"] = ["compile"]
    return ctx


def test_opt_fc1_and_relu_become_one_call_with_the_same_logits_and_weights(one_thread: Any) -> None:
    model = tiny_model("opt")
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, 128, (2, 12))
    read_before = weights_read_per_token(model)
    params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        before = model(ids).logits
        assert fuse_bias_activations(model) == {"fc1+activation_fn (relu)": layers}
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert weights_read_per_token(model) == read_before
    assert sum(p.numel() for p in model.parameters()) == params_before
    block = model.model.decoder.layers[0]
    assert isinstance(block.fc1, LinearWithActivation) and isinstance(block.activation_fn, nn.Identity)


def test_the_cpus_gelu_is_not_the_tanh_form_so_gpt2_stays_unfused_there() -> None:
    """``_addmm_activation``'s GELU is the erf form on the CPU and the tanh form on CUDA: fusing GPT-2's tanh-GELU
    on the CPU would change the model."""
    model = tiny_model("gpt2")
    assert activation_kind(model.transformer.h[0].mlp.act) == "gelu_tanh"
    assert fuse_bias_activations(model) == {}
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    assert not torch.allclose(fused, nn.functional.gelu(x @ w.t() + b, approximate="tanh"), rtol=0, atol=1e-6)


def test_quantised_unbiased_or_gated_layers_are_left_alone() -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantised = tiny_model("opt")
    quantize_(quantised, Int8WeightOnlyConfig())
    assert fuse_bias_activations(quantised) == {}  # a tensor-subclass weight has its own kernel
    unbiased = tiny_model("opt")
    for layer in unbiased.model.decoder.layers:
        layer.fc1.bias = None
    assert fuse_bias_activations(unbiased) == {}
    assert fuse_bias_activations(tiny_model("llama")) == {}  # SiLU(gate) x up: no epilogue for it


@pytest.mark.gpu
def test_gpt2_c_fc_and_tanh_gelu_fused_on_a_gpu_give_the_same_logits() -> None:
    """GELU's tanh form in the epilogue is CUDA's (cuBLASLt); the CPU's ``_addmm_activation`` computes erf's."""
    model = tiny_model("gpt2").cuda()
    ids = torch.randint(0, 128, (2, 12), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
        assert fuse_bias_activations(model) == {"c_fc+act (gelu_tanh)": model.config.n_layer}
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_compile_fuses_and_says_so_or_says_it_is_off(one_thread: Any) -> None:
    torch._dynamo.reset()
    ctx = _ctx()
    model = Compile(backend="eager").apply(tiny_model("opt"), ctx)
    layers = model.config.num_hidden_layers
    assert ctx.info["compile"]["bias_activation_epilogues"] == {"fc1+activation_fn (relu)": layers}
    ctx = _ctx()
    Compile(backend="eager").apply(tiny_model("llama"), ctx)
    assert ctx.info["compile"]["bias_activation_epilogues"].startswith("none fused")
    ctx = _ctx()
    model = Compile(backend="eager", fuse_bias_activation=False).apply(tiny_model("opt"), ctx)
    assert ctx.info["compile"]["bias_activation_epilogues"] == "off (fuse_bias_activation = false)"
    assert isinstance(model.model.decoder.layers[0].fc1, nn.Linear)
