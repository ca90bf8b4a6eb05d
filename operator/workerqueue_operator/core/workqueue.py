"""A keyed work queue, as controllers use: a key scheduled many times is processed once, never twice
at the same time, with bounded concurrency across keys, retries after failures and delayed requeues.

A key that keeps failing is retried ever less often (2 s doubling to a minute, as client-go's rate
limiter does), and failures are logged in one line at most every 10 s with a count: while the API
server is away, 10,000 queues must not become 5,000 requests and log lines a second."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from workerqueue_operator.core import pace
from workerqueue_operator.k8s import client as client_

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


async def together(*loops: Coroutine[Any, Any, None]) -> None:
    """Runs loops meant to run for good until the first one ends: its exception (or its return) ends
    them all and is raised, so that a loop that died never goes unnoticed behind the others."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class WorkQueue(Generic[K]):
    def __init__(
        self,
        process: Callable[[K], Awaitable[None]],
        *,
        name: str,
        concurrency: int = 8,
        retry_seconds: float = 2.0,
        max_retry_seconds: float = 60.0,
        log_every_seconds: float = 10.0,
    ) -> None:
        self._process = process
        self._name = name
        self._retry_seconds = retry_seconds
        self._max_retry_seconds = max_retry_seconds
        self._failures: dict[K, int] = {}  # consecutive failures of each failing key
        self._log_every = log_every_seconds
        self._logged: dict[bool, tuple[float | None, int]] = {}
        """Per kind (ours or the API server's): when a line was last logged, and failures since."""
        self._dirty: dict[K, None] = {}  # an insertion-ordered set
        self._running: set[K] = set()
        self._again: set[K] = set()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._concurrency = concurrency
        self._waiting = 0  # taken from `_dirty` by `run`, not started yet
        self.failed = 0
        """Keys whose processing failed, in all (a metric)."""

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
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            self.failed += 1
            delay = pace.doubling(failures, self._retry_seconds, self._max_retry_seconds)
            self._log_failure(key, delay, exc)
            self.add_after(key, delay)
        else:
            self._failures.pop(key, None)
        finally:
            self._running.discard(key)
            self._slots.release()
            if key in self._again:
                self._again.discard(key)
                self.add(key)

    def _log_failure(self, key: K, delay: float, exc: Exception) -> None:
        # Paced apart: an outage's warnings must not fold a bug's error (and its traceback) away.
        ours = not isinstance(exc, client_.ERRORS)
        now = asyncio.get_running_loop().time()
        logged_at, unlogged = self._logged.get(ours, (None, 0))
        if logged_at is not None and now - logged_at < self._log_every:
            self._logged[ours] = (logged_at, unlogged + 1)
            return
        more = ""
        if logged_at is not None and unlogged:
            more = f" (and {unlogged} more failures like it in the last {now - logged_at:.0f}s)"
        # A timeout says nothing of itself ("TimeoutError: "): its type alone then.
        said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if ours:  # a bug of ours: where it is matters
            logger.error("%s: processing %s failed, retrying in %.0fs: %s%s", self._name, key, delay, said, more,
                         exc_info=exc)
        else:  # the API server refused or is out of reach: retried, as said
            logger.warning("%s: processing %s failed, retrying in %.0fs: %s%s", self._name, key, delay, said, more)
        self._logged[ours] = (now, 0)
