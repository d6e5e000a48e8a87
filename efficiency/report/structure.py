"""The structure every reader of a report relies on, checked once where a report enters from a file.

A report that parses as JSON and carries a readable schema version can still be structurally broken (a case
that is not an object, ``cases`` that is not a list, a section that is a string): such a report is refused
here with the file and the first broken place named, so that no command ends in a traceback on it. The same for
the few values a reader converts (a perplexity it divides by, a threshold it compares with).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from efficiency.report.io import ReportError
from efficiency.report.schema import SchemaError, upgrade

CASE_SECTIONS = ("perplexity", "runtime", "energy", "latency", "memory", "size", "threshold", "deltas",
                 "scores", "baseline", "pareto", "metrics", "phases")
CASE_STRINGS = ("id", "model", "technique", "status")
# Perplexities a reader divides by or compares (gate.check_perplexity): exp(mean NLL), never 0 or below.
CASE_PERPLEXITIES = (("perplexity", "value"), ("baseline", "perplexity"))


def _where(source: object, place: str, what: str, value: Any) -> ReportError:
    return ReportError(f"report {source} is structurally broken: {place} must be {what}, not "
                       f"{type(value).__name__}")


def _dict_or_none(value: Any, source: object, place: str) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise _where(source, place, "an object or null", value)


def check_structure(report: Any, source: object = "report") -> dict[str, Any]:
    """``report`` itself when its structure is readable; raises ReportError naming ``source`` otherwise."""
    if not isinstance(report, dict):
        raise _where(source, "the top level", "an object", report)
    if not isinstance(report.get("status"), str):
        raise _where(source, "status", "a string", report.get("status"))
    for key in ("settings", "environment"):
        _dict_or_none(report.get(key), source, key)
    settings = report.get("settings") or {}
    for key in ("workload", "thresholds"):
        _dict_or_none(settings.get(key), source, f"settings.{key}")
    for name, value in (settings.get("thresholds") or {}).items():  # the gate's limits (gating.thresholds_of)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise ReportError(f"report {source} is broken: settings.thresholds.{name} must be a finite number of "
                              f"percent, not {value!r}")
    env = report.get("environment") or {}
    for key in ("git", "device"):
        _dict_or_none(env.get(key), source, f"environment.{key}")
    cases = report.get("cases")
    if not isinstance(cases, list):
        raise _where(source, "cases", "a list", cases)
    for i, case in enumerate(cases):
        if not isinstance(case, dict):
            raise _where(source, f"cases[{i}]", "an object", case)
        for key in CASE_STRINGS:
            if not isinstance(case.get(key), str):
                raise _where(source, f"cases[{i}].{key}", "a string", case.get(key))
        for key in CASE_SECTIONS:
            _dict_or_none(case.get(key), source, f"cases[{i}].{key}")
        for section, key in CASE_PERPLEXITIES:
            value = (case.get(section) or {}).get(key)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and value > 0):
                raise ReportError(f"report {source} is broken: cases[{i}].{section}.{key} must be a perplexity (a "
                                  f"positive number) or null, not {value!r}")
    violations = report.get("violations")
    if violations is not None and not (isinstance(violations, list)
                                       and all(isinstance(v, dict) and isinstance(v.get("message"), str)
                                               for v in violations)):
        raise ReportError(f"report {source} is structurally broken: violations must be a list of objects with a "
                          "message")
    return report


def read_checked(path: Path) -> dict[str, Any]:
    """A report file: JSON, the structure check (before the upgrade of an older schema reads it), the schema
    version (older upgraded, unreadable refused); every error a ReportError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"cannot read report {path}: {err}") from err
    if isinstance(data, dict) and "schema_version" in data:
        check_structure(data, path)
    try:
        return check_structure(upgrade(data, path), path)
    except SchemaError as err:
        raise ReportError(str(err)) from err
