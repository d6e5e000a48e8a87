"""Development probe behind the defaults of docs/results.md section 5: execution variants side by side on one GPU.

Not a suite report (no energy window, no phases): it chooses what the suite's ``compile`` step and the low-bit
techniques default to, and the suite's own grid (`benchmarks/gpu/run.sh deploy`) then measures the chosen ones.

`python benchmarks/gpu/decode_probe.py OUTDIR --model opt-6.7b --variants "bf16+compile,int4wo+compile@cdt"`

A variant is a pipeline of the suite, optionally followed by ``@`` and flags joined by ``.``: compile settings
``cdt`` / ``nocdt`` (inductor's coordinate-descent tuning on / off; without either, compile's automatic choice),
``ma`` (max-autotune), ``fz`` (freezing), ``nofuse`` (projections not fused, techniques/fusion.py), ``nohead`` (LM
head not compiled in passes without cache), ``noepi`` (bias and activation not fused into the matmul's epilogue,
techniques/epilogue.py), ``nounwrap`` (torchao's weights left as tensor subclasses),
``guards`` (dynamo's guards evaluated on every decode step), ``nomk`` (compile's ``multi_kernel`` off: the passes'
reductions compiled one way only; in the lease of docs/results.md 5p, before it became the default, ``mk`` turned it
on, and the flags ``whole``, ``lin``, ``fq`` and ``nn`` tried settings that were measured and dropped), ``chain``
(compile's ``chain_blocks`` on: in the passes without cache, the decoder blocks compiled as one region that runs
them in turn, instead of one region per block, so that inductor can fuse a block's residual add into the next
block's norm; the attention mask is still made outside the graph, by the model's own eager code); attention
backends ``flash`` (cuDNN's SDPA off, so
FlashAttention's kernels run), ``effat`` (cuDNN and Flash off: the memory-efficient kernels) and ``math`` (all fused
SDPA kernels off: inductor writes the attention); ``blaslt`` (cuBLASLt, not cuBLAS, for the matmuls outside
inductor's own kernels: ``torch.backends.cuda.preferred_blas_library``), ``mag`` (inductor's GEMM autotuning
alone, process-wide: each matmul timed as cuBLAS and as inductor's Triton templates, the faster kept; no pointwise
autotuning, unlike ``ma``), ``tma`` (``mag`` with the persistent TMA template too), ``nocombo`` (compile's
``combo_kernels`` off: inductor's combo kernels, on by default in decode; before 89ea07a the probe's ``combo`` flag
turned them on process-wide), ``nopdl`` (compile's ``pdl`` off: programmatic dependent launch of inductor's
Triton kernels, on by default from compute capability 9.0; in the lease of docs/results.md 5o the probe's ``pdl``
flag turned it on process-wide), ``flex`` (the model's attention through
FlexAttention, ``set_attn_implementation("flex_attention")``: under compile, inductor's split-KV decoding kernel for
one query); gemlite settings
``glmax`` (its full autotuning grid for the GEMV kernels) and ``glcg`` (candidates timed in CUDA graphs); and
``prof`` (a kernel table from torch.profiler after the timed rounds, outside them), e.g. ``bf16+compile@cdt.ma.prof``.
Each variant runs in its own process (fresh compiler state and GPU memory) under the time left of ``--budget-s``:

- ``--what decode``: batch-1 greedy decode of ``--new`` tokens after a ``--prompt``-token prompt, as the suite's
  decode phase measures it: compiled, the median of rounds of the ``new - 1`` steps after one prefill, over
  ``new - 1``; eager, (median t(generate new) - median t(generate 1)) / (new - 1). A compiled variant also reports
  that difference (``ms_per_token_difference``): it carries the eager prefill's spread (docs/results.md 5h).
- ``--what ppl``: the perplexity pass (context 1024, stride 512, automatic batch) over ``--tokens`` random ids,
  median of ``--rounds`` passes after a warm-up (3 before docs/results.md 5p), MFU by the suite's FLOP count
  (efficiency.measure.roofline.pass_flops).

The kernel table (``prof``) gives each kernel's GPU time per generated token (decode: the profile of ``new`` tokens
minus that of 1, over ``new - 1``) or per pass (ppl), with the share of the total, top 30.

Writes OUTDIR/probe-<what>-<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Any, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return out


def _flags(variant: str) -> list[str]:
    """The flags after ``@`` in a variant name (``bf16+compile@cdt.prof`` -> ``["cdt", "prof"]``)."""
    return variant.partition("@")[2].split(".")


def _model(name: str, variant: str, device: str) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoConfig

    from efficiency.models import _random_model
    from efficiency.techniques.base import Context, parse
    from efficiency.techniques.compile import compiled_state

    pipeline_name, flags = variant.partition("@")[0], _flags(variant)
    steps = pipeline_name.split("+")
    options: dict[str, dict[str, Any]] = {}
    if "compile" in steps:
        tuning = True if "cdt" in flags else False if "nocdt" in flags else None
        options["compile"] = {"coordinate_descent_tuning": tuning,
                              "max_autotune": "ma" in flags, "freezing": "fz" in flags,
                              "fuse_projections": "nofuse" not in flags, "compile_head": "nohead" not in flags,
                              "unwrap_subclasses": "nounwrap" not in flags,
                              "fuse_bias_activation": "noepi" not in flags,
                              "skip_repeat_guards": "guards" not in flags,
                              "combo_kernels": "nocombo" not in flags, "pdl": "nopdl" not in flags,
                              "multi_kernel": "nomk" not in flags, "chain_blocks": "chain" in flags}
    for step in (s for s in steps if s.startswith("gemlite-")):
        options[step] = {"gemv_autotune": "max" if "glmax" in flags else "fast", "cuda_graph_autotune": "glcg" in flags}
    pipeline = parse(pipeline_name, options)
    ctx = Context(device=device, tokenizer=None, model_name=name, cache_dir=Path("/tmp/eff-probe"))
    pipeline.check(ctx)
    dtype = pipeline.load_dtype(ctx, torch.bfloat16)
    config = AutoConfig.from_pretrained(Path(os.environ["EFFICIENCY_DATA_DIR"]) / "architectures" / name)
    model = _random_model(config, dtype, device, {}).eval()
    if "flex" in flags:
        model.set_attn_implementation("flex_attention")
    t0 = time.perf_counter()
    model = pipeline.apply(model, ctx)
    state = compiled_state(model)
    if "chain" in flags and (state is None or not state.chained):
        raise SystemExit(f"{variant}: chain asked, but the passes' blocks are not chained: "
                         f"{(ctx.info.get('compile') or {}).get('forward', 'no +compile step')}")
    _sync()
    info = {k: v for k, v in ctx.info.items() if k != "order"}
    return model, {"apply_s": time.perf_counter() - t0, "info": info}


def _kernel_times_us(fn: Any) -> dict[str, tuple[float, int]]:
    """GPU time (microseconds) of each kernel name over one call of ``fn``, from torch.profiler (on a machine
    without a GPU: each operator's own CPU time, so that the table can be tried there)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        fn()
        _sync()
    out: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        t = float(getattr(e, "device_time_total", 0.0) if gpu else e.self_cpu_time_total)
        if t > 0:
            before = out.get(e.key, (0.0, 0))
            out[e.key] = (before[0] + t, before[1] + int(e.count))
    return out


def kernel_table(many: dict[str, tuple[float, int]], few: dict[str, tuple[float, int]] | None, per: int,
                 top: int = 30) -> dict[str, Any]:
    """Top kernels by GPU time per unit (``(many - few) / per``), with calls per unit and share of the total."""
    few = few or {}
    names = set(many) | set(few)
    zero = (0.0, 0)
    per_unit = {n: ((many.get(n, zero)[0] - few.get(n, zero)[0]) / per,
                    (many.get(n, zero)[1] - few.get(n, zero)[1]) / per) for n in names}
    total = sum(v for v, _ in per_unit.values() if v > 0)
    rows = sorted(((n, v, c) for n, (v, c) in per_unit.items() if v > 0), key=lambda r: -r[1])[:top]
    return {"total_us": total, "kernels": [{"name": n[:160], "us": v, "calls": c,
                                            "share": v / total if total else None} for n, v, c in rows]}


def _choose_backends(flags: list[str]) -> None:
    """Turn off the fused SDPA backends that the flags name, choose the BLAS library and inductor's GEMM autotuning
    (process-wide: each variant has its own process)."""
    import torch

    if {"mag", "tma"} & set(flags):
        import torch._inductor.config as inductor_config

        inductor_config.max_autotune_gemm = True
        inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
        inductor_config.triton.enable_persistent_tma_matmul = "tma" in flags
    if "blaslt" in flags:
        torch.backends.cuda.preferred_blas_library("cublaslt")
    if {"flash", "effat", "math"} & set(flags):
        torch.backends.cuda.enable_cudnn_sdp(False)
    if {"effat", "math"} & set(flags):
        torch.backends.cuda.enable_flash_sdp(False)
    if "math" in flags:
        torch.backends.cuda.enable_mem_efficient_sdp(False)


def one(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from efficiency.measure.roofline import decode_roofline, device_name, weights_read_per_token
    from efficiency.techniques.compile import compiled_state

    dev = a.device
    _choose_backends(_flags(a.one))
    model, row = _model(a.model, a.one, dev)
    weight_bytes, params = weights_read_per_token(model)
    row.update(variant=a.one, model=a.model, device=device_name(dev), torch=torch.__version__,
               weight_bytes_per_token=weight_bytes, parameters=params)
    g = torch.Generator().manual_seed(0)
    if a.what == "decode":
        prompt = torch.randint(0, model.config.vocab_size, (1, a.prompt), generator=g).to(dev)
        mask = torch.ones_like(prompt)

        def gen(n: int) -> Any:
            with torch.inference_mode():
                return model.generate(prompt, attention_mask=mask, do_sample=False, min_new_tokens=n,
                                      max_new_tokens=n, pad_token_id=0)

        t0 = time.perf_counter()
        out = gen(a.new)  # compile + CUDA-graph capture happen here and in the next call
        gen(1)
        _sync()
        row["warm_up_s"] = time.perf_counter() - t0
        assert out.shape == (1, a.prompt + a.new), out.shape
        one_s = _timed(lambda: gen(1), a.rounds)
        many_s = _timed(lambda: gen(a.new), a.rounds)
        difference = (statistics.median(many_s) - statistics.median(one_s)) / (a.new - 1)
        state = compiled_state(model)
        if state is not None:  # the steps alone, from one prefill (efficiency.phases.latency.DecodePhase)
            from efficiency.phases.latency import decode_round, host_pace

            host_s: list[float] = []
            rounds_s = _timed(decode_round(state, state.prefill(prompt, a.new), a.new - 1, host_s), a.rounds)
            spread = [t / (a.new - 1) for t in rounds_s]
            per_token = statistics.median(spread)
            pace = host_pace(host_s, rounds_s, a.new - 1, dev)
            row["method"] = "compiled steps after one prefill"
            row["host_ms_per_token"] = pace["decode_host_s_per_token"] * 1e3
            row["host_share"] = pace["decode_host_share"]
        else:
            per_token = difference
            spread = [(m - statistics.median(one_s)) / (a.new - 1) for m in many_s]
            row["method"] = "difference of generate medians"
        row["ms_per_token_difference"] = difference * 1e3
        roof = decode_roofline(weight_bytes, per_token, device_name(dev))
        row.update(ms_per_token=per_token * 1e3, ms_per_token_min=min(spread) * 1e3,
                   ms_per_token_max=max(spread) * 1e3, rounds=a.rounds,
                   roofline_pct=roof["roofline_fraction"] * 100 if roof["roofline_fraction"] else None,
                   floor_ms=roof["floor_s_per_token"] * 1e3 if roof["floor_s_per_token"] else None,
                   device_peak=roof["device_peak"],
                   cuda_graph_skips=state.cudagraph_skips() if state is not None else None,
                   calls=dict(state.calls) if state is not None else None)
        if "prof" in _flags(a.one):
            row["kernels_per_token"] = kernel_table(_kernel_times_us(lambda: gen(a.new)),
                                                    _kernel_times_us(lambda: gen(1)), a.new - 1)
    else:
        from efficiency.measure.perplexity import PerplexityEvaluator
        from efficiency.measure.roofline import evaluator_flops, mfu, pass_flops

        ids = torch.randint(0, model.config.vocab_size, (a.tokens,), generator=g).to(dev)
        ev = PerplexityEvaluator(ids, 1024, 512, None if a.batch == 0 else a.batch)
        t0 = time.perf_counter()
        first = ev.run(model, dev)
        _sync()
        row["warm_up_s"] = time.perf_counter() - t0
        row["perplexity"] = first.perplexity  # of the random ids: variants of one model must agree
        times = _timed(lambda: ev.run(model, dev), a.rounds)
        s = statistics.median(times)
        dtype = next(model.parameters()).dtype
        flops, _ = evaluator_flops(params, model, ev)
        m = mfu(flops, s, dtype, device_name(dev))
        old = mfu(pass_flops(params, ev.n_processed_tokens), s, dtype, device_name(dev))
        row.update(pass_s=s, pass_s_all=times, batch=ev.batch_size, tokens=a.tokens,
                   tokens_processed=ev.n_processed_tokens, model_tflop=flops / 1e12 if flops else None,
                   mfu_pct=m["mfu"] * 100 if m["mfu"] else None,
                   old_count_mfu_pct=old["mfu"] * 100 if old["mfu"] else None,
                   logit_positions=ev.n_logit_positions)
        if "prof" in _flags(a.one):
            row["kernels_per_pass"] = kernel_table(_kernel_times_us(lambda: ev.run(model, dev)), None, 1)
    return row


def _error_text(stderr: str) -> str:
    """The lines of a failed variant's stderr that name the error (a compiler's warnings can fill its tail),
    then the tail itself."""
    named = [ln for ln in stderr.splitlines() if any(w in ln for w in ("Error", "error:", "Exception", "Unsupported"))]
    return "\n".join(named[-8:])[-2000:] + "\n...\n" + stderr[-1500:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--variants", default="bf16+compile")
    ap.add_argument("--what", choices=("decode", "ppl"), default="decode")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=0, help="perplexity batch of windows; 0: automatic")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        from efficiency.techniques.compile import compiled_case_settings

        with compiled_case_settings():  # as the suite's runner measures a case
            row = one(a)
        print("PROBE-ROW " + json.dumps(row, default=str), flush=True)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for variant in a.variants.split(","):
        left = a.budget_s - (time.perf_counter() - start)
        if left < 30:
            rows.append({"variant": variant, "error": "not run: the probe's time budget was spent"})
            continue
        cmd = [sys.executable, __file__, str(a.out), "--model", a.model, "--what", a.what, "--one", variant,
               "--prompt", str(a.prompt), "--new", str(a.new), "--rounds", str(a.rounds), "--tokens", str(a.tokens),
               "--batch", str(a.batch), "--device", a.device]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            found = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE-ROW ")]
            row = json.loads(found[-1][10:]) if found else {"variant": variant, "error": _error_text(p.stderr)}
            hints = [ln for ln in p.stderr.splitlines() if "cudagraph" in ln.lower() or "skipping" in ln.lower()]
            row["perf_hints"] = hints[-5:]
        except subprocess.TimeoutExpired:
            row = {"variant": variant, "error": f"stopped after {left:.0f} s (the probe's budget)"}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row, default=str)[:1500], flush=True)
    path = a.out / f"probe-{a.what}-{a.model}.json"
    path.write_text(json.dumps({"model": a.model, "what": a.what, "rows": rows}, indent=1, default=str))
    print(f"\n{a.what} {a.model}")
    for r in rows:
        table = r.get("kernels_per_token") or r.get("kernels_per_pass")
        if table:
            print(f"{r['variant']}: kernels, GPU us per {'token' if a.what == 'decode' else 'pass'} "
                  f"(total {table['total_us']:.1f})")
            for k in table["kernels"][:15]:
                print(f"  {k['us']:10.1f} {k['share'] * 100:5.1f}% x{k['calls']:<6.1f} {k['name'][:100]}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:34s} ERROR {str(r['error'])[-300:]}")
        elif a.what == "decode":
            print(f"{r['variant']:34s} {r['ms_per_token']:7.3f} ms/token [{r['ms_per_token_min']:.3f}, "
                  f"{r['ms_per_token_max']:.3f}]  host {r.get('host_ms_per_token')} ms/token  "
                  f"{r['roofline_pct']}% of {r['device_peak']} peak BW  floor "
                  f"{r['floor_ms']} ms  warm-up {r['warm_up_s']:.0f} s  skips {r['cuda_graph_skips']}")
        else:
            print(f"{r['variant']:34s} {r['pass_s']:7.4f} s  batch {r['batch']}  MFU {r['mfu_pct']}% "
                  f"(old count {r['old_count_mfu_pct']}%)  warm-up {r['warm_up_s']:.0f} s")


if __name__ == "__main__":
    main()
