"""Text and Markdown renderings: a comparison (terminal and Markdown), a run's Markdown summary (for
``$GITHUB_STEP_SUMMARY``) and a gate result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from efficiency.metrics import BY_NAME, METRICS
from efficiency.report.compare import INCONCLUSIVE, NOT_SIGNIFICANT, Comparison, MetricComparison
from efficiency.report.schema import upgrade
from efficiency.report.view import rows as view_rows
from efficiency.report.view import unique_notes

LABELS = {m.name: m.label for m in METRICS}


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "B":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.4g}"


def pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.1f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in rows]
        return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |"
                                                                                   for r in esc]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
            for r in [list(headers), *rows]]


def _metric_row(case_id: str, m: MetricComparison) -> list[str]:
    unit = BY_NAME[m.metric].unit if m.metric in BY_NAME else ""
    p = "" if m.p_value is None else f"{m.p_value:.3g}"
    n = f"{m.n_base}/{m.n_head}" if m.n_base or m.n_head else ""
    return [case_id, LABELS[m.metric], fmt(m.base, unit), fmt(m.head, unit), pct(m.change_pct), n, p,
            m.verdict]


def comparison_lines(comp: Comparison, markdown: bool = False, verbose: bool = True,
                     gated_only: bool = False) -> list[str]:
    """A header, one row per case and metric (``verbose=False``: only rows with a value; ``gated_only``: only
    the metrics that can fail a gate), then the verdict and the reasons behind uncalled changes."""
    crit = comp.criteria
    regs, imps = comp.regressions(), comp.improvements()
    head = f"{comp.head_label} vs {comp.base_label}"
    lines = [("### " if markdown else "") + f"Comparison: {head}",
             f"criteria: {crit.describe()}"]
    if markdown:
        lines.append("")
    lines += [f"note: {n}" for n in comp.notes]
    rows: list[list[str]] = []
    skipped: list[str] = []
    for case in comp.cases:
        if not case.compared:
            skipped.append(f"{case.case_id}: not compared: {case.reason}")
            continue
        for m in case.metrics:
            if (verbose or m.verdict != "n/a") and (m.gated or not gated_only):
                rows.append(_metric_row(case.case_id, m))
    shown = [m for m in METRICS if m.gated or not gated_only]
    absent = [m.label for m in shown if all(x.verdict == "n/a" for c in comp.cases if c.compared
                                            for x in c.metrics if x.metric == m.name)]
    if not verbose and absent and comp.compared:
        lines.append("no value on either side for: " + ", ".join(absent))
    if rows:
        if markdown:
            lines.append("")
        headers = ["case", "metric", "base", "head", "change", "n base/head", "p", "verdict"]
        lines += table(headers, rows, markdown)
    if markdown and skipped:
        lines.append("")
    lines += [("- " if markdown else "") + s for s in skipped]
    if markdown:
        lines.append("")
    if regs:
        lines.append(f"REGRESSION: {len(regs)} significant regression(s) beyond the threshold:")
        lines += [f"{'- ' if markdown else '  '}{cid}: {LABELS[m.metric]} {m.reason}" for cid, m in regs]
    elif comp.compared == 0:
        lines.append(f"nothing compared: none of the {len(comp.cases)} case(s) is comparable")
    else:
        undecided = len(comp.inconclusive())
        lines.append(f"no significant regression ({comp.compared} of {len(comp.cases)} case(s) compared"
                     + (f"; {undecided} inconclusive verdict(s), see below)" if undecided else ")"))
    if imps:
        lines.append("improvements: " + ", ".join(f"{cid} {LABELS[m.metric]} {pct(m.change_pct)}"
                                                   for cid, m in imps))
    details = [f"{c.case_id} {LABELS[m.metric]}: {m.reason}" for c in comp.cases for m in c.metrics
               if m.gated and m.verdict in (*INCONCLUSIVE, NOT_SIGNIFICANT)]
    lines += [("- " if markdown else "  ") + d for d in details]
    return lines


def run_markdown(report: dict[str, Any]) -> list[str]:
    """A run as Markdown: header, one row per case (the view-model of efficiency.report.view), violations,
    notes."""
    report = upgrade(report)
    env, settings = report.get("environment") or {}, report.get("settings") or {}
    git, wl = env.get("git") or {}, settings.get("workload") or {}
    commit = (git.get("commit") or "no git")[:12] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        "## pytest-efficiency",
        "",
        f"status **{report.get('status')}**, commit `{commit}`, device {settings.get('device')} "
        f"({(env.get('device') or {}).get('name')}), baseline {settings.get('baseline')}, "
        f"{wl.get('dataset')} context {wl.get('context')} stride {wl.get('stride')} "
        f"max_tokens {wl.get('max_tokens')}",
        "",
    ]
    case_rows = view_rows(report)
    table_rows = []
    for r in case_rows:
        if r.status != "measured":
            table_rows.append([r.id, "", "", "", "", "", "", "", r.status])
            continue
        c = r.cells
        gate = "**FAIL**" if r.gate == "FAIL" else r.gate
        table_rows.append([r.id, c["perplexity"].value, c["perplexity"].change, c["runtime_s"].value,
                           c["runtime_s"].change, c["energy_j"].value, c["energy_j"].change,
                           r.scores(" / ") + (f" (R-only {r.runtime_only_score})"
                                                              if r.runtime_only_score else ""), gate])
    notes = unique_notes(case_rows)
    headers = ["case", "ppl", "Δppl", "runtime s", "Δt", "energy J", "ΔE", "opt E / R / B", "gate"]
    lines += table(headers, table_rows, True)
    violations = report.get("violations") or []
    lines += ["", f"**{len(violations)} threshold violation(s)**" if violations else "no threshold violation"]
    lines += [f"- {v['message']}" for v in violations]
    lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)] if notes else []
    lines.append("")
    lines.append("opt = Pc^1.5 / (alpha Tc + beta Ec), lower is better (arXiv 2502.00046; see the report's "
                 "settings.score_convention)")
    return lines
