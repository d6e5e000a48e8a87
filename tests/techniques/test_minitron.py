"""Minitron: importance on planted models, exact surgery (shapes, config, reload, KV cache), recovery."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import CharTokenizer, tiny_model
from conftest import word_corpus as corpus
from efficiency.techniques.base import Context, UnsupportedTechnique, parse
from efficiency.techniques.distil import KdSettings, count_params, sample_from_teacher
from efficiency.techniques.minitron import (
    Minitron,
    decoder_layers,
    head_plan,
    keep_layers,
    layer_importance,
    prune_channels,
    prune_heads,
    prune_mlp,
    width_importance,
)

TINY = KdSettings(tokens=2048, batch_size=4, seq_len=32, lr=1e-3, warmup=0.1, heldout_tokens=256)
IDS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def llama(kv_heads: int = 4, layers: int = 4, tied: bool = False, planted: bool = True) -> Any:
    """hidden 48, 8 query heads of dim 4 in ``kv_heads`` KV groups, MLP 64. ``planted``: LM head and MLP
    outputs scaled up so that every block matters (see test_distil.llama_teacher)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, max_position_embeddings=64, hidden_size=48, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=4, intermediate_size=64,
                      tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if planted:
        with torch.no_grad():
            model.lm_head.weight.mul_(10)
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.mul_(8)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


def roundtrip(model: Any, tmp_path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------- importance


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_neuron_importance_finds_planted_neurons(family: str) -> None:
    model = llama() if family == "llama" else tiny_model(family)
    layer: Any = decoder_layers(model)[0]
    with torch.no_grad():
        if family == "llama":
            layer.mlp.gate_proj.weight[[3, 7]] = 0  # silu(0) * up = 0: dead neurons
            layer.mlp.up_proj.weight[5] *= 50
        elif family == "opt":
            layer.fc1.weight[[3, 7]] = 0
            layer.fc1.bias[[3, 7]] = 0  # relu(0) = 0
            layer.fc1.weight[5] *= 50
        else:
            layer.mlp.c_fc.weight[:, [3, 7]] = 0
            layer.mlp.c_fc.bias[[3, 7]] = 0  # gelu(0) = 0
            layer.mlp.c_fc.weight[:, 5] *= 50
    scores = width_importance(model, IDS, "cpu").neurons[0]
    order = scores.argsort()
    assert set(order[:2].tolist()) == {3, 7} and order[-1].item() == 5


def test_head_and_channel_importance_find_planted_ones() -> None:
    model = llama(kv_heads=4)  # 2 query heads per KV head: head h reads KV head h // 2
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[0:4] = 0  # KV head 0 -> query heads 0, 1 output nothing
            layer.self_attn.v_proj.weight[12:16] *= 20  # KV head 3 -> query heads 6, 7 dominate
        for norm in [model.model.norm] + [n for lyr in model.model.layers
                                          for n in (lyr.input_layernorm, lyr.post_attention_layernorm)]:
            norm.weight[9] = 0
            norm.weight[4] *= 10
    imp = width_importance(model, IDS, "cpu")
    for heads in imp.heads:
        order = heads.argsort().tolist()
        assert set(order[:2]) == {0, 1} and set(order[-2:]) == {6, 7}
    assert imp.channels.argmin().item() == 9 and imp.channels.argmax().item() == 4


def test_identity_layer_ranks_least_important() -> None:
    model = llama()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: an identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    # On text the model samples itself, skipping any layer that matters raises the loss (Gibbs' inequality).
    ids = sample_from_teacher(model, 1, 8, 24, 8, seed=0, device="cpu")
    scores = layer_importance(model, ids, "cpu")
    assert scores[2].abs().item() < 1e-6 and scores.argmin().item() == 2 and (scores[[0, 1, 3]] > 0).all()


# ------------------------------------------------------------------------------------------------- surgery


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_layer_removal_is_exact_for_identity_layers_and_reloads(family: str, tmp_path: Path) -> None:
    model = llama() if family == "llama" else tiny_model(family)
    layers = decoder_layers(model)
    with torch.no_grad():
        for name, p in layers[0].named_parameters():  # make layer 0 an identity: zero its residual writes
            if any(k in name for k in ("o_proj", "down_proj", "out_proj", "fc2", "c_proj")):
                p.zero_()
    reference = logits(model)
    removed = sum(p.numel() for p in layers[0].parameters())
    before = count_params(model)
    n = len(layers)
    info = keep_layers(model, list(range(1, n)))
    assert info["layers_removed"] == [0] and model.config.num_hidden_layers == n - 1
    assert count_params(model) == before - removed
    torch.testing.assert_close(logits(model), reference)
    reloaded = roundtrip(model, tmp_path)
    torch.testing.assert_close(logits(reloaded), reference)
    attn = [m for m in decoder_layers(reloaded)[0].modules() if hasattr(m, "layer_idx")]
    assert attn and all(m.layer_idx == 0 for m in attn)
    out = reloaded.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_mlp_pruning_is_exact_for_dead_neurons_and_reloads(family: str, tmp_path: Path) -> None:
    model = llama() if family == "llama" else tiny_model(family)
    key = {"llama": "intermediate_size", "opt": "ffn_dim", "gpt2": "n_inner"}[family]
    scores = width_importance(model, IDS, "cpu").neurons
    width = scores[0].numel()
    keep = width * 3 // 4
    down = {"llama": "mlp.down_proj", "opt": "fc2", "gpt2": "mlp.c_proj"}[family]
    with torch.no_grad():  # neurons about to go write nothing: removal must not change the output
        for layer, s in zip(decoder_layers(model), scores, strict=True):
            drop = s.argsort()[: width - keep]
            out: Any = layer.get_submodule(down)
            if family == "gpt2":
                out.weight[drop] = 0
            else:
                out.weight[:, drop] = 0
    reference, before = logits(model), count_params(model)
    prune_mlp(model, scores, keep)
    assert getattr(model.config, key) == keep
    per_neuron = {"llama": 3 * 48, "opt": 2 * 32 + 1, "gpt2": 2 * 32 + 1}[family]
    assert count_params(model) == before - len(scores) * (width - keep) * per_neuron
    torch.testing.assert_close(logits(model), reference)
    torch.testing.assert_close(logits(roundtrip(model, tmp_path)), reference)


@pytest.mark.parametrize(
    ("heads", "groups", "remove", "hidden", "expected"),
    [
        (9, 3, 0.25, 576, ("groups", 2, 3)),  # SmolLM2-135M: 6 heads either way; groups shrink the KV cache
        (8, 4, 0.25, 48, ("groups", 3, 2)),
        (8, 2, 0.25, 48, ("queries", 2, 3)),  # whole groups would be 4 or 8 heads; 3 per group gives 6
        (8, 4, 0.25, 32, ("groups", 4, 2)),  # 6 heads do not divide 32: keep all rather than prune to 4
        (8, 8, 0.5, 64, ("groups", 4, 1)),  # plain multi-head attention
    ],
)
def test_head_plan(heads: int, groups: int, remove: float, hidden: int, expected: tuple[str, int, int]
                   ) -> None:
    assert head_plan(heads, groups, remove, hidden) == expected


@pytest.mark.parametrize(("kv_heads", "mode"), [(4, "groups"), (2, "queries")])
def test_head_pruning_is_exact_for_silent_heads(kv_heads: int, mode: str, tmp_path: Path) -> None:
    model = llama(kv_heads=kv_heads)
    rep = 8 // kv_heads
    # Scores: the heads to drop are head 0's group (groups mode) or query 0 of every group (queries mode).
    drop = list(range(rep)) if mode == "groups" else [g * rep for g in range(kv_heads)]
    scores = [torch.tensor([0.0 if h in drop else 1.0 + h for h in range(8)]) for _ in range(4)]
    with torch.no_grad():
        for layer in model.model.layers:  # silence the dropped heads in o_proj so the output must not change
            for h in drop:
                layer.self_attn.o_proj.weight[:, h * 4 : (h + 1) * 4] = 0
    reference = logits(model)
    info = prune_heads(model, scores, 0.25)
    assert info["mode"] == mode and model.config.num_attention_heads == 6
    assert model.config.num_key_value_heads == (3 if mode == "groups" else kv_heads)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (24, 48) and attn.o_proj.weight.shape == (48, 24)
    assert attn.k_proj.weight.shape == (4 * model.config.num_key_value_heads, 48)
    torch.testing.assert_close(logits(model), reference)
    reloaded = roundtrip(model, tmp_path)
    torch.testing.assert_close(logits(reloaded), reference)
    cached = reloaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
    plain = reloaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_heads_and_channels_stay_for_families_that_cannot_reload_them() -> None:
    model = tiny_model("gpt2")
    imp = width_importance(model, IDS, "cpu")
    assert prune_heads(model, imp.heads, 0.5)["pruned"] is False
    assert prune_channels(model, imp.channels, 16)["pruned"] is False
    assert model.config.n_head == 4 and model.config.n_embd == 32


@pytest.mark.parametrize("tied", [False, True])
def test_channel_pruning_shrinks_the_residual_stream(tied: bool, tmp_path: Path) -> None:
    model = llama(tied=tied)
    imp = width_importance(model, IDS, "cpu")
    with pytest.raises(ValueError, match="multiple"):
        prune_channels(model, imp.channels, 36)  # 8 heads
    info = prune_channels(model, imp.channels, 40)
    assert info["channels_kept"] == 40 and model.config.hidden_size == 40 and model.config.head_dim == 4
    assert model.model.embed_tokens.weight.shape == (128, 40) and model.lm_head.weight.shape == (128, 40)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 40)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (40, 64)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert logits(model).shape == (4, 16, 128)
    torch.testing.assert_close(logits(roundtrip(model, tmp_path)), logits(model))


# ------------------------------------------------------------------------------------------ end to end


def test_names_parse_and_unsupported_family(tmp_path: Path) -> None:
    assert [s.name for s in parse("minitron-w25+minitron-d25+minitron-w50-e")] == [
        "minitron-w25", "minitron-d25", "minitron-w50-e"]
    model = SimpleNamespace(config=SimpleNamespace(model_type="bert"))
    with pytest.raises(UnsupportedTechnique, match="bert"):
        Minitron("w", 25).apply(model, Context("cpu", None, "x", tmp_path))


@pytest.mark.parametrize(("axis", "embedding"), [("w", False), ("d", False), ("w", True)])
def test_minitron_end_to_end(axis: str, embedding: bool, tmp_path: Path) -> None:
    teacher = llama()
    technique = Minitron(axis, 25, embedding, TINY, importance_sequences=8)
    ctx = Context("cpu", CharTokenizer(), "tiny-llama", tmp_path, calibration=corpus, progress=False)
    student = technique.apply(teacher, ctx)
    info = ctx.info[technique.name]
    assert info["cache"] == "miss" and info["params_student"] < info["params_teacher"]
    if axis == "d":
        assert student.config.num_hidden_layers == 3 and len(info["structure"]["layer_ce_increase"]) == 4
    else:
        assert student.config.intermediate_size == 48 and student.config.num_attention_heads == 6
        assert info["structure"]["heads"]["mode"] == "groups"
        assert student.config.hidden_size == (36 if embedding else 48)
    training = info["training"]
    assert training["loss_final"] < training["loss_step0"]
    held = info["heldout"]
    assert held["after_training"]["kl_from_teacher"] < held["before_training"]["kl_from_teacher"]
    assert {"perplexity", "n_scored_tokens"} <= set(held["before_training"])
    assert "perplexity" in held["teacher"]
    ctx2 = Context("cpu", CharTokenizer(), "tiny-llama", tmp_path, calibration=corpus, progress=False)
    again = technique.apply(teacher, ctx2)
    assert ctx2.info[technique.name]["cache"] == "hit"
    torch.testing.assert_close(logits(again), logits(student))
