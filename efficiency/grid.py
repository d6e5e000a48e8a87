"""The model x technique grid as a test module users collect without copying it.

    pytest --eff-grid -m efficiency         # the plugin adds this module to the collected tests
    pytest --pyargs efficiency.grid          # or name it explicitly

Each case measures perplexity, runtime (pytest-benchmark rounds), energy, memory and size, compares them with
the model's baseline, scores them and fails when perplexity rises past the technique's threshold. Select cases
with -k, e.g. ``-k "smollm2-135m and bnb4"``.
"""

from __future__ import annotations

from typing import Any


def test_efficiency(eff_case: Any, eff_session: Any, benchmark: Any) -> None:
    eff_session.run_case(eff_case.model, eff_case.technique, benchmark)
