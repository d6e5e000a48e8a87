"""Throttled progress lines with an ETA, through ``ctx.log`` (the runner writes them to the terminal)."""

from __future__ import annotations

import time
from collections.abc import Callable

# At most one line per this many seconds (plus the first and the last).
PROGRESS_EVERY_S = 5.0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, s = divmod(seconds, 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


class Progress:
    """``update(done, extra)`` logs ``label: done/total unit (pct), elapsed, ETA`` at most every ``every_s``
    seconds; the first update and the one that reaches ``total`` always log. ``eta=False`` leaves the ETA out, for
    work whose units do not take alike (a compiling pass: its first windows carry the compilation)."""

    def __init__(
        self, log: Callable[[str], None], label: str, total: int, unit: str = "",
        *, every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic, eta: bool = True,
    ) -> None:
        self.log, self.label, self.total, self.unit = log, label, max(1, total), unit
        self.show_eta = eta
        self.every_s, self.clock = every_s, clock
        self.t0 = clock()
        self.last: float | None = None

    def update(self, done: int, extra: str = "") -> None:
        now = self.clock()
        final = done >= self.total
        if not final and self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.t0
        eta = ("" if final or done <= 0 or not self.show_eta else
               f", ETA {_duration(elapsed * (self.total - done) / done)}")
        unit = f" {self.unit}" if self.unit else ""
        tail = f", {extra}" if extra else ""
        self.log(f"{self.label}: {done}/{self.total}{unit} ({100 * done / self.total:.0f}%), "
                 f"{_duration(elapsed)} elapsed{eta}{tail}")
