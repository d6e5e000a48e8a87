"""bitsandbytes: the module swap gives the model teams ship, i.e. the same outputs as transformers'
``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` of the same weights, on CPU here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from efficiency.techniques.base import Context, parse

pytest.importorskip("bitsandbytes")


def model_128(family: str) -> Any:
    """Tiny models whose layer widths are multiples of bitsandbytes' 64-value block (the CPU packed kernel)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    torch.manual_seed(0)
    cfg = {
        "gpt2": GPT2Config(vocab_size=128, n_positions=64, n_embd=128, n_layer=2, n_head=4),
        "llama": LlamaConfig(vocab_size=128, max_position_embeddings=64, hidden_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=256),
        "opt": OPTConfig(vocab_size=128, max_position_embeddings=64, hidden_size=128, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=128),
    }[family]
    return AutoModelForCausalLM.from_config(cfg).eval()


def transformers_config(name: str) -> Any:
    from transformers import BitsAndBytesConfig

    if name == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if name == "bnb4-fp4" else "nf4",
                              bnb_4bit_compute_dtype=torch.float32)


def perplexity(model: Any, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(ids, labels=ids).loss.exp())


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
@pytest.mark.parametrize("name", ["bnb4", "bnb4-fp4", "bnb8"])
def test_swap_equals_transformers_from_pretrained(tmp_path: Path, family: str, name: str) -> None:
    from transformers import AutoModelForCausalLM

    model_128(family).save_pretrained(tmp_path / "m")
    ctx = Context("cpu", None, "t", tmp_path)
    ours = parse(name).apply(model_128(family), ctx)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=transformers_config(name),
                                                  device_map="cpu", dtype=torch.float32)
    kinds = {n: type(m).__name__ for n, m in ours.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert kinds == {n: type(m).__name__ for n, m in theirs.named_modules()
                     if type(m).__module__.startswith("bitsandbytes")}  # same layers, lm_head kept
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    assert perplexity(ours, ids) == perplexity(theirs, ids)
    assert "module swap" in ctx.info[name]["path"]


def test_swapped_layers_follow_the_model_mode(tmp_path: Path) -> None:
    """A new module starts in training mode, where bitsandbytes takes another kernel than the shipped model."""
    ours = parse("bnb4").apply(model_128("llama"), Context("cpu", None, "t", tmp_path))
    assert not any(m.training for m in ours.modules())


def test_narrow_layers_use_the_reference_kernel_on_cpu(tmp_path: Path) -> None:
    from conftest import tiny_model

    ctx = Context("cpu", None, "t", tmp_path)
    model = parse("bnb4").apply(tiny_model("gpt2"), ctx)  # 32-wide layers: not a multiple of 64
    ids = torch.randint(0, 128, (2, 16))
    assert torch.isfinite(torch.tensor(perplexity(model, ids)))
    assert "transformer.h.0.attn.c_attn" in ctx.info["bnb4"]["cpu_reference_kernel_layers"]
