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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from aiohttp.resolver import ThreadedResolver

THREADS = 16
"""Lookups under way at once, all namespaces together."""
PER_NAMESPACE = 2
"""Lookups under way at once for one namespace's requests: its further ones wait (within the
request's connect timeout), and the other namespaces' are not held up."""

NAMESPACE: contextvars.ContextVar[str] = contextvars.ContextVar("upstream_lookup_namespace", default="")
"""The namespace a request to an upstream is made for, set by the pass-through for its lookups."""


class Lookups:
    """The few calls of an event loop aiohttp's ThreadedResolver makes, run on threads of their own."""

    def __init__(self, *, threads: int = THREADS, per_namespace: int = PER_NAMESPACE) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="upstream-lookup")
        self._per_namespace = per_namespace
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._users: collections.Counter[str] = collections.Counter()
        """Lookups of each namespace under way or waiting: its gate goes with the last."""

    def resolver(self) -> ThreadedResolver:
        # aiohttp's resolver turns getaddrinfo's answers into its own; given these calls for a loop's.
        return ThreadedResolver(loop=cast(asyncio.AbstractEventLoop, self))

    async def getaddrinfo(self, host: Any, port: Any, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:
        namespace = NAMESPACE.get()
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
            lookup = self._executor.submit(socket.getaddrinfo, host, port, family, type, proto, flags)
        except RuntimeError:  # shut down: the operator is stopping
            self._release(namespace, gate)
            raise OSError("the operator is stopping") from None
        lookup.add_done_callback(lambda _: _call_soon(loop, self._release, namespace, gate))
        return await asyncio.wrap_future(lookup)

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> tuple[str, str]:
        # Numeric (aiohttp asks only for an IPv6 link-local address's scope): no network, no gate.
        return await asyncio.wrap_future(self._executor.submit(socket.getnameinfo, sockaddr, flags))

    def _release(self, namespace: str, gate: asyncio.Semaphore) -> None:
        gate.release()
        self._done(namespace)

    def _done(self, namespace: str) -> None:
        self._users[namespace] -= 1
        if self._users[namespace] <= 0:
            del self._users[namespace]
            self._gates.pop(namespace, None)

    def close(self) -> None:
        # Lookups blocked in getaddrinfo end when their resolver gives up; nobody waits for them.
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """From a lookup's thread; a loop closed meanwhile (the operator stopped) has nothing to release."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)

