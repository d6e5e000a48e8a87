"""benchmarks/gpu/deploy_table.py: the serving speed-up is tokens/s over the baseline's at the same batch size, a
report without a serving sweep gets no serving table, and decode and the pass show their spread and decode energy
its uncertainty (hand-made reports, no measurement)."""

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


def test_a_decode_the_host_paced_gets_its_share_and_the_reports_note() -> None:
    """The host's share of each compiled decode round is a column, and where the report says the host set the pace
    its note goes under the table (opt-6.7b fp8dq on the H200: 99%, docs/results.md 5i)."""
    base = _case("m-bf16+compile", True, None)
    base["latency"].update(decode_host_share=0.19, decode_host_note=None)
    paced = _case("m-fp8dq+compile", False, None)
    note = "paced by the host: it issued the steps in 99% of each round (median), so the device waited"
    paced["latency"].update(decode_s_per_token=0.005, decode_host_share=0.99, decode_host_note=note)
    lines = _module().table(_report([base, paced]))
    assert any(line.startswith("| m-bf16+compile | 4 | 1.00x | 19 |") for line in lines)
    assert any(line.startswith("| m-fp8dq+compile | 5 | 0.80x | 99 |") for line in lines)
    assert f"- m-fp8dq+compile: {note}" in lines and not any(line.startswith("- m-bf16") for line in lines)


def test_real_weights_get_perplexity_next_to_speed_and_random_weights_do_not() -> None:
    table = _module().table
    base = {**_case("smol-bf16+compile", True, None), "random_weights": False,
            "perplexity": {"value": 20.0}, "deltas": {"perplexity": 0.0}, "kld": {"mean": 0.0, "top1_match": 1.0}}
    low = {**_case("smol-int4wo-g64+compile", False, None), "random_weights": False,
           "perplexity": {"value": 25.0}, "deltas": {"perplexity": 25.0}, "kld": {"mean": 0.25, "top1_match": 0.7}}
    text = "\n".join(table(_report([base, low])))
    assert "| smol-int4wo-g64+compile | 25.000 | +25.0% | 0.2500 | 70.0% |" in text
    assert "| smol-bf16+compile | 20.000 | +0.0% | 0.0000 | 100.0% |" in text
    random = [{**c, "random_weights": True} for c in (base, low)]
    assert "Quality" not in "\n".join(table(_report(random)))


def test_decode_and_the_pass_show_their_spread_and_decode_energy_its_uncertainty() -> None:
    """Medians alone hid the rounds' spread and the energy window's uncertainty, which decide whether two cases
    differ (docs/results.md 5o quotes both); the table now shows median [min, max] (rounds) and J +- uncertainty."""
    case = _case("m-bf16+compile", True, None)
    case["latency"].update(decode_s_per_token=0.00552, decode_s_per_token_all=[0.005517, 0.00552, 0.005523],
                           decode_j_per_token=2.5875)
    case["runtime"].update(median_s=0.3183, rounds_s=[0.3262, 0.3158, 0.3107, 0.3209])
    # 489 J over the window, +- 93.4 J: per token the same share, 2.5875 x 93.4 / 489 = 0.494
    case["phases"] = {"decode": {"window": {"energy": {"gpu": {"energy_j": 489.0, "uncertainty_j": 93.4}}}}}
    row = next(line for line in _module().table(_report([case])) if line.startswith("| m-bf16+compile |"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[1] == "5.520 [5.517, 5.523] (3)"
    assert cells[4] == "2.59 +- 0.49"
    assert cells[8] == "0.3183 [0.3107, 0.3262] (4)"


def test_decode_energy_without_a_window_uncertainty_is_the_value_alone() -> None:
    case = _case("m-bf16+compile", True, None)
    case["latency"]["decode_j_per_token"] = 2.5875
    assert _module().decode_energy(case) == "2.59"
    case["latency"]["decode_j_per_token"] = None
    assert _module().decode_energy(case) == "n/a"
