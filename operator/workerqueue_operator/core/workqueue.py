"""A keyed work queue, as controllers use: a key scheduled many times is processed once, never twice
at the same time, with bounded concurrency across keys, retries after failures and delayed requeues."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(
        self,
        process: Callable[[K], Awaitable[None]],
        *,
        name: str,
        concurrency: int = 8,
        retry_seconds: float = 2.0,
    ) -> None:
        self._process = process
        self._name = name
        self._retry_seconds = retry_seconds
        self._dirty: dict[K, None] = {}  # an insertion-ordered set
        self._running: set[K] = set()
        self._again: set[K] = set()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._concurrency = concurrency
        self._waiting = 0  # taken from `_dirty` by `run`, not started yet

    @property
    def behind(self) -> bool:
        """Whether keys wait for a free slot (more work than `concurrency` at once)."""
        return len(self._dirty) + self._waiting + len(self._running) > self._concurrency

    def add(self, key: K) -> None:
        self._dirty[key] = None
        self._wakeup.set()

    def add_after(self, key: K, delay: float) -> None:
        """Processes the key again after `delay` seconds (the earliest of several requests wins)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(delay, 0.0)
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                batch, self._dirty = list(self._dirty), {}
                self._waiting = len(batch)
                for key in batch:
                    if key in self._running:
                        self._waiting -= 1
                        self._again.add(key)
                        continue
                    await self._slots.acquire()
                    self._waiting -= 1
                    self._running.add(key)
                    task = asyncio.create_task(self._one(key), name=f"{self._name} {key}")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            for timer in self._timers.values():
                timer.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, key: K) -> None:
        try:
            await self._process(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one key's failure must not stop the others
            logger.warning("%s: processing %s failed, retrying in %.0fs: %s", self._name, key, self._retry_seconds, exc)
            self.add_after(key, self._retry_seconds)
        finally:
            self._running.discard(key)
            self._slots.release()
            if key in self._again:
                self._again.discard(key)
                self.add(key)
