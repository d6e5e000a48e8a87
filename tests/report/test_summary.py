"""The Markdown summary of a run (``efficiency report --markdown``, ``$GITHUB_STEP_SUMMARY``)."""

from __future__ import annotations

import json
from pathlib import Path

from efficiency.report.summary import run_markdown

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "reports"


def test_the_score_cell_keeps_three_scores_when_they_are_not_available() -> None:
    """Before: the cell split "n/a/n/a/n/a" at every "/", printing "n / a / n / a / n / a", six values to read."""
    report = json.loads((FIXTURES / "head-slow.json").read_text())
    (row,) = [line for line in run_markdown(report) if line.startswith("| smollm2-135m-bnb8 |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[7].split(" (R-only")[0] == "n/a / n/a / n/a"
