"""The ``efficiency`` command: report / compare / history / gate over stored runs (no measuring, no torch).

Exit status: 0 success (``gate``: clean), 1 ``gate`` found a breach, failure or regression, 2 a usage error or
an unreadable input (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from efficiency.report import history
from efficiency.metrics import NAMES as METRIC_NAMES
from efficiency.report.compare import Criteria, compare
from efficiency.report.gating import Baseline, gate, resolve
from efficiency.report.io import ReportError, read
from efficiency.report.summary import comparison_lines, fmt, run_markdown, table


class CliError(Exception):
    pass


def _write(path: str, text: str | bytes, append: bool = False) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        target.write_bytes(text)
        return
    with target.open("a" if append else "w", encoding="utf-8") as f:
        f.write(text)


def _criteria(args: argparse.Namespace) -> Criteria:
    return Criteria(runtime_pct=args.threshold, perplexity_pct=args.ppl_threshold, alpha=args.alpha)


def _side(spec: str, args: argparse.Namespace, other: dict[str, object] | None = None) -> Baseline:
    found = resolve(spec, other, Path(args.db), args.include_dirty, args.include_incomplete)
    if found is None:
        raise CliError(f"no complete run on a clean tree with the same settings and machine in {args.db}")
    return found


def cmd_report(args: argparse.Namespace) -> int:
    from efficiency.report.html import render

    report = read(Path(args.run))
    comparison = None
    if args.compare:
        base = _side(args.compare, args, report)
        comparison = compare(base.runs, [report], Criteria(), base.label, args.run)
    out = args.output or str(Path(args.run).with_suffix(".html"))
    _write(out, render(report, comparison, args.run))
    print(f"HTML report: {out}")
    if args.markdown:
        md = run_markdown(report)
        if comparison is not None:
            md += ["", *comparison_lines(comparison, markdown=True, verbose=False)]
        _write(args.markdown, "\n".join(md) + "\n", append=args.markdown_append)
        print(f"Markdown summary: {args.markdown}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    head = _side(args.head, args)
    base = _side(args.base, args, head.runs[0])
    comp = compare(base.runs, head.runs, _criteria(args), base.label, head.label)
    text = comparison_lines(comp, markdown=args.format == "markdown", verbose=args.verbose)
    print("\n".join(text))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    if args.action == "import":
        conn = history.connect(Path(args.db))
        try:
            for path, run_id, added in history.import_files(conn, args.files):
                print(f"{path}: {'added as' if added else 'already stored as'} run {run_id}")
        finally:
            conn.close()
        return 0
    conn = history.connect(Path(args.db), create=False)
    try:
        points = history.trend(conn, args.metric, args.model, args.technique, args.baseline_only)
    finally:
        conn.close()
    rows = [[str(p.run.id), (p.run.commit or "nogit")[:12], "yes" if p.run.dirty else "no", p.run.status,
             str(p.run.started_at), p.case_id, fmt(p.value), p.run.settings] for p in points]
    headers = ["run", "commit", "dirty", "status", "started", "case", args.metric, "settings"]
    print("\n".join(table(headers, rows, False)))
    print(f"{len(points)} point(s); dirty or incomplete runs are shown but never used as a baseline")
    if args.png:
        from efficiency.report.plots import trend_plot

        _write(args.png, trend_plot(points, args.metric))
        print(f"plot: {args.png}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    report = read(Path(args.run))
    baseline = None
    notes: list[str] = []
    if args.baseline:
        baseline = resolve(args.baseline, report, Path(args.db), args.include_dirty, args.include_incomplete)
        if baseline is None:
            notes.append(f"no baseline run in {args.db} with the same settings and machine: "
                         "regressions not checked")
    result = gate(report, baseline, args.fail_on_regression)
    text = result.lines() + [f"note: {n}" for n in notes]
    print("\n".join(text))
    if args.markdown:
        _write(args.markdown, "\n".join(["### pytest-efficiency gate", "", *result.lines(markdown=True),
                                         *[f"note: {n}" for n in notes]]) + "\n", append=True)
    return 0 if result.ok else 1


def _add_baseline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=str(history.DEFAULT_DB), help="history database (default %(default)s)")
    p.add_argument("--include-dirty", action="store_true",
                   help="allow runs measured on a dirty tree (or outside git) as baseline")
    p.add_argument("--include-incomplete", action="store_true",
                   help="allow interrupted or failed runs as baseline")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="efficiency", description="pytest-efficiency reports, comparison, "
                                 "history and gate over stored runs")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("report", help="self-contained HTML page (and Markdown summary) of a run")
    p.add_argument("run", help="a run's JSON report")
    p.add_argument("-o", "--output", help="HTML file (default: the report's path with .html)")
    p.add_argument("--markdown", help="also write a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)")
    p.add_argument("--markdown-append", action="store_true", help="append to the Markdown file")
    p.add_argument("--compare", help="add a comparison with this base: report path, 'last' or commit")
    _add_baseline_flags(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="per-case changes and verdicts between two runs")
    p.add_argument("base", help="report path or commit (prefix) in the history")
    p.add_argument("head", help="report path or commit (prefix) in the history")
    p.add_argument("--threshold", type=float, default=5.0, help="practical threshold for runtime and energy, "
                   "percent (default %(default)s)")
    p.add_argument("--ppl-threshold", type=float, default=1.0, help="perplexity threshold, percent (default "
                   "%(default)s)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default %(default)s)")
    p.add_argument("--format", choices=("text", "markdown"), default="text")
    p.add_argument("--verbose", action="store_true", help="also list metrics without a value")
    _add_baseline_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("history", help="trend of a metric over the stored runs, or `history import FILES`")
    p.add_argument("--model")
    p.add_argument("--technique")
    p.add_argument("--metric", default="runtime_s", choices=METRIC_NAMES)
    p.add_argument("--baseline-only", action="store_true", help="only complete runs on a clean tree")
    p.add_argument("--png", help="also draw the trend into this PNG")
    p.add_argument("--db", default=str(history.DEFAULT_DB), help="history database (default %(default)s)")
    hsub = p.add_subparsers(dest="action")
    imp = hsub.add_parser("import", help="add JSON reports to the history")
    imp.add_argument("files", nargs="+", type=Path)
    imp.add_argument("--db", default=argparse.SUPPRESS, help="history database")
    p.set_defaults(func=cmd_history, action=None)

    p = sub.add_parser("gate", help="exit 1 on a threshold breach, an unfinished run or a significant "
                       "regression")
    p.add_argument("run", help="a run's JSON report")
    p.add_argument("--baseline", help="report path, 'last' (history) or commit (prefix) in the history")
    p.add_argument("--fail-on-regression", type=float, default=5.0, metavar="PCT",
                   help="a significant runtime/energy regression beyond PCT percent fails "
                        "(default %(default)s)")
    p.add_argument("--markdown",
                   help="append the verdict as Markdown to this file (e.g. $GITHUB_STEP_SUMMARY)")
    _add_baseline_flags(p)
    p.set_defaults(func=cmd_gate)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ReportError, history.HistoryError, ValueError, OSError) as err:
        print(f"efficiency {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
