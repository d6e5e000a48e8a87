"""The terminal summary of a run (efficiency.report.render, through the view-model of efficiency.report.view)."""

from __future__ import annotations

import json
from pathlib import Path

from efficiency.report.render import terminal_table

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "reports"


def test_a_latency_prompt_shorter_than_asked_is_a_note_under_the_table() -> None:
    """The report's latency.prompt_note (the prompt capped below --eff-prefill-tokens) is said once, in the notes."""
    report = json.loads((FIXTURES / "base.json").read_text())
    note = "latency prompt of 256 tokens, not --eff-prefill-tokens 4000: capped at --eff-max-tokens 256"
    for case in report["cases"]:
        case["latency"]["prompt_note"] = note
    lines = terminal_table(report)
    assert [line for line in lines if line.endswith(note)] == [f"{report['cases'][0]['id']}: {note}"]
