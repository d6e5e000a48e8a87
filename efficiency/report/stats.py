"""The one-sided Mann-Whitney U test (scipy.stats.mannwhitneyu) and what its sample sizes can reach.

``U`` counts, over all (head, base) pairs, how often the head value is larger (a tie counts one half), so
``0 <= U <= n_head * n_base``. ``alternative="greater"`` asks whether head values tend to be larger (a slowdown
for a time), ``"less"`` whether they tend to be smaller.

- Without ties and with ``n + m <= EXACT_MAX`` the p-value is exact (the null distribution of U over all
  C(n+m, n) equally likely rankings).
- Otherwise the normal approximation with tie correction and continuity correction.

``shift`` tests a ratio instead of equality: the head values are divided by ``shift`` before ranking, so
``alternative="greater", shift=1.05`` asks whether head is larger than base by MORE than 5%. Both samples must
then be positive (times, energies, throughputs).

A sample pair is too small for the test when even the most extreme ranking could not reach ``alpha``: the
smallest attainable one-sided p-value is ``1 / C(n+m, n)`` (for example 0.05 for 3 against 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scipy.stats import mannwhitneyu

EXACT_MAX = 60
Alternative = Literal["greater", "less"]


@dataclass(frozen=True)
class UTest:
    u: float  # U of the head sample
    p_value: float
    method: str  # "exact" | "normal"
    n_head: int
    n_base: int


def min_p_value(n_head: int, n_base: int) -> float:
    """The smallest one-sided p-value any ranking of these sample sizes can give."""
    if n_head < 1 or n_base < 1:
        return 1.0
    return 1.0 / math.comb(n_head + n_base, n_head)


def testable(n_head: int, n_base: int, alpha: float) -> bool:
    """True when the test can reach ``alpha``: at least 2 values on each side and 1 / C(n+m, n) <= alpha."""
    return n_head >= 2 and n_base >= 2 and min_p_value(n_head, n_base) <= alpha


def u_statistic(head: Sequence[float], base: Sequence[float]) -> float:
    return sum(1.0 if h > b else 0.5 if h == b else 0.0 for h in head for b in base)


def mann_whitney_u(head: Sequence[float], base: Sequence[float], alternative: Alternative,
                   shift: float = 1.0) -> UTest:
    n, m = len(head), len(base)
    if n == 0 or m == 0:
        raise ValueError("both samples need at least one value")
    if shift != 1.0:
        if shift <= 0 or min(*head, *base) <= 0:
            raise ValueError("a ratio shift needs a positive shift and positive values")
        head = [h / shift for h in head]  # ranks of h / shift against b: log h - log shift against log b
    values = [*head, *base]
    if min(values) == max(values):  # every value equal: no evidence either way
        return UTest(u_statistic(head, base), 1.0, "normal", n, m)
    ties = len(set(values)) < len(values)
    method = "exact" if not ties and n + m <= EXACT_MAX else "normal"
    result = mannwhitneyu(head, base, alternative=alternative,
                          method="exact" if method == "exact" else "asymptotic", use_continuity=True)
    return UTest(float(result.statistic), min(1.0, float(result.pvalue)), method, n, m)
