"""Attention-head pruning: the concentration score, the selection rule, and physical removal that matches
zeroing the removed heads' outputs (GPT-2 fused Conv1D, OPT, Llama grouped-query incl. uneven groups)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import byte_context
from efficiency.techniques.base import parse, parse_one
from efficiency.techniques.heads import (
    HeadGather,
    HeadPruning,
    attention_modules,
    concentration_scores,
    head_scores,
    prune_heads,
    select_heads,
    zero_heads,
)


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_concentration_of_hand_built_patterns() -> None:
    q = 4
    sink = torch.zeros(q, q)
    sink[:, 0] = 1.0  # every query attends only to the first token
    causal_uniform = torch.tril(torch.ones(q, q))
    causal_uniform /= causal_uniform.sum(-1, keepdim=True)  # row q: 1/(q+1) on each visible token
    half = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.5, 0.25, 0.25, 0], [0.5, 0.2, 0.2, 0.1]])
    probs = torch.stack([sink, causal_uniform, half]).unsqueeze(0).repeat(2, 1, 1, 1)  # (B=2, H=3, Q, K)
    scores = concentration_scores(probs)
    expected = torch.tensor([1.0, (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, (1 + 0.5 + 0.5 + 0.5) / 4]).double()
    assert torch.allclose(scores, expected)


def test_selection_keeps_the_least_concentrated_head() -> None:
    scores = [torch.tensor([0.95, 0.2, 0.91]), torch.tensor([0.97, 0.93, 0.99]), torch.tensor([0.1, 0.2])]
    assert select_heads(scores, 0.9) == [[0, 2], [0, 2], []]


def test_hooked_scores_equal_output_attentions(tiny: Any) -> None:
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    scores = head_scores(tiny, ids, batch_size=2)
    attn_impl = tiny.config._attn_implementation
    tiny.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = tiny(ids, output_attentions=True).attentions
    tiny.set_attn_implementation(attn_impl)
    assert tiny.config._attn_implementation == attn_impl  # restored
    for got, probs in zip(scores, attentions, strict=True):
        assert torch.allclose(got, concentration_scores(probs))


# Llama tiny: 4 query heads in 2 KV groups of 2. Layer 0 leaves groups of 1 and 2 (uneven, gathered KV);
# layer 1 drops the whole first group (one KV head left, 2 queries share it).
REMOVE = {"gpt2": [[1, 3], [0, 1, 2]], "opt": [[1, 3], [0, 1, 2]], "llama": [[1], [0, 1]]}


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_physical_removal_equals_zeroed_heads(tiny: Any, attn_impl: str) -> None:
    model, family = tiny, tiny.config.model_type
    model.set_attn_implementation(attn_impl)
    reference = copy.deepcopy(model)
    zero_heads(reference, REMOVE[family])
    params_before = sum(p.numel() for p in model.parameters())
    report = prune_heads(model, REMOVE[family])
    assert [r["heads_after"] for r in report] == [4 - len(r) for r in REMOVE[family]]
    assert sum(p.numel() for p in model.parameters()) < params_before
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    # Incremental decoding (KV cache) works with the new shapes and agrees with the reference.
    prompt = ids[:1, :6]
    kwargs: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_llama_layouts_and_pruning_twice(tiny: Any) -> None:
    model = tiny
    reference = copy.deepcopy(model)
    prune_heads(model, REMOVE["llama"])
    attn0, attn1 = attention_modules(model)
    assert isinstance(attn0.k_proj, HeadGather) and attn0.num_key_value_groups == 1
    assert attn0.k_proj.proj.out_features == 2 * attn0.head_dim  # both KV heads still computed once each
    assert attn1.k_proj.out_features == attn1.head_dim and attn1.num_key_value_groups == 2
    # Layer 0 now has original heads [0, 2, 3]; removing its current head 0 leaves one even group [2, 3].
    prune_heads(model, [[0], []])
    zero_heads(reference, [[0, 1], [0, 1]])
    assert not isinstance(attn0.k_proj, HeadGather) and attn0.num_key_value_groups == 2
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiny", ["opt"], indirect=True)
def test_every_head_cannot_go(tiny: Any) -> None:
    with pytest.raises(ValueError, match="keep at least one"):
        prune_heads(tiny, [[0, 1, 2, 3], []])


def test_technique_keeps_one_head_per_layer_and_reports(tiny: Any, tmp_path: Path) -> None:
    ctx = byte_context(tmp_path)
    step = HeadPruning(0.0, n_sequences=2, seq_len=16)  # every score >= 0: all but one head per layer go
    model = step.apply(tiny, ctx)
    info = ctx.info["ah00"]
    assert info["heads_removed_per_layer"] == [3, 3]
    assert all(layer["heads_after"] == 1 for layer in info["layers"])
    assert info["params_after"] == sum(p.numel() for p in model.parameters()) < info["params_before"]
    assert all(len(layer["scores"]) == 4 for layer in info["layers"])
    assert logits(model, torch.randint(0, 128, (1, 8))).shape == (1, 8, 128)


def test_names() -> None:
    assert parse_one("ah90") == HeadPruning(0.9)
    assert parse_one("ah80").name == "ah80"
    assert parse("ah90+bnb4").name == "ah90+bnb4"
