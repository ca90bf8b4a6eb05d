"""Kubernetes Events, posted in the background so that reporting never delays the work it reports.

Bounded: Events waiting to be posted are keyed by (object, type, reason, message), so the same
Event repeated before it could be posted becomes one Event with a count, as the kubelet's own
aggregation does. When `backlog` distinct Events are waiting, a new one makes room by dropping an
Event of the namespace that has the most waiting, its oldest routine (Normal) one first. A routine
one makes room only at another namespace's routine ones; a Warning takes another namespace's
Warning's place only when no routine one waits anywhere: Warnings say what someone must fix. Drops
are counted (`dropped`, a metric) and logged at most once a minute.

Shared by namespace: Events are posted namespace by namespace in turn (Warnings first), and room is
made at the cost of the namespace with the most waiting, so that one team's flood of Events
(disconnects in a loop, a flapping Temporal) neither delays another team's Events nor has them
dropped, while a namespace alone still has the whole backlog.

Paced per object, as client-go's spam filter paces a source: a queue may get `burst` distinct Events
at once, then `rate` a second (BURST and RATE: looser than client-go's 25, then one every 5 minutes,
since each worker's start and end is an Event of its queue). Its Events report what its workers do
(one per disconnect), so without it a client calling /start and disconnect in a loop would make the
operator write an Event to the API server per call. Warnings have a pace of their own, so that such a flood of routine
Events cannot silence the Warning that says what to fix. Those over the pace are counted
(`limited`) and logged as drops are.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workerqueue_operator.core import pacedlog
from workerqueue_operator.core.workqueue import together
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources

logger = logging.getLogger(__name__)

_DEFERRED_LOOK_SECONDS = 0.25
_SETTLE_SECONDS = 10.0

EventKey = tuple[str, str, str, bool, str, str]
"""(namespace, name, uid, warning, reason, message)."""


@dataclass
class _Pending:
    involved: dict[str, Any]
    reason: str
    message: str
    warning: bool
    count: int = 1


BURST = 100
"""Distinct Events an object may get at once (Warnings and routine ones each)."""
RATE = 0.1
"""Events an object may get a second once its burst is spent: 360 an hour."""


class EventPoster:
    def __init__(self, client: client_.KubeClient, *, workers: int = 4, backlog: int = 10_000,
                 burst: int = BURST, rate: float = RATE, clock: Callable[[], float] = time.monotonic,
                 instance: str = resources.COMPONENT) -> None:
        self._client = client
        self._instance = instance
        self._workers = workers
        self._backlog = backlog
        self._burst = burst
        self._rate = rate
        self._allowances: dict[tuple[str, str, str, bool], tuple[float, float]] = {}
        """Per involved object and Warning or not: (Events it may still get, when that was reckoned)."""
        self.limited = 0
        """Events left out because their object got more than its pace allows (a metric)."""
        self.failed = 0
        """Events the API server did not take (a metric)."""
        self._log = pacedlog.PacedLog(logger)
        # Insertion-ordered, oldest first; Warnings apart, so that they are posted first and never
        # make way for routine Events.
        self._warnings: dict[EventKey, _Pending] = {}
        self._normals: dict[EventKey, _Pending] = {}
        self._turns: dict[bool, collections.OrderedDict[str, collections.deque[EventKey]]] = {
            True: collections.OrderedDict(), False: collections.OrderedDict()}
        """Warning or not -> namespaces in the order they are posted for, each its keys oldest first
        (a key dropped meanwhile is skipped when its turn comes)."""
        self._by_namespace: collections.Counter[str] = collections.Counter()
        self._wakeup = asyncio.Event()
        self._clock = clock
        self.dropped = 0
        """Events dropped because the backlog was full (a metric)."""
        self.coalesced = 0
        """Events folded into an identical one still waiting (a metric)."""
        self._dropped_logged = 0
        self._limited_logged = 0
        self._logged_at: float | None = None
        self._behind: Callable[[], bool] | None = None
        self._defer_at_most = 0.0
        self._deferred_since: float | None = None
        self._flushing = False
        self._posting = 0
        self._settled = asyncio.Event()
        """Set when nothing waits and nothing is being posted (see flush)."""

    def defer_routine(self, behind: Callable[[], bool], *, at_most: float = 60.0) -> None:
        """Routine Events wait while `behind()` says the work they report on is behind (10,000 new
        queues: their 10,000 TokenSecretCreated Events would compete with their statuses at the API
        server), for at most `at_most` seconds at a time and while the backlog is less than 90% full
        (Events then go out ahead of the new ones, which the posting workers cannot match while
        queues are made by the thousand: half full, 1,500 of those 10,000 were posted before the
        statuses were written, competing with them). Warnings never wait."""
        self._behind, self._defer_at_most = behind, at_most

    def _deferring(self) -> bool:
        # Never so long that the backlog fills and Events are dropped.
        if self._flushing or self._behind is None or self.waiting * 10 >= self._backlog * 9 or not self._behind():
            self._deferred_since = None
            return False
        now = self._clock()
        if self._deferred_since is None:
            self._deferred_since = now
        return now - self._deferred_since < self._defer_at_most

    @property
    def waiting(self) -> int:
        return len(self._warnings) + len(self._normals)

    def post(self, *, involved: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        """Queues an Event; messages never hold secret values (callers build them from names only)."""
        meta = involved["metadata"]
        key = (meta["namespace"], meta["name"], meta.get("uid", ""), warning, reason, message)
        waiting = self._warnings if warning else self._normals
        pending = waiting.get(key)
        if pending is not None:
            pending.count += 1
            self.coalesced += 1
            return
        if not self._allowed(key[:4]):
            self.limited += 1
            self._left_out(reason)
            return
        namespace = key[0]
        if self.waiting >= self._backlog:
            room = self._make_room(namespace, warning)
            if room is None:
                self._drop(reason)
                return
            self._drop(room.reason)
        waiting[key] = _Pending(involved, reason, message, warning)
        self._turns[warning].setdefault(namespace, collections.deque()).append(key)
        self._by_namespace[namespace] += 1
        self._wakeup.set()

    def _make_room(self, namespace: str, warning: bool) -> _Pending | None:
        """The Event dropped to make room for a new one of `namespace`, None if the new one is not
        worth any: taken from the namespace with the most waiting."""
        heaviest = max(self._by_namespace, key=lambda name: self._by_namespace[name])
        if self._by_namespace[namespace] >= self._by_namespace[heaviest]:
            heaviest = namespace  # a tie: the new one's own pays
        if not warning:  # a routine one makes room only at another namespace's routine ones
            return self._take_turn(False, heaviest) if heaviest != namespace else None
        dropped = self._take_turn(False, heaviest)
        if dropped is None and self._normals:  # never a Warning while a routine one waits
            oldest = next(iter(self._normals))  # its turn is skipped when it comes
            dropped = self._normals.pop(oldest)
            self._uncount(oldest[0])
        if dropped is None and heaviest != namespace:
            dropped = self._take_turn(True, heaviest)
        return dropped

    def _take_turn(self, warning: bool, namespace: str | None = None) -> _Pending | None:
        """The oldest waiting Event of the next namespace in turn (or of `namespace`), taken out."""
        turns = self._turns[warning]
        waiting = self._warnings if warning else self._normals
        while turns:
            name = namespace if namespace is not None else next(iter(turns))
            keys = turns.get(name)
            if keys is None:
                return None
            key = keys.popleft()
            if not keys:
                del turns[name]
            elif namespace is None:
                turns.move_to_end(name)  # its next one after every other namespace's
            pending = waiting.pop(key, None)
            if pending is not None:
                self._uncount(name)
                return pending
        return None

    def _uncount(self, namespace: str) -> None:
        self._by_namespace[namespace] -= 1
        if self._by_namespace[namespace] <= 0:
            del self._by_namespace[namespace]

    def _allowed(self, obj: tuple[str, str, str, bool]) -> bool:
        """Takes one of the object's allowance of Events, if it has one left."""
        now = self._clock()
        left, since = self._allowances.get(obj, (float(self._burst), now))
        left = min(float(self._burst), left + (now - since) * self._rate)
        if left < 1.0:
            self._allowances[obj] = (left, now)
            return False
        if len(self._allowances) >= 4 * self._backlog:  # objects long quiet have their whole burst: forget them
            self._allowances = {k: v for k, v in self._allowances.items()
                                if v[0] + (now - v[1]) * self._rate < self._burst}
        self._allowances[obj] = (left - 1.0, now)
        return True

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self._left_out(reason)

    def _left_out(self, reason: str) -> None:
        """Logs Events dropped or over their pace, at most once a minute."""
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= 60:
            logger.warning("dropped %d Events (the latest: %s) for a full backlog and %d over their object's pace; "
                           "%d distinct Events are waiting to be posted",
                           self.dropped - self._dropped_logged, reason, self.limited - self._limited_logged,
                           self.waiting)
            self._logged_at, self._dropped_logged, self._limited_logged = now, self.dropped, self.limited

    async def run(self) -> None:
        # together: one failing stops the others, not left posting with no owner once run() has ended.
        await together(*(self._work() for _ in range(self._workers)))

    async def flush(self, seconds: float) -> int:
        """Posts what waits, routine Events deferred too, for at most `seconds` (with `run` going on):
        a stopping operator's last Events (a worker's disconnect, a rollout's) are not lost with it.
        Returns how many were left waiting."""
        self._flushing = True
        self._wakeup.set()
        if self.waiting or self._posting:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):  # not wait_for: see _work
                    await self._settled.wait()
        return self.waiting

    def _next(self) -> _Pending | None:
        if self._warnings:
            return self._take_turn(True)
        if self._normals and not self._deferring():
            return self._take_turn(False)
        return None

    async def _work(self) -> None:
        while True:
            event = self._next()
            if event is None:
                self._wakeup.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when it is
                # cancelled just as the event is set (flush() sets it, and the poster is cancelled right
                # after), and the cancelled poster would go on for ever, the operator's stop with it.
                # Deferred routine Events: looked at again soon. Idle: what the paced log left out of
                # the last failures is told once its pace allows.
                deferred = bool(self._normals)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_DEFERRED_LOOK_SECONDS if deferred else _SETTLE_SECONDS):
                        await self._wakeup.wait()
                if not deferred:
                    self._log.settle()
                continue
            self._posting += 1
            try:
                await resources.post_event(self._client, involved=event.involved, reason=event.reason,
                                           message=event.message, warning=event.warning, count=event.count,
                                           instance=self._instance)
            except client_.ERRORS as exc:
                if isinstance(exc, client_.ApiError) and exc.namespace_terminating:
                    # In a namespace being deleted its object goes too, and so would the Event: no news.
                    logger.debug("posting Event %s failed: %s", event.reason, exc)
                else:
                    # One line every few seconds: an outage fails every Event waiting (thousands).
                    self.failed += 1
                    self._log.warning("event_post_failed", "posting Event %s failed: %s", event.reason, exc)
            finally:
                self._posting -= 1
                if not self.waiting and not self._posting:
                    self._settled.set()
