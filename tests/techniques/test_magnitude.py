"""Magnitude pruning: exact per-layer sparsity, the 2:4 pattern, untouched embeddings/LM head, filter."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from efficiency.techniques.base import Context, UnsupportedTechnique, parse_one
from efficiency.techniques.magnitude import (
    NO_SPEEDUP,
    MagnitudePruning,
    SparsityPattern,
    block_filter,
    follows_nm,
    nm_keep,
    unstructured_keep,
    weight_view,
)


def ctx(tmp_path: Path) -> Context:
    return Context("cpu", None, "tiny", tmp_path, progress=False)


def block_linears(model: Any) -> list[tuple[str, nn.Module]]:
    chosen = block_filter(model)
    return [(n, m) for n, m in model.named_modules() if n and chosen(m, n)]


def outside_blocks(model: Any) -> dict[str, torch.Tensor]:
    inside = {n for n, _ in block_linears(model)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in inside}


def test_masks() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.6, 0.9]])
    assert unstructured_keep(scores, 0.25).tolist() == [[True, True, True, True, False, True, False, True]]
    assert nm_keep(scores, 2, 4).tolist() == [[True, False, True, False, False, True, False, True]]
    assert follows_nm(scores * nm_keep(scores, 2, 4), 2, 4) and not follows_nm(scores, 2, 4)


@pytest.mark.parametrize("percent", [50, 70])
def test_unstructured_sparsity_is_exact_per_layer(tiny: Any, tmp_path: Path, percent: int) -> None:
    before = outside_blocks(tiny)
    c = ctx(tmp_path)
    step = parse_one(f"mag{percent}")
    step.apply(tiny, c)
    layers = block_linears(tiny)
    assert len(layers) >= 8  # q, k, v, out (or fused) and two MLP layers, in two blocks
    for name, module in layers:
        weight = weight_view(module)
        zeros = int((weight == 0).sum())
        assert abs(zeros - percent / 100 * weight.numel()) <= 1, name
    for name, tensor in outside_blocks(tiny).items():  # embeddings, norms, LM head: untouched
        assert torch.equal(tensor, before[name]), name
    info = c.info[f"mag{percent}"]
    assert info["pruned_layers"] == len(layers) and abs(info["sparsity"] - percent / 100) < 1e-3
    assert info["sparse_kernels"] is False and info["reason"] == NO_SPEEDUP


@pytest.mark.parametrize("tiny", ["opt"], indirect=True)
def test_kept_weights_are_the_largest(tiny: Any, tmp_path: Path) -> None:
    model = tiny
    original = weight_view(model.model.decoder.layers[0].fc1).clone()
    MagnitudePruning(SparsityPattern(0.5)).apply(model, ctx(tmp_path))
    pruned = weight_view(model.model.decoder.layers[0].fc1)
    kept = original.abs()[pruned != 0]
    dropped = original.abs()[pruned == 0]
    assert kept.min() >= dropped.max()
    assert torch.equal(pruned[pruned != 0], original[pruned != 0])


def test_two_four_pattern(tiny: Any, tmp_path: Path) -> None:
    before = outside_blocks(tiny)
    c = ctx(tmp_path)
    parse_one("mag-2:4").apply(tiny, c)
    for name, module in block_linears(tiny):
        weight = weight_view(module)  # (out, in): groups of 4 consecutive inputs per output row
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert bool(((groups == 0).sum(-1) >= 2).all()), name
    for name, tensor in outside_blocks(tiny).items():
        assert torch.equal(tensor, before[name]), name
    assert c.info["mag-2:4"]["sparse_kernels"] is False and NO_SPEEDUP in c.info["mag-2:4"]["reason"]
    assert abs(c.info["mag-2:4"]["sparsity"] - 0.5) < 1e-6


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_filter_chooses_layers(tiny: Any, tmp_path: Path) -> None:
    model = tiny
    reference = copy.deepcopy(model)

    def mlp_only(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and ".mlp." in name

    MagnitudePruning(SparsityPattern(0.5)).apply(model, ctx(tmp_path), filter_fn=mlp_only)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q) != (".mlp." in name), name


@pytest.mark.parametrize("tiny", ["opt"], indirect=True)
def test_quantised_layers_are_refused(tiny: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    model = parse_one("bnb8").apply(tiny, ctx(tmp_path))
    with pytest.raises(UnsupportedTechnique, match="prune before quantising"):
        parse_one("mag50").apply(model, ctx(tmp_path))


def test_names_and_validation() -> None:
    assert parse_one("mag50") == MagnitudePruning(SparsityPattern(0.5))
    assert parse_one("mag-2:4") == MagnitudePruning(SparsityPattern(n=2, m=4))
    assert parse_one("mag05").name == "mag05" and parse_one("mag-2:4").name == "mag-2:4"
    with pytest.raises(ValueError):
        SparsityPattern(n=4, m=2)
    with pytest.raises(ValueError):
        SparsityPattern(1.5)
