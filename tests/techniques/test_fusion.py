"""Fused projections (techniques/fusion.py): the same outputs as the separate layers, the same parameters, the
fused layer found by name at each call (a quantisation step may replace it), and the pipeline fusing before its
first quantisation step when compile asks for it."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import tiny_model
from efficiency.techniques.base import Context, parse
from efficiency.techniques.compile import compiled_state
from efficiency.techniques.fusion import ProjectionPart, fuse_projections


def _ctx() -> Context:
    return Context(device="cpu", tokenizer=None, model_name="tiny", cache_dir=Path("."))


@pytest.mark.parametrize(("family", "expected"), [
    ("opt", {"q_proj+k_proj+v_proj": 2}),
    ("llama", {"q_proj+k_proj+v_proj": 2, "gate_proj+up_proj": 2}),
    ("gpt2", {}),  # GPT-2's c_attn is already one layer
])
def test_fused_model_gives_the_same_logits_and_parameters(family: str, expected: dict[str, int],
                                                           one_thread: Any) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 12))
    params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        before = model(ids).logits
        assert fuse_projections(model) == expected
        after = model(ids).logits
    assert torch.equal(before, after)
    assert sum(p.numel() for p in model.parameters()) == params_before
    parts = [m for m in model.modules() if isinstance(m, ProjectionPart)]
    assert not any(isinstance(p, nn.Linear) for p in parts)  # quantisation steps see only the fused layers
    assert all(not list(p.parameters()) for p in parts)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_fusion_leaves_the_weights_read_and_the_flop_count_alone(family: str) -> None:
    """Regression: the parts carried in_features / out_features, so the roofline counted each as a linear layer
    with packed weights, and MFU came out 1.23x too high on opt-1.3b (H200 probe, 2026-12-02)."""
    from efficiency.measure.roofline import weights_read_per_token

    model = tiny_model(family)
    before = weights_read_per_token(model)
    fuse_projections(model)
    assert weights_read_per_token(model) == before


def test_a_part_called_with_another_tensor_computes_its_own_product() -> None:
    torch.manual_seed(0)
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj = nn.Linear(8, 4), nn.Linear(8, 2), nn.Linear(8, 2)
    ref = [block.q_proj.weight.clone(), block.k_proj.weight.clone(), block.v_proj.weight.clone()]
    biases = [block.q_proj.bias.clone(), block.k_proj.bias.clone(), block.v_proj.bias.clone()]
    fuse_projections(block)
    x, other = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        q = block.q_proj(x)
        k = block.k_proj(other)  # cross-attention style: not the tensor q was computed from
        v = block.v_proj(x)
    torch.testing.assert_close(q, x @ ref[0].T + biases[0])
    torch.testing.assert_close(k, other @ ref[1].T + biases[1])
    torch.testing.assert_close(v, x @ ref[2].T + biases[2])


def test_parts_use_the_layer_a_quantisation_step_put_in_its_place() -> None:
    """gemlite replaces the fused nn.Linear by its own module: the parts must call the new one."""
    block = nn.Module()
    block.gate_proj, block.up_proj = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
    fuse_projections(block)
    replacement = nn.Linear(4, 6, bias=False)
    nn.init.zeros_(replacement.weight)
    block.gate_up_proj = replacement
    with torch.no_grad():
        assert torch.equal(block.gate_proj(torch.ones(1, 4)), torch.zeros(1, 3))


def test_layers_placed_by_accelerate_hooks_are_left_alone() -> None:
    block = nn.Module()
    block.gate_proj, block.up_proj = nn.Linear(4, 3), nn.Linear(4, 3)
    block.up_proj._hf_hook = object()  # what accelerate's dispatch attaches to an offloaded layer
    assert fuse_projections(block) == {}
    with torch.device("meta"):
        block.gate_proj, block.up_proj = nn.Linear(4, 3), nn.Linear(4, 3)
    assert fuse_projections(block) == {}
    assert isinstance(block.gate_proj, nn.Linear)


@pytest.mark.parametrize(("pipeline", "index"), [
    ("compile", 0), ("bf16+compile", 1), ("int8wo+compile", 0), ("bf16+int8wo+compile", 1),
    ("bf16", None), ("int8wo", None),
])
def test_the_pipeline_fuses_before_its_first_quantisation_step(pipeline: str, index: int | None) -> None:
    assert parse(pipeline).fusion_index() == index


def test_compile_can_leave_projections_alone() -> None:
    assert parse("bf16+compile", {"compile": {"fuse_projections": False}}).fusion_index() is None


def test_compiled_fused_decode_equals_hf_greedy(one_thread: Any) -> None:
    """Through the pipeline: the fused model's compiled greedy tokens are Hugging Face's on the unfused model."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    torch.manual_seed(3)
    prompt = torch.randint(0, 128, (1, 9))
    with torch.inference_mode():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  min_new_tokens=10, max_new_tokens=10, pad_token_id=0)
    ctx = _ctx()
    model = parse("compile", {"compile": {"backend": "eager", "cache_bucket": 32}}).apply(model, ctx)
    assert ctx.info["fused_projections"] == {"q_proj+k_proj+v_proj": 2, "gate_proj+up_proj": 2}
    assert ctx.info["compile"]["fuse_projections"] is True
    with torch.inference_mode():
        got = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, min_new_tokens=10,
                             max_new_tokens=10, pad_token_id=0)
    state = compiled_state(model)
    assert state is not None and state.calls["compiled_generate"] == 1
    assert torch.equal(got, expected)


def test_int8_weight_only_quantises_the_fused_layer(one_thread: Any) -> None:
    pytest.importorskip("torchao")
    model = tiny_model("opt")
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    ctx = _ctx()
    model = parse("int8wo+compile", {"compile": {"backend": "eager"}}).apply(model, ctx)
    attention = model.model.decoder.layers[0].self_attn
    assert type(attention.qkv_proj.weight).__module__.startswith("torchao")  # the fused layer was quantised
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()


@pytest.mark.slow
def test_real_smollm2_fused_gives_the_same_perplexity(smollm2_folder: Path, smollm2_eval_ids: torch.Tensor) -> None:
    """On the real SmolLM2-135M (dequantised Q4_1 GGUF, small budget): fusing q/k/v and gate/up changes only the
    GEMMs' shapes, so fp32 perplexity agrees to float rounding, and int8 weight-only (per output row) quantises
    the fused layers to the same values as the separate ones."""
    from transformers import AutoModelForCausalLM

    from efficiency.measure.perplexity import PerplexityEvaluator

    ids = smollm2_eval_ids
    original = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()

    def perplexity(pipeline: str | None) -> float:
        model = copy.deepcopy(original)
        if pipeline == "fused":
            assert fuse_projections(model) == {"q_proj+k_proj+v_proj": 30, "gate_proj+up_proj": 30}
        elif pipeline:
            model = parse(pipeline, {"compile": {"backend": "eager"}}).apply(model, _ctx())
        return PerplexityEvaluator(ids, 256, 256, 3).run(model, "cpu").perplexity

    ref, fused = perplexity(None), perplexity("fused")
    assert 5 < ref < 200 and abs(fused - ref) / ref < 1e-5, (ref, fused)
    if importlib.util.find_spec("torchao") is not None:
        separate, together = perplexity("int8wo"), perplexity("int8wo+compile")
        assert abs(together - separate) / separate < 1e-4, (separate, together)
