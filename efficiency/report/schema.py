"""The JSON report: one file per run, schema-versioned.

Top level: ``schema_version``, ``status`` (running | complete | interrupted | failed), ``started_at``,
``finished_at``, ``environment`` (report/env.py), ``settings`` (workload, device, baseline, thresholds, the score
convention), ``cases`` (one dict per model x technique, built by efficiency/runner.py) and ``violations``.
Units are in the field names (``_s``, ``_j``, ``_bytes``, ``_pct``); a number that could not be measured is
``null`` next to a ``reason``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("running", "complete", "interrupted", "failed")


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
