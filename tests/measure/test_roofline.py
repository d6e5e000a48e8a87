"""Roofline figures against hand computations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from efficiency.measure import roofline
from efficiency.measure.memory import stored_bytes
from efficiency.measure.roofline import (
    attention_flops,
    decode_roofline,
    evaluator_flops,
    lookup,
    mfu,
    pass_flops,
    weights_read_per_token,
)


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"),
    # before: the three below matched the H200 SXM row (its bandwidth and compute)
    ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200 96GB HBM3"),
    ("NVIDIA GH200 144G HBM3e", "GH200 144GB HBM3e"),
])
def test_device_table_matches_torch_names(name: str, expected: str) -> None:
    peak = lookup(name)
    assert peak is not None and peak.name == expected and peak.source


def test_every_row_has_a_source_and_dense_half_precision() -> None:
    for peak in roofline.PEAKS:
        assert peak.source.startswith("NVIDIA") and peak.memory_bytes_per_s > 0
        assert peak.dense_flops_per_s["bfloat16"] == peak.dense_flops_per_s["float16"]


def test_decode_roofline_by_hand() -> None:
    # opt-6.7b in bf16: 13.3 GB of weights, 5.7 ms per token on an H100 SXM (3.35 TB/s)
    r = decode_roofline(13_300_000_000, 0.0057, "NVIDIA H100 80GB HBM3")
    assert r["weight_bytes_per_s"] == pytest.approx(13.3e9 / 0.0057)
    assert r["roofline_fraction"] == pytest.approx(13.3e9 / 0.0057 / 3.35e12)  # 0.6965
    assert r["floor_s_per_token"] == pytest.approx(13.3e9 / 3.35e12)
    assert r["reason"] is None


def test_unknown_device_reports_achieved_without_fraction() -> None:
    r = decode_roofline(1000, 0.001, "cpu")
    assert r["weight_bytes_per_s"] == pytest.approx(1e6)
    assert r["roofline_fraction"] is None and "not in the peak table" in r["reason"]
    m = mfu(2000.0, 1.0, torch.float32, "Some Future GPU")
    assert m["achieved_flops_per_s"] == pytest.approx(2000.0) and m["mfu"] is None and m["reason"]


def test_mfu_by_hand() -> None:
    # 1.3e9 parameters, 65,536 tokens processed in 0.5 s: 2 * 1.3e9 * 65536 / 0.5 FLOP/s over 989.5 TFLOP/s
    m = mfu(pass_flops(1_300_000_000, 65_536), 0.5, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    assert m["flops"] == pytest.approx(2 * 1.3e9 * 65536)
    assert m["mfu"] == pytest.approx(2 * 1.3e9 * 65536 / 0.5 / 989.5e12)
    assert mfu(1.0, 1.0, torch.float8_e4m3fn, "NVIDIA H200")["peak_flops_per_s"] == pytest.approx(1979e12)


def test_pass_flops_count_the_head_only_where_logits_are_computed() -> None:
    # 100 weights of which 30 are the LM head; 1,000 tokens through the body, logits at 600 positions, plus 7
    assert pass_flops(100, 1000, head_parameters=30, logit_positions=600, attention=7.0) == \
        2 * 70 * 1000 + 2 * 30 * 600 + 7
    assert pass_flops(100, 1000, head_parameters=30) == 2 * 100 * 1000  # logits everywhere: the old count


def test_attention_flops_by_hand() -> None:
    # 2 layers, 4 heads of 8 (width 32); windows of 3 and 2 tokens: query i attends to i + 1 keys, so 6 and 3
    # query-key pairs; 4 x 32 FLOPs each (QK^T and AV) per layer
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=32)
    assert attention_flops(config, [3, 2]) == 2 * 4 * 32 * (6 + 3)
    gpt2 = SimpleNamespace(n_layer=1, n_head=2, n_embd=16)
    assert attention_flops(gpt2, [1]) == 4 * 16 * 1
    assert attention_flops(SimpleNamespace(), [4]) is None


def test_evaluator_flops_by_hand() -> None:
    # 100 weights, 30 of them the LM head; 1,000 tokens processed in windows of 3 and 2, logits at 600 positions;
    # 2 layers of width 32: attention 2 x 4 x 32 x (6 + 3)
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=32),
                            get_output_embeddings=lambda: SimpleNamespace(weight=torch.zeros(30, 1)))
    ev = SimpleNamespace(n_processed_tokens=1000, window_lengths=[3, 2], n_logit_positions=600)
    assert evaluator_flops(100, model, ev) == (2 * 70 * 1000 + 2 * 30 * 600 + 2 * 4 * 32 * 9, True)
    assert evaluator_flops(None, model, ev) == (None, False)


def test_missing_inputs_give_none_with_reason() -> None:
    assert decode_roofline(None, 0.01, "NVIDIA H200")["reason"]
    assert mfu(100.0, None, torch.float16, "NVIDIA H200")["mfu"] is None


def test_weights_read_per_token_counts_tied_head_once_and_skips_gathered_tables() -> None:
    model = tiny_model("opt")  # OPT ties the LM head to the token embedding; positions are a gathered table
    nbytes, params = weights_read_per_token(model)
    positions = model.model.decoder.embed_positions.weight
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    assert params == total - positions.numel()
    assert nbytes == params * 4  # float32


@pytest.mark.parametrize("technique", ["bnb4", "bnb8"])
def test_bitsandbytes_weights_read_count_logical_weights_and_their_quantisation_state(technique: str) -> None:
    """Before: a packed 4-bit weight counted its uint8 storage as its parameters (half of them, so the FLOPs and
    MFU of a bnb4 pass came out at about half), and neither 4-bit absmax/code nor 8-bit row scales were in the
    weight bytes a decode reads (the roofline fraction came out high)."""
    from pathlib import Path

    from efficiency.measure.memory import model_size
    from efficiency.techniques import Context, parse

    plain = tiny_model("opt")
    plain_bytes, plain_params = weights_read_per_token(plain)
    model = parse(technique).apply(tiny_model("opt"), Context("cpu", None, "t", Path("/tmp")))
    nbytes, params = weights_read_per_token(model)
    assert params == plain_params
    layers = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert layers
    if technique == "bnb4":  # 0.5 byte per weight, a float32 absmax per 64-weight block, a 16-entry float32 code
        per_layer = [m.weight.quant_state.shape.numel() * (0.5 + 4 / 64) + 16 * 4 for m in layers]
    else:  # one byte per weight and a float32 scale per output row
        per_layer = [m.weight.numel() + m.weight.shape[0] * 4 for m in layers]
    linear = sum(m.in_features * m.out_features for m in layers)
    assert nbytes == plain_bytes - linear * 4 + sum(per_layer)
    # the size counts the same weights the same way, plus the gathered tables and buffers a decode does not read
    size = model_size(model)
    assert size.parameters == model_size(plain).parameters
    assert size.size_bytes - nbytes == model_size(plain).size_bytes - plain_bytes


def test_stored_bytes_of_a_quantised_tensor_counts_packed_data() -> None:
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_(lin, Int8WeightOnlyConfig())
    w = lin[0].weight
    assert stored_bytes(w) < 64 * 32 * 4
    assert stored_bytes(w) >= 64 * 32  # int8 data plus scales


def test_model_size_counts_torchao_weights_as_stored() -> None:
    """Before: model_size called count_nonzero on torchao's Int8Tensor, which it does not implement (the case
    errored); and counted logical float bytes."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from efficiency.measure.memory import model_size

    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    quantize_(model, Int8WeightOnlyConfig())
    size = model_size(model)
    assert size.parameters == 64 * 32
    assert 64 * 32 <= size.size_bytes < 64 * 32 * 2


def test_linear_layers_with_packed_buffers_count_their_logical_weights() -> None:
    """Before: a layer keeping its packed weight as a buffer (gemlite) added no parameters, so the FLOPs of the
    pass, and its MFU, came out near zero."""

    class PackedLinear(torch.nn.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.in_features, self.out_features = n_in, n_out
            self.register_buffer("W_q", torch.zeros(n_out, n_in // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(n_out, n_in // 64, dtype=torch.bfloat16))

    model = torch.nn.Sequential(PackedLinear(128, 64), torch.nn.Linear(64, 8, bias=False))
    nbytes, params = weights_read_per_token(model)
    assert params == 128 * 64 + 64 * 8
    assert nbytes == 64 * 64 + 64 * 2 * 2 + 64 * 8 * 4
