"""PNG plots of a run and of the history, drawn with matplotlib's object API on the Agg canvas (no pyplot, no
display). matplotlib is imported only when a plot is drawn; it comes with the ``ml`` extra."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from efficiency.report.history import trend_series
from efficiency.score import pareto_front

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from efficiency.report.history import TrendPoint

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _figure(width: float = 7.5, height: float = 4.2) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("plots need matplotlib: pip install 'pytest-efficiency[ml]' or pip install "
                           "matplotlib") from err
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _measured(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report.get("cases") or [] if c.get("status") == "measured"]


def _field(case: dict[str, Any], section: str, key: str) -> Any:
    """``case[section][key]``, None where the section or the value is missing (a report edited by hand, or written
    by another version: a plot draws what it can instead of failing the whole page)."""
    return (case.get(section) or {}).get(key)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def quality_axis(report: dict[str, Any]) -> tuple[str, str]:
    """(key, axis label) of the x axis of the quality plot: energy per token when every measured case has it,
    else the runtime of a perplexity pass, labelled as such."""
    cases = _measured(report)
    if cases and all(_field(c, "energy", "j_per_token") is not None for c in cases):
        return "j_per_token", "energy per token (J/token)"
    return "runtime", "runtime of one perplexity pass (s) — energy not measured"


def energy_reasons(report: dict[str, Any]) -> list[str]:
    """Why energy is missing, once per distinct reason."""
    return sorted({str(_field(c, "energy", "reason")) for c in _measured(report)
                   if _field(c, "energy", "j_per_token") is None and _field(c, "energy", "reason")})


def quality_plot(report: dict[str, Any]) -> bytes:
    """Perplexity against energy per token (or runtime), per model, with each model's Pareto front."""
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    cases = _measured(report)
    if not cases:
        _empty(ax, "no measured case")
        return png(fig)
    key, xlabel = quality_axis(report)
    meaningful = all(_field(c, "perplexity", "meaningful") for c in cases)

    def point(c: dict[str, Any]) -> tuple[Any, Any]:
        x = _field(c, "energy", "j_per_token") if key == "j_per_token" else _field(c, "runtime", "median_s")
        return x, _field(c, "perplexity", "value")

    left_out = [c["id"] for c in cases if None in point(c)]
    for i, model in enumerate(dict.fromkeys(c["model"] for c in cases)):
        group = [c for c in cases if c["model"] == model and None not in point(c)]
        if not group:
            continue
        xs = [point(c)[0] for c in group]
        ys = [point(c)[1] for c in group]
        color = COLORS[i % len(COLORS)]
        ax.scatter(xs, ys, color=color, s=45, zorder=3, label=model)
        for k, (x, y, c) in enumerate(zip(xs, ys, group, strict=True)):  # staggered so labels do not overlap
            ax.annotate(c["technique"], (x, y), textcoords="offset points", xytext=(6, 5 - 11 * (k % 3)),
                        fontsize=8, arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.5})
        front = sorted((x, y) for x, y, on in zip(xs, ys, pareto_front(list(zip(xs, ys, strict=True))),
                                                  strict=True) if on)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, alpha=0.6,
                    linestyle="--", label=f"{model} Pareto front")
        elif front:
            ax.scatter(*front[0], s=160, facecolors="none", edgecolors=color, label=f"{model} Pareto front")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("perplexity (lower is better)" + ("" if meaningful else " — meaningless: random weights"))
    ax.set_title("quality vs cost (down-left is better)"
                 + (f"; not drawn, without a value: {', '.join(left_out)}" if left_out else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def changes_plot(report: dict[str, Any]) -> bytes:
    """Runtime and energy change against the model's baseline, per technique (negative = saving)."""
    fig = _figure()
    ax = fig.add_subplot()
    cases = [c for c in _measured(report) if not c.get("is_baseline")]
    series = [("runtime_s", "runtime", COLORS[0]), ("energy_j", "energy", COLORS[2])]
    present = [s for s in series if any((c.get("deltas") or {}).get(s[0]) is not None for c in cases)]
    if not cases or not present:
        _empty(ax, "no change to show (no measured non-baseline case)")
        return png(fig)
    width = 0.8 / len(present)
    for k, (field, label, color) in enumerate(present):
        values = [(c.get("deltas") or {}).get(field) for c in cases]
        pos = [i + (k - (len(present) - 1) / 2) * width for i in range(len(cases))]
        ax.barh(pos, [v if v is not None else 0.0 for v in values], height=width, color=color, label=label)
        for p, v in zip(pos, values, strict=True):
            ax.annotate("n/a" if v is None else f"{v:+.1f}%", (v or 0.0, p), xytext=(3, -3), fontsize=8,
                        textcoords="offset points")
    ax.set_yticks(range(len(cases)), [c["id"] for c in cases], fontsize=8)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo - 0.05 * (hi - lo) if lo < 0 else lo, hi + 0.12 * (hi - lo))
    ax.axvline(0, color="black", linewidth=0.8)
    missing = "" if len(present) == len(series) else " (energy not measured)"
    ax.set_xlabel("change vs the model's baseline (%), negative = saving")
    ax.set_title("runtime and energy change per technique" + missing)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return png(fig)


def scores_plot(report: dict[str, Any]) -> bytes:
    """The optimisation score per priority (lower is better); cases without a score are named, not drawn."""
    cases = [c for c in _measured(report) if not c.get("is_baseline")]
    priorities: tuple[str, ...] = ("energy", "runtime", "balanced")
    if cases and all(((c.get("scores") or {}).get("energy") or {}).get("status") == "unavailable" for c in cases):
        priorities = ("runtime_only",)  # no energy anywhere: the always-available runtime-only score
    scored = [(c, p, (c.get("scores") or {}).get(p) or {}) for c in cases for p in priorities]
    drawable = any(s.get("status") in ("ok", "free") for _, _, s in scored)
    fig = _figure() if drawable else _figure(7.5, 1.4)
    ax = fig.add_subplot()
    if not drawable:
        reasons = sorted({str(s.get("reason") or s.get("status")) for _, _, s in scored})
        _empty(ax, "no score to plot: "
               + ("; ".join(reasons) if reasons else "no measured non-baseline case"))
        ax.set_title("optimisation score per priority (lower is better)")
        return png(fig)
    width = 0.8 / len(priorities)
    for k, p in enumerate(priorities):
        pos = [i + (k - (len(priorities) - 1) / 2) * width for i in range(len(cases))]
        for x, c in zip(pos, cases, strict=True):
            s = (c.get("scores") or {}).get(p) or {}
            ok = s.get("status") in ("ok", "free")
            ax.bar(x, s["value"] if ok else 0.0, width=width, color=COLORS[k],
                   label=p if x == pos[0] else None)
            if not ok:
                ax.annotate({"no-saving": "none"}.get(str(s.get("status")), "n/a"), (x, 0), ha="center",
                            xytext=(0, 3), textcoords="offset points", fontsize=7)
    ax.set_xticks(range(len(cases)), [c["id"] for c in cases], fontsize=8, rotation=15)
    ax.set_ylabel("opt = Pc^1.5 / (αTc + βEc)")
    only = priorities == ("runtime_only",)
    ax.set_title("optimisation score per priority (lower is better; 'none' = saves nothing)"
                 + ("\nruntime only (alpha 1, beta 0): energy was not measured" if only else ""), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def trend_plot(points: Sequence[TrendPoint], metric: str) -> bytes:
    """One line per case over the stored runs (x: run order, labelled by commit); dirty or incomplete runs
    are drawn hollow."""
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    runs = list(dict.fromkeys(p.run.id for p in points))
    if not runs:
        _empty(ax, "no stored run matches")
        return png(fig)
    x_of = {r: i for i, r in enumerate(runs)}
    labels = {p.run.id: (p.run.commit or "nogit")[:7] + ("" if p.run.baseline_ok() else "*") for p in points}
    lines = trend_series(points)  # never join points measured differently
    several = len(lines) > len({case_id for case_id, _ in lines})
    for i, (case_id, group) in enumerate(lines):
        mine = [(x_of[p.run.id], p.value, p.run.baseline_ok()) for p in group if p.value is not None]
        color = COLORS[i % len(COLORS)]
        label = case_id + (f" [{group[0].run.settings}]" if several and group else "")
        ax.plot([m[0] for m in mine], [m[1] for m in mine], color=color, marker="o", label=label)
        bad = [m for m in mine if not m[2]]
        ax.scatter([m[0] for m in bad], [m[1] for m in bad], s=90, facecolors="white", edgecolors=color,
                   zorder=3)
    ax.set_xticks(range(len(runs)), [labels[r] for r in runs], rotation=30, fontsize=8)
    ax.set_xlabel("run (commit; * = dirty tree or not complete, never a baseline)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over commits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)
