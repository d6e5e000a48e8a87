"""Development probe: the perplexity pass's big kernels alone, each weight layout and attention backend side by side.

The pass's kernel table (decode_probe.py ``--what ppl`` with ``prof``) showed gpt2-xl's matmuls with 1,600 inputs
running well below its 6,400-input ones. This times each matmul of a model's decoder block at the pass's row count
(``--rows``, 64 windows of 1,024 tokens) as the model stores its weight (GPT-2's ``Conv1D``: (in, out); ``nn.Linear``:
(out, in)) and in the other layout, with its bias (and the activation fused in the epilogue where the block has
one), and causal attention through each fused SDPA backend, at the block's heads and head size.

`python benchmarks/gpu/gemm_probe.py OUT.json --model gpt2-xl`

``--inductor tt,tma`` also times each matmul compiled by inductor with its GEMM autotuning (``max_autotune_gemm``,
backends ATEN and TRITON, so that cuBLAS and inductor's Triton templates compete at the same shape), in the layout the
model stores: ``tt`` with inductor's default templates, ``tma`` with its persistent TMA template too (Hopper), ``ex``
with the exhaustive search space. Inductor prints each autotuning's table of choices (stderr). ``--budget-s``
bounds the whole run: a compiled variant that would start after it is left out and named in the report.

``--sustained-s 10`` then runs one decoder block's kernels (the four matmuls as the model stores its weights, eager,
and cuDNN's causal attention) back to back for about that long and reports the time of one block and its TFLOP/s
under sustained load, next to the sum of the same kernels timed alone; the wall-clock times of its start and end
are printed, to be read against a clock and power log (``nvidia-smi -lms``) taken beside it.

Median [min, max] of ``--rounds`` CUDA-event timings after 3 warm-up calls; TFLOP/s from 2 x rows x in x out (attention:
one layer's causal FLOPs as the suite counts them, efficiency.measure.roofline.attention_flops; the reports of
docs/results.md 5p counted T^2 / 2 query-key pairs instead of T (T + 1) / 2, 0.1% fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any


def _time_ms(fn: Any, rounds: int) -> list[float]:
    import torch

    for _ in range(3):
        fn()
    out = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def _compiled(variant: str, activation: str | None, x: Any, w: Any, bias: Any) -> tuple[Any, float]:
    """The matmul (bias, activation) compiled with inductor's GEMM autotuning over cuBLAS and its Triton templates,
    called once (the autotuning), and the seconds that took."""
    import torch
    import torch.nn.functional as F

    options: dict[str, Any] = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                               "triton.cudagraphs": False}
    if variant == "tma":
        options["triton.enable_persistent_tma_matmul"] = True
    elif variant == "ex":
        options["max_autotune_gemm_search_space"] = "EXHAUSTIVE"
    elif variant != "tt":
        raise ValueError(f"unknown compiled variant {variant!r}")

    def f(x: Any, w: Any, bias: Any) -> Any:
        y = torch.addmm(bias, x, w)
        if activation == "gelu":
            return F.gelu(y, approximate="tanh")
        return torch.relu(y) if activation == "relu" else y

    torch._dynamo.reset()
    compiled = torch.compile(f, options=options, dynamic=False)
    t0 = time.perf_counter()
    compiled(x, w, bias)
    torch.cuda.synchronize()
    return (lambda: compiled(x, w, bias)), time.perf_counter() - t0


def _sustained(seconds: float, stored_ops: list[tuple[Any, float, float]], q: Any, k: Any, v: Any,
               attention_flop: float, rows: list[dict[str, Any]], record: Any) -> None:
    """One decoder block's kernels back to back for about ``seconds``: ms per block under sustained load, against
    the sum of the same kernels timed alone (cuDNN's attention: its row above)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    alone = [r for r in rows if "CUDNN" in r.get("what", "") and "ms" in r]
    if not alone:
        rows.append({"what": "sustained block", "error": "cuDNN's attention did not run"})
        return
    flop = sum(f for _, f, _ in stored_ops) + attention_flop
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        def block() -> None:
            for fn, _, _ in stored_ops:
                fn()
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

        one = statistics.median(_time_ms(block, 5))
        n = max(1, int(seconds * 1000 / one))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        print(f"sustained start {time.time():.3f}", flush=True)
        start.record()
        for _ in range(n):
            block()
        end.record()
        end.synchronize()
        print(f"sustained end {time.time():.3f}", flush=True)
    per_block = start.elapsed_time(end) / n
    record(f"sustained block ({n} back to back)", [per_block], flop)
    rows[-1].update(blocks=n, ms_alone_sum=sum(ms for _, _, ms in stored_ops) + alone[0]["ms"],
                    tflops_alone_sum=flop / (sum(ms for _, _, ms in stored_ops) + alone[0]["ms"]) / 1e9)
    print(f"  the same kernels timed alone: {rows[-1]['ms_alone_sum']:.3f} ms, {rows[-1]['tflops_alone_sum']:.1f} "
          "TFLOP/s", flush=True)


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoConfig

    from efficiency.measure.roofline import attention_flops

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="gpt2-xl")
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--inductor", default="", help="compiled variants: tt, tma, ex (comma-separated)")
    ap.add_argument("--budget-s", type=float, default=float("inf"))
    ap.add_argument("--sustained-s", type=float, default=0.0)
    a = ap.parse_args()
    started = time.perf_counter()
    cfg = AutoConfig.from_pretrained(Path(os.environ["EFFICIENCY_DATA_DIR"]) / "architectures" / a.model)
    hidden = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    ffn = int(getattr(cfg, "ffn_dim", None) or getattr(cfg, "n_inner", None) or 4 * hidden)
    heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    act = "gelu" if "gpt2" in cfg.model_type else "relu"
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x_in = {k: torch.randn(a.rows, k, device=dev, dtype=dt, generator=g) * 0.1 for k in {hidden, ffn}}
    rows: list[dict[str, Any]] = []

    def record(what: str, times: list[float], flop: float) -> None:
        med = statistics.median(times)
        rows.append({"what": what, "ms": med, "ms_min": min(times), "ms_max": max(times), "tflops": flop / med / 1e9})
        print(f"{what:58s} {med:8.3f} ms [{min(times):.3f}, {max(times):.3f}]  {flop / med / 1e9:6.1f} TFLOP/s",
              flush=True)

    stored_ops: list[tuple[Any, float, float]] = []  # (the matmul as the model stores its weight, FLOPs, ms alone)
    shapes = [("qkv", hidden, 3 * hidden, None), ("attn out", hidden, hidden, None), ("mlp in", hidden, ffn, act),
              ("mlp out", ffn, hidden, None)]
    for name, k, n, activation in shapes:
        x = x_in[k]
        w_out_in = torch.randn(n, k, device=dev, dtype=dt, generator=g) * 0.02  # nn.Linear's layout
        w_in_out = w_out_in.t().contiguous()  # GPT-2 Conv1D's layout
        bias = torch.randn(n, device=dev, dtype=dt, generator=g) * 0.02
        flop = 2.0 * a.rows * k * n
        for layout, w in (("(in, out), Conv1D", w_in_out), ("(out, in), Linear", w_out_in.t())):
            def fn(w: Any = w, x: Any = x, bias: Any = bias, activation: str | None = activation) -> Any:
                if activation:
                    return torch._addmm_activation(bias, x, w, use_gelu=activation == "gelu")
                return torch.addmm(bias, x, w)

            record(f"{name} {k}x{n} {layout}{' +' + activation if activation else ''}", _time_ms(fn, a.rounds), flop)
            if layout.startswith("(in, out)") == ("gpt2" in cfg.model_type):
                stored_ops.append((fn, flop, rows[-1]["ms"]))
        stored = w_in_out if "gpt2" in cfg.model_type else w_out_in.t()
        for variant in [v for v in a.inductor.split(",") if v]:
            what = f"{name} {k}x{n} compiled {variant}{' +' + activation if activation else ''}"
            if time.perf_counter() - started > a.budget_s:
                rows.append({"what": what, "error": "left out: the probe's budget was spent"})
                continue
            try:
                compiled, compile_s = _compiled(variant, activation, x, stored, bias)
                record(what, _time_ms(compiled, a.rounds), flop)
                rows[-1]["compile_s"] = compile_s
            except Exception as e:  # a template that fails to compile is a result here, not a crash
                rows.append({"what": what, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"{what}: {rows[-1]['error']}", flush=True)
    head = hidden // heads
    batch = a.rows // 1024
    q, kk, v = (torch.randn(batch, 1024, heads, head, device=dev, dtype=dt, generator=g).transpose(1, 2)
                for _ in range(3))
    layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
    flop = (attention_flops(cfg, [1024] * batch) or 0.0) / layers  # one layer's
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                times = _time_ms(lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=True), a.rounds)
            record(f"attention causal {batch}x{heads}x1024x{head} {backend.name}", times, flop)
        except RuntimeError as e:
            rows.append({"what": f"attention {backend.name}", "error": str(e)[:300]})
    if a.sustained_s > 0:
        _sustained(a.sustained_s, stored_ops, q, kk, v, flop, rows, record)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "rows_of_tokens": a.rows, "device": torch.cuda.get_device_name(),
                                 "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
