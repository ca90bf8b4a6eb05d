"""Per-worker tokens this replica has not seen yet: held a moment rather than refused.

The supervisor makes a pod's token Secret just before the pod, and the pod's worker calls /start once
it runs. A replica whose Secret watch has not brought that Secret yet (an event still on the way, a
watch relisting or backing off) would answer 401; the worker exits on any answer but 200, and its pod
fails as if it had crashed, so a run of them could turn the queue CrashLooping. A token marked as the
operator's (workers.is_worker_token) is therefore held until the watch brings it, briefly while the
watch is well and longer while it is down; still unknown then, it is refused (401) if the watch is
well, or answered 503 if the watch is still down, since then it is this replica that does not know.
Forged tokens with the mark cost a waiting request each, never an API call: at most MAX_WAITING
wait at once, and the rest are answered at once (503: whether they are wrong is not known yet).
Once half the places are taken, an address that holds MAX_WAITING_PER_PEER of them gets no more:
one client cannot take every place from the pods whose tokens are really on their way. (Not
before: behind a service mesh's proxy, or an ingress, every pod may come from one address.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LAG_SECONDS = 2.0
"""How long a token is awaited while the Secret watch is well: a watch event's usual delay, many times over."""
DOWN_SECONDS = 15.0
"""How long it is awaited while the watch is down: a relist after a back-off, well within the worker's
60-s /start timeout."""
CALL_DOWN_SECONDS = 8.0
"""The same for a running worker's other calls (heartbeat, disconnect, executions): the real worker
gives those 10 s (httpx), and a 503 it is told beats a timeout it is left with (a disconnect lost)."""
MAX_WAITING = 256
MAX_WAITING_PER_PEER = 8
"""A pod is one address, and its worker makes one /start at a time."""
POLL_SECONDS = 0.1


class Crowded(Exception):
    """Turned away without a wait: too many unseen tokens are awaited already."""


class UnseenTokens:
    def __init__(self, current: Callable[[], bool]) -> None:
        self.current = current
        """Whether the Secret watch has every Secret made until a moment ago (listed, watching)."""
        self._lag = LAG_SECONDS
        self._down = DOWN_SECONDS
        self._call_down = CALL_DOWN_SECONDS
        self._max_waiting = MAX_WAITING
        self._max_per_peer = MAX_WAITING_PER_PEER
        self._by_peer: dict[str, int] = {}
        self.waiting = 0
        self.waited = 0
        """Requests held so far (a metric)."""

    async def until(self, lookup: Callable[[], T | None], *, peer: str = "", starting: bool = False) -> T | None:
        """What `lookup` finds (a credential; a pod's queue) once it does; None when it still does not
        after the wait. Raises Crowded when too many wait already, from everywhere or from `peer`.
        `starting`: for a /start, which its worker waits longer for than its other calls."""
        if self.waiting >= self._max_waiting or (
                self.waiting >= self._max_waiting // 2 and self._by_peer.get(peer, 0) >= self._max_per_peer):
            raise Crowded
        self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        self.waiting += 1
        self.waited += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        down = self._down if starting else self._call_down
        try:
            while True:
                await asyncio.sleep(POLL_SECONDS)
                found = lookup()
                if found is not None:
                    return found
                waited = loop.time() - started
                if waited >= (self._lag if self.current() else down):
                    return None
        finally:
            self.waiting -= 1
            left = self._by_peer.pop(peer) - 1
            if left:
                self._by_peer[peer] = left
