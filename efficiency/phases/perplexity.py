"""The perplexity phases: ``quality`` (one pass: the perplexity, the first-pass time and the case's peak memory)
and ``ppl_pass`` (the paper's runtime: the same pass repeated in timed rounds inside an energy window)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from efficiency.phases.base import PhaseContext, PhaseRecord, Rounds

RANDOM_PPL_REASON = "random weights: the perplexity of an untrained model is meaningless (architecture timing only)"


def _evaluator(ctx: PhaseContext) -> Any:
    """One evaluator per case, shared by the two phases (same windows, same token ids)."""
    if "evaluator" not in ctx.shared:
        from efficiency.measure.perplexity import PerplexityEvaluator

        ctx.shared["evaluator"] = PerplexityEvaluator(ctx.tokens, ctx.context, ctx.stride,
                                                      ctx.workload.batch_size)
    return ctx.shared["evaluator"]


def _progress(ctx: PhaseContext, what: str, windows: int, *, compiling: bool = False) -> Callable[[int], None]:
    """Throttled progress lines of a pass through the case's log (a pass over the whole test split, or one that
    compiles, can take minutes). A compiling pass shows no ETA: its first windows carry the compilation, and an
    ETA drawn from them said 17m54s for a warm-up that ended 1m34s later (fp8wo, opt-6.7b, H200; results 5l)."""
    from efficiency.techniques.progress import Progress

    return Progress(ctx.log, f"{ctx.case_id}: {what}", windows, "windows", eta=not compiling).update


@dataclass
class QualityPhase:
    """Perplexity over the evaluation text, once. Its window gives the first pass's time (with one-time costs
    such as kernel loading) and the peak memory the report shows for the case."""

    random_weights: bool = False
    name: ClassVar[str] = "quality"
    exact_cpu_peak: ClassVar[bool] = True  # its peak is the case's memory; its time is no timed figure

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        from efficiency.techniques.compile import compiled_state

        ev = _evaluator(ctx)
        ctx.log(f"{ctx.case_id}: perplexity pass over {len(ctx.tokens)} tokens ({len(ev.plan)} windows of "
                f"{ctx.context})")
        if compiled_state(model) is not None:  # compile every input shape of the pass here, not in the window
            ev.run(model, ctx.device, _progress(ctx, "compiling and warming up the perplexity pass", len(ev.plan),
                                                compiling=True))

    def run(self, model: Any, ctx: PhaseContext) -> Any:
        ev = _evaluator(ctx)
        return ev.run(model, ctx.device, _progress(ctx, "perplexity pass", len(ev.plan)))

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        ppl = record.result
        return {
            "perplexity": {
                "value": ppl.perplexity,
                "meaningful": not self.random_weights,
                "reason": RANDOM_PPL_REASON if self.random_weights else None,
                **ppl.to_dict(),
            },
            "memory": record.window.peak.to_dict(),
        }


def mfu_dtype(shared: Mapping[str, Any]) -> Any:
    """The dtype whose dense peak a pass's MFU is taken against: the one the quantised matmuls run in where a step
    declares it (int8dq: int8, fp8dq: float8; ``MATMUL_DTYPE_KEY``), the model's compute dtype otherwise."""
    return shared.get("matmul_dtype") or shared.get("compute_dtype")


@dataclass(frozen=True)
class TimedPass:
    rounds: Rounds
    n_tokens: int
    n_scored_tokens: int
    n_processed_tokens: int = 0  # window overlap counted
    batch_size: int | None = None
    n_logit_positions: int | None = None  # positions whose logits were computed (the LM head's work)
    flops: float | None = None  # model FLOPs of one pass (efficiency.measure.roofline.evaluator_flops)
    attention_counted: bool = False

    @property
    def n(self) -> int:
        return self.rounds.n

    @property
    def median_s(self) -> float:
        return self.rounds.median_s

    @property
    def capped(self) -> bool:
        return self.rounds.capped


def energy_per_unit(window: Any, units: int, primary: str) -> dict[str, Any]:
    """Per-unit energy from a window's readings: ``energy_j`` is the primary meter's (the GPU's on a GPU run,
    the CPU package's otherwise), null with the reason when that meter is unavailable; every meter's window
    reading is kept under its key."""

    def per_unit(sample: Any) -> dict[str, Any]:
        if sample is None:
            return {"energy_j": None, "reason": "measurement window was cancelled"}
        d = sample.to_dict()
        d["window_energy_j"] = d.pop("energy_j")
        d["window_uncertainty_j"] = d.pop("uncertainty_j")
        d["rounds_in_window"] = units
        d["energy_j"] = d["window_energy_j"] / units if d["window_energy_j"] is not None else None
        d["uncertainty_j"] = d["window_uncertainty_j"] / units if d["window_uncertainty_j"] is not None else None
        return d

    per_meter = {k: per_unit(s) for k, s in window.energy.items()}
    main = per_meter.get(primary) or {"energy_j": None, "reason": f"no {primary} meter"}
    return {
        "energy_j": main["energy_j"],
        "uncertainty_j": main.get("uncertainty_j"),
        "primary": primary,
        "reason": main.get("reason") if main["energy_j"] is None else None,
        **per_meter,
    }


def net_of_idle(energy: dict[str, Any], idle_w: float) -> dict[str, Any]:
    """Net energy per pass next to the gross ``energy_j`` of an ``energy_per_unit`` section: the primary meter's
    window energy minus idle power x that window's length, per round in it (gross and idle over the same time; the
    median round time would not be the mean round time the gross is). Null with the reason where it cannot be
    measured: no window length, or idle power x time above the gross (the idle draw was not the same then), never
    clamped to 0."""
    window = energy.get(str(energy.get("primary"))) or {}
    gross, window_s, rounds = (window.get(k) for k in ("window_energy_j", "window_s", "rounds_in_window"))
    out: dict[str, Any] = {"idle_power_w": idle_w, "net_energy_j": None}
    if gross is None or not window_s or not rounds:
        return {**out, "net_energy_reason": "the primary meter's window energy, length or rounds are not recorded"}
    idle_j = idle_w * window_s
    if idle_j > gross:
        return {**out, "net_energy_reason": f"idle power x window time ({idle_j:.4g} J) exceeds the window's gross "
                f"energy ({gross:.4g} J): the idle reading does not hold for this window, net energy not measurable"}
    return {**out, "net_energy_j": (gross - idle_j) / rounds}


@dataclass
class TimedPassPhase:
    """The perplexity pass in timed rounds (pytest-benchmark's when the fixture is enabled), inside one energy
    window of at least the minimum window; energy per pass = window energy / rounds."""

    name: ClassVar[str] = "ppl_pass"
    _estimate_s: float = 0.0

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        import time

        ctx.weights_read(model)
        ctx.shared["compute_dtype"] = getattr(model, "dtype", None)
        ev = _evaluator(ctx)
        first = ctx.records.get("quality")
        self._estimate_s = first.window.wall_s if first else 0.0
        if ctx.min_window_s > 0:  # the first pass carries one-time costs: size the window from a warm one
            ctx.sync()
            t0 = time.perf_counter()
            ev.run(model, ctx.device)
            ctx.sync()
            self._estimate_s = time.perf_counter() - t0
        planned = ctx.rounds_for(self._estimate_s, ctx.workload.min_rounds)
        window = (f"energy window >= {ctx.min_window_s:g} s" if ctx.min_window_s > 0 else
                  "no minimum window: --eff-min-window 0" if ctx.real_meters else
                  "no energy meter here, so no minimum window")
        ctx.log(f"{ctx.case_id}: {planned} timed rounds ({window})")

    def run(self, model: Any, ctx: PhaseContext) -> TimedPass:
        ev = _evaluator(ctx)
        rounds = ctx.repeat(lambda: ev.run(model, ctx.device), ctx.workload.min_rounds, self._estimate_s,
                            use_benchmark=True)
        from efficiency.measure.roofline import evaluator_flops

        flops, attention = evaluator_flops(ctx.shared.get("weights_read", (None, None))[1], model, ev)
        return TimedPass(rounds, len(ev.ids), ev.n_scored_tokens, ev.n_processed_tokens, ev.batch_size,
                         ev.n_logit_positions, flops, attention)

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        tp: TimedPass = record.result
        median_s = tp.rounds.median_s
        energy = energy_per_unit(record.window, tp.rounds.n, ctx.primary)
        energy["j_per_token"] = energy["energy_j"] / tp.n_scored_tokens if energy["energy_j"] is not None else None
        if tp.rounds.note:
            energy["round_cap"] = tp.rounds.note
        first = ctx.records.get("quality")
        from efficiency.measure.roofline import device_name, mfu

        m = mfu(tp.flops, median_s, mfu_dtype(ctx.shared), device_name(ctx.device))
        clocks = record.window.first_gpu_clocks() or {}  # the first metered GPU's; none on a CPU run
        return {
            "runtime": {
                "batch_size": tp.batch_size,
                "tokens_processed": tp.n_processed_tokens,
                "logit_positions": tp.n_logit_positions,
                "model_tflop": m["flops"] / 1e12 if m["flops"] else None,
                "attention_flops_counted": tp.attention_counted,
                "achieved_tflops": m["achieved_flops_per_s"] / 1e12 if m["achieved_flops_per_s"] else None,
                "mfu_pct": m["mfu"] * 100 if m["mfu"] is not None else None,
                "mfu_peak_tflops": m["peak_flops_per_s"] / 1e12 if m["peak_flops_per_s"] else None,
                "mfu_compute_dtype": m["compute_dtype"],
                "mfu_device_peak": m["device_peak"],
                "mfu_reason": m["reason"],
                # the median SM clock the pass ran at: MFU is against the datasheet's peak, which assumes the tensor
                # cores' boost clock; a GPU at its power limit runs below it (docs/results.md 5r)
                "mfu_sm_clock_mhz": clocks.get("sm_clock_mhz_median"),
                "mfu_power_capped_share": clocks.get("power_capped_share"),
                "median_s": median_s,
                "min_s": min(tp.rounds.times_s),
                "rounds_s": list(tp.rounds.times_s),
                "rounds": tp.rounds.n,
                "first_pass_s": first.window.wall_s if first else None,
                "tokens_per_s": tp.n_tokens / median_s if median_s > 0 else None,
                "round_cap": tp.rounds.note,
                "method": "perplexity pass; perf_counter with device sync at both edges; median of rounds "
                          "after one untimed pass",
            },
            "energy": energy,
        }
