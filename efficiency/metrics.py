"""The metric registry: one entry per metric, read by every consumer.

An entry says what a metric is (name, label, unit, which direction is better), whether a rerun gives the same
number (``deterministic``, which every entry must state), where its value and its
per-round samples come from in a report case (a path into the case dict, filled at the JSON edge by
``efficiency.results.case_to_dict``), whether a change of it can fail a gate, how it is compared (threshold
kind) and formatted, and whether it is an axis of the Pareto front. Deltas (score.case_deltas), scores, the
Pareto front, ``efficiency compare``, the history store and the terminal, Markdown and HTML renderers all
iterate :data:`METRICS`; none of them names a report path itself.

Adding a metric: one :class:`Metric` entry here, and its producer (the phase result field its ``path``
points at). Nothing else: the history stores metrics in a long table (run, case, metric, value), so a new
metric needs no schema migration.

This module imports nothing heavy (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Better = Literal["lower", "higher"]
# How a change is judged in a comparison: "quality" (the perplexity threshold, deterministic), "regression"
# (the practical regression threshold plus a significance test: gated), "info" (reported, not gated).
Kind = Literal["quality", "regression", "info"]


def _get(d: Any, path: Sequence[str]) -> Any:
    cur = d
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt_number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.3g}"


@dataclass(frozen=True)
class Metric:
    name: str  # key in case["metrics"], in deltas and in the history
    label: str  # human label with its unit as shown
    unit: str  # "s", "J", "B", "tok/s", "" (dimensionless)
    better: Better
    path: tuple[str, ...]  # where the value is in a report case
    kind: Kind = "info"
    samples_path: tuple[str, ...] | None = None  # per-round values; None: one value per run
    # settings that must match for this metric to be compared: keys of settings.workload, or the settings sections
    # "baseline", "kld", "tasks", "serving" (efficiency.report.compare.measurement_settings)
    workload_keys: tuple[str, ...] = ()
    pareto_tolerance_pct: float | None = None  # an axis of the Pareto front, with its noise tolerance
    short: str = ""  # column header in the terminal table ("" = not a terminal column)
    formatter: Callable[[float | None], str] = fmt_number
    requires_meaningful_quality: bool = False  # perplexity of random weights is not a value
    group: str | None = None  # the optional phase group producing it (phases.plan); None: always measured
    relative: bool = True  # a percent change against the baseline means something (False: the metric is itself
    # measured against the baseline, e.g. KL divergence, which is 0 for the baseline)
    # True: counted or computed from the model and the data, a rerun of the same code, weights and settings gives
    # the same number (a comparison judges it by the threshold alone). False: read from a clock, an energy meter or
    # a sampled memory level, or derived from one (throughputs, bandwidths, MFU): a rerun measures another number,
    # so a verdict needs several independent runs per side (efficiency.report.compare). Required, without a
    # default: a new metric cannot slip through as deterministic.
    deterministic: bool = field(kw_only=True)

    @property
    def gated(self) -> bool:
        return self.kind in ("quality", "regression")

    def value(self, case: Mapping[str, Any]) -> float | None:
        """The metric's value in a v2 report case, None when not measured (or not meaningful)."""
        if case.get("status") not in (None, "measured"):
            return None
        if self.requires_meaningful_quality and not _get(case, ("perplexity", "meaningful")):
            return None
        return finite(_get(case, self.path))

    def round_samples(self, case: Mapping[str, Any]) -> list[float]:
        """The per-round values a case recorded at ``samples_path`` ([] where it has none: a metric measured once a
        run, or a case whose method has no per-round value, such as eager decode's difference of medians)."""
        if self.samples_path is None or self.value(case) is None:
            return []
        raw = _get(case, self.samples_path)
        return [v for v in (finite(x) for x in raw) if v is not None] if isinstance(raw, list) else []

    def is_worse(self, change_pct: float) -> bool:
        """True when a relative change in this direction makes the metric worse."""
        return change_pct > 0 if self.better == "lower" else change_pct < 0

    def format(self, value: float | None) -> str:
        return self.formatter(value)


KLD_KEYS = ("kld", "baseline")  # the KL divergence is measured against the baseline technique's distribution

METRICS: tuple[Metric, ...] = (
    Metric("perplexity", "perplexity", "", "lower", ("perplexity", "value"), kind="quality",
           pareto_tolerance_pct=0.5, short="ppl", requires_meaningful_quality=True, deterministic=True),
    Metric("runtime_s", "runtime (s)", "s", "lower", ("runtime", "median_s"),
           kind="regression", samples_path=("runtime", "rounds_s"), workload_keys=("batch_size",),
           pareto_tolerance_pct=3.0, short="time s", deterministic=False),
    Metric("energy_j", "energy (J)", "J", "lower", ("energy", "energy_j"),
           kind="regression",
           workload_keys=("batch_size",), pareto_tolerance_pct=3.0, short="energy J", deterministic=False),
    Metric("j_per_token", "energy per token (J)", "J", "lower", ("energy", "j_per_token"),
           workload_keys=("batch_size",), deterministic=False),
    Metric("tokens_per_s", "throughput (tokens/s)", "tok/s", "higher",
           ("runtime", "tokens_per_s"), workload_keys=("batch_size",), deterministic=False),
    Metric("prefill_s", "prefill latency (s)", "s", "lower", ("latency", "prefill_s"),
           samples_path=("latency", "prefill_s_all"), workload_keys=("prefill_tokens",), short="prefill ms",
           formatter=fmt_ms, deterministic=False),
    Metric("decode_s_per_token", "decode per token (s)", "s", "lower", ("latency", "decode_s_per_token"),
           samples_path=("latency", "decode_s_per_token_all"),
           workload_keys=("prefill_tokens", "decode_tokens"), short="decode ms/tok",
           formatter=fmt_ms, deterministic=False),
    Metric("decode_j_per_token", "decode energy per token (J)", "J", "lower",
           ("latency", "decode_j_per_token"),
           workload_keys=("prefill_tokens", "decode_tokens"), deterministic=False),
    Metric("decode_weight_bytes_per_s", "decode weight bandwidth (B/s)", "B/s", "higher",
           ("latency", "weight_bytes_per_s"), workload_keys=("prefill_tokens", "decode_tokens"),
           deterministic=False),
    Metric("decode_roofline_pct", "decode % of peak memory bandwidth", "%", "higher",
           ("latency", "roofline_pct"), workload_keys=("prefill_tokens", "decode_tokens"), deterministic=False),
    Metric("ppl_tflops", "perplexity pass TFLOP/s", "TFLOP/s", "higher", ("runtime", "achieved_tflops"),
           workload_keys=("batch_size",), deterministic=False),
    Metric("mfu_pct", "perplexity pass MFU (%)", "%", "higher", ("runtime", "mfu_pct"),
           workload_keys=("batch_size",), deterministic=False),
    # Not deterministic: on the CPU a resident-set size sampled on a thread (allocator reuse and the sampling instant
    # vary between runs), on a GPU the caching allocator's peak, which follows the automatic batch size (from free
    # memory) and the kernels autotuning picks (their workspaces). One run per side is no verdict for it.
    Metric("peak_bytes", "peak memory", "B", "lower", ("memory", "peak_bytes"),
           workload_keys=("batch_size",), short="peak MiB", formatter=fmt_mib, deterministic=False),
    Metric("size_bytes", "size", "B", "lower", ("size", "size_bytes"), short="size MiB",
           formatter=fmt_mib, deterministic=True),
    Metric("parameters", "parameters", "", "lower", ("size", "parameters"), deterministic=True),
    # quality beyond perplexity and serving (optional phases: their group must be enabled)
    Metric("kld_mean", "KL divergence from baseline (nats/token)", "", "lower", ("kld", "mean"),
           requires_meaningful_quality=True, group="kld", relative=False, short="KLD", workload_keys=KLD_KEYS,
           deterministic=True),
    Metric("kld_p99", "KL divergence p99 (nats)", "", "lower", ("kld", "p99"), requires_meaningful_quality=True,
           group="kld", relative=False, workload_keys=KLD_KEYS, deterministic=True),
    Metric("top1_match", "top-1 agreement with baseline", "", "higher", ("kld", "top1_match"),
           requires_meaningful_quality=True, group="kld", relative=False, short="top1", workload_keys=KLD_KEYS,
           deterministic=True),
    Metric("task_acc_mean", "task accuracy (mean over tasks)", "", "higher", ("tasks", "mean_acc"),
           requires_meaningful_quality=True, group="tasks", short="acc", workload_keys=("tasks",), deterministic=True),
    Metric("serving_tokens_per_s", "serving throughput at the largest batch (tokens/s)", "tok/s", "higher",
           ("serving", "largest", "tokens_per_s"), group="serving", short="serve tok/s",
           workload_keys=("serving",), deterministic=False),
    Metric("serving_j_per_token", "serving energy per output token at the largest batch (J)", "J", "lower",
           ("serving", "largest", "j_per_token"), group="serving", workload_keys=("serving",),
           deterministic=False),
)

# Producers of the optional groups: efficiency/phases/kld.py, tasks.py, serving.py (their sections exist only where
# the phases run).
QUALITY_SERVING_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.group is not None)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def get(name: str) -> Metric:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(NAMES)}") from None


def case_values(case: Mapping[str, Any]) -> dict[str, float | None]:
    """Every registry metric's value in a report case."""
    return {m.name: m.value(case) for m in METRICS}


def pareto_axes(cases: Sequence[Mapping[str, Any]]) -> list[Metric]:
    """The Pareto axes usable for a group of cases: those measured in every case."""
    return [m for m in METRICS if m.pareto_tolerance_pct is not None
            and cases and all(m.value(c) is not None for c in cases)]
