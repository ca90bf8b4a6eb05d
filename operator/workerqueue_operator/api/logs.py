"""Log lines about clients, throttled: a flood of one failure is counted, not printed thousands of times.

Every occurrence is counted in `workerqueue_http_problems_total{kind}`; at most one line per kind is
logged per `interval`, saying how many were left out since the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import http_exceptions

from workerqueue_operator.api import metrics as metrics_
from workerqueue_operator.core import pacedlog

PROBLEMS = "workerqueue_http_problems_total"
KINDS = ("accept_failed", "bad_request", "client_disconnected", "connections_evicted", "connections_refused",
         "http_server", "registrations_refused", "registry_unavailable", "reviews_busy", "reviews_unavailable",
         "unhandled_error", "worker_token_unseen", "workers_rejoined")
"""Every kind, shown from 0: an alert on `increase()` would miss the first of a kind never seen before."""


def what_was_wrong(exc: BaseException) -> str:
    """The first words of why aiohttp refused a request ("Invalid header value char"), never what
    follows them: the offending bytes, which may be a header holding a token. "" if it says nothing."""
    text = getattr(exc, "message", None) if isinstance(exc, http_exceptions.HttpProcessingError) else str(exc)
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not lines or lines[0].startswith(("b'", 'b"')):
        return ""
    return lines[0].rstrip(":")[:200]


class Throttled:
    def __init__(self, logger: logging.Logger, metrics: metrics_.Metrics, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._paced = pacedlog.PacedLog(logger, interval=interval, clock=clock)
        metrics.describe(PROBLEMS, "Client and upstream problems of the HTTP API by kind (each one, logged or not).",
                         kinds=KINDS)

    def log(self, level: int, kind: str, message: str, *args: Any, exc_info: Any = None) -> None:
        self._metrics.count(PROBLEMS, kind)
        self._paced.log(level, kind, message, *args, exc_info=exc_info)

    def warning(self, kind: str, message: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, message, *args)

    async def settling(self, app: object) -> AsyncIterator[None]:
        """An aiohttp cleanup context: tells, now and then, what the end of a flood left out."""
        task = asyncio.create_task(self._settle_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _settle_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._paced.settle()
