"""docs/report.schema.json describes the reports the suite writes (and the upgraded version-1 fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from efficiency import metrics
from efficiency.report.io import read

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "docs" / "report.schema.json").read_text())


def validator() -> object:
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft202012Validator(SCHEMA)


@pytest.mark.parametrize("name", ["real-cpu-0001", "base", "violation", "interrupted"])
def test_upgraded_version_1_fixtures_match_the_schema(name: str) -> None:
    report = read(REPO / "fixtures" / "reports" / f"{name}.json")
    errors = [e.message for e in validator().iter_errors(report)]  # type: ignore[attr-defined]
    assert not errors, errors[:3]


def test_a_report_written_now_matches_the_schema() -> None:
    report = read(REPO / "docs" / "results" / "arch-after-eef439b-cpu.json")
    errors = [e.message for e in validator().iter_errors(report)]  # type: ignore[attr-defined]
    assert not errors, errors[:3]
    assert set(report["cases"][0]["metrics"]) == set(metrics.NAMES)


def test_the_schema_rejects_what_it_must() -> None:
    report = read(REPO / "fixtures" / "reports" / "base.json")
    report["status"] = "done"
    assert not validator().is_valid(report)  # type: ignore[attr-defined]
