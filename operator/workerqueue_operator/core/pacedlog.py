"""Log lines paced per kind: a flood of one failure (an API-server outage meets every worker's
Lease at once) is one line at most every `interval`, saying how many were left out since.

`settle`, called now and then, logs what the end of a flood left out: without it, a burst's last
line was its first, and the thousand that followed it went untold."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple


class _Held(NamedTuple):
    level: int
    message: str
    args: tuple[Any, ...]
    left_out: int


class PacedLog:
    def __init__(self, logger: logging.Logger, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, _Held] = {}
        """Per kind: the latest line left out, and how many were."""

    def log(self, level: int, kind: str, message: str, *args: Any, exc_info: Any = None) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            held = self._held.get(kind)
            self._held[kind] = _Held(level, message, args, 1 + (held.left_out if held else 0))
            return
        self._last[kind] = now
        held = self._held.pop(kind, None)
        if held is not None and last is not None:
            message += f" (and {held.left_out} more like it in the last {now - last:.0f}s)"
        self._logger.log(level, message, *args, exc_info=exc_info, extra={"kind": kind})

    def settle(self) -> None:
        """Logs, for each kind whose pace allows a line again, the latest line it left out, with how
        many more there were."""
        now = self._clock()
        for kind, held in list(self._held.items()):
            last = self._last[kind]
            if now - last < self._interval:
                continue
            del self._held[kind]
            self._last[kind] = now
            message = held.message
            if held.left_out > 1:
                message += f" (and {held.left_out - 1} more like it in the last {now - last:.0f}s)"
            self._logger.log(held.level, message, *held.args, extra={"kind": kind})

    def warning(self, kind: str, message: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, message, *args)
