"""The serving sweep: batched generation with exact output lengths, one window per batch size, each batch's row
computed from its own rounds, and the section's per-batch table."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch

from conftest import tiny_model
from efficiency.config import ConfigError, Workload
from efficiency.measure.serving import Generation, prompts
from efficiency.phases.base import PhaseContext, run_phase
from efficiency.phases.plan import case_phases, group_of
from efficiency.phases.quality_settings import KldSettings, ServingSettings, TasksSettings, parse_int_list
from efficiency.phases.serving import ServingPhase


def phase_context(tokens: Any, min_rounds: int = 3) -> PhaseContext:
    from efficiency.measure.energy import NullMeter

    return PhaseContext(case_id="tiny-fp32", device="cpu", workload=Workload(min_rounds=min_rounds),
                        tokens=tokens, tokenizer=None, context=64, stride=64, meters={"cpu": NullMeter("test")},
                        primary="cpu", sync=lambda: None)


def eval_tokens(n: int = 200) -> Any:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(0))


def test_prompts_are_distinct_equal_length_slices() -> None:
    ids = prompts(eval_tokens(40), 5, 16, "cpu")
    assert ids.shape == (5, 16)
    assert not torch.equal(ids[0], ids[1])  # different rows, wrapping around a short text
    with pytest.raises(ValueError, match="need 16 tokens"):
        prompts(eval_tokens(8), 1, 16, "cpu")


def test_generation_has_exact_lengths_and_a_first_token_time(one_thread: None) -> None:
    model = tiny_model("gpt2")
    model.generation_config.eos_token_id = 5  # an early end-of-sequence must not shorten any row
    gen = Generation(model, prompts(eval_tokens(), 3, 8, "cpu"), 6, 0, lambda: None)
    out = gen()
    gen.check(out)
    assert out.shape == (3, 14)
    assert len(gen.first_token_s) == 1 and gen.first_token_s[0] > 0


def test_serving_rows_come_from_their_own_rounds_and_the_table(one_thread: None) -> None:
    # Which batch is faster is a benchmark's question (a timed assertion here could fail under CPU contention).
    model = tiny_model("llama")
    settings = ServingSettings(batch_sizes=(1, 4), input_tokens=16, output_tokens=8)
    ctx = phase_context(eval_tokens())
    phases = [ServingPhase(1, settings), ServingPhase(4, settings, last=True)]
    sections: dict[str, Any] = {}
    for phase in phases:
        record = run_phase(phase, model, ctx)
        assert record.result.rounds.n >= 3 and len(record.result.first_token_s) == record.result.rounds.n
        sections.update(phase.section(record, ctx))
    rows = sections["serving"]["batches"]
    assert [r["batch_size"] for r in rows] == [1, 4]
    b1, b4 = rows
    for r in rows:  # by hand: batch x output tokens / median round; time per output token after the first
        assert r["round_s"] == pytest.approx(statistics.median(r["rounds_s"]))
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * 8 / r["round_s"])
        first = statistics.median(r["first_token_s_all"])
        assert r["time_per_output_token_s"] == pytest.approx((r["round_s"] - first) / 7)
        assert 0 < r["time_to_first_token_s"] < r["round_s"]
        assert r["time_per_output_token_s"] > 0
        assert r["j_per_token"] is None and r["energy_reason"]  # no meter on this machine: null, with why
    assert sections["serving"]["largest"] == b4


def test_plan_adds_the_phases_its_settings_enable() -> None:
    from types import SimpleNamespace

    base = [p.name for p in case_phases(SimpleNamespace(), False)]  # type: ignore[arg-type]
    cfg = SimpleNamespace(kld=KldSettings(tokens=64), tasks=TasksSettings(tasks=("eff_facts",)),
                          serving=ServingSettings(batch_sizes=(8, 1)))
    names = [p.name for p in case_phases(cfg, False)]  # type: ignore[arg-type]
    assert names == base + ["kld", "tasks", "serving_b1", "serving_b8"]
    off = SimpleNamespace(kld=KldSettings(tokens=0), tasks=TasksSettings(), serving=ServingSettings())
    assert [p.name for p in case_phases(off, False)] == base  # type: ignore[arg-type]
    assert [group_of(n) for n in ("quality", "decode", "kld", "tasks", "serving_b8")] == \
        [None, "latency", "kld", "tasks", "serving"]


def test_settings_validation() -> None:
    assert parse_int_list("1, 8,32") == (1, 8, 32)
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_int_list("1,eight")
    with pytest.raises(ConfigError, match="repeat"):
        ServingSettings(batch_sizes=(1, 1))
    with pytest.raises(ConfigError, match="output tokens"):
        ServingSettings(batch_sizes=(1,), output_tokens=1)
    with pytest.raises(ConfigError, match="kld tokens"):
        KldSettings(tokens=1)


def test_serving_plot_draws_a_png_per_report() -> None:
    from efficiency.report.serving_plots import serving_plot, serving_series

    def case(cid: str, tps: list[float], j: list[float | None]) -> dict[str, Any]:
        rows = [{"batch_size": b, "tokens_per_s": t, "j_per_token": e, "energy_reason": None if e else "no meter"}
                for b, t, e in zip((1, 8, 32), tps, j, strict=True)]
        return {"id": cid, "status": "measured", "serving": {"batches": rows}}

    report = {"cases": [case("m-bf16", [10, 70, 200], [2.0, 0.4, 0.2]), case("m-int4", [12, 80, 150], [None] * 3),
                        {"id": "m-x", "status": "skipped"}]}
    assert list(serving_series(report)) == ["m-bf16", "m-int4"]
    data = serving_plot(report)
    assert data is not None and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert serving_plot({"cases": [{"id": "m-x", "status": "measured"}]}) is None
