"""Latency phases, each in its own energy window: ``prefill`` (one forward pass over the prompt, no cache),
``first_token`` (``generate`` of 1 token: prefill plus the first sampled token) and ``decode`` (``generate`` of
exactly N tokens, min_new_tokens = max_new_tokens, greedy).

Decode per token, compiled (``+compile``, efficiency.techniques.compile): the prompt is run into its static cache
once, in the phase's setup, and each timed round is the N - 1 compiled one-token steps after it, so
``decode_s_per_token = median t(N - 1 steps) / (N - 1)`` and ``decode_j_per_token = E per round / (N - 1)``, with
no prefill in the window; the host's part of each round (until the last step is issued, before the wait for the
device) is reported beside it (``decode_host_s_per_token``, ``decode_host_share``), and a round the host paced is
said to be (:data:`HOST_BOUND_SHARE`). Eager (Hugging Face's ``generate``) it is a difference, so that the prefill
cancels out: ``(median t(generate N) - median t(generate 1)) / (N - 1)`` and, from the two windows,
``(E(generate N) per round - E(generate 1) per round) / (N - 1)``. The difference is only as good as the two
medians, and a compiled case's eager prefill through torchao's tensor subclasses varies from round to round: on
opt-6.7b (H200) fp8dq's generate(1) took 0.15-0.20 s and its generate(64) 0.46-0.82 s, and the difference gave
10.1 ms/token; the next run, timing its steps alone, measured 5.6 (docs/results.md section 5h).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from efficiency.measure.ops import aten_ops_called, matmul_ops
from efficiency.phases.base import PhaseContext, PhaseRecord, Rounds

METHOD = ("median of rounds after 1 warm-up; perf_counter with device sync at both edges; greedy decode; "
          "each phase in its own energy window")
DECODE_METHOD = {
    "steps": "compiled decode: each round is the N - 1 one-token steps after a prompt prefilled once in setup "
             "(no prefill in the window); per token = median round / (N - 1)",
    "difference": "generate: per token = (median t(generate N) - median t(generate 1)) / (N - 1), the prefill "
                  "cancelling out; energy likewise from the two windows",
}

# A compiled decode round's host time (issuing the steps, before the final wait for the device) as a share of the
# round, from which on a GPU the round is said to be paced by the host (Python, dynamo's guards, graph replays):
# the kernels then wait for their launches, and the figure measures the host, not the kernels or the weights.
HOST_BOUND_SHARE = 0.9


def _prompt(model: Any, ctx: PhaseContext) -> tuple[Any, Any]:
    """The (1, P) prompt ids and attention mask: the first evaluation tokens, P = Workload.prompt_tokens (the check
    before loading applies the same rule); where P is below --eff-prefill-tokens, ``ctx.shared["prompt_note"]``
    says what capped it."""
    if "prompt" not in ctx.shared:
        import torch

        from efficiency.models import max_positions

        positions = max_positions(model.config)
        prompt = ctx.tokens[: ctx.workload.prompt_tokens(positions)].unsqueeze(0).to(ctx.device)
        ctx.shared["prompt"] = (prompt, torch.ones_like(prompt))  # (1, P) ids and attention mask
        ctx.shared["prompt_note"] = ctx.workload.prompt_note(int(prompt.shape[1]), positions)
    return ctx.shared["prompt"]


def _generate_kwargs(ctx: PhaseContext, n: int) -> dict[str, Any]:
    """``generate``'s arguments for exactly ``n`` greedy tokens (what a compiled model's own loop handles)."""
    return {"do_sample": False, "min_new_tokens": n, "max_new_tokens": n,
            "pad_token_id": getattr(ctx.tokenizer, "pad_token_id", None)}


def _generate(model: Any, ctx: PhaseContext, n: int) -> Callable[[], Any]:
    prompt, mask = _prompt(model, ctx)
    kwargs = _generate_kwargs(ctx, n)

    def go() -> Any:
        import torch

        with torch.inference_mode():
            return model.generate(prompt, attention_mask=mask, **kwargs)

    return go


def _prefill(model: Any, ctx: PhaseContext) -> Callable[[], Any]:
    prompt, mask = _prompt(model, ctx)

    def go() -> Any:
        import torch

        with torch.inference_mode():
            return model(prompt, attention_mask=mask, use_cache=False)

    return go


def _energy_per_round_j(record: PhaseRecord, key: str) -> float | None:
    sample = record.window.sample(key)
    energy = getattr(sample, "energy_j", None)
    return energy / record.result.n if energy is not None and record.result.n else None


@dataclass
class PrefillPhase:
    name: ClassVar[str] = "prefill"

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        for fn in (_prefill(model, ctx), _generate(model, ctx, 2)):  # warm-up: kernels, caches, allocator
            ctx.sync()
            fn()
            ctx.sync()

    def run(self, model: Any, ctx: PhaseContext) -> Rounds:
        return ctx.repeat(_prefill(model, ctx), ctx.workload.min_rounds)

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        return {}  # the latency section is written by DecodePhase from the three records


@dataclass
class FirstTokenPhase:
    name: ClassVar[str] = "first_token"

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        return None

    def run(self, model: Any, ctx: PhaseContext) -> Rounds:
        return ctx.repeat(_generate(model, ctx, 1), ctx.workload.min_rounds)

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        return {}


@dataclass
class DecodePhase:
    name: ClassVar[str] = "decode"

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        from efficiency.techniques.compile import compiled_state

        ctx.weights_read(model)
        compiled = ctx.shared["compiled"] = compiled_state(model)
        n = ctx.workload.decode_tokens
        prompt, mask = _prompt(model, ctx)
        # Warm-up at the measured length: a compiled decode (static cache, CUDA graphs) compiles and records here,
        # never inside the window; its prompt is prefilled here once, and the rounds are its steps alone.
        ctx.sync()
        if compiled is not None and compiled.handles(prompt, mask, _generate_kwargs(ctx, n)):
            prefilled = compiled.prefill(prompt, n)
            compiled.decode(prefilled, n - 1)
            host_s: list[float] = []
            ctx.shared["decode_round"] = decode_round(compiled, prefilled, n - 1, host_s)
            ctx.shared["decode_host_s"] = host_s
            ops = decode_matmul_ops(functools.partial(compiled.decode, prefilled, 1),
                                    cuda_graphs=compiled.cuda_graphs, method=DECODE_OPS_STEP)
        else:
            ctx.shared["decode_round"] = None
            # the warm-up itself is the observed call: no second generate, no second prefill
            ops = decode_matmul_ops(_generate(model, ctx, n), cuda_graphs=False, method=DECODE_OPS_WARM_UP)
        ctx.shared["decode_matmul_ops"] = ops
        ctx.sync()

    def run(self, model: Any, ctx: PhaseContext) -> Rounds:
        steps_alone = ctx.shared["decode_round"]
        return ctx.repeat(steps_alone or _generate(model, ctx, ctx.workload.decode_tokens), ctx.workload.min_rounds)

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        n = ctx.workload.decode_tokens
        pre, one = ctx.records["prefill"].result, ctx.records["first_token"].result
        many: Rounds = record.result
        steps_only = ctx.shared["decode_round"] is not None
        per_token = many.median_s / (n - 1) if steps_only else (many.median_s - one.median_s) / (n - 1)
        reason = None
        if per_token <= 0:  # timing noise larger than the decode work: say so instead of reporting 0
            reason = f"generate({n}) was not slower than generate(1) (noise); use more --eff-decode-tokens"
        e_many = _energy_per_round_j(record, ctx.primary)
        e_one = 0.0 if steps_only else _energy_per_round_j(ctx.records["first_token"], ctx.primary)
        j_per_token: float | None = None
        energy_reason = None
        if e_many is None or e_one is None:
            sample = record.window.sample(ctx.primary)
            energy_reason = getattr(sample, "reason", None) or "energy not measured"
        elif e_many - e_one <= 0:
            what = (f"E per round of {n - 1} steps was not above 0" if steps_only
                    else f"E(generate {n}) per round was not above E(generate 1) per round")
            energy_reason = (f"{what} (meter resolution or noise); use a longer --eff-min-window or more "
                             "--eff-decode-tokens")
        else:
            j_per_token = (e_many - e_one) / (n - 1)
        prompt, _ = ctx.shared["prompt"]
        roof = _roofline(ctx, per_token if per_token > 0 else None)
        compiled = ctx.shared.get("compiled")
        skips = compiled.cudagraph_skips() if compiled is not None else None
        host = host_pace(ctx.shared["decode_host_s"], many.times_s, n - 1, ctx.device) if steps_only else {
            "decode_host_s_per_token": None, "decode_host_share": None,
            "decode_host_note": "not measured: generate waits for each token on the host (stopping criteria)"}
        return {"latency": {
            "prefill_s": pre.median_s,
            "first_token_s": one.median_s,
            "decode_s_per_token": per_token if per_token > 0 else None,
            "decode_j_per_token": j_per_token,
            "decode_energy_reason": energy_reason,
            "tokens_per_s_decode": 1.0 / per_token if per_token > 0 else None,
            "prompt_tokens": int(prompt.shape[1]),
            "prompt_note": ctx.shared["prompt_note"],  # what capped the prompt below --eff-prefill-tokens, or None
            "new_tokens": n,
            "rounds": pre.n,
            "rounds_first_token": one.n,
            "rounds_decode": many.n,
            "prefill_s_all": list(pre.times_s),
            "first_token_s_all": list(one.times_s),
            "decode_s_all": list(many.times_s),
            # per token, one value a round: compiled decode times the steps alone; the eager difference of two
            # generate medians has no per-round value (its rounds are not paired)
            "decode_s_per_token_all": [t / (n - 1) for t in many.times_s] if steps_only else None,
            "reason": reason,
            "method": METHOD,
            "decode_method": DECODE_METHOD["steps" if steps_only else "difference"],
            "cuda_graph_skips": skips,  # compiled graphs that ran without CUDA graphs (None: not asked for)
            **ctx.shared["decode_matmul_ops"],
            **host,
            **roof,
        }}


DECODE_OPS_STEP = ("the ATen matmul operators of one untimed compiled decode step after the warm-up, observed with "
                   "torch.profiler")
DECODE_OPS_WARM_UP = ("the ATen matmul operators of the untimed warm-up generate (its prefill included), observed "
                      "with torch.profiler")
DECODE_OPS_CUDA_GRAPHS = ("not observed: the compiled step replays a CUDA graph, which runs no operator on the host "
                          "(the GPU leases' kernel tables name its kernels: docs/results.md sections 5c-5j)")


def decode_matmul_ops(call: Callable[[], Any], *, cuda_graphs: bool, method: str) -> dict[str, Any]:
    """The latency section's ``decode_matmul_ops`` (``["aten._weight_int8pack_mm"]``; an empty list when the
    compiler generated the matmuls as kernels of its own) of ``call``, with ``method``; or, where ``call`` replays
    CUDA graphs, None with the reason, without calling it."""
    if cuda_graphs:
        return {"decode_matmul_ops": None, "decode_matmul_ops_method": DECODE_OPS_CUDA_GRAPHS}
    import torch

    with torch.inference_mode():
        ops = aten_ops_called(call)
    return {"decode_matmul_ops": matmul_ops(ops), "decode_matmul_ops_method": method}


def decode_round(executor: Any, prompt: Any, steps: int, host_s: list[float]) -> Callable[[], None]:
    """One timed round of a compiled decode: ``steps`` steps from ``prompt`` (``CompiledExecution.decode``), each
    call appending the host's part to ``host_s``: the time until the last step is issued, before any wait for the
    device (the caller synchronises around the round)."""
    def round_() -> None:
        t0 = time.perf_counter()
        executor.decode(prompt, steps)
        host_s.append(time.perf_counter() - t0)

    return round_


def host_pace(host_s: Sequence[float], rounds_s: Sequence[float], steps: int, device: str) -> dict[str, Any]:
    """How long the host took to issue a compiled round's ``steps`` (median, per step), its share of the round
    (median over rounds, one host time per round), and a note when the host set the pace: on a GPU at
    HOST_BOUND_SHARE or more; on the CPU the host runs the kernels, so the share is 1 by construction."""
    share = statistics.median(h / t for h, t in zip(host_s, rounds_s, strict=True))
    note = None
    if not str(device).startswith("cuda"):
        note = "on the CPU the host runs the kernels: the share is 1 by construction"
    elif share >= HOST_BOUND_SHARE:
        note = (f"paced by the host: it issued the steps in {share:.0%} of each round (median), so the device "
                "waited for launches and the figure measures Python and launch overhead, not the kernels")
    return {"decode_host_s_per_token": statistics.median(host_s) / steps, "decode_host_share": share,
            "decode_host_note": note}


def _roofline(ctx: PhaseContext, s_per_token: float | None) -> dict[str, Any]:
    """Achieved weight bandwidth of decode and its fraction of the device's peak (efficiency.measure.roofline)."""
    from efficiency.measure.roofline import decode_roofline, device_name

    weight_bytes = ctx.shared.get("weights_read", (None, None))[0]
    r = decode_roofline(weight_bytes, s_per_token, device_name(ctx.device))
    return {
        "weight_bytes_per_token": r["weight_bytes_per_token"],
        "weight_bytes_per_s": r["weight_bytes_per_s"],
        "roofline_pct": r["roofline_fraction"] * 100 if r["roofline_fraction"] is not None else None,
        "roofline_floor_s_per_token": r["floor_s_per_token"],
        "peak_bytes_per_s": r["peak_bytes_per_s"],
        "device_peak": r["device_peak"],
        "peak_source": r["peak_source"],
        "roofline_reason": r["reason"],
    }
