"""Tables for docs/results.md from `run.sh deploy` reports: `python benchmarks/gpu/deploy_table.py REPORT.json...`

Per model: batch-1 decode (ms per generated token as the median [min, max] (rounds) of the rounds, J per generated
token +- the energy window's uncertainty, speed-up over the compiled bf16 baseline, the host's share of each round
with a note under the table where the host set the pace, achieved weight bandwidth and its fraction of the device's
peak), the perplexity pass (median [min, max] s, MFU), the untimed setup (compile and warm-up) and the kernel
each technique ran. For a model with real weights, a table of perplexity next to it. With a serving sweep
(`DEPLOY_BATCH_SIZES`), a table per batch size: output tokens per second, time per output token and joules per
output token, with the speed-up over the baseline at the same batch size.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from efficiency.metrics import BY_NAME


def f(v: Any, spec: str = "{:.3g}") -> str:
    return "n/a" if v is None else spec.format(v)


def spread(median: float | None, rounds: list[float], scale: float = 1.0) -> str:
    """``median [min, max] (n)`` of a phase's rounds (the metric registry's ``round_samples``), four significant
    digits; the median alone without rounds."""
    if median is None:
        return "n/a"
    if not rounds:
        return f"{median * scale:.3g}"
    return (f"{median * scale:#.4g} [{min(rounds) * scale:#.4g}, {max(rounds) * scale:#.4g}] "
            f"({len(rounds)})")


def decode_energy(case: dict[str, Any]) -> str:
    """J per generated token +- its share of the decode window's uncertainty (the window's energy and its
    uncertainty scale alike: uncertainty_j x J/token / energy_j); the value alone where the window has none."""
    per_token = (case.get("latency") or {}).get("decode_j_per_token")
    if not per_token:
        return "n/a"
    window = (((case.get("phases") or {}).get("decode") or {}).get("window") or {})
    gpu = ((window.get("energy") or {}).get("gpu") or {})
    energy, uncertainty = gpu.get("energy_j"), gpu.get("uncertainty_j")
    if not energy or uncertainty is None:
        return f"{per_token:.3g}"
    return f"{per_token:.3g} +- {uncertainty * per_token / energy:.2g}"


def kernel(case: dict[str, Any]) -> str:
    info = case.get("technique_info") or {}
    for step in case.get("steps", []):
        k = (info.get(step) or {}).get("kernel") if isinstance(info.get(step), dict) else None
        if k:
            return str(k).split(" (")[0]
    return "cuBLAS bf16" if any(s in ("bf16", "fp16") for s in case.get("steps", [])) else ""


def table(report: dict[str, Any]) -> list[str]:
    env, st = report["environment"], report["settings"]
    wl = st["workload"]
    dev = env["device"].get("name")
    lines = [f"{', '.join(st['models'])} on {dev}, torch {env['packages'].get('torch')}, status {report['status']}, "
             f"commit {str(env.get('git', {}).get('commit', ''))[:12]}; prompt {wl['prefill_tokens']} tokens, "
             f"{wl['decode_tokens']} new tokens, batch 1; perplexity pass {wl['max_tokens']} tokens, context "
             f"{wl['context']}, stride {wl['stride']}, batch {wl['batch_size']}"
             + (f" ({env['git']['note']})" if env.get("git", {}).get("note") else ""), "",
             "| case | decode ms/token, median [min, max] (rounds) | speed-up | host % | decode J/token | "
             "weight GB/s | % of peak BW | floor ms | pass s, median [min, max] (rounds) | MFU % | setup s | kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = report["cases"]
    base = next((c for c in cases if c.get("is_baseline") and c.get("status") == "measured"), None)
    base_tok = (base or {}).get("latency", {}).get("decode_s_per_token")
    notes: list[str] = []
    for c in cases:
        if c.get("status") != "measured":
            lines.append(f"| {c['id']} | {c.get('status')}: {str(c.get('reason', ''))[:160]} ||||||||||||")
            continue
        lat, rt = c.get("latency") or {}, c.get("runtime") or {}
        tok = lat.get("decode_s_per_token")
        setup = sum((p.get("setup_s") or 0) for p in (c.get("phases") or {}).values())
        if tok is None and lat.get("reason"):  # decode not measured: the reason goes under the table
            notes.append(f"- {c['id']}: decode not measured: {lat['reason']}")
        share = lat.get("decode_host_share")
        if share is not None and lat.get("decode_host_note") and str(lat["decode_host_note"]).startswith("paced"):
            notes.append(f"- {c['id']}: {lat['decode_host_note']}")
        mfu_dtype = rt.get("mfu_compute_dtype")
        mfu_of = f" ({mfu_dtype})" if rt.get("mfu_pct") is not None and mfu_dtype not in ("bfloat16", "float16") else ""
        clock = rt.get("mfu_sm_clock_mhz")  # the pass's median SM clock (reports from 5r on)
        mfu_of += f" at {clock:.0f} MHz" if rt.get("mfu_pct") is not None and clock is not None else ""
        lines.append(
            f"| {c['id']} | {spread(tok, BY_NAME['decode_s_per_token'].round_samples(c), 1e3)} | "
            f"{f(base_tok / tok if tok and base_tok else None, '{:.2f}x')} | "
            f"{f(share * 100 if share is not None else None, '{:.0f}')} | "
            f"{decode_energy(c)} | "
            f"{f(lat['weight_bytes_per_s'] / 1e9 if lat.get('weight_bytes_per_s') else None, '{:.0f}')} | "
            f"{f(lat.get('roofline_pct'), '{:.0f}')} | "
            f"{f(lat['roofline_floor_s_per_token'] * 1e3 if lat.get('roofline_floor_s_per_token') else None)} | "
            f"{spread(rt.get('median_s'), BY_NAME['runtime_s'].round_samples(c))} | "
            f"{f(rt.get('mfu_pct'), '{:.1f}')}{mfu_of} | {setup:.0f} | {kernel(c)} |")
    return lines + ([""] + notes if notes else []) + quality_table(cases) + serving_table(cases, base)


def quality_table(cases: list[dict[str, Any]]) -> list[str]:
    """Perplexity next to speed for a model with real weights (a random-weight model's perplexity means nothing): per
    measured case, perplexity, its change against the baseline's (the report's ``deltas``), KL divergence from the
    baseline's next-token distribution and top-1 agreement; [] when no case has real weights."""
    real = [c for c in cases if c.get("status") == "measured" and c.get("random_weights") is False]
    rows = []
    for c in real:
        kld: dict[str, Any] = c["kld"] if isinstance(c.get("kld"), dict) else {}
        top1 = kld.get("top1_match")
        rows.append(f"| {c['id']} | {f((c.get('perplexity') or {}).get('value'), '{:.3f}')} | "
                    f"{f((c.get('deltas') or {}).get('perplexity'), '{:+.1f}%')} | {f(kld.get('mean'), '{:.4f}')} | "
                    f"{f(top1 * 100 if top1 is not None else None, '{:.1f}%')} |")
    if not rows:
        return []
    return ["", "Quality (real weights; against the baseline):", "",
            "| case | perplexity | change | KLD from the baseline (mean, nats) | top-1 agreement |",
            "|---|---|---|---|---|", *rows]


def serving_table(cases: list[dict[str, Any]], base: dict[str, Any] | None) -> list[str]:
    """Rows of every measured case's serving sweep; [] when no case ran one."""
    def batches(case: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
        return {int(r["batch_size"]): r for r in ((case or {}).get("serving") or {}).get("batches") or []}

    base_rows = batches(base)
    rows: list[str] = []
    for c in cases:
        for b, r in sorted(batches(c).items()):
            tps, ref = r.get("tokens_per_s"), (base_rows.get(b) or {}).get("tokens_per_s")
            tpot, j = r.get("time_per_output_token_s"), r.get("j_per_token")
            speed_up = tps / ref if tps and ref else None
            rows.append(f"| {c['id']} | {b} | {f(tps, '{:.0f}')} | {f(speed_up, '{:.2f}x')} | "
                        f"{f(tpot * 1e3 if tpot else None)} | {f(j * 1e3 if j else None)} | {r.get('rounds')} |")
    if not rows:
        return []
    return ["", "Serving sweep (greedy generate of equal-length prompts, no padding; speed-up: tokens/s over the "
            "baseline's at the same batch size):", "",
            "| case | batch | output tokens/s | speed-up | ms per output token | mJ/output token | rounds |",
            "|---|---|---|---|---|---|---|", *rows]


def main(paths: list[str]) -> None:
    for p in paths:
        try:
            report = json.load(open(p))
        except (OSError, ValueError) as err:
            print(f"{p}: {err}\n")
            continue
        print("\n".join(table(report)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
