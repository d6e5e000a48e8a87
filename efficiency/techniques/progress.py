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
    seconds; the first update and the one that reaches ``total`` always log. The ETA is drawn from the units after
    the first update, so from the second line on: the first units carry one-time costs (CUDA's start-up, kernel
    selection), and an eager fp16 pass on an H100 said "1/127 windows, 7s elapsed, ETA 14m25s" for a pass that
    ended 3 s later (results 5m). ``eta=False`` leaves the ETA out, for work whose units do not take alike (a
    compiling pass: its first windows carry the compilation)."""

    def __init__(
        self, log: Callable[[str], None], label: str, total: int, unit: str = "",
        *, every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic, eta: bool = True,
    ) -> None:
        self.log, self.label, self.total, self.unit = log, label, max(1, total), unit
        self.show_eta = eta
        self.every_s, self.clock = every_s, clock
        self.t0 = clock()
        self.last: float | None = None
        self.first: tuple[float, int] | None = None  # (time, units done) at the first update: the ETA's origin

    def update(self, done: int, extra: str = "") -> None:
        now = self.clock()
        final = done >= self.total
        if not final and self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.t0
        if self.first is None:
            self.first = (now, done)
        t_first, done_first = self.first
        eta = ("" if final or done <= done_first or not self.show_eta else
               f", ETA {_duration((now - t_first) * (self.total - done) / (done - done_first))}")
        unit = f" {self.unit}" if self.unit else ""
        tail = f", {extra}" if extra else ""
        self.log(f"{self.label}: {done}/{self.total}{unit} ({100 * done / self.total:.0f}%), "
                 f"{_duration(elapsed)} elapsed{eta}{tail}")
