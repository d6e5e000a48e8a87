"""The HTML report: self-contained, labels its axes honestly, and renders in headless Chromium."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from efficiency.report.html import render  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "reports"
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def test_page_is_self_contained() -> None:
    page = render(load("violation"))
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "<script" not in page
    assert "1 threshold violation(s)" in page and "above the bnb4 limit of +20%" in page


def test_cost_axis_is_runtime_when_energy_is_missing_and_says_so() -> None:
    page = render(load("base"))
    assert "runtime of one perplexity pass (s) — energy not measured" in page
    assert "no powercap directory /sys/class/powercap" in page  # the reason, in the caption


def test_cost_axis_is_energy_per_token_when_measured() -> None:
    run = copy.deepcopy(load("base"))
    for c in run["cases"]:
        c["energy"].update(energy_j=40.0 * c["runtime"]["median_s"], reason=None)
        c["energy"]["j_per_token"] = c["energy"]["energy_j"] / c["perplexity"]["n_scored_tokens"]
    page = render(run)
    assert "Perplexity against energy per token (J/token)" in page and "energy not measured" not in page


def _non_white_fraction(png: Path, top: float, bottom: float) -> tuple[float, float]:
    """(fraction of non-white pixels, fraction of coloured pixels) in a horizontal band of the image."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    band = rgb[int(top * rgb.shape[0]):int(bottom * rgb.shape[0])]
    non_white = band.min(axis=2) < 235
    coloured = band.max(axis=2) - band.min(axis=2) > 60
    return float(non_white.mean()), float(coloured.mean())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render(load("violation")), encoding="utf-8")
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    whole, _ = _non_white_fraction(shot, 0.0, 1.0)
    assert whole > 0.02  # not blank
    # the plots lie between the header and the table: drawn lines, markers and bars are coloured
    non_white, coloured = _non_white_fraction(shot, 0.15, 0.9)
    assert non_white > 0.03 and coloured > 0.005
