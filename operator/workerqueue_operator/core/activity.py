"""Whether this replica is the active one: the single answer every loop that changes the cluster asks.

With kopf peering, replicas write keep-alives into a shared peering object and kopf pauses its
handlers on every replica but the one with the highest priority. kopf keeps that pause to itself,
so this module reads the same peering object (through an informer) and applies the same rule: a
replica is active when no other live peer has a priority as high as its own. A standalone operator
is always active.

A peer is live while its keep-alive changed less than its lifetime ago, as this replica's own
monotonic clock measured since it saw the change (client-go's leader election measures a Lease so),
not by comparing the `lastseen` the peer wrote with this replica's wall clock, as kopf does: with the
operator's 10-s lifetime, a standby whose clock ran 8 s ahead took the active replica for dead 3 s
after each keep-alive, and one a minute ahead was active for good beside it. A peer first seen is
taken as live for one lifetime.

The loops outside kopf's handlers (the worker supervisor, the status reconciler) check `is_active()`
before they act, forget what they hold while paused (it may be stale on resumption: kopf re-lists
then), and are told when the replica becomes active again.

A peer that only expires with time (no event says so) may as well be alive with its keep-alives held
up on their way here (a stalled watch): as kopf does, a standby takes over only once the API server,
read then, says so too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

logger = logging.getLogger(__name__)

PeeringKey = tuple[str, str]
"""(namespace, name) of a peering object; namespace "" for a ClusterKopfPeering."""
Listener = Callable[[bool], None]
Reader = Callable[[PeeringKey], Awaitable[Mapping[str, Any] | None]]
"""Reads a peering object from the API server now (None: it does not exist)."""

DEFAULT_LIFETIME = 60
"""What kopf assumes of a peer that states no lifetime."""
READ_SECONDS = 5.0
"""How long a read of the peering objects before a takeover may take."""
READ_RETRY_SECONDS = 2.0
"""After such a read failed, the next one waits this long (the replica stands by meanwhile)."""


def blocking_peers(status: Mapping[str, Any], *, identity: str, priority: int,
                   ages: Mapping[str, float]) -> list[str]:
    """The live peers (other than us) with a priority at least ours: any of them pauses us, as in kopf.
    `ages`: per peer, seconds since its keep-alive was seen to change (one not in it: just seen)."""
    blocking = []
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            their_priority = int(info.get("priority", 0))
            lifetime = int(info.get("lifetime", DEFAULT_LIFETIME))
        except (TypeError, ValueError):
            continue
        if ages.get(peer, 0.0) < lifetime and their_priority >= priority:
            blocking.append(peer)
    return blocking


class Activity:
    """The replica's activity, from the peering objects it belongs to (none: standalone, always active)."""

    def __init__(self, *, identity: str, priority: int, peerings: Collection[PeeringKey] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.identity = identity
        self.priority = priority
        self._expected = frozenset(peerings)
        self._status: dict[PeeringKey, Mapping[str, Any]] = {}
        self._changed: dict[PeeringKey, dict[str, tuple[Any, float]]] = {}
        """Per peering object and peer: its keep-alive as last seen, and `clock()` when it was first seen so."""
        self._clock = clock
        self._listeners: list[Listener] = []
        self._active = not self._expected
        self._stood_down = False
        self._reader: Reader | None = None
        self._read_failed_at: float | None = None
        self._heard = 0
        """Peering events observed: a read answered after a newer event must not overwrite it."""

    @property
    def standalone(self) -> bool:
        return not self._expected

    def is_active(self) -> bool:
        """As last decided: on a peering event, or at a tick of `run()` once a peer expired (confirmed by
        a read with a reader, see `confirm_with`). Listeners hear of every change as it is decided."""
        return not self._stood_down and (self.standalone or self._active)

    def confirm_with(self, reader: Reader) -> None:
        """A takeover for a peer expired with time alone waits for `reader` to say so too."""
        self._reader = reader

    def stand_down(self) -> None:
        """The replica is stopping: it acts no more, whatever the peering says. A stopping kopf takes
        itself out of the peering object, and a replica of the highest priority would otherwise go on
        seeing nobody above it while the next one takes over (alone: while the next one starts)."""
        self._stood_down = True
        self._refresh()

    def subscribe(self, listener: Listener) -> None:
        """`listener(active)` on every change."""
        self._listeners.append(listener)

    def observed(self, key: PeeringKey, body: Mapping[str, Any] | None) -> None:
        """A peering object as the watch saw it, or None when it is gone."""
        if key not in self._expected:
            return
        self._heard += 1
        if body is None:
            self._status.pop(key, None)
            self._changed.pop(key, None)
        else:
            status = body.get("status")
            self._status[key] = status = status if isinstance(status, Mapping) else {}
            before, now = self._changed.get(key, {}), self._clock()
            changed: dict[str, tuple[Any, float]] = {}
            for peer, info in status.items():
                keepalive = info.get("lastseen") if isinstance(info, Mapping) else None
                seen = before.get(peer)
                changed[peer] = seen if seen is not None and seen[0] == keepalive else (keepalive, now)
            self._changed[key] = changed
        self._refresh()

    async def run(self, tick: float = 0.5) -> None:
        """Notices peers expiring without any event (a SIGKILLed replica sends nothing)."""
        while True:
            await asyncio.sleep(tick if not self.standalone else 3600)
            if self._reader is not None and self._takes_over() and not await self._read_again():
                continue
            self._refresh()

    def _takes_over(self) -> bool:
        return not self._active and not self._stood_down and self._decide()[0]

    async def _read_again(self) -> bool:
        """Reads every peering object anew; False (standing by) if that cannot be done now."""
        assert self._reader is not None
        loop = asyncio.get_running_loop()
        if self._read_failed_at is not None and loop.time() - self._read_failed_at < READ_RETRY_SECONDS:
            return False
        heard = self._heard
        try:
            async with asyncio.timeout(READ_SECONDS):
                read = {key: await self._reader(key) for key in sorted(self._expected)}
        except Exception as exc:  # any failure: stand by, as kopf does without news
            self._read_failed_at = loop.time()
            logger.warning("a peer's keep-alives expired, but the peering could not be read to confirm it: %s; "
                           "standing by", type(exc).__name__ if not str(exc) else exc)
            return False
        self._read_failed_at = None
        if self._heard != heard:
            return True  # the watch told newer meanwhile: decided on that
        for key, body in read.items():
            self.observed(key, body)
        return True

    def _decide(self) -> tuple[bool, list[str]]:
        blocking: list[str] = []
        now = self._clock()
        for key, status in self._status.items():
            ages = {peer: now - since for peer, (_, since) in self._changed.get(key, {}).items()}
            blocking += blocking_peers(status, identity=self.identity, priority=self.priority, ages=ages)
        # Until every peering object has been seen, kopf stays paused too.
        return self._expected <= self._status.keys() and not blocking, blocking

    def _refresh(self) -> None:
        if self.standalone and not self._stood_down:
            return
        active, blocking = (False, []) if self._stood_down else self._decide()
        if active == self._active:
            return
        self._active = active
        if active:
            logger.info("this replica is now the active one (priority %d)", self.priority)
        elif self._stood_down:
            logger.info("this replica stands down: it is stopping")
        else:
            logger.info("this replica stands by: %s", ", ".join(sorted(blocking)) or "peering not seen yet")
        for listener in self._listeners:
            listener(active)
