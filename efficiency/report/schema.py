"""The JSON report: one file per run, schema-versioned.

Top level: ``schema_version``, ``status`` (running | complete | incomplete | interrupted | failed),
``started_at``, ``finished_at``, ``environment`` (report/env.py), ``settings`` (workload, device, baseline,
thresholds, the score convention), ``cases`` (one dict per model x technique, written by
efficiency.results.case_to_dict), ``violations``, when some selected cases did not end, ``missing`` (their
ids) and, when the run selected grid cases, ``selected`` (their ids: a comparison leaves out baseline cases not in
it). Units are in the field names (``_s``, ``_j``, ``_bytes``, ``_pct``); a number that could not be measured is
``null`` next to a ``reason``.

Version 2 (this one) adds to every measured case ``metrics`` (every registry metric's value, efficiency.metrics),
``phases`` (each phase's window: wall time, energy of every meter, peak memory), the ``latency`` decode energy,
``deltas`` keyed by metric name, the ``runtime_only`` score, and the case statuses ``invalid`` and ``oom`` and
the run status ``incomplete``. Version-1 reports are upgraded on read by :func:`upgrade` (their content is
kept; what version 1 did not measure stays null); anything older or unversioned is refused.

The case status ``interrupted`` (with ``partial``, the sections its phases measured before the interrupt, and
``phases_done``) was added later within version 2: readers that know only the older statuses take it as not
measured, like ``error``.

Each ``phases`` entry's ``median_s`` (the median round of a timed phase) came later within version 2 too, and so
did, on a GPU metered through NVML, its window's ``gpu_clocks`` (the SM clock, power and throttle reasons sampled
during the window) and the perplexity runtime's ``mfu_sm_clock_mhz`` and ``mfu_power_capped_share``: a report
without them was written before they were recorded.

Settings recorded later within version 2 (``compute_dtype``, ``technique_options`` by canonical step name,
``calibration_path``, ``device_map``, ``kld``, ``tasks``, ``serving``, ``accuracy_thresholds``) are optional
additions, not a new version: a report without one was written before it was recorded and readers take it as
unknown (efficiency.report.compare.differing), never as a difference. No upgrade fills them in: a default would
claim what the run did not record (an older run may well have used ``--eff-compute-dtype bf16``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

SCHEMA_VERSION = 2
STATUSES = ("running", "complete", "incomplete", "interrupted", "failed")
_V1_DELTAS = {"perplexity_pct": "perplexity", "runtime_pct": "runtime_s", "energy_pct": "energy_j",
              "j_per_token_pct": "j_per_token", "prefill_pct": "prefill_s",
              "decode_per_token_pct": "decode_s_per_token", "peak_memory_pct": "peak_bytes",
              "size_pct": "size_bytes", "parameters_pct": "parameters"}


class SchemaError(ValueError):
    """A report this version cannot read (too old, too new, or not a report)."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_report(environment: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "started_at": now_iso(),
        "finished_at": None,
        "environment": environment,
        "settings": settings,
        "cases": [],
        "violations": [],
    }


def _upgrade_case_v1(case: dict[str, Any]) -> dict[str, Any]:
    from efficiency.metrics import case_values
    from efficiency.score import case_scores

    case = dict(case)
    memory = case.get("memory")
    if isinstance(memory, dict) and "not per case" in str(memory.get("method") or ""):
        # version 1 on CPU recorded the process high-water mark since start: not a per-case figure
        memory = dict(memory)
        memory["process_high_water_bytes"] = memory.get("peak_bytes")
        memory["peak_bytes"] = None
        memory["reason"] = "version-1 report: the CPU figure was the process high-water mark, not per case"
        case["memory"] = memory
    if isinstance(case.get("deltas"), dict):
        case["deltas"] = {_V1_DELTAS.get(k, k): v for k, v in case["deltas"].items()}
        case["scores"] = case_scores(case["deltas"])
    if isinstance(case.get("latency"), dict) and "decode_j_per_token" not in case["latency"]:
        case["latency"] = {**case["latency"], "decode_j_per_token": None,
                           "decode_energy_reason": "version-1 report: decode ran outside any energy window"}
    if case.get("status") == "measured":
        case["metrics"] = case_values(case)
        case.setdefault("phases", {})
    return case


def _refresh_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Every registry metric in every measured case: a metric added to the registry after the report was written
    reads null there (its producer did not run), so a new metric never needs a migration."""
    from efficiency.metrics import case_values

    cases = report.get("cases") or []
    if all(set(c.get("metrics") or {}) >= _names() for c in cases if c.get("status") == "measured"):
        return report
    out = dict(report)
    out["cases"] = [{**c, "metrics": case_values(c)} if c.get("status") == "measured" else c for c in cases]
    return out


def _names() -> set[str]:
    from efficiency.metrics import NAMES

    return set(NAMES)


def upgrade(report: dict[str, Any], source: object = "report") -> dict[str, Any]:
    """The report in the current schema; raises SchemaError for a version this code cannot read."""
    version = report.get("schema_version") if isinstance(report, dict) else None
    if not isinstance(version, int) or version < 1:
        raise SchemaError(f"{source} is not a pytest-efficiency report of a readable schema version "
                          f"(schema_version {version!r}; versions 1 to {SCHEMA_VERSION} are read)")
    if version > SCHEMA_VERSION:
        raise SchemaError(f"{source} has schema version {version}; this pytest-efficiency understands "
                          f"<= {SCHEMA_VERSION}: upgrade pytest-efficiency")
    if version == SCHEMA_VERSION:
        return _refresh_metrics(report)
    out = dict(report)
    out["cases"] = [_upgrade_case_v1(c) for c in report.get("cases") or []]
    out["schema_version"] = SCHEMA_VERSION
    out["upgraded_from"] = version
    return out
