"""Bounded resources shared by key (a namespace, say), so that one key's users cannot take them all."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Hashable


class Shares:
    """At most `share` holders at once for each key; waiters of a key wait in its own line (first
    come, first served), so that they do not stand in a line other keys' users share either."""

    def __init__(self, share: int) -> None:
        self.share = share
        self._held: dict[Hashable, tuple[asyncio.Semaphore, list[int]]] = {}
        """Key -> its turns and how many hold or wait for one (gone at none)."""

    async def take(self, key: Hashable, wait: float) -> bool:
        """Takes one of the key's share, waiting up to `wait` seconds; False if none came. Each True is
        given back (give_back)."""
        entry = self._held.get(key)
        if entry is None:
            entry = self._held[key] = (asyncio.Semaphore(self.share), [0])
        turns, users = entry
        users[0] += 1
        try:
            if not turns.locked():
                await turns.acquire()  # free: taken without a wait
                return True
            if wait > 0:
                async with asyncio.timeout(wait):
                    await turns.acquire()
                return True
        except TimeoutError:
            pass
        except BaseException:  # cancelled while it waited
            self._leave(key)
            raise
        self._leave(key)
        return False

    def give_back(self, key: Hashable) -> None:
        self._held[key][0].release()
        self._leave(key)

    def _leave(self, key: Hashable) -> None:
        users = self._held[key][1]
        users[0] -= 1
        if not users[0]:
            del self._held[key]


class FairGate:
    """At most `limit` holders at once, over all keys. While every place is taken, waiters are let in
    key by key in turn (each key's own first come, first served): one key with many waiters gets one
    turn in as many as there are keys waiting, not every turn, yet takes every place nobody else wants."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._lines: collections.OrderedDict[Hashable, collections.deque[asyncio.Future[None]]] = (
            collections.OrderedDict())

    @contextlib.asynccontextmanager
    async def turn(self, key: Hashable) -> AsyncIterator[None]:
        """A place for the block's length, however long it takes to come."""
        await self.take(key, None)
        try:
            yield
        finally:
            self._pass_on()

    async def take(self, key: Hashable, wait: float | None) -> bool:
        """A place, waiting up to `wait` seconds (0: only a free one; None: as long as it takes); False
        if none came. Each True is given back (give_back)."""
        if self._free > 0 and not self._lines:
            self._free -= 1
            return True
        if wait is not None and wait <= 0:
            return False
        admitted = asyncio.get_running_loop().create_future()
        self._lines.setdefault(key, collections.deque()).append(admitted)
        try:
            await asyncio.wait({admitted}, timeout=wait)  # never cancels it: let in at the deadline, it is in
        except BaseException:
            if admitted.done():
                self._pass_on()  # let in as it was cancelled: its place goes to the next
            else:
                self._leave(key, admitted)
            raise
        if admitted.done():
            return True
        self._leave(key, admitted)
        return False

    def _leave(self, key: Hashable, admitted: asyncio.Future[None]) -> None:
        """A waiter that gave up leaves its line now: while every place stays taken, those timing out
        would otherwise pile up until their turns came."""
        admitted.cancel()
        line = self._lines.get(key)
        if line is not None:
            with contextlib.suppress(ValueError):
                line.remove(admitted)
            if not line:
                del self._lines[key]

    def give_back(self) -> None:
        self._pass_on()

    @property
    def waiting(self) -> int:
        return sum(1 for line in self._lines.values() for admitted in line if not admitted.done())

    def _pass_on(self) -> None:
        """A place is given back: to the first waiter of the next key in turn, else kept free."""
        while self._lines:
            key, line = next(iter(self._lines.items()))
            admitted = line.popleft()
            if line:
                self._lines.move_to_end(key)  # its next waiter after every other key's first
            else:
                del self._lines[key]
            if not admitted.done():
                admitted.set_result(None)
                return
        self._free += 1
