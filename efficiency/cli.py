"""The ``efficiency`` command: report / compare / history / gate / merge / list over stored runs (no measuring;
torch only for ``list``).

Exit status: 0 success (``gate``: clean), 1 ``gate`` found a breach, failure, regression (or an inconclusive
verdict with ``--fail-on-inconclusive``), ``compare --fail-on-regression`` found a regression; 2 a usage error
or an unreadable input, a structurally broken report included (message on stderr naming the file).

The history database defaults to ``reports/history.sqlite`` under the project root: the nearest folder upward
from the working directory holding ``pyproject.toml`` or ``.git`` (else the working directory), so that the
commands find it from any subfolder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from efficiency.defaults import (
    ALPHA,
    HISTORY_FILENAME,
    PERPLEXITY_COMPARE_PCT,
    REGRESSION_THRESHOLD_PCT,
    REPORTS_DIRNAME,
)
from efficiency.metrics import NAMES as METRIC_NAMES
from efficiency.report import history
from efficiency.report.compare import MIN_RUNS, Criteria, compare
from efficiency.report.gating import (
    Baseline,
    files_side,
    gate,
    head_runs,
    no_baseline_reason,
    report_files,
    resolve,
)
from efficiency.report.io import ReportError
from efficiency.report.structure import read_checked
from efficiency.report.summary import comparison_lines, fmt, run_markdown, table


class CliError(Exception):
    pass


def project_root(start: Path | None = None) -> Path:
    """The nearest folder upward from ``start`` (default: the working directory) that holds pyproject.toml or
    .git; ``start`` itself when there is none."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return here


def default_db() -> Path:
    return project_root() / REPORTS_DIRNAME / HISTORY_FILENAME


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pytest-efficiency")
    except PackageNotFoundError:
        return "unknown (not installed as a distribution)"


def _write(path: str, text: str | bytes, append: bool = False) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        target.write_bytes(text)
        return
    with target.open("a" if append else "w", encoding="utf-8") as f:
        f.write(text)


def _db(args: argparse.Namespace) -> Path:
    return Path(args.db) if args.db else default_db()


def _criteria(args: argparse.Namespace, threshold: float) -> Criteria:
    return Criteria(runtime_pct=threshold, perplexity_pct=args.ppl_threshold, alpha=args.alpha,
                    min_runs=args.min_runs, include_busy=args.include_busy)


def _side(spec: str, args: argparse.Namespace, other: Sequence[dict[str, Any]] | None = None) -> Baseline:
    files = report_files(spec)
    if files is not None:
        return files_side(files, spec)
    found = resolve(spec, other, _db(args), args.include_dirty, args.include_incomplete)
    if found is None:
        raise CliError(no_baseline_reason(_db(args), other or []))
    return found


def cmd_report(args: argparse.Namespace) -> int:
    from efficiency.report.html import MissingDependency, render

    report = read_checked(Path(args.run))
    comparison = None
    if args.compare is not None:
        base = _side(args.compare, args, [report])
        comparison = compare(base.runs, [report], Criteria(), base.label, args.run, base.per_case)
    out = args.output or str(Path(args.run).with_suffix(".html"))
    try:
        page = render(report, comparison, args.run)
    except MissingDependency as err:
        raise CliError(str(err)) from err
    except RuntimeError as err:  # the plots: matplotlib missing
        raise CliError(f"cannot draw the HTML report's plots: {err}") from err
    _write(out, page)
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
    base = _side(args.base, args, head.runs)
    comp = compare(base.runs, head.runs, _criteria(args, args.threshold), base.label, head.label, base.per_case)
    text = comparison_lines(comp, markdown=args.format == "markdown", verbose=args.verbose)
    inconclusive = comp.inconclusive()
    if inconclusive:
        text.append(f"inconclusive: {len(inconclusive)} verdict(s) could not be decided")
    print("\n".join(text))
    if args.fail_on_regression and comp.regressions():
        return 1
    if args.fail_on_inconclusive and inconclusive:
        return 1
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    db = _db(args)
    if args.action == "import":
        conn = history.connect(db)
        try:
            for path in args.files:
                run_id, added = history.add_report(conn, read_checked(Path(path)), str(path))
                others, counted = history.counted_as(conn, run_id)
                note = (f"; the same measurement as run(s) {', '.join(map(str, others))}: counted once, as "
                        f"run{'s' if len(counted) > 1 else ''} {', '.join(map(str, counted))}") if others else ""
                print(f"{path}: {'added as' if added else 'already stored as'} run {run_id}{note}")
        finally:
            conn.close()
        return 0
    conn = history.connect(db, create=False)
    try:
        points = history.trend(conn, args.metric, args.model, args.technique, args.baseline_only)
    finally:
        conn.close()
    rows = [[str(p.run.id), (p.run.commit or "nogit")[:12], "yes" if p.run.dirty else "no", p.run.status,
             str(p.run.started_at), p.case_id, fmt(p.value), p.run.settings] for p in points]
    headers = ["run", "commit", "dirty", "status", "started", "case", args.metric, "settings"]
    print("\n".join(table(headers, rows, False)))
    print(f"{len(points)} point(s); dirty or incomplete runs are shown but never used as a baseline; shard reports "
          "stored beside the report merged from them are shown once, as that report")
    if args.png and not points:  # before: an empty plot was written and the command passed
        filters = "".join(f" {what} {value!r}" for what, value in (("model", args.model), ("technique", args.technique))
                          if value)
        raise CliError(f"no stored point of {args.metric}{' for' + filters if filters else ''} in {db}: no plot "
                       f"written to {args.png}")
    if args.png:
        from efficiency.report.plots import trend_plot

        try:
            image = trend_plot(points, args.metric)
        except RuntimeError as err:  # matplotlib missing
            raise CliError(f"cannot draw the trend: {err}") from err
        _write(args.png, image)
        print(f"plot: {args.png}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    reports = [read_checked(Path(p)) for p in args.run]
    report, db = reports[0], _db(args)
    head = head_runs(reports, None if args.no_pool else db, args.run)
    baseline, no_baseline = None, None
    if args.baseline is not None:
        baseline = resolve(args.baseline, head, db, args.include_dirty, args.include_incomplete)
        if baseline is None:
            no_baseline = no_baseline_reason(db, head)
    result = gate(report, baseline, criteria=_criteria(args, args.fail_on_regression),
                  fail_on_inconclusive=args.fail_on_inconclusive, head=head, no_baseline=no_baseline)
    print("\n".join(result.lines()))
    if args.markdown:
        _write(args.markdown, "\n".join(["### pytest-efficiency gate", "", *result.lines(markdown=True)]) + "\n",
               append=True)
    return 0 if result.ok else 1


def cmd_merge(args: argparse.Namespace) -> int:
    from efficiency.report.io import write_atomic
    from efficiency.shard import MergeError, merge

    reports = [read_checked(Path(p)) for p in args.files]
    try:
        merged = merge(reports, [str(p) for p in args.files])
    except MergeError as err:
        raise CliError(str(err)) from err
    write_atomic(Path(args.output), merged)
    print(f"{args.output}: {len(merged['cases'])} case(s) from {len(reports)} shard report(s), "
          f"status {merged['status']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from efficiency.models import REGISTRY, registry_source
    from efficiency.techniques import base

    print("models (name: where the weights come from, unless --eff-model-dir holds a folder of that name):")
    for name in sorted(REGISTRY):
        print(f"  {name}: {registry_source(name)}")
    print("techniques (name patterns; combine with '+', e.g. ah90+bnb4):")
    registrations = getattr(base, "registrations", None)
    for item in registrations() if callable(registrations) else base.known_patterns():
        example = getattr(item, "example", item)
        examples = ", ".join(getattr(item, "examples", ()) or ())
        print(f"  {example}" + (f"   e.g. {examples}" if examples else ""))
    print("metrics (name: label, better):")
    from efficiency.metrics import METRICS

    for m in METRICS:
        print(f"  {m.name}: {m.label}, {m.better} is better{', gated' if m.gated else ''}")
    return 0


def _add_baseline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, help="history database (default: reports/history.sqlite under the "
                   "project root, the nearest folder upward holding pyproject.toml or .git)")
    p.add_argument("--include-dirty", action="store_true",
                   help="allow runs measured on a dirty tree (or outside git) as baseline")
    p.add_argument("--include-incomplete", action="store_true",
                   help="allow interrupted or failed runs as baseline")


def _add_verdict_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ppl-threshold", type=float, default=PERPLEXITY_COMPARE_PCT,
                   help="perplexity threshold, percent (default %(default)s)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level (default %(default)s)")
    p.add_argument("--min-runs", type=int, default=MIN_RUNS, help="independent runs each side needs for a "
                   "runtime/energy verdict; fewer is 'insufficient runs' (default %(default)s)")
    p.add_argument("--include-busy", action="store_true", help="let runs the suite flagged 'machine busy' count "
                   "for runtime/energy verdicts (left out by default: other load is not this code's speed)")
    p.add_argument("--fail-on-inconclusive", action="store_true", help="exit 1 when a verdict is inconclusive "
                   "(insufficient runs, not compared, a case missing from the baseline, no baseline)")


SPEC = ("a report file, a quoted glob of report files or several joined by commas (each run one independent "
        "sample), or a commit (prefix) in the history (its runs pooled)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="efficiency", description="pytest-efficiency reports, comparison, "
                                 "history and gate over stored runs")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("report", help="self-contained HTML page (and Markdown summary) of a run")
    p.add_argument("run", help="a run's JSON report")
    p.add_argument("-o", "--output", help="HTML file (default: the report's path with .html)")
    p.add_argument("--markdown", help="also write a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)")
    p.add_argument("--markdown-append", action="store_true", help="append to the Markdown file")
    p.add_argument("--compare", help="add a comparison with this base: report path(s), 'last' or commit")
    _add_baseline_flags(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="per-case changes and verdicts between the runs of two sides")
    p.add_argument("base", help=SPEC + ", or 'last' (per case, the latest eligible commit before the head)")
    p.add_argument("head", help=SPEC)
    p.add_argument("--threshold", type=float, default=REGRESSION_THRESHOLD_PCT, help="practical threshold for "
                   "runtime and energy, percent (default %(default)s)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 on a significant regression")
    _add_verdict_flags(p)
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
    p.add_argument("--db", default=None, help="history database (default: reports/history.sqlite under the "
                   "project root)")
    hsub = p.add_subparsers(dest="action")
    imp = hsub.add_parser("import", help="add JSON reports to the history")
    imp.add_argument("files", nargs="+", type=Path)
    imp.add_argument("--db", default=argparse.SUPPRESS, help="history database")
    p.set_defaults(func=cmd_history, action=None)

    p = sub.add_parser("gate", help="exit 1 on a threshold breach, an unfinished run or a significant "
                       "regression (and, with --fail-on-inconclusive, on an inconclusive verdict)")
    p.add_argument("run", nargs="+", help="the run's JSON report (gated), then optionally more runs of the same "
                   "commit to pool with it for the regression check (a run of another commit, or of a dirty tree "
                   "where the gated run's was clean or the reverse, is refused)")
    p.add_argument("--baseline", help="report path(s), 'last' (history, per case) or commit (prefix) in the "
                   "history")
    p.add_argument("--fail-on-regression", type=float, default=REGRESSION_THRESHOLD_PCT, metavar="PCT",
                   help="a significant runtime/energy regression beyond PCT percent fails "
                        "(default %(default)s)")
    _add_verdict_flags(p)
    p.add_argument("--no-pool", action="store_true", help="do not pool the run with the stored runs of its "
                   "commit")
    p.add_argument("--markdown",
                   help="append the verdict as Markdown to this file (e.g. $GITHUB_STEP_SUMMARY)")
    _add_baseline_flags(p)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("merge", help="combine the shard reports of one commit into one report")
    p.add_argument("files", nargs="+", type=Path, help="shard reports (--eff-shard I/N runs)")
    p.add_argument("-o", "--output", required=True, help="the merged report")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("list", help="known models, technique name patterns and metrics")
    p.set_defaults(func=cmd_list)
    return ap


def _inputs(args: argparse.Namespace) -> list[str]:
    named = [getattr(args, k, None) for k in ("run", "base", "head", "files", "compare", "baseline")]
    flat = [x for v in named for x in (v if isinstance(v, list) else [v]) if x is not None]
    return [str(x) for x in flat]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ReportError, history.HistoryError, ValueError, OSError) as err:
        print(f"efficiency {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        # a report that passed the structure check but still has a field of an unexpected shape
        print(f"efficiency {args.command}: error: an input report is structurally broken "
              f"({', '.join(_inputs(args))}): {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
