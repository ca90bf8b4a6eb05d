"""Whether this replica is the active one: the single answer every loop that changes the cluster asks.

With kopf peering, replicas write keep-alives into a shared peering object and kopf pauses its
handlers on every replica but the one with the highest priority. kopf keeps that pause to itself,
so this module reads the same peering object (through an informer) and applies the same rule: a
replica is active when no other live peer (its last keep-alive younger than its lifetime) has a
priority as high as its own. A standalone operator is always active.

The loops outside kopf's handlers (the worker supervisor, the status reconciler) check `is_active()`
before they act, forget what they hold while paused (it may be stale on resumption: kopf re-lists
then), and are told when the replica becomes active again.

A peer that only expires with time (no event says so) may as well be alive with its keep-alives held
up on their way here (a stalled watch): as kopf does, a standby takes over only once the API server,
read then, says so too.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from workerqueue_operator.models import times

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


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def live_peers(status: Mapping[str, Any], *, identity: str, now: datetime.datetime) -> dict[str, int]:
    """The live peers (other than us: their last keep-alive younger than their lifetime), by priority."""
    live = {}
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            their_priority = int(info.get("priority", 0))
            lifetime = int(info.get("lifetime", DEFAULT_LIFETIME))
        except (TypeError, ValueError):
            continue
        # In epoch seconds: a peer's entry is anyone's to write, and a datetime overflows on a year
        # 9999 or a lifetime of 10**12 (that raised, and stopped the operator at every start).
        seen = times.parse_or_none(info.get("lastseen"))
        if (seen if seen is not None else now.timestamp()) + lifetime > now.timestamp():
            live[peer] = their_priority
    return live


def blocking_peers(status: Mapping[str, Any], *, identity: str, priority: int,
                   now: datetime.datetime) -> list[str]:
    """The live peers (other than us) with a priority at least ours: any of them pauses us, as in kopf."""
    return [peer for peer, theirs in live_peers(status, identity=identity, now=now).items() if theirs >= priority]


class Activity:
    """The replica's activity, from the peering objects it belongs to (none: standalone, always active)."""

    def __init__(self, *, identity: str, priority: int, peerings: Collection[PeeringKey] = (),
                 now: Callable[[], datetime.datetime] = _utcnow) -> None:
        self.identity = identity
        self.priority = priority
        self._expected = frozenset(peerings)
        self._status: dict[PeeringKey, Mapping[str, Any]] = {}
        self._now = now
        self._listeners: list[Listener] = []
        self._lost_listeners: list[Callable[[], None]] = []
        self._peers: frozenset[str] = frozenset()
        """The other replicas live at the last decision."""
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

    def on_peer_lost(self, listener: Callable[[], None]) -> None:
        """`listener()` whenever another replica leaves the peering: stopped, or its keep-alives expired."""
        self._lost_listeners.append(listener)

    def observed(self, key: PeeringKey, body: Mapping[str, Any] | None) -> None:
        """A peering object as the watch saw it, or None when it is gone."""
        if key not in self._expected:
            return
        self._heard += 1
        if body is None:
            self._status.pop(key, None)
        else:
            status = body.get("status")
            self._status[key] = status if isinstance(status, Mapping) else {}
        self._refresh()

    async def run(self, tick: float = 0.5) -> None:
        """Notices peers expiring without any event (a SIGKILLed replica sends nothing)."""
        while True:
            await asyncio.sleep(tick if not self.standalone else 3600)
            if self._reader is not None and self._takes_over() and not await self._read_again():
                continue
            self._refresh()

    def _takes_over(self) -> bool:
        return not self._active and not self._stood_down and self._decide(self._now())[0]

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

    def _decide(self, now: datetime.datetime) -> tuple[bool, list[str]]:
        blocking: list[str] = []
        for status in self._status.values():
            blocking += blocking_peers(status, identity=self.identity, priority=self.priority, now=now)
        # Until every peering object has been seen, kopf stays paused too.
        return self._expected <= self._status.keys() and not blocking, blocking

    def _refresh(self) -> None:
        if self.standalone and not self._stood_down:
            return
        now = self._now()
        peers = frozenset(peer for status in self._status.values()
                          for peer in live_peers(status, identity=self.identity, now=now))
        lost, self._peers = self._peers - peers, peers
        if lost:
            logger.info("replica %s left the peering", ", ".join(sorted(lost)))
            for lost_listener in self._lost_listeners:
                lost_listener()
        active, blocking = (False, []) if self._stood_down else self._decide(now)
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
