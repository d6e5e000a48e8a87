from __future__ import annotations

from efficiency.config import Thresholds
from efficiency.gate import check, check_perplexity


def test_breach_message_gives_both_perplexities_and_the_limit() -> None:
    v = check_perplexity("opt-125m-bnb4", "bnb4", 33.0, 30.0, "fp16", 5.0)
    assert v is not None
    assert "33" in v.message and "30" in v.message and "+10.00%" in v.message and "+5%" in v.message


def test_at_or_under_the_limit_passes() -> None:
    assert check_perplexity("m-t", "t", 31.5, 30.0, "fp16", 5.0) is None
    assert check_perplexity("m-t", "t", 29.0, 30.0, "fp16", 0.0) is None


def test_thresholds_per_technique_pipeline_and_default() -> None:
    t = Thresholds(25.0, {"bnb4": 10.0, "distil+bnb4": 70.0})
    assert t.limit_for("bnb4") == 10.0
    assert t.limit_for("ah90+bnb4") == 35.0  # a pipeline: its steps' limits added (default 25 + bnb4 10)
    assert t.limit_for("distil+bnb4") == 70.0  # exact name wins
    assert t.limit_for("mag50") == 25.0


def test_a_compute_dtype_suffix_keeps_its_quantisers_limit() -> None:
    """Before: ``bnb4@bf16`` (bnb4 with bf16 compute) was not found under bnb4 and got the default 25% instead of
    bnb4's limit, so the README's own bnb4 case (+28.2%) failed the gate when run as bnb4@bf16."""
    t = Thresholds(25.0, {"bnb4": 40.0, "bnb8": 5.0, "bnb4@fp16": 45.0})
    assert t.limit_for("bnb4@bf16") == 40.0 and t.limit_for("bnb8@fp32") == 5.0
    assert t.limit_for("bnb4@fp16") == 45.0  # its own entry wins
    assert t.limit_for("ah90+bnb4@bf16") == 65.0
    assert t.limit_for("bnb4-fp4@fp16") == 25.0  # another quantiser (fp4) without an entry: the default


def test_compile_adds_float_rounding_to_a_pipelines_limit_not_the_default() -> None:
    """``compile`` changes how a model runs, not its weights, yet it added the default 25 points to a pipeline's
    limit: on SmolLM2 (CPU) int4wo-g64 failed its 25% limit at +35.5% while int4wo-g64+compile passed at +36.2%
    against 50% (docs/results.md section 5k). Its built-in limit is 1 (float rounding), set with the thresholds
    (so that a report's settings record it); the user's table and command line win."""
    from efficiency.settings import parse_thresholds

    t = parse_thresholds({"default": 25.0, "bf16": 3.0}, [])
    assert dict(t.per_technique) == {"compile": 1.0, "bf16": 3.0}
    assert t.limit_for("int4wo-g64+compile") == 26.0 and t.limit_for("bf16+compile") == 4.0
    assert t.limit_for("compile") == 1.0
    cases = [{"id": f"m-{tech}", "technique": tech, "is_baseline": False, "baseline": {"perplexity": 29.94},
              "perplexity": {"value": 40.77, "meaningful": True}} for tech in ("int4wo-g64", "int4wo-g64+compile")]
    assert [v.case_id for v in check(cases, t, "bf16+compile")] == ["m-int4wo-g64", "m-int4wo-g64+compile"]
    assert parse_thresholds({"compile": 5.0}, []).limit_for("int4wo+compile") == 30.0
    assert parse_thresholds({}, ["compile=2"]).limit_for("int4wo+compile") == 27.0


def test_check_over_report_cases_skips_baseline_and_random_weights() -> None:
    def case(tech: str, ppl: float, meaningful: bool = True, base: bool = False) -> dict:
        return {"id": f"m-{tech}", "technique": tech, "is_baseline": base,
                "perplexity": {"value": ppl, "meaningful": meaningful}, "baseline": {"perplexity": 10.0}}

    cases = [case("fp16", 10.0, base=True), case("bnb4", 12.0), case("bnb8", 10.1), case("ah90", 50.0, False)]
    found = check(cases, Thresholds(25.0, {"bnb4": 5.0, "bnb8": 5.0}), "fp16")
    assert [v.case_id for v in found] == ["m-bnb4"]
