"""Log lines about clients, throttled: a flood of one failure is counted, not printed thousands of times.

Every occurrence is counted in `workerqueue_http_problems_total{kind}`; at most one line per kind is
logged per `interval`, saying how many were left out since the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import weakref
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


_PAYLOAD_FAULTS = {
    "ContentLengthError": "the body is shorter than its Content-Length",
    "TransferEncodingError": "a malformed chunked body",
    "ContentEncodingError": "a body that is not what its Content-Encoding says",
}
"""What a body's fault is, in fixed words: aiohttp's own texts quote what the client sent (a chunk's
size line, its extension)."""


def what_was_wrong(exc: BaseException) -> str:
    """Why aiohttp refused a request, in words that never quote what the client sent ("" when there
    are none such): the client's bytes may be a header holding a token, or a URL with one. The
    C parser's (llhttp's) reasons are fixed texts, the offending bytes after a blank line; every other
    text is left out, as it may quote them anywhere."""
    if isinstance(exc, http_exceptions.LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        return f"a line over {limit} bytes" if isinstance(limit, int) else "a line too long"
    cause = exc if isinstance(exc, http_exceptions.HttpProcessingError) else exc.__cause__
    fixed = _PAYLOAD_FAULTS.get(type(cause).__name__)
    if fixed is not None:
        return fixed
    message = str(getattr(exc, "message", "") or "") if isinstance(exc, http_exceptions.HttpProcessingError) else ""
    llhttp = _LLHTTP_REASON.match(message)
    return llhttp.group(1) if llhttp else ""


_LLHTTP_REASON = re.compile(r"([A-Z][A-Za-z' -]{2,80}):\n\n  (?:b'|b\"|bytearray\()")
"""The C parser's (llhttp's) layout: a fixed reason in words, a blank line, then the bytes it read, as
a repr indented by two spaces. What the pure-Python parser quotes raw (a request target, where a bare
LF may pass) cannot take that layout: a target holds no space."""


class Throttled:
    def __init__(self, logger: logging.Logger, metrics: metrics_.Metrics, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._paced = pacedlog.PacedLog(logger, interval=interval, clock=clock)
        metrics.describe(PROBLEMS, "Client and upstream problems of the HTTP API by kind (each one, logged or not).",
                         kinds=KINDS)
        self._faults: weakref.WeakSet[BaseException] = weakref.WeakSet()

    def log(self, level: int, kind: str, message: str, *args: Any, exc_info: Any = None) -> None:
        self._metrics.count(PROBLEMS, kind)
        self._paced.log(level, kind, message, *args, exc_info=exc_info)

    def warning(self, kind: str, message: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, message, *args)

    def fault(self, exc: BaseException, kind: str, message: str, *args: Any, level: int = logging.INFO) -> None:
        """A client's fault: logged and counted once however often it is raised. A body that
        fails to decode is raised to the handler, which answers 400, and again to aiohttp, which reads
        what is left of it after the answer (to keep the connection) and logs it."""
        if exc in self._faults:
            return
        with contextlib.suppress(TypeError):  # OSError's kin take no weak reference: raised once, by the socket
            self._faults.add(exc)
        self.log(level, kind, message, *args)

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
