"""A token bucket: at most `rate` starts a second, up to a second's worth (at least one) saved up
after a quiet spell. What asks and finds none waits for a later look; nothing is handed out ahead,
so nothing is held for what went away meanwhile (a queue deleted, a check made already)."""

from __future__ import annotations


class Pace:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = self._burst
        self._updated: float | None = None

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, rate: float) -> None:
        """A new rate holds from the next take, which keeps no more than its second's worth (the
        registry's rate follows the renewals it has to make)."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._rate = rate
        self._burst = max(rate, 1.0)

    def take(self, now: float) -> bool:
        """Whether one more start may be made at `now`; if so, it is counted."""
        elapsed = 0.0 if self._updated is None else max(now - self._updated, 0.0)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def doubling(failures: int, first: float, most: float) -> float:
    """The wait after `failures` failures in a row: `first`, doubling, at most `most`. The exponent is
    capped, so that a long outage cannot overflow it."""
    return float(min(first * 2 ** min(max(failures - 1, 0), 32), most))
