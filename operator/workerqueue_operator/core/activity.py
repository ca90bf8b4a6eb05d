"""Whether this replica is the active one: the single answer every loop that changes the cluster asks.

With kopf peering, replicas write keep-alives into a shared peering object and kopf pauses its
handlers on every replica but the one with the highest priority. kopf keeps that pause to itself,
so this module reads the same peering object (through an informer) and applies the same rule: a
replica is active when no other live peer (its last keep-alive younger than its lifetime) has a
priority as high as its own. A standalone operator is always active.

The loops outside kopf's handlers (the worker supervisor, the status reconciler) check `is_active()`
before they act, forget what they hold while paused (it may be stale on resumption: kopf re-lists
then), and are told when the replica becomes active again.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from workerqueue_operator.models import times

logger = logging.getLogger(__name__)

PeeringKey = tuple[str, str]
"""(namespace, name) of a peering object; namespace "" for a ClusterKopfPeering."""
Listener = Callable[[bool], None]

DEFAULT_LIFETIME = 60
"""What kopf assumes of a peer that states no lifetime."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def blocking_peers(status: Mapping[str, Any], *, identity: str, priority: int,
                   now: datetime.datetime) -> list[str]:
    """The live peers (other than us) with a priority at least ours: any of them pauses us, as in kopf."""
    blocking = []
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            their_priority = int(info.get("priority", 0))
            lifetime = int(info.get("lifetime", DEFAULT_LIFETIME))
        except (TypeError, ValueError):
            continue
        seen = times.parse_or_none(info.get("lastseen"))
        lastseen = datetime.datetime.fromtimestamp(seen, datetime.UTC) if seen is not None else now
        if lastseen + datetime.timedelta(seconds=lifetime) > now and their_priority >= priority:
            blocking.append(peer)
    return blocking


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
        self._active = not self._expected
        self._stood_down = False

    @property
    def standalone(self) -> bool:
        return not self._expected

    def is_active(self) -> bool:
        """Computed at each call: a peer that stopped sending keep-alives expires with time alone.
        Listeners hear of a change at the next tick of `run()` (or the next peering event)."""
        return not self._stood_down and (self.standalone or self._decide(self._now())[0])

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
            self._refresh()

    def _decide(self, now: datetime.datetime) -> tuple[bool, list[str]]:
        blocking: list[str] = []
        for status in self._status.values():
            blocking += blocking_peers(status, identity=self.identity, priority=self.priority, now=now)
        # Until every peering object has been seen, kopf stays paused too.
        return self._expected <= self._status.keys() and not blocking, blocking

    def _refresh(self) -> None:
        if self.standalone and not self._stood_down:
            return
        active, blocking = (False, []) if self._stood_down else self._decide(self._now())
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
