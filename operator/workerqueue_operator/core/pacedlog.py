"""Log lines paced per kind: a flood of one failure (an API-server outage meets every worker's
Lease at once) is one line at most every `interval`, saying how many were left out since."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any


class PacedLog:
    def __init__(self, logger: logging.Logger, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = defaultdict(int)

    def log(self, level: int, kind: str, message: str, *args: Any, exc_info: Any = None) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._left_out[kind] += 1
            return
        self._last[kind] = now
        left_out = self._left_out.pop(kind, 0)
        if left_out and last is not None:
            message += f" (and {left_out} more like it in the last {now - last:.0f}s)"
        self._logger.log(level, message, *args, exc_info=exc_info, extra={"kind": kind})

    def warning(self, kind: str, message: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, message, *args)
