"""Paces a source to a fixed rate on a monotonic schedule, so the rate does not drift."""

from __future__ import annotations

import time


class Pacer:
    """Sleeps until the next slot of a fixed-period schedule (`period_s` <= 0: no pacing).

    Slots are `start + n * period`, so time spent between waits does not accumulate. A
    consumer that falls more than one period behind is re-anchored to now instead of
    being handed a burst of overdue samples.
    """

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._next: float | None = None

    def wait(self) -> None:
        if self.period_s <= 0:
            return
        now = time.monotonic()
        if self._next is None or now - self._next > self.period_s:
            self._next = now
        elif self._next > now:
            time.sleep(self._next - now)
        self._next += self.period_s

    def reset(self) -> None:
        self._next = None
