"""Start times handed out at a bounded rate: a load of N things to do on an outside service (checks of
10,000 queues' Temporal) spreads itself out instead of growing with N.

Virtual scheduling (GCRA): each start is given the next free slot, at most `rate` a second, with up
to a second's worth at once after a quiet spell; a start past its slot waits for it, it is not
refused, so nothing is lost, only later."""

from __future__ import annotations


class Slots:
    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate
        # How far ahead of now slots may be taken at once: a second's worth, at least one.
        self._burst = (max(rate, 1.0) - 1.0) * self._interval
        self._next = float("-inf")
        """When all slots handed out so far are paid for (the theoretical arrival time)."""

    def take(self, now: float) -> float:
        """The time, `now` or later, at which one more start may be made; that slot is taken."""
        start = max(now, self._next - self._burst)
        self._next = max(start, self._next) + self._interval
        return start
