"""torchao techniques on the CPU with tiny models: the ones with CPU kernels quantise every block linear layer,
keep the perplexity close, shrink the weights and name the kernel; the GPU-only ones skip with the reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from efficiency.measure.perplexity import PerplexityEvaluator
from efficiency.measure.roofline import weights_read_per_token
from efficiency.techniques.base import Context, UnsupportedTechnique, parse

pytest.importorskip("torchao")


def _ctx() -> Context:
    return Context(device="cpu", tokenizer=None, model_name="tiny", cache_dir=Path("."))


def test_int4wo_after_another_dtype_step_is_refused_not_run_in_bf16() -> None:
    """Before: fp16+int4wo cast the model to bf16 for the int4 kernels while the report's dtype said fp16."""
    ctx = _ctx()
    pipeline = parse("fp16+int4wo-g32")
    model = tiny_model("llama").to(pipeline.load_dtype(ctx, torch.float32))
    with pytest.raises(UnsupportedTechnique, match=r"earlier step made the model fp16; use bf16\+int4wo-g32"):
        pipeline.apply(model, ctx)
    bf16 = parse("bf16+int4wo-g32")
    assert next(bf16.apply(tiny_model("llama"), _ctx()).parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
@pytest.mark.parametrize("name,max_rel,max_bytes_ratio", [("int8wo", 1e-3, 0.45), ("int8dq", 1e-3, 0.45),
                                                          ("fp8wo", 1e-3, 0.45), ("int4wo-g32", 2e-3, 0.45),
                                                          ("int4wo-g32-hqq", 2e-3, 0.45)])
def test_cpu_techniques_quantise(family: str, name: str, max_rel: float, max_bytes_ratio: float,
                                 one_thread: None) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (300,))
    model = tiny_model(family)
    ref = PerplexityEvaluator(ids, 64, 32, 4).run(model, "cpu").perplexity
    base_bytes = weights_read_per_token(model)[0]
    ctx = _ctx()
    pipe = parse(name)
    pipe.check(ctx)
    model = pipe.apply(model.to(pipe.load_dtype(ctx, torch.float32)), ctx)
    got = PerplexityEvaluator(ids, 64, 32, 4).run(model, "cpu").perplexity
    assert abs(got - ref) / ref < max_rel
    info = ctx.info[name]
    assert info["quantised_layers"] == {"gpt2": 8, "opt": 12, "llama": 14}[family]
    assert info["kernel"] and info["weight_tensor"] != "Parameter"
    # tiny models are embedding-heavy: the linear layers shrink 4x, the whole read set to under ~45%
    assert weights_read_per_token(model)[0] < base_bytes * max_bytes_ratio + 2 * 128 * 32 * 4


@pytest.mark.parametrize("name", ["fp8dq", "gemlite-int4", "gemlite-fp8wo"])
def test_gpu_only_techniques_skip_on_cpu_with_the_reason(name: str) -> None:
    with pytest.raises(UnsupportedTechnique, match="CUDA|GPU"):
        parse(name).check(_ctx())


def test_int4wo_on_the_cpu_uses_torchaos_cpu_packing_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4wo skipped on the CPU saying 'the CPU packing was removed from torchao'; it had moved to torchao's
    prototype namespace (Int4OpaqueTensor, aten._weight_int4pack_mm_for_cpu), under one config name in 0.17 and
    another in 0.18. Either is found; a torchao with neither skips with the reason, before any model loads."""
    import torchao.prototype.quantization.int4 as cpu_int4

    from efficiency.techniques import torchao_quant

    step = parse("int4wo-g64").steps[0]
    step.check(_ctx())
    config = step.config(on_cpu=True)
    assert type(config).__name__ in torchao_quant.CPU_INT4_CONFIGS and config.group_size == 64
    assert parse("int4wo-hqq").steps[0].config(on_cpu=True).int4_choose_qparams_algorithm == "hqq"
    assert type(step.config(on_cpu=False)).__name__ == "Int4WeightOnlyConfig"  # the GPU's tile packing
    for name in torchao_quant.CPU_INT4_CONFIGS:
        monkeypatch.delattr(cpu_int4, name, raising=False)
    with pytest.raises(UnsupportedTechnique, match="int4wo on the CPU needs torchao's"):
        step.check(_ctx())


def test_names() -> None:
    assert parse("int4wo-g64-hqq+compile").name == "int4wo-g64-hqq+compile"
    assert parse("int4wo").name == "int4wo" and parse("gemlite-int4").name == "gemlite-int4"


@pytest.mark.slow
@pytest.mark.parametrize("name,max_increase_pct", [("int8wo", 2.0), ("int8dq", 5.0), ("fp8wo", 5.0)])
def test_real_smollm2_perplexity_on_cpu(name: str, max_increase_pct: float, smollm2_folder: Path,
                                        smollm2_eval_ids: torch.Tensor) -> None:
    """The CPU techniques on the real SmolLM2-135M (small budget): a real model's perplexity, close to fp32's."""
    from transformers import AutoModelForCausalLM

    folder, ids = smollm2_folder, smollm2_eval_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = PerplexityEvaluator(ids, 256, 256, 3).run(model, "cpu").perplexity
    ctx = _ctx()
    model = parse(name).apply(model, ctx)
    got = PerplexityEvaluator(ids, 256, 256, 3).run(model, "cpu").perplexity
    assert 5 < ref < 200
    assert (got - ref) / ref * 100 < max_increase_pct, (name, ref, got)


def test_gemlite_autotune_options_are_validated_and_handed_to_gemlite() -> None:
    """``[tool.efficiency.technique."gemlite-int4"] gemv_autotune = "max"`` reaches gemlite's own setter for its
    GEMV kernels only; a value gemlite does not know is refused by the options check, before any model loads."""
    from efficiency.errors import ConfigError
    from efficiency.techniques.gemlite_quant import configure_autotune

    tuned = parse("gemlite-int4", {"gemlite-int4": {"gemv_autotune": "max", "cuda_graph_autotune": True}})
    step = tuned.steps[0]
    assert (step.gemv_autotune, step.cuda_graph_autotune, step.name) == ("max", True, "gemlite-int4")
    with pytest.raises(ConfigError, match="autotune"):
        parse("gemlite-int4", {"gemlite-int4": {"gemv_autotune": "maximum"}})

    calls: list[tuple[dict[str, str], bool]] = []

    class FakeGemlite:  # stands in for the module on a machine without a GPU; records what the technique asks
        @staticmethod
        def set_autotune(setting: dict[str, str], use_cuda_graph: bool) -> None:
            calls.append((setting, use_cuda_graph))

    configure_autotune(FakeGemlite, step.gemv_autotune, step.cuda_graph_autotune)
    assert calls == [({"GEMM": "fast", "GEMM_SPLITK": "fast", "GEMV": "max", "GEMV_REVSPLITK": "max",
                       "GEMV_SPLITK": "max"}, True)]


def test_int4wo_refuses_layers_its_group_does_not_divide() -> None:
    """torchao leaves a layer whose inputs its int4 group does not divide unquantised, with an info log line only:
    gpt2-xl's 1600-wide layers under int4wo's group 128 ran three of four layers per block in bf16 while the report
    said int4. The case is now refused with the reason and the group that fits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=96, n_layer=1, n_head=2)).eval()
    with pytest.raises(UnsupportedTechnique, match=r"not a multiple of the group size 128; int4wo-g32 fits"):
        parse("int4wo").steps[0].apply(model, _ctx())


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_int4_groups_are_checked_on_the_config_before_a_model_loads(family: str) -> None:
    """An int4 group that does not divide a layer's inputs is refused from the model's config (modules on the meta
    device), before any weight loads; the steps before it must leave the layers' shapes alone for that."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(tiny_config(family))  # widths 32 and 64 (GPT-2: 32 and 128)

    def unbuilt() -> torch.nn.Module:
        raise AssertionError("no step of this pipeline needed the layers")

    with pytest.raises(UnsupportedTechnique, match=r"not a multiple of the group size 128; int4wo-g32 fits"):
        parse("bf16+int4wo+compile").check_layers(lambda: skeleton)
    with pytest.raises(UnsupportedTechnique, match=r"group size 64; no gemlite-int4 group size fits every layer"):
        parse("gemlite-int4-g64").check_layers(lambda: skeleton)  # gemlite takes 64 or 128: neither divides 32
    parse("int4wo-g32+compile").check_layers(lambda: skeleton)  # fits every layer
    parse("bf16+int8wo+compile").check_layers(unbuilt)  # nothing to check: the skeleton is never built
    parse("ah90+int4wo").check_layers(unbuilt)  # head pruning may change the shapes int4wo meets: apply checks


def test_gemlite_int4_refuses_a_misfit_group_on_the_model_in_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a shape-changing step only ``apply`` sees the layers: gemlite-int4 refuses them there by the same rule
    and message as the config check, before it touches gemlite's kernels (faked here: the check runs first)."""
    from efficiency.techniques import gemlite_quant

    monkeypatch.setattr(gemlite_quant, "require_gemlite", lambda: (object(), None))
    monkeypatch.setattr(gemlite_quant, "configure_autotune", lambda *args: None)
    with pytest.raises(UnsupportedTechnique, match=r"gemlite-int4: 6 of 8 linear layers \(transformer.h.0.attn.c_attn: "
                                                   r"32 inputs\) are not a multiple of the group size 128; no "
                                                   r"gemlite-int4 group size fits every layer"):
        parse("gemlite-int4").steps[0].apply(tiny_model("gpt2"), _ctx())


def test_the_widths_checked_on_the_config_are_the_widths_quantised() -> None:
    """GPT-2's Conv1D stores its weight (in, out): the config check reads the same input widths as the quantiser,
    which reads them after turning Conv1D into nn.Linear."""
    from efficiency.techniques.torchao_quant import conv1d_to_linear, input_widths

    model = tiny_model("gpt2")
    before = input_widths(model)
    assert sorted(set(before.values())) == [32, 128] and len(before) == 8
    conv1d_to_linear(model)
    assert input_widths(model) == before


def test_layers_torchao_left_unquantised_are_found() -> None:
    """The check behind every torchao technique's report: a layer whose weight is still a plain tensor."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from efficiency.techniques.torchao_quant import unquantised

    model = tiny_model("opt")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, fqn: fqn == names[0])
    assert unquantised(model, names) == names[1:]


def test_the_mfu_of_dynamically_quantised_matmuls_is_against_their_dtypes_peak() -> None:
    """int8dq and fp8dq multiply in int8 / fp8, whose dense peak is twice bf16's on an H100 or H200: their MFU
    was reported against the bf16 peak (int8dq on opt-6.7b: 71%, above bf16's own 63%; section 5f)."""
    from efficiency.techniques.base import MATMUL_DTYPE_KEY, matmul_dtype
    from efficiency.techniques.torchao_quant import TorchaoQuant

    gpu = Context(device="cuda:0", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    cpu = Context(device="cpu", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    assert TorchaoQuant("int8dq").matmul_dtype(gpu) == "int8"
    assert TorchaoQuant("fp8dq").matmul_dtype(gpu) == "float8"
    assert TorchaoQuant("int8dq").matmul_dtype(cpu) is None
    assert all(TorchaoQuant(k).matmul_dtype(gpu) is None for k in ("int8wo", "int4wo", "fp8wo"))
    assert matmul_dtype({"fused_projections": {}, "int8dq": {MATMUL_DTYPE_KEY: "int8"}, "compile": {}}) == "int8"
    assert matmul_dtype({"bf16": {"dtype": "bf16"}}) is None

    from efficiency.measure.roofline import mfu
    from efficiency.phases.perplexity import mfu_dtype

    shared = {"compute_dtype": torch.bfloat16, "matmul_dtype": "int8"}
    m = mfu(704.2e12 * 0.2918, 0.2918, mfu_dtype(shared), "NVIDIA H200")  # int8dq's opt-6.7b pass (section 5f)
    assert m["compute_dtype"] == "int8" and m["peak_flops_per_s"] == 1979e12
    assert abs(m["mfu"] - 704.2 / 1979) < 1e-9  # 35.6%, not 71.2% of the bf16 peak
    assert mfu_dtype({"compute_dtype": torch.bfloat16, "matmul_dtype": None}) is torch.bfloat16


def test_a_bias_moved_after_the_matmul_gives_the_same_function_and_parameters() -> None:
    """fp8dq keeps the layers' biases out of its fp8 GEMM (cuBLASLt refuses the bias epilogue at few rows, section
    5g): the moved bias must give the same outputs, eagerly and compiled whole, and leave the parameters alone."""
    from efficiency.techniques.torchao_quant import OUTPUT_BIAS, move_bias_after_matmul

    model = tiny_model("opt")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    fc1_before = model.model.decoder.layers[0].fc1
    weight, bias = fc1_before.weight.detach().clone(), fc1_before.bias.detach().clone()
    with torch.no_grad():
        ref = model(ids).logits
    params = sum(p.numel() for p in model.parameters())
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    assert move_bias_after_matmul(model, targets) == 12  # OPT's q, k, v, out, fc1, fc2 in 2 layers all have one
    fc1 = model.model.decoder.layers[0].fc1
    assert fc1.bias is None and getattr(fc1, OUTPUT_BIAS).shape == (64,)
    assert sum(p.numel() for p in model.parameters()) == params
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        compiled = torch.compile(fc1, fullgraph=True)  # the hook is traced into the graph, not dropped
        torch.testing.assert_close(compiled(x), torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fp8dq_runs_a_wide_layer_with_a_bias_at_one_row_eagerly_and_compiled() -> None:
    """opt-6.7b's fc2 shape (16384 -> 4096, with a bias) at one row: with the bias in torchao's fp8 GEMM cuBLASLt
    raised CUBLAS_STATUS_NOT_SUPPORTED on the H200 (section 5g), so fp8dq had no batch-1 decode."""
    layer = torch.nn.Sequential(torch.nn.Linear(16384, 4096, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, 16384, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x).float()
    ctx = Context(device="cuda", tokenizer=None, model_name="fc2", cache_dir=Path("."))
    pipe = parse("fp8dq")
    pipe.check(ctx)
    model = pipe.apply(layer, ctx)
    assert "after the GEMM in 1 layers" in ctx.info["fp8dq"]["bias"]
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.inference_mode():
        for run in (model, compiled):
            for _ in range(3):
                got = run(x).float()
            torch.cuda.synchronize()
            assert ((got - ref).norm() / ref.norm()).item() < 0.1  # fp8 e4m3 weights and activations


@pytest.mark.parametrize("name", ["int8wo", "bf16+int8wo", "int8dq", "fp8wo"])
def test_the_kernel_named_on_the_cpu_is_the_one_a_quantised_layer_runs(name: str, one_thread: None) -> None:
    """The report named ``torch.ops.aten._weight_int8pack_mm`` as int8wo's CPU kernel, from a table; with torchao
    0.18 an eager int8wo layer runs ``aten.mm`` on its weight converted at each call. Every matmul operator the
    report names must be one that a call of another quantised layer runs (observed here with the profiler alone),
    and the one it runs must be named."""
    from torch.profiler import ProfilerActivity, profile

    from efficiency.measure.ops import MATMUL_OPS

    ctx = _ctx()
    pipe = parse(name)
    model = pipe.apply(tiny_model("llama").to(pipe.load_dtype(ctx, torch.float32)), ctx)
    info = ctx.info[name.split("+")[-1]]
    layer = model.model.layers[-1].mlp.down_proj  # not the layer the technique observed
    x = torch.randn(1, 3, layer.weight.shape[-1], dtype=next(model.parameters()).dtype)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x)
    ran = {e.key.removeprefix("aten::") for e in prof.key_averages()} & MATMUL_OPS
    named = set(re.findall(r"aten\.(\w+)", info["kernel"])) & MATMUL_OPS
    assert ran and named == ran, (info["kernel"], ran)
    assert info["kernel_source"].startswith("observed")
