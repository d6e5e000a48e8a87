"""A compiled case through the whole session on the CPU (every phase: quality, perplexity pass, prefill, first
token, decode, KL): a tiny Llama, so that the fused q/k/v and gate/up projections are on the path, compared with
its eager fp32 baseline."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from conftest import SHARED_DATA
from efficiency import metrics
from efficiency.report.view import UNTESTED_NOTE, significance
from efficiency.report.view import rows as view_rows


@pytest.fixture(scope="module")
def llama_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = SHARED_DATA / "architectures" / "gpt2"
    if not tok_dir.is_dir():
        pytest.skip(f"GPT-2 tokenizer files not found under {tok_dir}")
    root = tmp_path_factory.mktemp("compiled")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50257, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    LlamaForCausalLM(config).save_pretrained(root / "m" / "t")
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(root / "m" / "t")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return root


def _session(root: Path, techniques: str, baseline: str, folders: str = "", cache_bucket: int = 32,
             backend: str = "eager", **opts: Any) -> Any:
    """A CPU session over the tiny Llama under ``root``: 200 tokens, context 32, 2 rounds, 3 new tokens after an
    8-token prompt, compile with the eager backend (or ``backend``); ``opts`` add to or replace those settings."""
    from efficiency.session import EfficiencySession
    from efficiency.settings import build_config

    settings = {"models": "t", "techniques": techniques, "baseline": baseline, "model_dir": str(root / "m"),
                "dataset": str(root / "text.txt"), "device": "cpu", "max_tokens": "200", "context": 32,
                "stride": 32, "rounds": 2, "decode_tokens": 3, "prefill_tokens": 8,
                "cache_dir": str(root / f"cache{folders}"), "reports_dir": str(root / f"reports{folders}"), **opts}
    table = {"technique": {"compile": {"backend": backend, "cache_bucket": cache_bucket}}}
    return EfficiencySession(build_config(settings, table, root), root, quiet=True)


def test_a_compiled_case_runs_every_phase_and_keeps_the_baselines_perplexity(llama_root: Path,
                                                                                one_thread: Any) -> None:
    s = _session(llama_root, "fp32+compile", "fp32")
    s.run_case("t", "fp32")
    s.run_case("t", "fp32+compile")
    # The compiled graphs and CUDA-graph trees go with the case: after a CUDA-graph recording failed (int8dq's decode,
    # H200), the compiled cases that followed failed with a bare AssertionError (docs/results.md section 5f).
    from torch._dynamo import convert_frame

    assert convert_frame.FRAME_COUNTER == 0
    base, case = s.report["cases"]
    assert case["status"] == "measured", case.get("reason")
    info = case["technique_info"]
    assert info["fused_projections"] == {"q_proj+k_proj+v_proj": 2, "gate_proj+up_proj": 2}
    assert info["compile"]["backend"] == "eager"
    ppl, ref = case["perplexity"]["value"], base["perplexity"]["value"]
    assert abs(ppl - ref) / ref < 1e-5, (ppl, ref)
    latency = case["latency"]
    assert latency["decode_s_per_token"] > 0 and latency["prefill_s"] > 0
    assert case["kld"]["mean"] < 1e-6  # the same distribution as the baseline's
    assert set(case["phases"]) >= {"quality", "ppl_pass", "prefill", "first_token", "decode"}
    s.finish(0)


def test_compiled_cases_one_after_another_each_run_compiled(llama_root: Path, one_thread: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each compiled case adds its shapes to dynamo's cache of the decoder block's forward; without the reset at the
    end of each case, the third case of a session passed dynamo's recompile limit (8) and its blocks ran eagerly,
    for every shape not compiled before, under a "+compile" label, silently (a warning in the log). On the H200 this
    is how fp8dq's perplexity pass measured 0.438 s in call E and 0.212 s in call J (docs/results.md section 5g).
    With dynamo's own limit of 8 shapes, and the suite's failure past it, three cases in a row each run compiled
    only because each starts from a reset."""
    from efficiency.techniques import compile as compile_step

    monkeypatch.setattr(compile_step, "RECOMPILE_LIMIT", 8)
    techniques = ("fp32+compile", "bf16+compile", "fp16+compile")
    s = _session(llama_root, ",".join(techniques), "fp32+compile", "3", kld_tokens=0)
    for technique in techniques:
        s.run_case("t", technique)
    statuses = {c["id"]: (c["status"], c.get("reason"), (c.get("latency") or {}).get("reason"))
                for c in s.report["cases"]}
    assert all(status == ("measured", None, None) for status in statuses.values()), statuses
    s.finish(0)


def test_a_compiled_case_past_the_shape_limit_fails_instead_of_running_eagerly(llama_root: Path, one_thread: Any,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for one shape per compiled function, the perplexity pass's second shape (its last, smaller batch of
    windows) passes the limit: the case must say so, not measure eager blocks under "+compile"; dynamo's settings
    are given back when the case ends."""
    import torch._dynamo.config as dynamo_config

    from efficiency.techniques import compile as compile_step

    monkeypatch.setattr(compile_step, "RECOMPILE_LIMIT", 1)
    limit_before = dynamo_config.recompile_limit
    s = _session(llama_root, "fp32+compile", "fp32+compile", "4", batch_size=4, kld_tokens=0)
    with pytest.raises(pytest.fail.Exception, match="RecompileLimit"):  # the case fails, saying why
        s.run_case("t", "fp32+compile")
    assert s.report["cases"][0]["status"] != "measured"
    assert dynamo_config.recompile_limit == limit_before
    s.finish(0)


def test_a_serving_sweep_of_twelve_batch_sizes_runs_compiled_where_dynamos_default_limit_fails(
        llama_root: Path, one_thread: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode step compiles once per batch size, so a sweep of twelve passes dynamo's default limit of 8 at its
    ninth batch size, and runs whole under the suite's RECOMPILE_LIMIT."""
    from efficiency.techniques import compile as compile_step

    sizes, suite_limit = list(range(1, 13)), compile_step.RECOMPILE_LIMIT

    def serving(limit: int, name: str) -> dict[str, Any]:
        monkeypatch.setattr(compile_step, "RECOMPILE_LIMIT", limit)
        s = _session(llama_root, "fp32+compile", "fp32+compile", f"-{name}", kld_tokens=0,
                     batch_sizes=",".join(map(str, sizes)), input_tokens=8, output_tokens=3)
        s.run_case("t", "fp32+compile")
        s.finish(0)
        section: dict[str, Any] = s.report["cases"][0].get("serving") or {}
        return section

    at_default = serving(8, "default")
    assert "batches" not in at_default
    assert at_default["reason"].startswith("serving_b9: FailOnRecompileLimitHit"), at_default
    at_suite = serving(suite_limit, "suite")
    assert [row["batch_size"] for row in at_suite.get("batches", [])] == sizes, at_suite


def test_the_decode_rounds_of_a_compiled_case_time_its_steps_without_the_prefill(
        llama_root: Path, one_thread: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled case's decode per token was (median t(generate N) - median t(generate 1)) / (N - 1): each round
    ran the prompt's eager prefill, which varies from round to round through torchao's fp8 tensor subclasses
    (opt-6.7b fp8dq on the H200: generate(1) 0.15-0.20 s, generate(64) 0.46-0.82 s), and the difference of two medians
    gave 10.1 ms/token where the next run, timing the steps alone, measured 5.6 (docs/results.md section 5h). Now
    the prompt is prefilled once in setup and the rounds are the compiled steps alone; an eager case keeps the
    difference, and each report says which."""
    from efficiency.phases.latency import DECODE_METHOD, DecodePhase
    from efficiency.techniques.compile import CompiledExecution

    timing = {"on": False}
    prefills_in_rounds: list[int] = []
    original_prefill, original_run = CompiledExecution.prefill, DecodePhase.run

    def prefill(self: CompiledExecution, *args: Any, **kwargs: Any) -> Any:
        if timing["on"]:
            prefills_in_rounds.append(1)
        return original_prefill(self, *args, **kwargs)

    def run(self: DecodePhase, model: Any, ctx: Any) -> Any:
        timing["on"] = True
        try:
            return original_run(self, model, ctx)
        finally:
            timing["on"] = False

    monkeypatch.setattr(CompiledExecution, "prefill", prefill)
    monkeypatch.setattr(DecodePhase, "run", run)
    # a 16-token cache holds the 8-token prompt and 5 new tokens once: the rounds must each start again from the
    # prompt (transformers' StaticCache counts the tokens written, so a round that did not rewind it wrote past the end)
    s = _session(llama_root, "fp32+compile", "fp32", cache_bucket=16, rounds=3, decode_tokens=5)
    s.run_case("t", "fp32")
    s.run_case("t", "fp32+compile")
    base, case = s.report["cases"]
    assert case["status"] == "measured", case.get("reason")
    latency = case["latency"]
    assert prefills_in_rounds == [] and latency["rounds_decode"] >= 3
    assert latency["decode_method"] == DECODE_METHOD["steps"]
    assert latency["decode_s_per_token"] == pytest.approx(statistics.median(latency["decode_s_all"]) / 4)
    assert latency["decode_s_per_token_all"] == pytest.approx([t / 4 for t in latency["decode_s_all"]])
    assert base["latency"]["decode_method"] == DECODE_METHOD["difference"]
    assert base["latency"]["decode_s_per_token_all"] is None  # a difference of medians has no per-round value
    # the terminal table gives the compiled case's decode change its rounds and spread, as it does runtime's
    # (before: a bare percentage); the eager baseline has none to give
    decode = metrics.get("decode_s_per_token")
    rounds = latency["rounds_decode"]
    # no baseline rounds: no test, and it says so (before: no mark, which the legend reads as significant)
    assert re.fullmatch(rf"n={rounds} ±\d+\.\d% \?", significance(decode, case, base))
    assert re.fullmatch(rf"n={rounds} ±\d+\.\d% \?", significance(decode, case, None))  # baseline not reported
    row = next(r for r in view_rows(s.report) if r.id == case["id"])
    assert row.cells["decode_s_per_token"].change.endswith("?)") and any(UNTESTED_NOTE in n for n in row.notes)
    assert re.fullmatch(rf"n={rounds} ±\d+\.\d% ~", significance(decode, case, dict(case)))  # same rounds: not
    assert decode.round_samples(base) == [] and significance(decode, base, None) == ""  # significant
    # the host's part of each round is reported beside it: on the CPU the host runs the kernels, and says so
    assert 0 < latency["decode_host_s_per_token"] <= max(latency["decode_s_all"]) / 4
    assert 0 < latency["decode_host_share"] <= 1 and "on the CPU" in latency["decode_host_note"]
    assert base["latency"]["decode_host_s_per_token"] is None
    assert base["latency"]["decode_host_note"].startswith("not measured: generate waits")
    s.finish(0)


def test_the_decode_reports_the_matmul_operators_its_step_ran(llama_root: Path, one_thread: Any) -> None:
    """Each case's latency section names the ATen matmul operators one decode call ran, observed (measure/ops.py):
    the tiny Llama's plain linear layers run aten.mm, eagerly and in the compiled step; an int8 weight-only case
    eagerly runs aten.mm on its weight converted at each call (with torchao 0.18; the technique's report says the
    same), where a table had said aten._weight_int8pack_mm."""
    from efficiency.phases.latency import DECODE_OPS_STEP, DECODE_OPS_WARM_UP

    s = _session(llama_root, "fp32+compile,int8wo", "fp32", folders="-ops")
    for technique in ("fp32", "fp32+compile", "int8wo"):
        s.run_case("t", technique)
    base, compiled, int8wo = s.report["cases"]
    for case, method in ((base, DECODE_OPS_WARM_UP), (compiled, DECODE_OPS_STEP), (int8wo, DECODE_OPS_WARM_UP)):
        assert case["status"] == "measured", case.get("reason")
        assert case["latency"]["decode_matmul_ops_method"] == method
    assert base["latency"]["decode_matmul_ops"] == compiled["latency"]["decode_matmul_ops"] == ["aten.mm"]
    assert "aten.mm" in int8wo["latency"]["decode_matmul_ops"]
    assert int8wo["technique_info"]["int8wo"]["kernel"].startswith("aten.mm on the weight converted")
    s.finish(0)


def test_a_cuda_graph_decode_says_why_its_operators_are_not_observed() -> None:
    """A CUDA-graph replay runs no operator on the host: the report says so instead of an empty list, which would
    read as 'the compiler generated every matmul'."""
    from efficiency.phases.latency import DECODE_OPS_CUDA_GRAPHS, DECODE_OPS_STEP, decode_matmul_ops

    calls: list[int] = []
    got = decode_matmul_ops(lambda: calls.append(1), cuda_graphs=True, method=DECODE_OPS_STEP)
    assert got == {"decode_matmul_ops": None, "decode_matmul_ops_method": DECODE_OPS_CUDA_GRAPHS} and calls == []


@pytest.mark.slow
def test_bf16_int8wo_compiled_on_the_cpu_decodes_with_the_int8_matmul_kernel(llama_root: Path,
                                                                             one_thread: Any) -> None:
    """The mechanism behind docs/results.md section 5k (bf16+int8wo+compile decoding faster than bf16+compile on
    the CPU): with inductor, the compiled step runs aten._weight_int8pack_mm (int8 weights read as they are), where
    the eager layer converts its weight to bf16 at every call."""
    s = _session(llama_root, "bf16+int8wo+compile", "bf16", folders="-int8pack", backend="inductor")
    s.run_case("t", "bf16")
    s.run_case("t", "bf16+int8wo+compile")
    _, case = s.report["cases"]
    assert case["status"] == "measured", case.get("reason")
    assert "aten._weight_int8pack_mm" in case["latency"]["decode_matmul_ops"]
    # ... which is slower than the bf16 GEMM over a pass's many rows: the passes stay eager, and the report says why
    assert case["technique_info"]["compile"]["forward"].startswith("eager, asked for by an earlier step: int8wo")
    s.finish(0)


@pytest.mark.parametrize("host_s,note", [((0.9, 0.95, 1.0), "paced by the host: it issued the steps in 95%"),
                                          ((0.2, 0.3, 0.4), None)])
def test_a_gpu_decode_round_that_the_host_paced_is_said_to_be(host_s: tuple[float, ...], note: str | None) -> None:
    """On a GPU the host issues a compiled round's steps ahead of the device unless its own work (Python, dynamo's
    guards, graph replays) takes longer than the kernels; then the figure measures the host. By hand: rounds of
    1 s each, host 0.9 / 0.95 / 1.0 s -> median share 0.95, over 4 tokens -> 0.2375 s per token."""
    from efficiency.phases.latency import host_pace

    pace = host_pace(host_s, (1.0, 1.0, 1.0), 4, "cuda:0")
    assert pace["decode_host_share"] == pytest.approx(statistics.median(host_s))
    assert pace["decode_host_s_per_token"] == pytest.approx(statistics.median(host_s) / 4)
    assert pace["decode_host_note"] == note if note is None else pace["decode_host_note"].startswith(note)


def test_the_weights_a_token_reads_are_counted_once_per_case(llama_root: Path, one_thread: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The perplexity and decode phases share the count of weight bytes a token reads; ``setdefault`` evaluated its
    argument anyway, so the decode phase counted them again (through every unwrapped weight's rebuild since
    ``compile`` unwraps torchao's weights)."""
    import efficiency.measure.roofline as roofline

    calls: list[int] = []
    real = roofline.weights_read_per_token

    def counting(model: Any) -> tuple[int, int]:
        calls.append(1)
        return real(model)

    monkeypatch.setattr(roofline, "weights_read_per_token", counting)
    s = _session(llama_root, "fp32", "fp32")
    s.run_case("t", "fp32")
    assert s.report["cases"][0]["status"] == "measured" and len(calls) == 1
    s.finish(0)
