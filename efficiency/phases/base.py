"""The phase interface and the measured window every phase runs in.

A case is measured as a list of phases (``efficiency.phases.plan.case_phases``). For each phase the runner
calls, in order:

1. ``phase.setup(model, ctx)``: untimed preparation (inputs, warm-up, compilation); never inside a window;
2. ``phase.run(model, ctx)`` inside one measured window: the device is synchronised at both edges, every
   energy meter of the run (GPU and CPU) reads the window, and peak memory is tracked over it. A phase that
   repeats a unit of work calls ``ctx.repeat(unit, ...)``, which runs it at least ``min_rounds`` times and,
   where a real energy meter exists, until the window is at least ``min_window_s`` long;
3. ``phase.section(record, ctx)`` turns the typed result and its window into the report section(s) the phase
   fills (at the JSON edge only).

Adding a workload is one new Phase (and its settings); see docs/design.md.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from efficiency.config import Workload
from efficiency.defaults import MAX_ROUNDS


@dataclass(frozen=True)
class Window:
    """What one phase's window measured: wall time, one energy sample per meter, peak memory and, on a GPU with
    NVML, the clocks its work ran at (efficiency.measure.gpustate.sample_clocks)."""

    wall_s: float
    energy: Mapping[str, Any]  # meter key ("gpu", "cpu") -> EnergySample, or None when the window was cancelled
    peak: Any  # efficiency.measure.memory.PeakMemory
    gpu_clocks: dict[str, Any] | None = None  # None: no GPU metered through NVML (a CPU run)

    def sample(self, key: str) -> Any:
        return self.energy.get(key)

    def first_gpu_clocks(self) -> dict[str, Any] | None:
        """The clocks summary of the first sampled GPU, None where none was sampled."""
        gpus = (self.gpu_clocks or {}).get("gpus")
        return gpus[0] if gpus else None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "wall_s": self.wall_s,
            "energy": {k: (s.to_dict() if s is not None else None) for k, s in self.energy.items()},
            "peak_memory": self.peak.to_dict() if self.peak is not None else None,
        }
        if self.gpu_clocks is not None:
            out["gpu_clocks"] = self.gpu_clocks
        return out


@dataclass(frozen=True)
class Rounds:
    """Timed repetitions of a unit of work inside a window."""

    times_s: tuple[float, ...]
    capped: bool = False  # the round cap bound before the minimum window was reached
    note: str | None = None

    @property
    def n(self) -> int:
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


@dataclass(frozen=True)
class PhaseRecord:
    name: str
    result: Any  # the phase's typed result
    window: Window
    setup_s: float = 0.0  # untimed preparation before the window (warm-up, compilation), reported apart


@dataclass
class PhaseContext:
    """What a phase may use. ``shared`` carries objects between the phases of one case (e.g. the perplexity
    evaluator); ``records`` the phases already measured in this case."""

    case_id: str
    device: str
    workload: Workload
    tokens: Any  # 1-D token ids of the evaluation text (within the token budget)
    tokenizer: Any
    context: int  # perplexity window, capped at the model's context
    stride: int
    meters: Mapping[str, Any]  # meter key -> Meter
    primary: str  # the meter key whose energy the score uses ("gpu" on a GPU run, "cpu" otherwise)
    sync: Callable[[], None]
    log: Callable[[str], None] = lambda msg: None
    benchmark: Any = None  # pytest-benchmark fixture, used by the phase that owns the paper's runtime
    records: dict[str, PhaseRecord] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    # Per-model state kept across the cases of one model (the runner passes the same dict to every case of a
    # model; the baseline case runs first): e.g. the baseline's KL-divergence reference and task scores.
    store: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    is_baseline: bool = False
    gpus: tuple[str, ...] = ()  # every GPU of a model split across several (--eff-device-map): peaks tracked on each
    nvml_indices: tuple[int, ...] = ()  # the metered GPUs' NVML indices: their clocks sampled in every window
    max_rounds: int = MAX_ROUNDS
    _window_start: float | None = None

    def weights_read(self, model: Any) -> tuple[int, int]:
        """(bytes, logical parameters) of the weights one token reads (measure.roofline.weights_read_per_token),
        counted once per case and shared by its phases: counting looks through every unwrapped weight's rebuild."""
        if "weights_read" not in self.shared:
            from efficiency.measure.roofline import weights_read_per_token

            self.shared["weights_read"] = weights_read_per_token(model)
        counted: tuple[int, int] = self.shared["weights_read"]
        return counted

    @property
    def real_meters(self) -> list[str]:
        from efficiency.measure.energy import NullMeter

        return [k for k, m in self.meters.items() if not isinstance(m, NullMeter)]

    @property
    def min_window_s(self) -> float:
        """The minimum window: the workload's, where any real meter reads energy; 0 otherwise."""
        return self.workload.min_window_s if self.real_meters else 0.0

    def rounds_for(self, estimate_s: float, min_rounds: int) -> int:
        """Rounds planned from a warm estimate of one unit: enough for the minimum window, capped."""
        need = self.min_window_s / max(estimate_s, 1e-6) if self.min_window_s > 0 else 0
        return int(min(self.max_rounds, max(min_rounds, -(-need // 1))))

    def repeat(self, unit: Callable[[], Any], min_rounds: int, estimate_s: float | None = None,
               use_benchmark: bool = False) -> Rounds:
        """Run ``unit`` (synchronised at both edges) at least ``min_rounds`` times and until the window is at
        least ``min_window_s`` long, at most ``max_rounds`` times. With ``use_benchmark`` and an enabled
        pytest-benchmark fixture, the planned rounds run through ``benchmark.pedantic`` (its statistics and
        saved runs), and the window is extended by further rounds if they finished early."""
        times: list[float] = []

        def one() -> None:
            self.sync()
            t0 = time.perf_counter()
            unit()
            self.sync()
            times.append(time.perf_counter() - t0)

        planned = self.rounds_for(estimate_s, min_rounds) if estimate_s is not None else min_rounds
        bench = self.benchmark if use_benchmark else None
        if bench is not None:
            # Disabled (--benchmark-disable, xdist), pytest-benchmark runs the function once; the loop below
            # still runs the planned rounds, so --eff-rounds holds either way.
            bench.pedantic(one, rounds=planned, iterations=1, warmup_rounds=0)
        while len(times) < planned:
            one()
        start = self._window_start if self._window_start is not None else time.perf_counter()
        while (len(times) < min_rounds or time.perf_counter() - start < self.min_window_s) \
                and len(times) < self.max_rounds:
            one()
        capped = len(times) >= self.max_rounds and time.perf_counter() - start < self.min_window_s
        note = (f"round cap {self.max_rounds} reached after {time.perf_counter() - start:.2f} s, before the "
                f"{self.min_window_s:g} s minimum window") if capped else None
        return Rounds(tuple(times), capped, note)


class Phase(Protocol):
    @property
    def name(self) -> str:
        """The phase's name in the report (a class constant, or per instance: ``serving_b8``)."""

    # Optional (read with getattr, default False): on the CPU, return the C allocator's free memory to the OS
    # before the window, so that its peak counts allocations served from memory freed earlier (exact). Only for
    # a window that times nothing the report compares: the rounds after such a return run on fresh pages, slower
    # for a while (docs/results.md section 11). The quality pass sets it: its peak is the case's memory.
    # exact_cpu_peak: ClassVar[bool]

    def setup(self, model: Any, ctx: PhaseContext) -> None:
        """Untimed preparation (inputs, warm-up). Never inside the window."""

    def run(self, model: Any, ctx: PhaseContext) -> Any:
        """The measured work; returns the phase's typed result."""

    def section(self, record: PhaseRecord, ctx: PhaseContext) -> dict[str, Any]:
        """Report sections this phase fills (``{"runtime": {...}, "energy": {...}}``), from its record."""


@contextmanager
def measured_window(ctx: PhaseContext, exact_cpu_peak: bool = False) -> Iterator[dict[str, Any]]:
    """Sync, open every meter and peak-memory tracking, yield, sync, close. The yielded dict receives the
    finished :class:`Window` under ``"window"``. ``exact_cpu_peak``: see the note in :class:`Phase`."""
    from efficiency.measure.energy import measure_energy
    from efficiency.measure.gpustate import sample_clocks
    from efficiency.measure.memory import track_peak

    out: dict[str, Any] = {}
    with ExitStack() as stack:
        peak = stack.enter_context(track_peak(ctx.device, ctx.gpus, exact_cpu_peak))
        # entered before the meters (and left after them): the sampler's start and stop stay out of their windows
        clocks = stack.enter_context(sample_clocks(ctx.nvml_indices)) if ctx.nvml_indices else None
        windows = {k: stack.enter_context(measure_energy(m, ctx.sync)) for k, m in ctx.meters.items()}
        ctx.sync()
        t0 = time.perf_counter()
        ctx._window_start = t0
        try:
            yield out
            ctx.sync()
            wall_s = time.perf_counter() - t0
        finally:
            ctx._window_start = None
    out["window"] = Window(wall_s, {k: w.sample for k, w in windows.items()}, peak,
                           clocks.get("gpu_clocks") if clocks is not None else None)


def run_phase(phase: Phase, model: Any, ctx: PhaseContext) -> PhaseRecord:
    t0 = time.perf_counter()
    phase.setup(model, ctx)
    ctx.sync()
    setup_s = time.perf_counter() - t0
    with measured_window(ctx, getattr(phase, "exact_cpu_peak", False)) as out:
        result = phase.run(model, ctx)
    record = PhaseRecord(phase.name, result, out["window"], setup_s)
    ctx.records[phase.name] = record
    return record
