"""The serving plot: output tokens per second and joules per output token against batch size, one line per
case (model x technique), from the ``serving`` sections of a report. Drawn like efficiency.report.plots (Agg,
matplotlib's object API); for the HTML page."""

from __future__ import annotations

from typing import Any

from efficiency.report.plots import COLORS, _empty, _figure, _measured, png


def serving_series(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Case id -> its serving rows (sorted by batch size), for the measured cases that have them."""
    out: dict[str, list[dict[str, Any]]] = {}
    for case in _measured(report):
        rows = ((case.get("serving") or {}).get("batches")) or []
        if rows:
            out[case["id"]] = sorted(rows, key=lambda r: r["batch_size"])
    return out


def serving_plot(report: dict[str, Any]) -> bytes | None:
    """PNG of throughput and J/token against batch size per case; None when no case has a serving sweep."""
    series = serving_series(report)
    if not series:
        return None
    fig = _figure(11.0, 4.2)
    ax_tps, ax_j = fig.subplots(1, 2)
    reasons: set[str] = set()
    any_energy = False
    for i, (case_id, rows) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = [(r["batch_size"], r["tokens_per_s"]) for r in rows if r.get("tokens_per_s") is not None]
        if pts:
            ax_tps.plot(*zip(*pts, strict=True), marker="o", color=color, label=case_id)
        e = [(r["batch_size"], r["j_per_token"]) for r in rows if r.get("j_per_token") is not None]
        reasons.update(r["energy_reason"] for r in rows if r.get("j_per_token") is None and r.get("energy_reason"))
        if e:
            any_energy = True
            ax_j.plot(*zip(*e, strict=True), marker="o", color=color, label=case_id)
    for ax in (ax_tps, ax_j):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(True, alpha=0.3)
    ax_tps.set_yscale("log")  # batch 1 to 128 spans two decades of throughput
    ax_tps.set_ylabel("output tokens / s")
    ax_tps.set_title("serving throughput")
    ax_tps.legend(fontsize="small")
    if any_energy:
        ax_j.set_yscale("log")
        ax_j.set_ylabel("J / output token")
        ax_j.set_title("serving energy per output token")
    else:
        _empty(ax_j, "energy per token not measured: " + "; ".join(sorted(reasons))[:200])
    return png(fig)
