"""benchmarks/gpu/deploy_table.py's serving table: the speed-up is tokens/s over the baseline's at the same batch
size, and a report without a serving sweep gets no serving table (hand-made reports, no measurement)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_table", ROOT / "benchmarks" / "gpu" / "deploy_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(case_id: str, baseline: bool, serving: list[dict[str, Any]] | None) -> dict[str, Any]:
    case: dict[str, Any] = {"id": case_id, "status": "measured", "is_baseline": baseline, "steps": ["bf16"],
                            "latency": {"decode_s_per_token": 0.004}, "runtime": {"median_s": 0.3}}
    if serving is not None:
        case["serving"] = {"batches": serving}
    return case


def _report(cases: list[dict[str, Any]]) -> dict[str, Any]:
    workload = {"prefill_tokens": 128, "decode_tokens": 64, "max_tokens": 8192, "context": 1024, "stride": 512,
                "batch_size": None}
    return {"environment": {"device": {"name": "NVIDIA H200"}, "packages": {"torch": "2.11.0"}, "git": {}},
            "settings": {"workload": workload, "models": ["opt-6.7b"]}, "status": "complete", "cases": cases}


def test_the_serving_speed_up_is_against_the_baseline_at_the_same_batch_size() -> None:
    table = _module().table
    base = _case("m-bf16+compile", True, [
        {"batch_size": 1, "tokens_per_s": 200.0, "time_per_output_token_s": 0.005, "j_per_token": 2.0, "rounds": 3},
        {"batch_size": 32, "tokens_per_s": 4000.0, "time_per_output_token_s": 0.0066, "j_per_token": 0.14,
         "rounds": 3}])
    other = _case("m-fp8dq+compile", False, [
        {"batch_size": 32, "tokens_per_s": 3000.0, "time_per_output_token_s": 0.00875, "j_per_token": None,
         "rounds": 4}])
    lines = table(_report([base, other]))
    assert "| m-bf16+compile | 32 | 4000 | 1.00x | 6.6 | 140 | 3 |" in lines
    assert "| m-fp8dq+compile | 32 | 3000 | 0.75x | 8.75 | n/a | 4 |" in lines  # 3000 / 4000, not / 200
    assert "| m-bf16+compile | 1 | 200 | 1.00x | 5 | 2e+03 | 3 |" in lines


def test_a_report_without_a_serving_sweep_has_no_serving_table() -> None:
    lines = _module().table(_report([_case("m-bf16+compile", True, None)]))
    assert not any("Serving sweep" in line for line in lines)
    assert lines[-1].startswith("| m-bf16+compile |")
