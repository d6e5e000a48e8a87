"""SparseGPT: the OBS solver against magnitude pruning and least squares, the block-input capture, exact
sparsity / 2:4 on tiny models, and the on-disk cache (hit on a repeat, miss when a setting changes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import ByteTokenizer, byte_context
from efficiency.techniques.base import Context, UnsupportedTechnique, parse_one
from efficiency.techniques.magnitude import (
    SparsityPattern,
    block_filter,
    follows_nm,
    pattern_keep,
    weight_view,
)
from efficiency.techniques.sparsegpt import (
    BlockHessians,
    HessianAccumulator,
    SparseGPT,
    capture_block_inputs,
    decoder_layers,
    run_block,
    sparsegpt_prune,
)

TINY: dict[str, Any] = {"n_sequences": 4, "seq_len": 32, "batch_size": 2, "block_size": 16}


def correlated_layer(rows: int = 48, cols: int = 128, n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight (rows, cols) and inputs (cols, n) with strongly correlated features."""
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = mixing @ torch.randn(cols, n, generator=gen) + 0.1 * torch.randn(cols, n, generator=gen)
    return torch.randn(rows, cols, generator=gen), x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[0], torch.device("cpu"))
    for chunk in x.t().split(500):  # (t, cols) rows, as a hook sees them
        acc.add(chunk)
    return acc.hessian


def test_hessian_is_two_x_xt_over_n() -> None:
    _, x = correlated_layer()
    assert torch.allclose(hessian_of(x), 2 * x @ x.t() / x.shape[1], atol=1e-4)


@pytest.mark.parametrize("pattern", [SparsityPattern(0.5), SparsityPattern(0.7), SparsityPattern(n=2, m=4)])
def test_reconstruction_beats_magnitude(pattern: SparsityPattern) -> None:
    w, x = correlated_layer()
    pruned = sparsegpt_prune(w, hessian_of(x), pattern, block_size=32)
    magnitude = w * pattern_keep(w.abs(), pattern)
    n_zeros = round(pattern.target_sparsity * w.numel())
    assert int((pruned == 0).sum()) == int((magnitude == 0).sum()) == n_zeros
    if pattern.is_nm:
        assert follows_nm(pruned, 2, 4)
    err_sparsegpt = float(((w - pruned) @ x).norm())
    err_magnitude = float(((w - magnitude) @ x).norm())
    assert err_sparsegpt < 0.9 * err_magnitude


def test_obs_update_is_the_least_squares_optimum() -> None:
    """One pruned weight in the first column: the OBS update of the rest is the exact least-squares refit."""
    w, x = correlated_layer(rows=1, cols=8)
    w[0, 0] = 1e-4  # the lowest saliency: SparseGPT prunes this one weight (sparsity 1/8)
    pruned = sparsegpt_prune(w, hessian_of(x), SparsityPattern(1 / 8), damp=1e-9)
    assert pruned[0, 0] == 0 and int((pruned == 0).sum()) == 1
    # min ||w x - w' x|| with w'_0 = 0: regress the target w x on the other 7 input rows.
    target = (w @ x).t()  # (n, 1)
    refit = torch.linalg.lstsq(x[1:].t().double(), target.double()).solution.t().float()  # (1, 7)
    assert torch.allclose(pruned[:, 1:], refit, atol=1e-3, rtol=1e-3)


def test_captured_block_inputs_reproduce_the_model(tiny: Any) -> None:
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    _, blocks = decoder_layers(tiny)
    records = capture_block_inputs(tiny, blocks[0], ids, batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        hidden = tiny(ids, output_hidden_states=True, use_cache=False).hidden_states  # (embeddings, ...)
        assert torch.allclose(torch.cat([r.hidden for r in records]), hidden[0])
        out = torch.cat([run_block(blocks[0], r) for r in records])
    assert torch.allclose(out, hidden[1], atol=1e-5)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_layers_fed_the_same_input_share_one_hessian(tiny: Any) -> None:
    _, blocks = decoder_layers(tiny)
    targets = [(sub, mod) for sub, mod in blocks[0].named_modules() if isinstance(mod, torch.nn.Linear)]
    inputs: dict[str, list[torch.Tensor]] = {sub: [] for sub, _ in targets}
    spies = [mod.register_forward_hook(lambda m, i, o, sub=sub: inputs[sub].append(i[0])) for sub, mod in targets]
    hessians = BlockHessians(targets)
    records = capture_block_inputs(tiny, blocks[0], torch.randint(0, 128, (4, 12)), 2, torch.device("cpu"))
    for record in records:
        run_block(blocks[0], record)
        hessians.end_batch()
    hessians.remove()
    for spy in spies:
        spy.remove()
    assert hessians.owner == {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
                              "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
                              "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj",
                              "mlp.down_proj": "mlp.down_proj"}
    for sub, _ in targets:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[sub]])  # (tokens, in)
        assert torch.allclose(hessians.hessian(sub), 2 * x.t() @ x / len(x), atol=1e-5)


@pytest.mark.parametrize("name", ["sparsegpt50", "sparsegpt-2:4"])
def test_model_sparsity_and_pattern(tiny: Any, tmp_path: Path, name: str) -> None:
    step = SparseGPT(parse_one(name).pattern, **TINY)  # type: ignore[attr-defined]
    ctx = byte_context(tmp_path)
    embeddings = tiny.get_input_embeddings().weight.detach().clone()
    model = step.apply(tiny, ctx)
    chosen = block_filter(model)
    layers = [(n, m) for n, m in model.named_modules() if n and chosen(m, n)]
    for layer_name, module in layers:
        weight = weight_view(module)
        if step.pattern.is_nm:
            assert follows_nm(weight, 2, 4), layer_name
        else:
            assert abs(int((weight == 0).sum()) - weight.numel() // 2) <= 1, layer_name
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    info = ctx.info[name]
    assert info["pruned_layers"] == len(layers) and info["cache"] == "miss"
    assert abs(info["sparsity"] - 0.5) < 1e-3 and info["sparse_kernels"] is False
    assert torch.isfinite(model(torch.randint(0, 128, (1, 8))).logits).all()


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_cache_hit_on_repeat_and_miss_on_change(tiny: Any, tmp_path: Path) -> None:
    def run(step: SparseGPT) -> tuple[Any, dict[str, Any]]:
        ctx = byte_context(tmp_path)
        model = step.apply(copy.deepcopy(tiny), ctx)  # a fresh copy of the same unpruned model each time
        return model, ctx.info[step.name]

    step = SparseGPT(SparsityPattern(0.5), **TINY)
    first, info1 = run(step)
    second, info2 = run(step)
    assert (info1["cache"], info2["cache"]) == ("miss", "hit")
    assert info1["cache_entry"] == info2["cache_entry"]
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)
    _, info3 = run(SparseGPT(SparsityPattern(0.5), **{**TINY, "n_sequences": 3}))
    _, info4 = run(SparseGPT(SparsityPattern(0.6), **TINY))
    assert info3["cache"] == info4["cache"] == "miss"
    assert len({info1["cache_entry"], info3["cache_entry"], info4["cache_entry"]}) == 3


def test_pruning_reports_its_progress_through_the_context_log(tiny: Any, tmp_path: Path) -> None:
    """Before: a tqdm bar on stderr, which pytest captures: nothing showed between 'loading' and the perplexity
    pass (87 s on SmolLM2 on this CPU; minutes on larger models)."""
    import dataclasses

    lines: list[str] = []
    ctx = dataclasses.replace(byte_context(tmp_path), log=lines.append, progress=True)
    SparseGPT(SparsityPattern(0.5), **TINY).apply(tiny, ctx)
    n_blocks = len(decoder_layers(tiny)[1])
    assert any(line.startswith("sparsegpt50: pruning: 1/") for line in lines), lines
    assert f"sparsegpt50: pruning: {n_blocks}/{n_blocks} blocks (100%)" in "\n".join(lines)
    quiet: list[str] = []
    SparseGPT(SparsityPattern(0.6), **TINY).apply(tiny, dataclasses.replace(byte_context(tmp_path), log=quiet.append))
    assert not any("pruning" in line for line in quiet)  # progress off: nothing


def test_needs_calibration(tmp_path: Path) -> None:
    ctx = Context("cpu", ByteTokenizer(), "tiny", tmp_path)
    with pytest.raises(UnsupportedTechnique, match="calibration"):
        parse_one("sparsegpt50").check(ctx)


def test_names() -> None:
    assert parse_one("sparsegpt50") == SparseGPT(SparsityPattern(0.5))
    assert parse_one("sparsegpt-2:4").name == "sparsegpt-2:4"
    with pytest.raises(ValueError):
        SparseGPT(SparsityPattern(n=2, m=4), block_size=30)
