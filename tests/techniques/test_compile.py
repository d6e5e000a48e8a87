"""The compile step on CPU: the compiled greedy decode over a static cache gives Hugging Face's greedy tokens,
the compiled forward gives the same perplexity, the step is captured in one graph (fullgraph), and the lengths the
latency phases use share one cache (no recompilation inside a window)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_model
from efficiency.config import ConfigError
from efficiency.measure.perplexity import PerplexityEvaluator
from efficiency.techniques.base import Context, UnknownTechnique, UnsupportedTechnique, parse
from efficiency.techniques.compile import PDL_OPTION, Compile, compiled_state


def _ctx(order: list[str]) -> Context:
    ctx = Context(device="cpu", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    ctx.info["order"] = order
    ctx.steps_done = len(order) - 1
    return ctx


def _hf_greedy(model: Any, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, min_new_tokens=n,
                              max_new_tokens=n, pad_token_id=0)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_compiled_decode_equals_hf_greedy(family: str, one_thread: Any) -> None:
    torch._dynamo.reset()
    model = tiny_model(family)
    torch.manual_seed(3)
    prompt = torch.randint(0, 128, (1, 9))
    expected = {n: _hf_greedy(model, prompt, n) for n in (1, 2, 12)}
    model = Compile(backend="eager", cache_bucket=32).apply(model, _ctx(["compile"]))
    state = compiled_state(model)
    assert state is not None
    for n in (12, 1, 2, 12):  # the longest first, then the others: one cache serves them all
        got = _hf_greedy(model, prompt, n)
        assert torch.equal(got, expected[n]), (family, n)
    assert state.calls["compiled_generate"] == 4 and state.calls["hf_generate"] == 0
    assert len(state.caches) == 1  # 9 + 1, 9 + 2 and 9 + 12 tokens share the 32-token bucket


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_decoding_again_from_one_prefilled_prompt_gives_the_greedy_tokens_each_time(family: str,
                                                                                     one_thread: Any) -> None:
    """The decode phase prefills the prompt once and times rounds of steps from it; each round must start again from
    the prompt (transformers' StaticCache counts the tokens it has written: unrewound, the third round of 12 tokens
    from a 9-token prompt wrote past this 32-token cache, and on the H200 a device-side assert stopped the case)."""
    torch._dynamo.reset()
    model = tiny_model(family)
    torch.manual_seed(3)
    prompt = torch.randint(0, 128, (1, 9))
    expected = _hf_greedy(model, prompt, 12)
    model = Compile(backend="eager", cache_bucket=32).apply(model, _ctx(["compile"]))
    state = compiled_state(model)
    assert state is not None
    prefilled = state.prefill(prompt, 12)
    for _ in range(4):
        got = torch.cat([prompt, *state.decode(prefilled, 11)], dim=1)
        assert torch.equal(got, expected), family


def test_step_is_one_graph_without_recompiles(one_thread: Any) -> None:
    """fullgraph=True raises on any graph break; the compile counter shows one compilation for all steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = Compile(backend="eager", cache_bucket=32).apply(tiny_model("opt"), _ctx(["compile"]))
    prompt = torch.randint(0, 128, (1, 5))
    for n in (10, 3, 10):
        _hf_greedy(model, prompt, n)
    frames = counters["stats"]["unique_graphs"]
    assert frames == 1, dict(counters["stats"])


def test_other_generate_calls_go_to_hugging_face(one_thread: Any) -> None:
    model = Compile(backend="eager").apply(tiny_model("gpt2"), _ctx(["compile"]))
    prompt = torch.randint(0, 128, (1, 4))
    with torch.inference_mode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)  # no min_new_tokens: may stop early, so Hugging Face's loop runs
    state = compiled_state(model)
    assert state is not None and state.calls["hf_generate"] == 1 and state.calls["compiled_generate"] == 0


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_compiled_forward_gives_the_same_perplexity(family: str, one_thread: Any) -> None:
    """Regional compilation: the blocks share one graph per input shape (not one per block); the LM head is a
    region of its own, one graph per shape."""
    from torch._dynamo.utils import counters

    from efficiency.measure.perplexity import _batches

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(family)
    ids = torch.randint(0, 128, (200,))
    eager = PerplexityEvaluator(ids, 64, 32, 4).run(model, "cpu")
    model = Compile(backend="eager").apply(model, _ctx(["compile"]))
    ev = PerplexityEvaluator(ids, 64, 32, 4)
    compiled = ev.run(model, "cpu")
    state = compiled_state(model)
    assert state is not None and state.calls["compiled_forward"] > 0 and len(state.blocks) == 2
    assert abs(compiled.perplexity - eager.perplexity) / eager.perplexity < 1e-6
    shapes = {(len(g), g[0].length) for g in _batches(ev.plan, 4)}
    assert counters["stats"]["unique_graphs"] <= 2 * len(shapes)  # blocks + head
    assert all(b is model.get_submodule(n) for b, n in zip(state.blocks, _block_names(model), strict=True))  # put back
    assert state.head_name == "lm_head" and model.lm_head is state.head


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_blocks_chained_in_one_region_give_the_same_perplexity_and_hidden_states(family: str,
                                                                                one_thread: Any) -> None:
    """``chain_blocks``: the decoder blocks compiled as one region run in turn; a pass asking for every block's
    hidden states runs per block (the model's loop then sees its own blocks); the blocks are put back after."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(family)
    ids = torch.randint(0, 128, (200,))
    eager = PerplexityEvaluator(ids, 64, 32, 4).run(model, "cpu")
    batch = ids[:64].unsqueeze(0)
    with torch.inference_mode():
        eager_hidden = model(batch, use_cache=False, output_hidden_states=True).hidden_states
    ctx = _ctx(["compile"])
    model = Compile(backend="eager", chain_blocks=True).apply(model, ctx)
    assert "decoder blocks (as one region run in turn)" in ctx.info["compile"]["forward"]
    assert getattr(compiled_state(model), "chained", False)
    blocks_before = [model.get_submodule(n) for n in _block_names(model)]
    state = compiled_state(model)
    assert state is not None
    owner, name = state.regions[0][:2]
    blocks_seen = []  # how many blocks the model's loop saw in each pass
    run = state.orig_forward
    state.orig_forward = lambda *a, **kw: (blocks_seen.append(len(getattr(owner, name))), run(*a, **kw))[1]
    compiled = PerplexityEvaluator(ids, 64, 32, 4).run(model, "cpu")
    assert abs(compiled.perplexity - eager.perplexity) / eager.perplexity < 1e-6
    assert blocks_seen and set(blocks_seen) == {1}
    with torch.inference_mode():
        hidden = model(batch, use_cache=False, output_hidden_states=True).hidden_states
    assert blocks_seen[-1] == 2
    assert len(hidden) == len(eager_hidden) == 3
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(hidden, eager_hidden, strict=True))
    assert [model.get_submodule(n) for n in _block_names(model)] == blocks_before  # put back


def test_blocks_of_several_layer_types_are_not_chained_and_the_report_says_why(one_thread: Any) -> None:
    """Before: chained, Gemma 2's sliding-window and full-attention layers all took the first layer's mask (the
    model's loop picks each layer's mask by its index, and saw one block): logits 0.39 away from eager's."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                          max_position_embeddings=64)
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 24))
    with torch.inference_mode():
        eager = model(ids, use_cache=False).logits
    ctx = _ctx(["compile"])
    model = Compile(backend="eager", chain_blocks=True).apply(model, ctx)
    assert ("decoder blocks (one region each: chain_blocks refused, its layers are of several types "
            "(sliding_attention, full_attention), each given its own attention mask by the model's loop)"
            in ctx.info["compile"]["forward"]), ctx.info["compile"]["forward"]
    state = compiled_state(model)
    assert state is not None and not state.chained
    with torch.inference_mode():
        compiled = model(ids, use_cache=False).logits
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_a_step_that_asks_for_eager_passes_gets_them(one_thread: Any) -> None:
    """int8wo with bf16 activations: inductor lowers its dequantising matmul to aten._weight_int8pack_mm. Its CUDA
    kernel ran opt-1.3b's perplexity pass in 18.8 s compiled against 0.072 s eager (H200, docs/results.md section
    5e), and the suite's grid sat in that pass for over seven minutes; on the CPU it ran SmolLM2's pass 1.47-1.65x
    slower than eager (section 5k), while it speeds up decode. int8wo asks compile (in its report entry) to leave
    passes without cache eager; decode stays compiled. In fp32 inductor keeps aten.mm: no ask."""
    from efficiency.techniques.compile import EAGER_PASSES_KEY
    from efficiency.techniques.torchao_quant import TorchaoQuant

    gpu = Context(device="cuda:0", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    cpu = Context(device="cpu", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    why = TorchaoQuant("int8wo").eager_passes(gpu, "bfloat16")
    assert why and "_weight_int8pack_mm" in why
    on_cpu = TorchaoQuant("int8wo").eager_passes(cpu, "bfloat16")
    assert on_cpu and "on the CPU" in on_cpu
    assert TorchaoQuant("int8wo").eager_passes(cpu, "float32") is None
    assert all(TorchaoQuant(k).eager_passes(d, "bfloat16") is None for k in ("int4wo", "fp8wo", "fp8dq", "int8dq")
               for d in (gpu, cpu))

    ids = torch.randint(0, 128, (200,))
    ctx = _ctx(["int8wo", "compile"])
    ctx.info["int8wo"] = {EAGER_PASSES_KEY: why}
    model = Compile().apply(tiny_model("opt"), ctx)  # inductor compiles lazily: nothing compiled unless called
    PerplexityEvaluator(ids, 64, 32, 4).run(model, "cpu")
    state = compiled_state(model)
    assert state is not None and state.calls["compiled_forward"] == 0 and state.blocks == []
    assert state.head_name is None and state.step_options is not None  # decode stays compiled
    assert ctx.info["compile"]["forward"].startswith("eager, asked for by an earlier step: int8wo")
    assert ctx.info["compile"]["inductor"] is None  # no pass settings reported for passes that run eager


def test_a_step_that_asks_for_a_minimum_decode_batch_gets_a_clear_refusal_before_anything_compiles() -> None:
    """int8dq on a GPU: inductor calls torch._int_mm (cuBLAS) directly in the compiled decode step, cuBLAS takes
    more than 16 rows, and batch-1 decode failed inside the CUDA-graph recording (H200, docs/results.md section 5f).
    int8dq asks compile for a batch of at least 17; a smaller decode is refused with the reason, nothing compiled."""
    from efficiency.techniques.compile import MIN_DECODE_BATCH_KEY, CompiledDecodeRefused
    from efficiency.techniques.torchao_quant import TorchaoQuant

    gpu = Context(device="cuda:0", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    cpu = Context(device="cpu", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    ask = TorchaoQuant("int8dq").min_decode_batch(gpu)
    assert ask is not None and ask[0] == 17 and "_int_mm" in ask[1]
    assert TorchaoQuant("int8dq").min_decode_batch(cpu) is None  # the CPU's _int_mm takes one row
    assert all(TorchaoQuant(k).min_decode_batch(gpu) is None for k in ("int8wo", "int4wo", "fp8wo", "fp8dq"))

    ctx = _ctx(["int8dq", "compile"])
    ctx.info["int8dq"] = {MIN_DECODE_BATCH_KEY: ask}
    model = Compile().apply(tiny_model("opt"), ctx)
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(CompiledDecodeRefused, match=r"batch 1: needs a batch of at least 17: int8dq: torch\._int_mm"):
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    state = compiled_state(model)
    assert state is not None and state.calls["compiled_generate"] == 0
    assert ctx.info["compile"]["decode_min_batch"].startswith("17, asked for by an earlier step: int8dq")


def _block_names(model: Any) -> list[str]:
    return [n for n, m in model.named_modules() if n and n.rsplit(".", 1)[-1].isdigit()
            and isinstance(model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.ModuleList)]


@pytest.mark.parametrize("name", ["compile+bf16", "bf16+compile+compile", "compile+int4wo+compile"])
def test_a_pipeline_with_compile_anywhere_but_last_is_refused_when_its_name_is_read(name: str) -> None:
    """Regression: these names parsed, and the run refused them at each case, after the model had loaded."""
    with pytest.raises(UnknownTechnique, match="'compile' must be the last step of a pipeline, and only once"):
        parse(name)


def test_compile_must_be_last() -> None:
    ctx = _ctx(["compile", "bf16"])
    ctx.steps_done = 0
    with pytest.raises(ConfigError, match="last step"):
        Compile().apply(tiny_model("gpt2"), ctx)


def test_bitsandbytes_layers_are_not_compiled() -> None:
    class FakeBnb(torch.nn.Module):
        pass

    FakeBnb.__module__ = "bitsandbytes.nn.modules"
    model = tiny_model("gpt2")
    model.transformer.h[0].mlp.c_fc = FakeBnb()
    with pytest.raises(UnsupportedTechnique, match="bitsandbytes"):
        Compile().apply(model, _ctx(["bnb4", "compile"]))


def test_pipeline_names_parse() -> None:
    assert parse("bf16+compile").name == "bf16+compile"


@pytest.mark.slow
def test_inductor_on_cpu_decodes_like_hf(one_thread: Any) -> None:
    """The real CPU path (inductor code generation), slow: a C++ compile per graph."""
    torch._dynamo.reset()
    model = tiny_model("gpt2")
    prompt = torch.randint(0, 128, (1, 6))
    expected = _hf_greedy(model, prompt, 5)
    model = Compile(cache_bucket=16).apply(model, _ctx(["compile"]))
    assert torch.equal(_hf_greedy(model, prompt, 5), expected)


class _Recorder:
    """A generate streamer (Hugging Face's protocol) that keeps what it is given."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value)

    def end(self) -> None:
        self.ended = True


def test_compiled_decode_feeds_a_streamer_like_generate(one_thread: Any) -> None:
    """The serving phase reads the time to the first token through a streamer: the compiled loop must take it
    (it used to fall back to eager ``generate``) and feed it as ``generate`` does: the prompt, then each token."""
    torch._dynamo.reset()
    model = tiny_model("opt")
    torch.manual_seed(5)
    prompt = torch.randint(0, 128, (2, 7))
    model = Compile(backend="eager", cache_bucket=32).apply(model, _ctx(["compile"]))
    streamer = _Recorder()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, min_new_tokens=5,
                             max_new_tokens=5, pad_token_id=0, streamer=streamer)
    state = compiled_state(model)
    assert state is not None and state.calls["compiled_generate"] == 1 and state.calls["hf_generate"] == 0
    assert len(streamer.values) == 1 + 5 and streamer.ended
    assert torch.equal(streamer.values[0], prompt)
    assert torch.equal(torch.stack(streamer.values[1:], dim=1), out[:, 7:])
    assert state.cudagraph_skips() is None  # CUDA graphs are not asked for on the CPU


def test_compiled_model_keeps_the_signatures_callers_inspect(one_thread: Any) -> None:
    """Regression: ``model.forward`` became ``(*args, **kwargs)`` under compile, so the perplexity pass stopped
    asking for ``logits_to_keep`` and computed the LM head at every position (H100 probe, 2026-11-23)."""
    import inspect

    torch._dynamo.reset()
    model = tiny_model("opt")
    params = set(inspect.signature(model.forward).parameters)
    model = Compile(backend="eager").apply(model, _ctx(["compile"]))
    assert set(inspect.signature(model.forward).parameters) == params and "logits_to_keep" in params
    ev = PerplexityEvaluator(torch.randint(0, 128, (200,)), 64, 32, 4)
    ev.run(model, "cpu")
    assert ev.keeps_logits is True
    assert ev.n_logit_positions < ev.n_processed_tokens


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_compiled_decode_passes_the_cache_under_the_name_forward_takes(family: str, one_thread: Any) -> None:
    """Regression: the loop passed ``past_key_values``, which transformers 5.24 deprecates (FutureWarning; removed
    in 5.40) for ``cache``: the keyword now comes from forward's signature."""
    import warnings

    model = Compile(backend="eager", cache_bucket=32).apply(tiny_model(family), _ctx(["compile"]))
    prompt = torch.randint(0, 128, (1, 5))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        _hf_greedy(model, prompt, 4)
    state = compiled_state(model)
    assert state is not None and state.calls["compiled_generate"] == 1


def test_compile_tunes_the_matmuls_that_inductor_writes() -> None:
    """int8wo on a GPU has no matmul kernel of its own: under compile inductor writes the dequantising matmul.
    Untuned, that kernel decoded opt-6.7b at 44.4 ms/token on the H200; with coordinate-descent tuning at 3.73
    (bf16: 4.46; docs/results.md section 5d). compile takes the settings earlier steps ask for, so the tuning is on
    after such a step and only then; a setting in pyproject wins."""
    from efficiency.techniques.compile import INDUCTOR_OPTIONS_KEY
    from efficiency.techniques.torchao_quant import TorchaoQuant

    gpu = Context(device="cuda:0", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    cpu = Context(device="cpu", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    int8wo_asks = TorchaoQuant("int8wo").inductor_options(gpu)
    assert int8wo_asks["coordinate_descent_tuning"] is True
    assert TorchaoQuant("int8wo").inductor_options(cpu) == {}  # the CPU has _weight_int8pack_mm
    assert TorchaoQuant("int4wo").inductor_options(gpu) == {}  # tinygemm

    def compiled(compile_step: Compile, earlier: dict[str, Any]) -> tuple[dict[str, Any], str]:
        ctx = _ctx([*earlier, "compile"])
        ctx.info.update(earlier)
        state = compiled_state(compile_step.apply(tiny_model("gpt2"), ctx))
        assert state is not None and state.step_options is not None
        return state.step_options, ctx.info["compile"]["coordinate_descent_tuning"]

    options, why = compiled(Compile(), {"int8wo": {INDUCTOR_OPTIONS_KEY: int8wo_asks}})
    assert options["coordinate_descent_tuning"] is True and why.startswith("automatic: on")
    assert options["coordinate_descent_check_all_directions"] is True
    options, why = compiled(Compile(), {"int4wo": {INDUCTOR_OPTIONS_KEY: {}}, "dtype": "bf16"})
    assert options["coordinate_descent_tuning"] is False and why.startswith("automatic: off")
    options, why = compiled(Compile(coordinate_descent_tuning=False), {"int8wo": {INDUCTOR_OPTIONS_KEY: int8wo_asks}})
    assert options["coordinate_descent_tuning"] is False and why == "set"


def _compile_options(step: Compile, device: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the decode step's inductor options, the passes', the step's report entry) of ``step`` applied to a tiny OPT
    on ``device`` (nothing compiles before the first call, so a GPU device needs no GPU here)."""
    ctx = Context(device=device, tokenizer=None, model_name="tiny", cache_dir=Path("."))
    ctx.info["order"] = ["compile"]
    state = compiled_state(step.apply(tiny_model("opt"), ctx))
    assert state is not None and state.step_options is not None
    return state.step_options, ctx.info["compile"]["inductor"], ctx.info["compile"]


def test_the_compiled_decode_step_launches_independent_kernels_as_one_on_a_gpu_only() -> None:
    """Inductor's combo kernels cut opt-6.7b's batch-1 decode on the H100 from 5.791 to 5.699 ms/token in bf16 and
    from 3.013 to 2.870 with int4wo (docs/results.md 5n). They are Triton kernels, so a GPU's decode step asks for
    them and nothing else does: not the CPU's, not the passes; ``combo_kernels = false`` turns them off."""
    decode, passes, _ = _compile_options(Compile(), "cuda:0")
    assert decode["combo_kernels"] is True and passes["combo_kernels"] is False
    assert _compile_options(Compile(), "cpu")[0]["combo_kernels"] is False
    assert _compile_options(Compile(combo_kernels=False), "cuda:0")[0]["combo_kernels"] is False


def test_the_compiled_graphs_launch_with_pdl_on_a_gpu_only_and_the_report_says_why_not() -> None:
    """Programmatic dependent launch cut opt-6.7b's batch-1 bf16 decode on the H100 from 5.702 to 5.520 ms/token
    through the grid (docs/results.md 5o). It is inductor's Triton launch setting, so a GPU's decode step and passes
    ask for it, the CPU's do not, ``pdl = false`` turns it off, and the report says which and why."""
    decode, passes, info = _compile_options(Compile(), "cuda:0")  # no GPU here: capability unknown, it applies
    said = info["programmatic_dependent_launch"]
    assert decode[PDL_OPTION] is True and passes[PDL_OPTION] is True and said.startswith("on")
    decode, passes, info = _compile_options(Compile(), "cpu")
    said = info["programmatic_dependent_launch"]
    assert PDL_OPTION not in decode and PDL_OPTION not in passes and said.startswith("off: a CUDA feature")
    decode, _, info = _compile_options(Compile(pdl=False), "cuda:0")
    assert PDL_OPTION not in decode and info["programmatic_dependent_launch"] == "off: pdl = false"


def test_the_passes_compile_reductions_both_ways_on_a_gpu_only() -> None:
    """Inductor's multi-kernel cut gpt2-xl's perplexity pass on the H100 from 0.810 to 0.776 s (docs/results.md
    5p): its layer norms over 1,600 features ran as looped reductions. Triton's, so a GPU's passes ask for it; not
    the decode step (CUDA graphs), not the CPU's; ``multi_kernel = false`` turns it off."""
    from efficiency.techniques.compile import MULTI_KERNEL_OPTION

    decode, passes, _ = _compile_options(Compile(), "cuda:0")
    assert passes[MULTI_KERNEL_OPTION] == 1 and MULTI_KERNEL_OPTION not in decode
    assert MULTI_KERNEL_OPTION not in _compile_options(Compile(), "cpu")[1]
    assert MULTI_KERNEL_OPTION not in _compile_options(Compile(multi_kernel=False), "cuda:0")[1]


def test_pdl_is_refused_below_compute_capability_9(monkeypatch: pytest.MonkeyPatch) -> None:
    """An A100 (8.0) or an L4 (8.9) would run without it whatever the options say: the report must not say on."""
    from efficiency.techniques.compile import pdl_unavailable

    ctx = Context(device="cuda:0", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "compute capability 8.9" in str(pdl_unavailable(ctx))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pdl_unavailable(ctx) is None


def test_torchao_leaves_the_process_wide_settings_alone(one_thread: Any) -> None:
    """torchao's configs set inductor's process-wide config by default (and torchao 0.17, the GPU machine's, also
    switched every fp32 matmul of the process to TF32): a torchao case changed the cases after it. The suite turns
    that off and passes the settings through the report instead; on the CPU int8wo asks for none."""
    from efficiency.techniques.compile import INDUCTOR_OPTIONS_KEY

    pytest.importorskip("torchao")
    import torch._inductor.config as inductor_config

    before = (inductor_config.coordinate_descent_tuning, inductor_config.force_fuse_int_mm_with_mul,
              torch.get_float32_matmul_precision())
    for name in ("int8wo", "int8dq"):
        ctx = _ctx([name])
        ctx.steps_done = 0
        parse(name).steps[0].apply(tiny_model("opt"), ctx)
        assert ctx.info[name][INDUCTOR_OPTIONS_KEY] == {}
    after = (inductor_config.coordinate_descent_tuning, inductor_config.force_fuse_int_mm_with_mul,
             torch.get_float32_matmul_precision())
    assert after == before


@pytest.mark.parametrize("kind", ["int8wo", "int4wo", "fp8wo", "fp8dq", "int8dq"])
def test_the_inductor_settings_a_quantiser_asks_for_exist_in_this_torch(kind: str) -> None:
    """The GPU path cannot run in CI, but its settings' names can be checked: torch.compile refuses an option
    inductor does not know when it is built, which on a GPU would fail every compiled case of that technique."""
    from efficiency.techniques.compile import inductor_options
    from efficiency.techniques.torchao_quant import TorchaoQuant

    gpu = Context(device="cuda:0", tokenizer=None, model_name="tiny", cache_dir=Path("."))
    asked = TorchaoQuant(kind).inductor_options(gpu)
    torch.compile(lambda x: x + 1, options={**asked, **inductor_options(True, True, False, False, combo_kernels=True,
                                                                                 pdl=True, multi_kernel=True)})
    with pytest.raises(RuntimeError, match="option"):  # the check this test relies on
        torch.compile(lambda x: x + 1, options={"no_such_inductor_option": True})


def _int8wo_for_compile() -> tuple[Any, Context]:
    """A tiny OPT quantised by the suite's int8wo (torchao, CPU kernels), with the context of ``int8wo+compile``
    ready for its compile step."""
    pytest.importorskip("torchao")
    torch._dynamo.reset()
    ctx = _ctx(["int8wo", "compile"])
    ctx.steps_done = 0
    model = parse("int8wo").steps[0].apply(tiny_model("opt"), ctx)
    ctx.steps_done = 1
    return model, ctx


@pytest.mark.parametrize("unwrap", [True, False])
def test_torchao_weights_unwrapped_for_the_compiled_graphs_decode_alike_and_count_as_before(
        unwrap: bool, one_thread: Any) -> None:
    """``compile`` passes torchao's quantised weights to the compiled graphs as their plain inner tensors (a compiled
    call otherwise flattens every tensor-subclass input in Python, and a decode step takes all the weights). The
    tokens must stay the quantised model's greedy ones, and the size, the weight bytes read per token and the logical
    parameters (the FLOP count) must be those of the model before the unwrap: parametrized, the weights' parameters
    are their inner tensors (int8 data and scales), which counted as they are would change every figure."""
    from torch.nn.utils import parametrize

    from efficiency.measure.memory import model_size
    from efficiency.measure.roofline import weights_read_per_token

    model, ctx = _int8wo_for_compile()
    quantised = ctx.info["int8wo"]["quantised_layers"]
    torch.manual_seed(3)
    prompt = torch.randint(0, 128, (1, 9))
    expected = _hf_greedy(model, prompt, 12)
    size, read = model_size(model), weights_read_per_token(model)
    model = Compile(backend="eager", cache_bucket=32, unwrap_subclasses=unwrap).apply(model, ctx)
    parametrized = sum(1 for m in model.modules() if parametrize.is_parametrized(m, "weight"))
    assert parametrized == (quantised if unwrap else 0)
    info = ctx.info["compile"]["unwrapped_weights"]
    assert info.startswith(f"{quantised} tensor-subclass weights") if unwrap else info.startswith("off")
    assert model_size(model) == size and weights_read_per_token(model) == read
    state = compiled_state(model)
    assert state is not None
    prefilled = state.prefill(prompt, 12)
    assert torch.equal(torch.cat([prompt, *state.decode(prefilled, 11)], dim=1), expected)


def test_unwrapped_decoder_blocks_share_one_compiled_graph_in_a_pass(one_thread: Any) -> None:
    """``parametrize`` gives every parametrized layer a class of its own and dynamo guards on the class, so each
    decoder block of a regionally compiled pass became a graph of its own; on the H200 opt-1.3b's int4wo case failed
    past the recompile limit (FailOnRecompileLimitHit). The unwrapped layers of one class now share one class: a
    pass compiles one block graph and the LM head's, however many blocks."""
    from torch._dynamo.utils import counters

    model, ctx = _int8wo_for_compile()
    model = Compile(backend="eager").apply(model, ctx)
    blocks = compiled_state(model).blocks  # type: ignore[union-attr]
    assert len(blocks) >= 2 and ctx.info["compile"]["unwrapped_weights"] is not None
    counters.clear()
    with torch.inference_mode():
        model(torch.randint(0, 128, (2, 16)), use_cache=False)
    assert counters["stats"]["unique_graphs"] == 2  # one for every block, one for the LM head


def test_a_weight_type_dynamo_cannot_rebuild_stays_wrapped_and_the_report_says_why(
        monkeypatch: pytest.MonkeyPatch, one_thread: Any) -> None:
    """On the H200's torch 2.11 dynamo could not trace the rebuild of torchao 0.17's fp8dq weights (Float8Tensor),
    and every fp8dq decode failed once they were unwrapped. A type whose rebuild does not trace here, even retyped
    (tests/techniques/test_unwrap.py), stays a tensor subclass, and the report names it with dynamo's reason; int8
    weights trace on this CPU."""
    import efficiency.techniques.unwrap as unwrap_module

    model, ctx = _int8wo_for_compile()
    weight = model.get_submodule("model.decoder.layers.0.fc1").weight
    assert unwrap_module.rebuild_untraceable(weight) is None
    kind = type(weight).__name__
    monkeypatch.setattr(unwrap_module, "rebuild_untraceable", lambda w: "Unsupported: as on the H200")
    model = Compile(backend="eager").apply(model, ctx)
    assert type(model.get_submodule("model.decoder.layers.0.fc1").weight).__name__ == kind
    assert ctx.info["compile"]["unwrapped_weights"] is None
    assert ctx.info["compile"]["wrapped_weights"] == {
        kind: "left as a tensor subclass: dynamo cannot trace its rebuild here (Unsupported: as on the H200)"}


@pytest.mark.parametrize("skip", [True, False])
def test_a_decode_call_checks_dynamos_guards_on_its_first_step_only(
        skip: bool, monkeypatch: pytest.MonkeyPatch, one_thread: Any) -> None:
    """On the H200 gpt2-xl's int4wo decode was paced by the host (99% of each round): with dynamo's guards checked on
    every step the host took 3.59 ms a token, with them checked once per decode call 0.83 ms (docs/results.md 5i).
    The later steps of a call pass the same tensors, so they skip the evaluation (``skip_guard_eval_unsafe``),
    entered once after the first step; the tokens stay Hugging Face's greedy ones."""
    torch._dynamo.reset()
    model = tiny_model("opt")
    torch.manual_seed(3)
    prompt = torch.randint(0, 128, (1, 9))
    expected = _hf_greedy(model, prompt, 12)
    ctx = _ctx(["compile"])
    model = Compile(backend="eager", cache_bucket=32, skip_repeat_guards=skip).apply(model, ctx)
    state = compiled_state(model)
    assert state is not None
    events: list[str] = []  # "step", "skip on", "skip off" in the order they happen
    real_stance, real_step = torch.compiler.set_stance, state.step

    @contextlib.contextmanager
    def spy_stance(*args: Any, **kwargs: Any) -> Any:
        assert kwargs == {"skip_guard_eval_unsafe": True}
        with real_stance(*args, **kwargs):
            events.append("skip on")
            yield
        events.append("skip off")

    def spy_step(*args: Any) -> Any:
        events.append("step")
        return real_step(*args)

    monkeypatch.setattr(torch.compiler, "set_stance", spy_stance)
    monkeypatch.setattr(state, "step", spy_step)
    prefilled = state.prefill(prompt, 12)
    for _ in range(2):
        events.clear()
        assert torch.equal(torch.cat([prompt, *state.decode(prefilled, 11)], dim=1), expected)
        assert events == (["step", "skip on", *["step"] * 10, "skip off"] if skip else ["step"] * 11)
    said = ctx.info["compile"]["decode_guards"]
    assert said.startswith("evaluated on the first step" if skip else "evaluated on every")
