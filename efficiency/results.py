"""Typed results of one case, and the one function that turns them into a report case dict (the JSON edge).

A :class:`CaseResult` holds the phase records (typed results and their windows), the model size, the
conditions the case ran under (machine load, GPU power state) and where the model came from. The report
sections (``perplexity``, ``runtime``, ``energy``, ``latency``, ``memory``, ...) are written by each phase's
``section()`` at the edge; ``metrics`` is then filled from the metric registry, so every consumer reads the
same values.

Non-finite numbers never reach JSON: :func:`case_to_dict` replaces them by null and lists their paths under
``non_finite`` (the session marks such a case ``invalid``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from efficiency import metrics as registry

CASE_STATUSES = ("measured", "skipped", "error", "invalid", "oom", "interrupted")


@dataclass
class CaseResult:
    id: str
    model: str
    technique: str
    steps: list[str]
    is_baseline: bool
    source: str
    random_weights: bool
    load_s: float
    apply_s: float
    technique_info: dict[str, Any]
    records: dict[str, Any]  # phase name -> efficiency.phases.base.PhaseRecord
    sections: dict[str, dict[str, Any]]  # report sections written by the phases
    size: Any  # efficiency.measure.memory.SizeResult
    conditions: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)  # revision, weights hash

    def to_dict(self) -> dict[str, Any]:
        return case_to_dict(self)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def scrub_non_finite(value: Any, path: str = "", found: list[str] | None = None) -> Any:
    """A copy of ``value`` with NaN and infinities replaced by None; their paths appended to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(path or "<root>")
        return None
    if isinstance(value, dict):
        return {k: scrub_non_finite(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_non_finite(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def case_to_dict(result: CaseResult) -> dict[str, Any]:
    """The report case (schema 2) of a measured case."""
    case: dict[str, Any] = {
        "id": result.id,
        "model": result.model,
        "technique": result.technique,
        "steps": list(result.steps),
        "is_baseline": result.is_baseline,
        "status": "measured",
        "source": result.source,
        "random_weights": result.random_weights,
        "load_s": result.load_s,
        "apply_s": result.apply_s,
        "technique_info": jsonable(result.technique_info),
        "model_info": jsonable(result.model_info),
        **jsonable(result.sections),
        "size": result.size.to_dict(),
        "phases": phase_entries(result.records),
        "conditions": jsonable(result.conditions),
    }
    found: list[str] = []
    case = scrub_non_finite(case, "", found)
    if found:
        case["non_finite"] = found
    case["metrics"] = registry.case_values(case)
    return case


def phase_entries(records: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's ``phases``: each phase record's window, rounds, median round (timed phases) and setup time;
    for a measured case and for the phases an interrupted case ended."""
    out = {}
    for name, rec in records.items():
        rounds = getattr(rec.result, "n", None)
        out[name] = {"window": rec.window.to_dict(), "rounds": rounds,
                     "median_s": getattr(rec.result, "median_s", None) if rounds else None, "setup_s": rec.setup_s}
    return out


def unmeasured_case(case_id: str, model: str, technique: str, status: str, reason: str,
                    **extra: Any) -> dict[str, Any]:
    """The report case of a case that was not measured (skipped, error, oom): its status and reason."""
    if status not in CASE_STATUSES:
        raise ValueError(f"unknown case status {status!r}")
    return {"id": case_id, "model": model, "technique": technique, "status": status, "reason": reason,
            **scrub_non_finite(jsonable(extra))}
