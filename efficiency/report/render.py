"""Plain-text rendering of a report: the terminal summary table."""

from __future__ import annotations

from typing import Any


def _num(value: Any, fmt: str = "{:.4g}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _pct(value: Any) -> str:
    return "" if value is None else f"{value:+.1f}%"


def _mib(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _score(scores: dict[str, Any], key: str) -> str:
    s = scores.get(key) or {}
    if s.get("status") in ("ok", "free"):
        return f"{s['value']:.3g}"
    return {"no-saving": "none", "unavailable": "n/a"}.get(s.get("status", ""), "")


def terminal_table(report: dict[str, Any]) -> list[str]:
    headers = ["case", "ppl", "Δppl", "time s", "Δt", "energy J", "ΔE", "peak MiB", "size MiB",
               "opt E/R/B", "pareto", "gate"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for c in report["cases"]:
        if c.get("status") != "measured":
            rows.append([c["id"], "-", "", "-", "", "-", "", "-", "-", "", "", c.get("status", "?")])
            notes.append(f"{c['id']}: {c.get('reason')}")
            continue
        d = c.get("deltas") or {}
        e = c["energy"]
        energy = "n/a" if e["energy_j"] is None else f"{e['energy_j']:.3g}±{(e.get('uncertainty_j') or 0):.2g}"
        ppl = _num(c["perplexity"]["value"]) + ("" if c["perplexity"]["meaningful"] else "*")
        scores = c.get("scores") or {}
        th = c.get("threshold") or {}
        gate = "ok" if th.get("passed") else "FAIL"
        if c.get("is_baseline") or not th.get("checked"):
            gate = "base" if c.get("is_baseline") else "-"
        rows.append([
            c["id"], ppl, _pct(d.get("perplexity_pct")), _num(c["runtime"]["median_s"]), _pct(d.get("runtime_pct")),
            energy, _pct(d.get("energy_pct")), _mib(c["memory"]["peak_bytes"]), _mib(c["size"]["size_bytes"]),
            "/".join(_score(scores, k) for k in ("energy", "runtime", "balanced")) if scores else "",
            "*" if (c.get("pareto") or {}).get("on_front") else "", gate,
        ])
        if e["energy_j"] is None and e.get("reason"):
            notes.append(f"{c['id']}: energy unavailable: {e['reason']}")
        if not c["perplexity"]["meaningful"]:
            notes.append(f"{c['id']}: * {c['perplexity']['reason']}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    wl = report["settings"]["workload"]
    lines.append(
        f"device {report['settings']['device']}, baseline {report['settings']['baseline']}, {wl['dataset']} "
        f"context {wl['context']} stride {wl['stride']} max_tokens {wl['max_tokens']}; status {report['status']}; "
        "opt: lower is better (see report settings.score_convention)"
    )
    seen: set[str] = set()
    for n in notes:
        key = n.split(": ", 1)[1]
        if key not in seen:
            seen.add(key)
            lines.append(n)
    return lines
