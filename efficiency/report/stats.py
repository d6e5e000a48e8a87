"""The one-sided Mann-Whitney U test on repeated rounds, written out (no scipy needed).

``U`` counts, over all (head, base) pairs, how often the head sample is larger (a tie counts one half):
``U = sum_ij [h_i > b_j] + 0.5 [h_i == b_j]``, so ``0 <= U <= n_head * n_base`` and ``E[U] = n m / 2`` when
both samples come from one distribution. ``alternative="greater"`` asks whether head values tend to be larger
(a slowdown for a time), ``"less"`` whether they tend to be smaller.

- Without ties and with ``n + m <= EXACT_MAX`` the p-value is exact: the null distribution of U is counted
  over all C(n+m, n) equally likely rankings with the recurrence f(n, m, u) = f(n-1, m, u-m) + f(n, m-1, u).
- Otherwise the normal approximation with tie correction and continuity correction:
  ``sigma^2 = n m / 12 * ((N+1) - sum(t^3 - t) / (N (N-1)))`` over tie groups of size t, ``N = n + m``.

A sample pair is too small for the test when even the most extreme ranking could not reach ``alpha``: the
smallest attainable one-sided p-value is ``1 / C(n+m, n)`` (for example 0.05 for 3 rounds against 3).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

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


@lru_cache(maxsize=256)
def _null_counts(n: int, m: int) -> tuple[int, ...]:
    """Number of rankings giving U = 0 .. n*m for n head and m base values (no ties)."""
    # row[j][u] = f(i, j, u) for the current i; f(0, j, u) = [u == 0]
    rows: list[list[int]] = [[1] for _ in range(m + 1)]
    for i in range(1, n + 1):
        new: list[list[int]] = [[1]]  # f(i, 0, .): only U = 0
        for j in range(1, m + 1):
            size = i * j + 1
            counts = [0] * size
            for u, c in enumerate(new[j - 1]):  # f(i, j-1, u): the largest value is a base value
                counts[u] += c
            for u, c in enumerate(rows[j]):  # f(i-1, j, u - j): the largest value is a head value, beats j
                counts[u + j] += c
            new.append(counts)
        rows = new
    return tuple(rows[m])


def _phi_upper(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_u(head: Sequence[float], base: Sequence[float], alternative: Alternative) -> UTest:
    n, m = len(head), len(base)
    if n == 0 or m == 0:
        raise ValueError("both samples need at least one value")
    u = u_statistic(head, base)
    values = list(head) + list(base)
    ties = [t for t in Counter(values).values() if t > 1]
    if not ties and n + m <= EXACT_MAX:
        counts = _null_counts(n, m)
        total = math.comb(n + m, n)
        k = int(round(u))
        tail = sum(counts[k:]) if alternative == "greater" else sum(counts[: k + 1])
        return UTest(u, min(1.0, tail / total), "exact", n, m)
    big_n = n + m
    tie_term = sum(t**3 - t for t in ties) / (big_n * (big_n - 1))
    var = n * m / 12.0 * ((big_n + 1) - tie_term)
    if var <= 0:  # every value equal: no evidence either way
        return UTest(u, 1.0, "normal", n, m)
    mu = n * m / 2.0
    delta = u - mu if alternative == "greater" else mu - u
    z = (delta - 0.5) / math.sqrt(var)
    return UTest(u, min(1.0, _phi_upper(z)), "normal", n, m)
