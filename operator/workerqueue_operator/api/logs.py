"""Log lines about clients, throttled: a flood of one failure is counted, not printed thousands of times.

Every occurrence is counted in `workerqueue_http_problems_total{kind}`; at most one line per kind is
logged per `interval`, saying how many were left out since the previous one.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from workerqueue_operator.api import metrics as metrics_

PROBLEMS = "workerqueue_http_problems_total"


class Throttled:
    def __init__(self, logger: logging.Logger, metrics: metrics_.Metrics, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._metrics = metrics
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = defaultdict(int)
        metrics.describe(PROBLEMS, "Client and upstream problems of the HTTP API by kind (each one, logged or not).")

    def log(self, level: int, kind: str, message: str, *args: Any, exc_info: Any = None) -> None:
        self._metrics.count(PROBLEMS, kind)
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
