"""Pipelines of pruning and quantisation: applied left to right, order recorded, and order matters
(prune, then quantise works; quantise, then prune is refused with a reason)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import byte_context
from efficiency.techniques.base import Context, Pipeline, UnsupportedTechnique, parse, parse_one
from efficiency.techniques.heads import HeadPruning, attention_modules

pytest.importorskip("bitsandbytes")




@pytest.mark.parametrize("tiny", ["opt"], indirect=True)
def test_prune_then_quantise_keeps_the_zeros(tiny: Any, tmp_path: Path) -> None:
    ctx = byte_context(tmp_path)
    model = parse("mag50+bnb8").apply(tiny, ctx)
    assert ctx.info["order"] == ["mag50", "bnb8"]
    assert ctx.info["mag50"]["pruned_layers"] == ctx.info["bnb8"]["quantised_layers"] == 12
    fc1 = model.model.decoder.layers[0].fc1
    assert fc1.weight.dtype == torch.int8
    assert float((fc1.weight == 0).float().mean()) >= 0.5  # int8 keeps zeros as zeros
    assert torch.isfinite(model(torch.randint(0, 128, (1, 8))).logits).all()


@pytest.mark.parametrize("tiny", ["opt"], indirect=True)
def test_quantise_then_prune_is_refused(tiny: Any, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTechnique, match="prune before quantising"):
        parse("bnb8+mag50").apply(tiny, byte_context(tmp_path))


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_heads_then_quantise(tiny: Any, tmp_path: Path) -> None:
    ctx = byte_context(tmp_path)
    fresh = copy.deepcopy(tiny)
    heads: Any = HeadPruning(0.0, n_sequences=2, seq_len=16)  # ah00 with a small calibration set
    pipeline = Pipeline((heads, parse_one("bnb8")))
    assert pipeline.name == parse("ah00+bnb8").name
    model = pipeline.apply(tiny, ctx)
    assert ctx.info["order"] == ["ah00", "bnb8"]
    assert ctx.info["ah00"]["heads_removed_per_layer"] == [3, 3]
    for attn in attention_modules(model):  # the quantised projections have the pruned shapes
        assert type(attn.q_proj).__name__ == "Linear8bitLt"
        assert attn.q_proj.out_features == attn.head_dim
    assert model(torch.randint(0, 128, (1, 8))).logits.shape == (1, 8, 128)
    with pytest.raises(UnsupportedTechnique, match="prune before quantising"):
        parse("bnb8+ah00").apply(fresh, byte_context(tmp_path))


def test_pipeline_counts_applied_steps_for_later_ones(tmp_path: Path) -> None:
    from dataclasses import dataclass

    seen: list[int] = []

    @dataclass(frozen=True)
    class Probe:
        name: str = "probe"

        def check(self, ctx: Context) -> None: ...

        def load_dtype(self, ctx: Context) -> None:
            return None

        def apply(self, model: Any, ctx: Context) -> Any:
            seen.append(ctx.steps_done)
            return model

    ctx = Context("cpu", None, "tiny", tmp_path)
    Pipeline((Probe("probe1"), Probe("probe2"), Probe("probe3"))).apply(object(), ctx)
    assert seen == [0, 1, 2] and ctx.steps_done == 3


@pytest.mark.parametrize("name", ["mag50+mag50", "ah90+bnb4+ah90", "mag50+bnb4-nf4+bnb4"])
def test_a_step_named_twice_is_refused_when_the_name_is_read(name: str) -> None:
    """Each step's report entry is keyed by its name: before, the second ``mag50`` overwrote the first's entry, so
    the report described one pruning pass of two."""
    from efficiency.techniques.base import UnknownTechnique

    with pytest.raises(UnknownTechnique, match=r"appears 2 times in .*: a pipeline names each step once"):
        parse(name)
