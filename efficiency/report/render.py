"""Plain-text rendering of a report: the terminal summary table (columns from the metric registry, through the
case view-model of efficiency.report.view)."""

from __future__ import annotations

from typing import Any

from efficiency.report.schema import upgrade
from efficiency.report.view import rows, settings_line, terminal_metrics, unique_notes


def terminal_table(report: dict[str, Any]) -> list[str]:
    report = upgrade(report)
    case_rows = rows(report)
    # a metric of an optional phase group that ran nowhere in this run gets no column
    metrics = [m for m in terminal_metrics() if m.group is None
               or any(r.cells.get(m.name) and r.cells[m.name].value != "n/a" for r in case_rows)]
    headers = ["case"]
    for m in metrics:
        headers += [m.short, "Δ" + m.short.split(" ")[0]]
    headers += ["opt E/R/B", "opt R-only", "pareto", "gate"]
    table: list[list[str]] = []
    for row in case_rows:
        if row.status != "measured":
            table.append([row.id] + ["-", ""] * len(metrics) + ["", "", "", row.gate])
            continue
        cells = [row.id]
        for m in metrics:
            cell = row.cells[m.name]
            cells += [cell.value, cell.change]
        cells += [row.scores(), row.runtime_only_score, "*" if row.pareto else "", row.gate]
        table.append(cells)
    # drop change columns that are empty in every row (e.g. no energy measured anywhere)
    keep = [i for i, h in enumerate(headers) if not h.startswith("Δ") or any(r[i] for r in table)]
    headers = [headers[i] for i in keep]
    table = [[r[i] for i in keep] for r in table]
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.append(settings_line(report))
    lines += unique_notes(case_rows)
    return lines
