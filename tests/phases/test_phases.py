"""Phases, measured windows, the JSON edge and the metric registry, on a tiny random GPT-2 on the CPU.

A deterministic fake meter (constant power, so energy = power x window length) makes every derived energy
figure checkable by hand.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from conftest import tiny_model
from efficiency.config import Workload
from efficiency.measure.energy import EnergySample, NullMeter
from efficiency.phases.base import MAX_ROUNDS, PhaseContext, run_phase
from efficiency.phases.latency import DecodePhase, FirstTokenPhase, PrefillPhase
from efficiency.phases.perplexity import QualityPhase, TimedPassPhase

POWER_W = 50.0


class ConstantPowerMeter:
    """A real (non-null) meter reading POWER_W for the whole window."""

    method = "fake-constant-power"
    domains = ("fake:0",)

    def __init__(self) -> None:
        self.t0: float | None = None

    def begin(self) -> None:
        self.t0 = time.perf_counter()

    def end(self) -> EnergySample:
        assert self.t0 is not None
        window_s = time.perf_counter() - self.t0
        self.t0 = None
        return EnergySample(POWER_W * window_s, window_s, self.method, 0.0, self.domains)

    def cancel(self) -> None:
        self.t0 = None


def context(min_window_s: float = 0.0, meter: Any = None, **workload: Any) -> PhaseContext:
    import torch

    wl = Workload(dataset="x", context=32, stride=32, batch_size=2, prefill_tokens=8, decode_tokens=4,
                  min_rounds=2, min_window_s=min_window_s, **workload)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    meters = {"gpu": NullMeter("no GPU: the run is on the CPU"), "cpu": meter or ConstantPowerMeter()}
    return PhaseContext("tiny-fp32", "cpu", wl, ids, None, 32, 32, meters, "cpu", lambda: None)


def run_all(ctx: PhaseContext) -> dict[str, Any]:
    model = tiny_model("gpt2")
    sections: dict[str, Any] = {}
    for phase in (QualityPhase(), TimedPassPhase(), PrefillPhase(), FirstTokenPhase(), DecodePhase()):
        sections.update(phase.section(run_phase(phase, model, ctx), ctx))
    return sections


def test_every_phase_is_measured_in_its_own_window_by_every_meter(one_thread: None) -> None:
    ctx = context()
    sections = run_all(ctx)
    assert list(ctx.records) == ["quality", "ppl_pass", "prefill", "first_token", "decode"]
    for record in ctx.records.values():
        assert record.window.wall_s > 0
        assert record.window.sample("gpu").energy_j is None and "no GPU" in record.window.sample("gpu").reason
        assert record.window.sample("cpu").energy_j == pytest.approx(POWER_W * record.window.wall_s, rel=0.05)
        assert record.setup_s >= 0
    # the paper's runtime: energy per pass = window energy / rounds (by hand from the window)
    tp = ctx.records["ppl_pass"]
    assert sections["energy"]["energy_j"] == pytest.approx(tp.window.sample("cpu").energy_j / tp.result.n)
    assert sections["energy"]["j_per_token"] == pytest.approx(
        sections["energy"]["energy_j"] / sections["perplexity"]["n_scored_tokens"])
    assert sections["runtime"]["rounds"] == tp.result.n >= 2


def test_decode_time_and_energy_per_token_are_differences_of_two_windows(one_thread: None) -> None:
    ctx = context()
    lat = run_all(ctx)["latency"]
    one, many = ctx.records["first_token"], ctx.records["decode"]
    n = ctx.workload.decode_tokens
    e_one = one.window.sample("cpu").energy_j / one.result.n
    e_many = many.window.sample("cpu").energy_j / many.result.n
    if e_many > e_one:  # a constant-power meter: more generated tokens take longer and so more energy
        assert lat["decode_j_per_token"] == pytest.approx((e_many - e_one) / (n - 1))
    else:
        assert lat["decode_j_per_token"] is None and lat["decode_energy_reason"]
    if lat["decode_s_per_token"] is not None:
        assert lat["decode_s_per_token"] == pytest.approx((many.result.median_s - one.result.median_s) / (n - 1))
    assert lat["prompt_tokens"] == 8 and lat["new_tokens"] == n and lat["prompt_note"] is None


def test_the_latency_prompt_is_capped_at_the_token_budget_and_the_section_says_so(one_thread: None) -> None:
    """Before: --eff-prefill-tokens 4000 with --eff-max-tokens 256 ran a 256-token prompt (the runner's tokens end at
    the budget) while the settings said 4000, with no note anywhere."""
    import torch

    wl = Workload(dataset="x", context=32, stride=32, prefill_tokens=20, decode_tokens=3, min_rounds=1,
                  max_tokens=12, min_window_s=0.0)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    ctx = PhaseContext("tiny-fp32", "cpu", wl, ids, None, 32, 32, {"cpu": NullMeter("no RAPL")}, "cpu",
                       lambda: None)
    model = tiny_model("gpt2")
    sections: dict[str, Any] = {}
    for phase in (PrefillPhase(), FirstTokenPhase(), DecodePhase()):
        sections.update(phase.section(run_phase(phase, model, ctx), ctx))
    lat = sections["latency"]
    assert lat["prompt_tokens"] == 12
    assert lat["prompt_note"] == ("latency prompt of 12 tokens, not --eff-prefill-tokens 20: capped at "
                                  "--eff-max-tokens 12")


def test_a_real_meter_extends_the_window_to_the_minimum(one_thread: None) -> None:
    ctx = context(min_window_s=0.3)
    model = tiny_model("gpt2")
    run_phase(QualityPhase(), model, ctx)
    record = run_phase(TimedPassPhase(), model, ctx)
    assert record.window.wall_s >= 0.3
    assert record.result.n > 2 and not record.result.capped


def test_without_a_real_meter_there_is_no_minimum_window() -> None:
    ctx = context(min_window_s=5.0, meter=NullMeter("no RAPL"))
    assert ctx.min_window_s == 0.0
    rounds = ctx.repeat(lambda: None, 3)
    assert rounds.n == 3


def test_the_round_cap_says_so_when_it_binds() -> None:
    ctx = context(min_window_s=60.0)
    ctx.max_rounds = 5
    ctx._window_start = time.perf_counter()
    rounds = ctx.repeat(lambda: None, 2)
    assert rounds.n == 5 and rounds.capped and "round cap 5" in (rounds.note or "")
    assert MAX_ROUNDS == 1000


def test_case_to_dict_fills_every_metric_and_scrubs_non_finite_numbers() -> None:
    from efficiency import metrics
    from efficiency.measure.memory import SizeResult
    from efficiency.results import CaseResult, case_to_dict

    sections = {"perplexity": {"value": math.nan, "meaningful": True}, "runtime": {"median_s": 1.0},
                "energy": {"energy_j": math.inf}}
    result = CaseResult("m-t", "m", "t", ["t"], False, "src", False, 0.1, 0.2, {}, {}, sections,
                        SizeResult(10, 40, 10))
    case = case_to_dict(result)
    assert case["perplexity"]["value"] is None and case["energy"]["energy_j"] is None
    assert case["non_finite"] == ["perplexity.value", "energy.energy_j"]
    assert set(case["metrics"]) == set(metrics.NAMES)
    assert case["metrics"]["runtime_s"] == 1.0 and case["metrics"]["size_bytes"] == 40
    import json

    json.dumps(case, allow_nan=False)  # valid JSON


def test_registry_paths_exist_in_a_measured_case(one_thread: None) -> None:
    """Every registry metric points at a field some phase writes (a renamed field would silently read null)."""
    from efficiency import metrics
    from efficiency.measure.memory import model_size
    from efficiency.results import CaseResult, case_to_dict

    ctx = context()
    sections = run_all(ctx)
    result = CaseResult("t-fp32", "t", "fp32", ["fp32"], True, "src", False, 0.0, 0.0, {}, ctx.records, sections,
                        model_size(tiny_model("gpt2")))
    case = case_to_dict(result)
    for m in metrics.METRICS:
        if m.group is not None:  # optional phases (KL, tasks, serving): tests/phases/test_quality_metrics.py
            continue
        cur: Any = case
        for key in m.path:
            assert isinstance(cur, dict) and key in cur, f"{m.name}: {'.'.join(m.path)} missing"
            cur = cur[key]
    assert case["phases"]["decode"]["window"]["energy"]["cpu"]["energy_j"] > 0
    prefill = ctx.records["prefill"].result
    assert case["phases"]["prefill"]["rounds"] == prefill.n
    assert case["phases"]["prefill"]["median_s"] == prefill.median_s


def test_the_quality_pass_shows_its_progress(one_thread: None) -> None:
    """A pass over the whole test split, or one that compiles, takes minutes: the case's log shows how far it is
    (the first and the last batch always, throttled in between), and the evaluator reports every batch."""
    from efficiency.phases.perplexity import _evaluator

    lines: list[str] = []
    ctx = context()
    ctx.log = lines.append
    model = tiny_model("gpt2")
    run_phase(QualityPhase(), model, ctx)
    windows = len(_evaluator(ctx).plan)
    progress = [line for line in lines if "perplexity pass:" in line]
    assert progress[0].startswith("tiny-fp32: perplexity pass: 2/") and "windows" in progress[0]
    assert progress[-1].startswith(f"tiny-fp32: perplexity pass: {windows}/{windows} windows (100%)")
    seen: list[int] = []
    _evaluator(ctx).run(model, "cpu", seen.append)
    assert seen == sorted(seen) and seen[-1] == windows and seen[0] == 2  # batch 2 windows


def test_the_compile_warm_up_of_a_pass_shows_its_progress_without_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled pass's first windows carry its compilation, so an ETA drawn from them is wrong by minutes: on the
    H200 the warm-up of fp8wo's opt-6.7b pass said "1/15 windows, 1m17s elapsed, ETA 17m54s" and ended 1m34s later
    (docs/results.md 5l). The warm-up shows its windows and elapsed time; the timed pass keeps its ETA."""
    from types import SimpleNamespace

    lines: list[str] = []

    class Evaluator:
        plan = [0] * 15

        def run(self, model: Any, device: str, progress: Any) -> None:
            for done in (1, 9, 15):
                progress(done)

    ctx = SimpleNamespace(log=lines.append, case_id="m-fp8wo+compile", shared={"evaluator": Evaluator()},
                          tokens=[0] * 8192, context=1024, device="cpu")
    monkeypatch.setattr("efficiency.techniques.compile.compiled_state", lambda model: object())
    from efficiency.techniques import progress

    shows_eta: dict[str, bool] = {}
    real_init = progress.Progress.__init__

    def init(self: Any, log: Any, label: str, *args: Any, **kwargs: Any) -> None:
        real_init(self, log, label, *args, **kwargs)
        shows_eta[label.split(": ", 1)[1]] = self.show_eta

    monkeypatch.setattr(progress.Progress, "__init__", init)
    phase = QualityPhase()
    phase.setup(object(), ctx)  # type: ignore[arg-type]
    phase.run(object(), ctx)  # type: ignore[arg-type]
    warm_up = [line for line in lines if "compiling and warming up" in line]
    timed = [line for line in lines if ": perplexity pass: " in line]
    assert warm_up[0].startswith("m-fp8wo+compile: compiling and warming up the perplexity pass: 1/15 windows (7%)")
    assert not any("ETA" in line for line in warm_up) and "15/15 windows (100%)" in warm_up[-1]
    assert timed[0].startswith("m-fp8wo+compile: perplexity pass: 1/15 windows")
    assert shows_eta == {"compiling and warming up the perplexity pass": False, "perplexity pass": True}


def test_net_energy_is_per_round_of_the_window_and_null_when_idle_exceeds_gross() -> None:
    """Gross energy per pass is the window's energy over its rounds, so idle power is taken over the same window (its
    length over the rounds), not the median round; an idle draw above the gross is null with the reason, never 0."""
    from types import SimpleNamespace

    from efficiency.phases.perplexity import energy_per_unit, net_of_idle

    def section(window_j: float, window_s: float, rounds: int) -> dict[str, Any]:
        sample = EnergySample(window_j, window_s, "rapl", 1.0, ("intel-rapl:0",))
        return energy_per_unit(SimpleNamespace(energy={"cpu": sample}), rounds, "cpu")

    energy = section(500.0, 11.0, 10)  # 10 rounds of about 1 s, plus 1 s of edges, inside the window
    assert energy["energy_j"] == pytest.approx(50.0)
    net = net_of_idle(energy, 20.0)
    assert net["net_energy_j"] == pytest.approx((500.0 - 20.0 * 11.0) / 10)  # 28 J, not 50 - 20 x median round
    assert net["idle_power_w"] == 20.0
    low = net_of_idle(section(100.0, 11.0, 10), 20.0)  # idle x window = 220 J > 100 J gross
    assert low["net_energy_j"] is None and "exceeds the window's gross energy" in low["net_energy_reason"]
    assert net_of_idle({"energy_j": 5.0, "primary": "cpu"}, 20.0)["net_energy_j"] is None  # no window recorded
