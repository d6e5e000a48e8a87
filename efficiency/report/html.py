"""A self-contained HTML page for one run: header, plots embedded as base64 PNG, the case table, violations
and, optionally, a comparison with a base run. No external resource is referenced (no script, font or CSS)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from efficiency.metrics import METRICS
from efficiency.report import plots, view
from efficiency.report.compare import Comparison
from efficiency.report.schema import upgrade
from efficiency.report.summary import comparison_lines

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; white-space: nowrap; }
.fail { color: #b00020; font-weight: bold; } .ok { color: #1b7f3b; } .meta { color: #555; font-size: 13px; }
figure { margin: 12px 0; } figcaption { font-size: 12px; color: #555; } img { max-width: 100%; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _cases_table(report: dict[str, Any]) -> str:
    """The case table from the view-model: every registry metric with a column header, its change against the
    baseline (rounds, spread, ``~`` when not significant), the scores, the Pareto flag and the gate."""
    env = _environment()
    template = env.from_string(CASES_TEMPLATE)
    metrics = [m for m in METRICS if m.short or m.name in ("tokens_per_s", "j_per_token", "decode_j_per_token")]
    return template.render(rows=view.rows(report), metrics=metrics)


CASES_TEMPLATE = """<table><tr><th>case</th>{% for m in metrics %}<th>{{ m.short or m.label }}</th>\
{% endfor %}<th>opt E/R/B</th><th>opt runtime-only</th><th>Pareto</th><th>gate</th></tr>
{% for r in rows %}<tr><td>{{ r.id }}</td>{% if r.status != 'measured' %}\
<td colspan='{{ metrics|length + 3 }}' style='text-align:left'>{{ r.notes|join('; ') }}</td><td>{{ r.gate }}</td>\
{% else %}{% for m in metrics %}<td>{{ r.cells[m.name].value }}\
{% if r.cells[m.name].change %}<br><small>{{ r.cells[m.name].change }}</small>{% endif %}</td>{% endfor %}\
<td>{{ r.scores() }}</td><td>{{ r.runtime_only_score }}</td><td>{{ '*' if r.pareto else '' }}</td>\
<td class='{{ 'fail' if r.gate == 'FAIL' else 'ok' if r.gate in ('ok', 'base') else '' }}'>{{ r.gate }}</td>\
{% endif %}</tr>
{% endfor %}</table>"""


def _environment() -> Any:
    try:
        import jinja2
    except ImportError as err:
        raise MissingDependency("the HTML report needs jinja2: pip install 'pytest-efficiency[report]'") from err
    return jinja2.Environment(autoescape=True, trim_blocks=True)


def _serving_figure(report: dict[str, Any]) -> list[str]:
    """Throughput and J/token against batch size per technique, where the run had a serving sweep."""
    from efficiency.report.serving_plots import serving_plot

    data = serving_plot(report)
    if data is None:
        return []
    return ["<h2>Serving: throughput and energy per output token against batch size</h2><figure>",
            _img(data, "serving throughput and J per output token against batch size"), "</figure>"]


class MissingDependency(RuntimeError):
    """An optional library the command needs is not installed; the message says what to install."""


def _meta(report: dict[str, Any], source: str) -> str:
    env, settings = report.get("environment") or {}, report.get("settings") or {}
    git, wl = env.get("git") or {}, settings.get("workload") or {}
    status = str(report.get("status"))
    items = [
        f"status <b class='{'ok' if status == 'complete' else 'fail'}'>{escape(status)}</b>",
        "commit " + escape((git.get("commit") or "no git")[:12]
                           + (" (dirty tree)" if git.get("dirty") else "")),
        escape(f"{report.get('started_at')} to {report.get('finished_at')}"),
        escape(f"device {settings.get('device')} ({(env.get('device') or {}).get('name')}), "
               f"CPU {env.get('cpu')}"),
        escape(f"baseline {settings.get('baseline')}"),
        escape(f"{wl.get('dataset')} context {wl.get('context')} stride {wl.get('stride')} max_tokens "
               f"{wl.get('max_tokens')}, batch {wl.get('batch_size')}"),
    ] + ([f"source {escape(source)}"] if source else [])
    return "<p class='meta'>" + "; ".join(items) + "</p>"


def render(report: dict[str, Any], comparison: Comparison | None = None, source: str = "") -> str:
    report = upgrade(report)  # a report of an older schema, as given by a library user, renders too
    settings = report.get("settings") or {}
    commit = (((report.get("environment") or {}).get("git") or {}).get("commit") or "no git")[:12]
    _, xlabel = plots.quality_axis(report)
    reasons = "".join("; " + escape(r) for r in plots.energy_reasons(report))
    violations = report.get("violations") or []
    if violations:
        gate = (f"<p class='fail'>{len(violations)} threshold violation(s)</p><ul>"
                + "".join(f"<li>{escape(v['message'])}</li>" for v in violations) + "</ul>")
    else:
        gate = "<p class='ok'>no threshold violation</p>"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>pytest-efficiency report {escape(commit)}</title><style>{CSS}</style></head><body>",
        f"<h1>pytest-efficiency: {escape(', '.join(settings.get('models') or []))}</h1>",
        _meta(report, source),
        "<h2>Threshold gate</h2>", gate,
        "<div id='plots'><h2>Quality against cost</h2><figure>",
        _img(plots.quality_plot(report), "perplexity against cost with the Pareto front"),
        f"<figcaption>Perplexity against {escape(xlabel)}{reasons}. Dashed: each model's Pareto front in "
        "these two axes (the report's own Pareto flag also uses energy when measured).</figcaption></figure>",
        "<h2>Runtime and energy change per technique</h2><figure>",
        _img(plots.changes_plot(report), "runtime and energy change per technique"),
        "</figure><h2>Optimisation score per priority</h2><figure>",
        _img(plots.scores_plot(report), "optimisation score per priority"),
        f"<figcaption>{escape(str(settings.get('score_convention', '')))}</figcaption></figure>",
        *_serving_figure(report),
        "</div>",
        "<h2>Cases</h2>", _cases_table(report),
        "<p class='meta'>* perplexity meaningless (random weights). Pareto: not dominated within the "
        "model beyond each axis's noise tolerance. Changes: against the model's baseline in this run, n = "
        "rounds, ± half-range spread, ~ = not significant.</p>",
        "<ul class='meta'>" + "".join(f"<li>{escape(n)}</li>" for n in view.unique_notes(view.rows(report)))
        + "</ul>",
    ]
    if comparison is not None:
        parts += ["<h2>Comparison</h2><pre>", escape("\n".join(comparison_lines(comparison))), "</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)
