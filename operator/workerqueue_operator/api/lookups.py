"""Name lookups of the pass-through's upstream hosts: on threads of their own, a few per namespace.

aiohttp looks names up with getaddrinfo on the event loop's default executor (a handful of threads on
a small node), and a lookup blocks its thread until the resolver gives up, whatever timeout the
request had. A team whose queues name hosts with unresponsive DNS held every thread: every other
team's new upstream connections failed (504), and the API-server client's own lookups waited. Here
the pass-through has its own threads, and a namespace holds at most PER_NAMESPACE of them, counted
until each lookup's thread is free again, not until its request gave up on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, cast

from aiohttp.resolver import ThreadedResolver

THREADS = 16
"""Lookups under way at once, all namespaces together."""
PER_NAMESPACE = 2
"""Lookups under way at once for one namespace's requests: its further ones wait (within the
request's connect timeout), and the other namespaces' are not held up."""

CACHE_SECONDS = 10.0
"""How long a name's answer is used (aiohttp's own DNS cache keeps one as long)."""
CACHE_SIZE = 10_000
"""Answers kept at most (upstream hosts are the queues' own: one each at most)."""

NAMESPACE: contextvars.ContextVar[str] = contextvars.ContextVar("upstream_lookup_namespace", default="")
"""The namespace a request to an upstream is made for, set by the pass-through for its lookups."""


class Lookups:
    """The few calls of an event loop aiohttp's ThreadedResolver makes, run on threads of their own.

    The pass-through's pool keeps no DNS cache of its own (aiohttp's would merge two namespaces'
    lookups of one host into the first one's, and its gate): answers are kept here CACHE_SECONDS,
    and lookups under way merged per namespace and host."""

    def __init__(self, *, threads: int = THREADS, per_namespace: int = PER_NAMESPACE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="upstream-lookup")
        self._per_namespace = per_namespace
        self._clock = clock
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._users: collections.Counter[str] = collections.Counter()
        """Lookups of each namespace under way or waiting: its gate goes with the last."""
        self._answers: dict[_Asked, tuple[float, list[Any]]] = {}
        """What getaddrinfo answered, and until when (monotonic) it is used, oldest first."""
        self._flights: dict[tuple[str, _Asked], asyncio.Future[list[Any]]] = {}

    def resolver(self) -> ThreadedResolver:
        # aiohttp's resolver turns getaddrinfo's answers into its own; given these calls for a loop's.
        return ThreadedResolver(loop=cast(asyncio.AbstractEventLoop, self))

    async def getaddrinfo(self, host: Any, port: Any, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:
        asked = _Asked(host, port, family, type, proto, flags)
        answer = self._answers.get(asked)
        if answer is not None and answer[0] > self._clock():
            return answer[1]
        flight_key = (NAMESPACE.get(), asked)
        flight = self._flights.get(flight_key)
        if flight is None:
            flight = self._flights[flight_key] = asyncio.ensure_future(self._look_up(*flight_key))
            flight.add_done_callback(lambda done: self._landed(flight_key, done))
        return await asyncio.shield(flight)  # a caller that gives up leaves it to the others

    def _landed(self, flight_key: tuple[str, _Asked], done: asyncio.Future[list[Any]]) -> None:
        self._flights.pop(flight_key, None)
        if not done.cancelled():
            # Taken here: its callers may all have given up (their connect timeout), and asyncio would
            # log a failure nobody took as an ERROR with its traceback.
            done.exception()

    async def _look_up(self, namespace: str, asked: _Asked) -> list[Any]:
        gate = self._gates.get(namespace)
        if gate is None:
            gate = self._gates[namespace] = asyncio.Semaphore(self._per_namespace)
        self._users[namespace] += 1
        try:
            await gate.acquire()
        except BaseException:
            self._done(namespace)
            raise
        loop = asyncio.get_running_loop()
        try:
            lookup = self._executor.submit(socket.getaddrinfo, *asked)
        except RuntimeError:  # shut down: the operator is stopping
            self._release(namespace, gate)
            raise OSError("the operator is stopping") from None
        # Released once the thread is free, not when a caller gives up: the namespace's share is threads.
        lookup.add_done_callback(lambda _: _call_soon(loop, self._release, namespace, gate))
        answer = await asyncio.wrap_future(lookup)
        self._answers.pop(asked, None)
        self._answers[asked] = (self._clock() + CACHE_SECONDS, answer)
        if len(self._answers) > CACHE_SIZE:
            del self._answers[next(iter(self._answers))]
        return answer

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> tuple[str, str]:
        # Numeric (aiohttp asks only for an IPv6 link-local address's scope): no network, no gate.
        try:
            lookup = self._executor.submit(socket.getnameinfo, sockaddr, flags)
        except RuntimeError:
            raise OSError("the operator is stopping") from None
        return await asyncio.wrap_future(lookup)

    def _release(self, namespace: str, gate: asyncio.Semaphore) -> None:
        gate.release()
        self._done(namespace)

    def _done(self, namespace: str) -> None:
        self._users[namespace] -= 1
        if self._users[namespace] <= 0:
            del self._users[namespace]
            self._gates.pop(namespace, None)

    def close(self) -> None:
        # No new lookups; one blocked in getaddrinfo ends when its resolver gives up (Python's exit
        # waits for its thread, as it did for the default executor's).
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Asked(NamedTuple):
    host: Any
    port: Any
    family: int
    type: int
    proto: int
    flags: int


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """From a lookup's thread; a loop closed meanwhile (the operator stopped) has nothing to release."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)
