"""Measuring from Python, without pytest: one case against its baseline.

    from efficiency.api import measure_case
    case = measure_case("smollm2-135m", "bnb4", data_dir="../shared/data", max_tokens=512)
    case["metrics"]["perplexity"], case["deltas"]["runtime_s"], case["scores"]["balanced"]

Options are the ``--eff-*`` option names without the prefix, with ``_`` for ``-`` (``max_tokens``,
``min_window``, ``model_dir``, ``device`` ...); ``[tool.efficiency]`` of ``root``'s pyproject.toml applies as in
a pytest run. Returns the report case dict (schema 2: ``metrics``, ``deltas``, ``scores``, ``threshold``); the
typed results are :meth:`efficiency.runner.Runner.measure`'s :class:`efficiency.results.CaseResult`.
Errors: bad input raises ``ConfigError`` before any model loads, with the messages of a pytest run's usage errors
(the same checks, :func:`efficiency.checks.check_before_loading`; a pytest run's outputs, history and comparison
aside: the api writes none); the ``Unavailable`` errors (model, data, technique not available here) propagate.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def measure_case(model: str, technique: str, *, root: str | Path = ".", log: Callable[[str], None] | None = None,
                 **options: Any) -> dict[str, Any]:
    from efficiency.checks import check_before_loading
    from efficiency.gate import check_perplexity
    from efficiency.runner import Runner
    from efficiency.score import case_deltas, case_scores
    from efficiency.settings import build_config, canonical_config, read_pyproject

    root = Path(root).resolve()
    opts = {**options, "models": model, "techniques": technique}
    cfg = canonical_config(build_config(opts, read_pyproject(root), root), list(options.get("threshold") or []))
    check_before_loading(cfg)  # the plugin's checks, with its messages, before any model loads
    technique = cfg.techniques[0]  # canonical (bnb4-nf4 is bnb4), as the baseline is
    runner = Runner(cfg, log=log or (lambda msg: None))
    base = runner.measure(model, cfg.baseline).to_dict()
    case = base if technique == cfg.baseline else runner.measure(model, technique).to_dict()
    case = dict(case)
    case["deltas"] = case_deltas(case, base)
    case["scores"] = case_scores(case["deltas"])
    limit = cfg.thresholds.limit_for(case["technique"])
    ppl, base_ppl = case["metrics"]["perplexity"], base["metrics"]["perplexity"]
    checked = not case["is_baseline"] and ppl is not None and base_ppl is not None
    violation = (check_perplexity(case["id"], case["technique"], ppl, base_ppl, cfg.baseline, limit)
                 if checked else None)
    case["threshold"] = {"limit_pct": limit, "checked": checked, "passed": violation is None if checked else None,
                         "violation": violation.to_dict() if violation else None}
    case["baseline"] = {"technique": base["technique"], "perplexity": base_ppl,
                        "runtime_s": base["metrics"]["runtime_s"], "energy_j": base["metrics"]["energy_j"]}
    return case
