"""Markdown tables for docs/results.md from run reports: `python benchmarks/gpu/results_table.py REPORT.json...`"""

from __future__ import annotations

import json
import sys
from typing import Any


def fmt(v: Any, spec: str = "{:.4g}") -> str:
    return "n/a" if v is None else spec.format(v)


def pct(v: Any) -> str:
    return "" if v is None else f"{v:+.1f}%"


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def table(report: dict[str, Any]) -> list[str]:
    env, st = report["environment"], report["settings"]
    dev = env["device"]
    ps = (dev.get("power_state") or {}).get("gpus", [{}])[0] if isinstance(dev.get("power_state"), dict) else {}
    wl = st["workload"]
    pk = env["packages"]
    driver = (dev.get("power_state") or {}).get("driver_version")
    lines = [
        f"Device {dev.get('name')} (driver {driver}, power limit {ps.get('power_limit_w')} W), torch {pk['torch']}, "
        f"transformers {pk['transformers']}, bitsandbytes {pk['bitsandbytes']}; {wl['dataset']} context "
        f"{wl['context']} stride {wl['stride']} max_tokens {wl['max_tokens']}, batch {wl['batch_size']}; "
        f"baseline {st['baseline']}; status {report['status']}.",
        "",
        "| case | ppl | Δppl | pass s (median) | Δt | energy J/pass ± unc. | window s x rounds | mJ/token | ΔE | "
        "prefill ms | decode ms/tok | peak GiB | size MiB | opt E / R / B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        if c.get("status") != "measured":
            lines.append(f"| {c['id']} | {c.get('status')}: {c.get('reason', '')[:120]} |||||||||||||")
            continue
        d, e, lat = c.get("deltas") or {}, c["energy"], c["latency"]
        g = e["gpu"] if e["primary"] == "gpu" else e["cpu"]
        sc = c.get("scores") or {}
        opt = " / ".join(
            fmt(sc.get(k, {}).get("value"), "{:.3g}") if sc.get(k, {}).get("status") in ("ok", "free")
            else sc.get(k, {}).get("status", "") for k in ("energy", "runtime", "balanced"))
        ppl = fmt(c["perplexity"]["value"]) + ("" if c["perplexity"]["meaningful"] else " (random)")
        lines.append(
            f"| {c['id']} | {ppl} | {pct(d.get('perplexity_pct'))} | {fmt(c['runtime']['median_s'])} | "
            f"{pct(d.get('runtime_pct'))} | {fmt(e['energy_j'], '{:.4g}')} ± {fmt(e.get('uncertainty_j'), '{:.2g}')} | "
            f"{fmt(g.get('window_s'), '{:.1f}')} x {g.get('rounds_in_window')} | "
            f"{fmt(e['j_per_token'] * 1000 if e['j_per_token'] is not None else None, '{:.3g}')} | "
            f"{pct(d.get('energy_pct'))} | "
            f"{fmt(ms(lat.get('prefill_s')), '{:.3g}')} | "
            f"{fmt(ms(lat.get('decode_s_per_token')), '{:.3g}')} | "
            f"{fmt(c['memory']['peak_bytes'] / 2**30 if c['memory']['peak_bytes'] else None, '{:.2f}')} | "
            f"{fmt(c['size']['size_bytes'] / 2**20, '{:.1f}')} | {opt} |"
        )
    return lines


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"### {path}\n")
        print("\n".join(table(json.load(open(path)))))
        print()
