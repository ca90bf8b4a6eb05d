"""The live-worker registry: one `coordination.k8s.io/v1` Lease per worker, in its queue's namespace.

A Lease is what the API server offers for exactly this: a holder (the worker id), a renew time and a
duration. Kept there, the registry survives operator restarts and every replica sees it through its
watch. `/start` registers, heartbeats renew, disconnect ends a registration; a worker whose
heartbeats stop for its lease duration (2.5 of its heartbeat intervals) is gone, and so is a worker
whose operator-run pod has ended. A worker's interval is the one it keeps, as its heartbeats show:
the real worker heartbeats at the pace of its own environment and ignores the one /start answers.

Writes are paced, never one per request: a heartbeat updates memory and marks the worker dirty; a
writer renews each dirty Lease at most once per heartbeat interval, within a token bucket sized by
the workers it keeps alive. So N workers cost about N / interval writes a second, and a burst of
heartbeats (or of /start calls) never becomes a burst of writes. The exception is `maxWorkers`:
there the API server must arbitrate, so /start claims a slot Lease (`<queue>-slot-<k>`) at once and
a second claimant of the same slot gets AlreadyExists (or a Conflict when taking over an expired one).

What a worker's record and its Lease hold is in leases.py; this module decides when they are written,
and leasecalls.py makes the calls that write them. The refusals of /start are refusals.py's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from workerqueue_operator.core import leasecalls, pace, pacedlog, queues, refusals
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.leases import (
    EXPIRY_INTERVALS,
    Worker,
    bounded_hostname,
    ended_on_purpose,
    first_interval,
    is_refusal,
    later,
    lease_body,
    lease_duration,
    lease_name,
    left_by_another_queue,
    paced_interval,
    queue_selector,
    slot_lease_name,
    system_info_json,
    system_pid,
    worker_from_lease,
)
from workerqueue_operator.core.pace import Pace
from workerqueue_operator.core.queues import QueueKey, QueueObject
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models import wire

logger = logging.getLogger(__name__)

CLAIM_DEADLINE_SECONDS = 10.0
"""A slot claim (maxWorkers) takes one or two API-server calls per slot tried, each within
leasecalls.API_TIMEOUT: all of them within this, or the claim fails (/start answers 503)."""
PEER_LOST_FORGIVEN_SECONDS = 60.0
"""After another replica leaves the peering (a lost node, a SIGKILL), how long the registry counts as
blind (Registry.peer_lost): heartbeats its Service still sent there were lost until its endpoints
changed (about 40-50 s for a lost node: the node monitor's grace period)."""
BLIND_FORGIVEN_SECONDS = 300.0
"""The longest stretch of a Lease watch down whose time does not count toward expiry (see Registry._blind_at)."""
PEER_LOST_QUIET_SECONDS = BLIND_FORGIVEN_SECONDS + PEER_LOST_FORGIVEN_SECONDS
"""How long no replica must leave the peering before a loss is forgiven afresh: a peer flapping every
minute or so would otherwise keep dead workers registered for good."""
CLOCK_STEP_SECONDS = 2.0
"""How far the wall clock may move against the monotonic one between two sweeps before it counts as
stepped (NTP, a VM resumed): slewing moves them apart by milliseconds a second at most."""
STALL_SECONDS = 5.0
"""Two sweeps (a second apart) this far apart mean this replica stood still: paused, suspended, its
loop blocked. The heartbeats sent meanwhile wait unread in its sockets."""
RETRY_SECONDS = 2.0
"""A registration whose write failed is written again this much later, doubling with each failure
in a row up to a quarter of its interval (so that it is renewed before it lapses; at least this),
and a delete doubling up to DELETE_RETRY_MAX_SECONDS."""
DELETE_RETRY_MAX_SECONDS = 60.0
DELETE_CONCURRENCY = 16
"""Lease deletions under way at once: a sweep after an outage may end thousands of workers together."""
WRITES_IN_FLIGHT = 32
"""The writer's Lease writes under way at once: with the deletions, at most 48 of the client's 64
connections. The others wait here, first things first (_in_write_order), not in the pool's queue: with
the API server slow (150 ms a write, 10,000 workers at 30 s), that queue grew until every call waited
seconds for a connection, and a slot's claim or a disconnect missed its bound: 503s from an API
server that answers. (TokenReviews have a pool of their own: KubeClient.lane.)"""
SHUTDOWN_DELETE_SECONDS = 2.0
"""How long a stopping replica waits for the Lease deletions under way."""
DELETE_REFUSED_TRIES = 3
"""Tries of a deletion the API server refuses outright (403, 422: RBAC, a policy): no retry mends
that, and each pending retry holds its worker. The Lease is left (an expiry's lapses: any replica
takes it as expired) and the refusal logged."""
MARKED_GRACE_SECONDS = 10.0
"""A Lease marked as its worker's end is deleted at once by the replica that marked it; one still
there this long after (that replica stopped, or its deletion failed for good) is deleted by the
active replica. Nothing else would: no replica holds its worker any more."""
DISCONNECT_WAIT_SECONDS = 8.0
"""How long a disconnect may take, its Lease's deletion waited for: the real worker gives the call
10 s. Counted from the request's arrival (time spent on its token is spent)."""
ENDED_KEPT = 10_000
"""How many ended registrations are remembered, so that a late heartbeat does not register one
ended on purpose again (see Registry.rejoin)."""


@dataclass(frozen=True)
class Bounds:
    """How many registrations /start may make, so that a client calling it in a loop meets a bound
    rather than the operator's memory limit: registrations that wait for their worker's first
    heartbeat (a real worker sends it seconds after /start), and registrations in all (a loop that
    heartbeats once per worker). Each per queue and per namespace too, so that one queue's token
    holder cannot turn away other queues' workers, nor one team with a few queues everyone else's."""

    pending: int
    pending_per_queue: int
    workers: int
    workers_per_queue: int
    pending_per_namespace: int = 1 << 62
    workers_per_namespace: int = 1 << 62

    @classmethod
    def of(cls, settings: settings_.Settings) -> Bounds:
        """The bounds the settings give (their defaults are the only ones)."""
        return cls(pending=settings.registry_max_pending, pending_per_queue=settings.registry_max_pending_per_queue,
                   workers=settings.registry_max_workers, workers_per_queue=settings.registry_max_workers_per_queue,
                   pending_per_namespace=settings.registry_max_pending_per_namespace,
                   workers_per_namespace=settings.registry_max_workers_per_namespace)


class Full(Exception):
    """A registration /start would make is over one of the Bounds: it is refused."""

    def __init__(self, *, pending: bool, scope: str, limit: int = 0) -> None:
        what = "waiting for their first heartbeat" if pending else "registered"
        # The setting that bounds it, for whoever reads the log: raise it if such numbers are meant.
        setting = "WQ_REGISTRY_MAX_" + ("PENDING" if pending else "WORKERS") + {
            "in this queue": "_PER_QUEUE", "in this namespace": "_PER_NAMESPACE"}.get(scope, "")
        super().__init__(f"too many workers {what} ({scope}: {setting}={limit})")
        self.pending = pending


class _Ended(NamedTuple):
    """How a registration ended: on purpose (a disconnect, its pod gone) or not (it expired), and
    when its worker was last heard of (None if never), to learn its pace should it come back."""

    on_purpose: bool
    heard_at: float | None
    queue: QueueKey | None = None
    since: float | None = None
    """Worker.since, for a Kubernetes identity's worker coming back."""
    hostname: str | None = None
    """Its hostname: a heartbeat seldom carries it again (system_info every 5 min at most)."""
    pid: int | None = None
    """Its process id, from system_info: with the hostname, what tells its executions from those of
    another worker on its host."""
    identity: str | None = None
    """The Kubernetes identity that registered it (Worker.identity): only it may bring it back."""


@dataclass
class _Listings:
    """A listing of a queue's Leases under way, and the future of those waiting for the next one."""

    under_way: asyncio.Future[list[dict[str, Any]]]
    following: asyncio.Future[list[dict[str, Any]]] | None = None


def _settle(future: asyncio.Future[Any], finished: asyncio.Future[Any]) -> None:
    """`future` settled as `finished` was."""
    if future.done():
        return
    if finished.cancelled():
        future.cancel()
    elif finished.exception() is not None:
        future.set_exception(finished.exception())  # type: ignore[arg-type]
    else:
        future.set_result(finished.result())


RECHECK_SECONDS = 2.0
"""A queue found full while the Lease watch is down has its Leases listed at most this often."""
RECHECKS_KEPT = 10_000
"""Queues whose last such listing is remembered; past that, forgotten all at once (a few cost a LIST more)."""


class Registry:
    def __init__(
        self,
        *,
        client: client_.KubeClient,
        events: EventPoster,
        queue_of: Callable[[QueueKey], QueueObject | None],
        active: Callable[[], bool] = lambda: True,
        watching: Callable[[], bool] = lambda: True,
        pod_interval: Callable[[QueueKey, str], float | None] = lambda queue, pod: None,
        base_write_rate: float = 20.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tick: float = 0.2,
        bounds: Bounds | None = None,
    ) -> None:
        self._client = client
        self._events = events
        self._queue_of = queue_of
        self._pod_interval = pod_interval
        self._active = active
        self._watching = watching
        """Whether the Lease watch works: it brings the renewals the other replicas write."""
        self._blind_at = 0.0
        """The last moment (clock) this replica could not see the renewals other replicas write: its
        Lease watch down (the API server out of reach, say). No Lease counts as lapsed before a whole
        lease duration from then: those renewals could not be written, or not be seen here, meanwhile.
        Forgiven for BLIND_FORGIVEN_SECONDS of a watch down at most: one down for good (its RBAC lacks
        `watch`) must not keep dead workers registered, and their slots taken, for good."""
        self._blind_since: float | None = None
        """When the Lease watch went down (clock); None while it works."""
        self._forgiven_at = 0.0
        """The _blind_at the registrations' `seen_at` were last moved to (see _sweep)."""
        self._peer_lost_until = 0.0
        """Until when (clock) the heartbeats a replica that left may have taken are forgiven (peer_lost)."""
        self._peer_lost_since = 0.0
        """When the forgiveness under way began: losses in a row (a flapping peer) extend it for
        BLIND_FORGIVEN_SECONDS at most, as a watch down is."""
        self._peer_lost_last: float | None = None
        self._base_rate = base_write_rate
        self._clock = clock
        self._monotonic = monotonic
        self._tick = tick
        self._bounds = bounds or Bounds.of(settings_.Settings())
        self._pending: dict[QueueKey, int] = {}
        """Registrations per queue that wait for their first heartbeat: each costs memory until it
        expires, so a client calling /start in a loop could otherwise grow the operator without bound."""
        self._pending_by_namespace: collections.Counter[str] = collections.Counter()
        self._by_namespace: collections.Counter[str] = collections.Counter()
        """Registrations held, by namespace."""
        self._deleting = asyncio.Semaphore(DELETE_CONCURRENCY)
        self._deletions: set[asyncio.Task[Any]] = set()
        """The tasks deleting a Lease now (see run)."""
        self._stopping = False
        self._retries: dict[tuple[str, str], tuple[asyncio.TimerHandle, Callable[[], None]]] = {}
        """Deletions that failed and wait for their retry, by Lease (namespace, name): tried once more
        when the replica stops (see run), or the Lease would hold its slot for a whole lease duration
        after a rolling update, as a live worker to the replica that lists it next."""
        self._rechecked: dict[QueueKey, float] = {}
        """When (monotonic) each queue's Leases were last listed before a 409 (see _forget_unlisted)."""
        self._marked: dict[tuple[str, str], tuple[Worker, float]] = {}
        """Leases seen marked as their worker's end and not seen deleted yet, with when (monotonic)."""
        self.pending = 0
        self.refused = 0
        """Registrations refused by the Bounds, for the metrics."""
        self._workers: dict[str, Worker] = {}
        self._by_queue: dict[QueueKey, dict[str, Worker]] = {}
        self._uids: dict[QueueKey, collections.Counter[str]] = {}
        """Per queue name: the uids of its registrations (more than one: a namesake's are among them)."""
        self._by_identity: dict[str, dict[QueueKey, dict[str, Worker]]] = {}
        """Kubernetes identity (its registrant) -> queue -> its registrations there by worker id: its
        calls to the pass-through name no queue (see queues_registered_by)."""
        self._by_lease: dict[tuple[str, str], str] = {}
        """(namespace, Lease name) -> worker id, of the workers whose Lease exists: a watch event
        names a Lease; a registration not written yet has no Lease to be named by."""
        self._expiries: dict[int, dict[str, Worker]] = {}
        """Workers (by id) by the second their registration expires (or expired, as last looked at),
        so that the sweep looks at the workers that may have expired, never at every worker. One
        forgotten leaves its second's at once: a loop of /start and disconnect kept every ended
        registration in memory until its lease would have run out (up to 750 s)."""
        self._expiry_seconds: list[int] = []
        """The keys of `_expiries`, a heap."""
        self._claiming: dict[tuple[str, str], asyncio.Future[None]] = {}
        """Slot Leases a /start here is claiming, each done when that claim is."""
        # What the writer has to do, so that a tick looks at that only, never at every worker:
        self._urgent: dict[str, Worker] = {}
        """Not written yet, or its first heartbeat not yet: a heartbeat proved these alive."""
        self._creates: dict[str, Worker] = {}
        """Registrations not written yet, oldest first."""
        self._renewals: dict[str, Worker] = {}
        """Written, with a newer heartbeat to write (at most once an interval)."""
        self._renewal_rate = 0.0
        """Sum of 1/interval over the workers that heartbeat to this replica."""
        self._pace = Pace(self.write_rate())
        self._last_sweep = float("-inf")
        self._disconnecting: dict[str, asyncio.Task[None] | None] = {}
        """Disconnects of workers not known here under way (disconnect_unseen), with the deletion of
        their Lease once begun."""
        self._swept_at: tuple[float, float] | None = None
        """(clock, monotonic) at the last sweep of run(), to tell a step or a stand-still (_mind_the_clock)."""
        self._writes: set[asyncio.Task[None]] = set()
        self._writing = 0
        """The writer's writes under way (WRITES_IN_FLIGHT)."""
        self._listeners: list[Callable[[QueueKey], None]] = []
        self._calls = leasecalls.LeaseCalls(client, clock)
        """The API-server calls that write Leases, and the count of those writes."""
        self.refusals = refusals.Refusals(
            client=client, calls=self._calls, workers_of=lambda queue: self._by_queue.get(queue, {}).values(),
            spawn=self._spawn, clock=clock, monotonic=monotonic)
        """The pods whose worker /start turned away (see Refusals.start_refused)."""
        self.heartbeats = 0
        self.rejoined = 0
        """Workers registered again from a heartbeat (see rejoin), for the metrics."""
        self._rejoining: set[str] = set()
        """Workers claiming a slot to be registered again (see rejoin_slot)."""
        self._identity_lists: dict[tuple[QueueKey, str], asyncio.Future[list[Worker]]] = {}
        """Lease lists in flight for an identity's registrations (see registrations_of)."""
        self._lease_lists: dict[QueueKey, _Listings] = {}
        """Per queue, the listing of its Leases under way, and who waits for the next: see _listed."""
        self._log = pacedlog.PacedLog(logger)
        """Failed writes and deletions: an outage fails every worker's at once, one line each a flood."""
        self._ended: dict[str, _Ended] = {}
        """Worker id -> how its registration ended, oldest first: a late heartbeat of one ended on
        purpose is no reason to register it again."""
        self._first_read: dict[tuple[str, str], tuple[str, float]] = {}
        """Slot Lease -> (the version a takeover read of it, when first): a time far ahead in it is a
        renewal at that first read, not at each (see _take_unknown)."""

    # --- fed by the Lease informer ----------------------------------------------------------------

    def subscribe(self, listener: Callable[[QueueKey], None]) -> None:
        """Call `listener(queue)` when a queue's live workers may have changed."""
        self._listeners.append(listener)

    def lease_upserted(self, body: dict[str, Any]) -> None:
        if is_refusal(body):
            self.refusals.seen(body)
            return
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        known_id = self._by_lease.get(key)
        now = self._clock()
        incoming = worker_from_lease(body, seen_at=now, now=now)
        if incoming is None:
            if known_id is not None:
                self._forget(known_id)
            return
        holder = self._workers.get(known_id) if known_id is not None and known_id != incoming.worker_id else None
        if holder is not None and ended_on_purpose(body) and not later(incoming.registered_at, holder.registered_at):
            # A Lease marked as the end of a registration older than the one filed here: the slot's
            # previous holder's, seen after the slot went to this one (the watch behind that claim's
            # answer). No takeover; a newer one's (a relist after the slot changed hands unseen) is.
            self._marked_ended(key, incoming)
            return
        if holder is not None:
            self._taken_over(holder)  # a slot taken over by another worker
        if ended_on_purpose(body):
            self._marked.setdefault(key, (incoming, self._monotonic()))
            self._marked_ended(key, incoming)
            return
        self._marked.pop(key, None)  # a slot's Lease taken by another worker since
        mine = self._workers.get(incoming.worker_id)
        if mine is None:
            ended = self._ended.get(incoming.worker_id)
            # Of this queue only: an id is a name, and another queue's registration is not this one's end.
            if ended is not None and ended.on_purpose and ended.queue == incoming.queue:
                # Ended here on purpose (a disconnect) while its Lease was written elsewhere, or one
                # that outlived a delete that failed: deleted, never revived. Nobody else would: the
                # replicas that hold it have heard of no end.
                disconnecting = incoming.worker_id in self._disconnecting
                deleting = self._spawn(self._delete_quietly(incoming, "disconnected" if disconnecting else "ended",
                                                            on_purpose=True))
                if disconnecting:
                    self._disconnecting[incoming.worker_id] = deleting
                return
            self._add(incoming)
            return
        if (mine.queue, mine.queue_uid) != (incoming.queue, incoming.queue_uid):
            # Another queue's Lease naming this id: a worker id is no secret (Events and Leases show it),
            # and whoever may write Leases in their own namespace must not take over, or keep alive for
            # good, a registration of another's queue. A worker rejoining a namesake queue is filed
            # there once its first one is gone here, at its next renewal.
            return
        if (mine.namespace, mine.lease) != key:
            # Another slot (maxWorkers): a later registration of it is where it went (it rejoined
            # there, its first slot's delete made again by whoever expired it); an earlier one is
            # that first slot, not deleted yet. One worker, one slot: never filed under both.
            if not later(incoming.registered_at, mine.registered_at):
                return
            if self._by_lease.get((mine.namespace, mine.lease)) == mine.worker_id:
                del self._by_lease[(mine.namespace, mine.lease)]
            mine.lease, mine.slot, mine.registered_at = incoming.lease, incoming.slot, incoming.registered_at
        if not mine.stored and not mine.heartbeats_here:
            # Registered here, and its Lease written first by a replica its heartbeat reached: that
            # is newer than anything here, which must not be written over it.
            self._unmark(mine)
        # Ours is at least as new as what was written, except for what other replicas heard.
        self._stored(mine)
        mine.version = incoming.version or mine.version
        mine.seen_at = min(mine.seen_at, incoming.seen_at)
        if incoming.confirmed:
            self._heard_of(mine)  # a heartbeat reached the Lease, through another replica
        if later(incoming.renewed_at, mine.renewed_at):  # not just its own write, read back rounded
            mine.renewed_at = incoming.renewed_at
            self._set_duration(mine, incoming.duration)  # the replica that heard it knows its pace
            if not mine.dirty:
                mine.status, mine.tasks_processed = incoming.status, incoming.tasks_processed
                mine.current_task_id = incoming.current_task_id
                mine.system_info = incoming.system_info or mine.system_info

    def _marked_ended(self, key: tuple[str, str], incoming: Worker) -> None:
        """A Lease marked as its worker's end: the replica that marked it deletes it next."""
        mine = self._workers.get(incoming.worker_id)
        if mine is not None:
            if (mine.namespace, mine.lease) == key:
                self._ended_elsewhere(mine, expired=False)
            return
        ended = self._ended.get(incoming.worker_id)
        if ended is None or not ended.on_purpose or ended.queue != incoming.queue:
            self._bury(incoming, on_purpose=True)

    def lease_deleted(self, key: tuple[str, str], body: dict[str, Any] | None) -> None:
        self._marked.pop(key, None)
        if body is not None and is_refusal(body):
            return  # deleted with its pod, or expired: what is remembered here expires on its own
        # How it ended, by the Lease as it was deleted: marked (ENDED_ANNOTATION), its worker's life
        # ended (a disconnect, its pod gone). Else it expired, or was not its worker's doing (the
        # garbage collector with its queue, `kubectl delete`): a live worker comes back at its next
        # heartbeat. Without the body (a relist), the same: taking an expiry for a disconnect would
        # turn a live worker away for good.
        on_purpose = body is not None and ended_on_purpose(body)
        gone = worker_from_lease(body, seen_at=0.0) if body is not None else None
        worker_id = self._by_lease.get(key)
        filed = self._workers.get(worker_id) if worker_id is not None else None
        if filed is not None and gone is not None and gone.worker_id != filed.worker_id:
            if later(gone.registered_at, filed.registered_at):
                self._taken_over(filed)  # the slot changed hands while this replica's watch was away
            # Else a slot's previous holder's Lease, its deletion seen after the slot went to the worker
            # filed here (the watch behind that claim's answer): no end of the new holder's.
            worker_id = filed = None
        if worker_id is not None:
            if filed is not None and filed.stored:
                self._ended_elsewhere(filed, expired=not on_purpose)
        elif gone is not None and on_purpose:
            # Its Lease written elsewhere, not seen here, and ended there on purpose: a registration
            # here not written yet (or to be written again) must not bring it back.
            mine = self._workers.get(gone.worker_id)
            if mine is not None and not mine.stored and (mine.namespace, mine.lease) == key:
                self._forget(mine.worker_id)
                self._bury(mine, on_purpose=True)
            elif mine is None and gone.worker_id in self._ended:
                self._bury(gone, on_purpose=True)  # taken for an expiry when a renewal found it gone

    # --- reading ----------------------------------------------------------------------------------

    def get(self, worker_id: str, *, expired: bool = False) -> Worker | None:
        """A live registration; with `expired`, also one past its lease that is not ended yet."""
        worker = self._workers.get(worker_id)
        if worker is None or (not expired and worker.expired(self._clock())):
            return None
        return worker

    def _members(self, queue: QueueKey) -> Collection[Worker]:
        """The registrations of the queue of that name that is known now: not those of a namesake it
        replaced (`kubectl replace --force`), whose Leases wait for the garbage collector. A replica
        that knows the namesake still (its watch behind) counts the new queue's all the same: they
        were made after the namesake was."""
        members = self._by_queue.get(queue, {})
        uids = self._uids.get(queue)
        known = self._queue_of(queue)
        if known is None or uids is None or (len(uids) == 1 and known.uid in uids):
            return members.values()  # no namesake among them: the common case, at no cost
        return [w for w in members.values() if not namesakes(w, known)]

    def live(self, queue: QueueKey) -> list[Worker]:
        now = self._clock()
        return sorted((w for w in self._members(queue) if not w.expired(now)), key=lambda w: w.registered_at)

    def registered_as(self, queue: QueueKey, identity: str) -> list[Worker]:
        """The live registrations a Kubernetes identity made in a queue (not a deleted namesake's)."""
        now = self._clock()
        registered = self._by_identity.get(identity, {}).get(queue, {})
        known = self._queue_of(queue) if registered else None
        return [w for w in registered.values()
                if not w.expired(now) and (known is None or not namesakes(w, known))]

    def queues_registered_by(self, identity: str) -> list[QueueKey]:
        """The queues known here in which a Kubernetes identity has live registrations (not a
        deleted namesake's). As many steps as queues it is in, usually one: called as the
        pass-through relays."""
        now = self._clock()
        found = []
        for queue, registered in self._by_identity.get(identity, {}).items():
            known = self._queue_of(queue)
            if known is not None and any(not w.expired(now) and not namesakes(w, known) for w in registered.values()):
                found.append(queue)
        return found

    async def write_now(self, worker: Worker) -> None:
        """Writes a new registration's Lease before /start answers, not in the writer's turn: for a
        worker whose later calls say nothing of which registration is theirs (a Kubernetes identity),
        every replica must find it in the API server once it calls (registrations_of). A failed
        write is retried by the writer, as any."""
        self._unmark(worker)
        worker.written_at = self._monotonic()
        if worker.held_until > worker.written_at:
            return  # under way already, or failing: retried by the writer
        await self._write(worker)

    async def registrations_of(self, queue: QueueObject, identity: str) -> list[Worker]:
        """The live registrations a Kubernetes identity made in a queue: those known here, else those
        the API server's Leases hold (a consistent read, taken in as the watch will), for a worker
        registered by another replica whose Lease this replica's watch has not brought yet. Raises
        the API error (or a timeout) when the API server cannot be asked."""
        known = self.registered_as(queue.key, identity)
        if known:
            return known
        key = (queue.key, identity)
        listing = self._identity_lists.get(key)
        if listing is None:  # one list at a time per identity and queue, whoever else asks meanwhile
            listing = asyncio.ensure_future(self._list_identity(queue, identity))
            self._identity_lists[key] = listing
            listing.add_done_callback(lambda done: self._listed_identity(key, done))
        return await asyncio.shield(listing)

    def _listed_identity(self, key: tuple[QueueKey, str], done: asyncio.Future[list[Worker]]) -> None:
        self._identity_lists.pop(key, None)
        if not done.cancelled():
            done.exception()  # told to whoever awaited it; retrieved here for the one that left

    async def _list_identity(self, queue: QueueObject, identity: str) -> list[Worker]:
        await self._take_in_listed(queue, lambda held: held.identity == identity)
        return self.registered_as(queue.key, identity)

    async def _take_in_listed(self, queue: QueueObject, wanted: Callable[[Worker], bool], *,
                              fresh: bool = False) -> None:
        """Takes in, as the watch will, the registrations of the queue the API server's Leases hold
        (a consistent read) that are `wanted`."""
        for item in await (self._list_leases(queue) if fresh else self._listed(queue)):
            held = worker_from_lease(item, seen_at=self._clock(), now=self._clock())
            if held is not None and held.queue_uid == queue.uid and wanted(held):
                self.lease_upserted(item)

    async def _listed(self, queue: QueueObject) -> list[dict[str, Any]]:
        """The queue's Leases as the API server holds them, listed after this call began (a Lease
        written a moment ago, by another replica's /start, must be in it): one listing under way per
        queue, and whoever asks meanwhile shares the one that follows it. Each heartbeat of a worker
        unknown here (a full queue's, or ids its token holder mints) was a LIST of its own, as many
        at once as there were calls."""
        lists = self._lease_lists.get(queue.key)
        if lists is None:
            listing = asyncio.ensure_future(self._list_leases(queue))
            self._lease_lists[queue.key] = _Listings(listing)
            listing.add_done_callback(lambda done: self._listing_done(queue, done))
            return await asyncio.shield(listing)
        if lists.following is None:  # begun when the one under way ends, so after this call began
            lists.following = asyncio.get_running_loop().create_future()
            lists.following.add_done_callback(lambda done: done.cancelled() or done.exception())  # one left
        return await asyncio.shield(lists.following)

    def _listing_done(self, queue: QueueObject, done: asyncio.Future[list[dict[str, Any]]]) -> None:
        if not done.cancelled():
            done.exception()  # told to whoever awaited it; retrieved here for one that left
        lists = self._lease_lists.pop(queue.key, None)
        if lists is None or lists.following is None:
            return
        following = lists.following
        listing = asyncio.ensure_future(self._list_leases(queue))
        self._lease_lists[queue.key] = _Listings(listing)
        listing.add_done_callback(lambda finished: _settle(following, finished))
        listing.add_done_callback(lambda finished: self._listing_done(queue, finished))

    async def _list_leases(self, queue: QueueObject) -> list[dict[str, Any]]:
        listed = await self._client.request("GET", resources.leases_path(queue.namespace),
                                            params={"labelSelector": queue_selector(queue.name)},
                                            timeout=leasecalls.API_TIMEOUT)
        return list(listed.get("items") or [])

    def live_count(self, queue: QueueKey) -> int:
        now = self._clock()
        return sum(1 for w in self._members(queue) if not w.expired(now))

    @property
    def total(self) -> int:
        return len(self._workers)

    @property
    def writes(self) -> int:
        """Lease writes made (creates, renewals, deletions), for the metrics."""
        return self._calls.writes

    @property
    def write_failures(self) -> int:
        """Of those, writes that did not get through (LeaseCalls.write_failures)."""
        return self._calls.write_failures

    # --- registering ------------------------------------------------------------------------------

    def _new_worker(self, queue: QueueObject, worker_id: str, *, lease: str, slot: int | None, pod: str | None,
                    hostname: str | None, system_info: wire.WorkerSystemInfo | None,
                    interval: float | None = None, identity: str | None = None) -> Worker:
        now = self._clock()
        interval = interval or self._first_interval(queue, pod)
        # A worker coming back keeps when it first registered, if known here: its own execution, taken
        # since, must stay in its view (None: unknown, no bound rather than one that hides it).
        ended = self._ended.get(worker_id)
        since = None if identity is None else now if ended is None else ended.since
        if hostname is None and ended is not None:
            hostname = ended.hostname
        held = system_info_json(system_info)
        if held is None and ended is not None and ended.pid is not None:
            held = json.dumps({"pid": ended.pid}).encode()
        return Worker(
            worker_id=worker_id, queue=queue.key, queue_uid=queue.uid, queue_id=queue.queue_id, lease=lease,
            duration=lease_duration(interval), registered_at=now,
            renewed_at=now, seen_at=now, slot=slot, pod=pod, hostname=bounded_hostname(hostname),
            system_info=held, identity=identity, since=since)

    def register(self, queue: QueueObject, worker_id: str, *, pod: str | None = None, hostname: str | None = None,
                 system_info: wire.WorkerSystemInfo | None = None, identity: str | None = None) -> Worker:
        """Registers a worker of a queue without maxWorkers; its Lease is written in the background.

        Raises Full when that would pass one of the Bounds."""
        bounds, waiting = self._bounds, self._pending.get(queue.key, 0)
        in_namespace = self._pending_by_namespace.get(queue.namespace, 0)
        scope, limit = (("in this queue", bounds.pending_per_queue) if waiting >= bounds.pending_per_queue else
                        ("in this namespace", bounds.pending_per_namespace)
                        if in_namespace >= bounds.pending_per_namespace else
                        ("in all queues", bounds.pending) if self.pending >= bounds.pending else (None, 0))
        if scope is not None:
            self.refused += 1
            raise Full(pending=True, scope=scope, limit=limit)
        self._check_room(queue)
        self._replace_pod_worker(queue.key, pod)
        worker = self._new_worker(queue, worker_id, lease=lease_name(queue.name, worker_id), slot=None, pod=pod,
                                  hostname=hostname, system_info=system_info, identity=identity)
        worker.pending = True
        self._pending[queue.key] = waiting + 1
        self._pending_by_namespace[queue.namespace] = in_namespace + 1
        self.pending += 1
        self._add(worker)
        return worker

    def may_rejoin(self, queue: QueueObject, worker_id: str, *, pod: str | None = None) -> bool:
        """Whether a worker that heartbeats while no registration of it is known here is to be
        registered again (rejoin, rejoin_slot): it expired while it could not reach the operator, or
        another replica registered it and its Lease is not seen here yet (or never written: that
        replica stopped first). The worker is alive. The caller has checked that the queue issued the id.

        Not one whose registration ended on purpose (disconnect, pod gone: a late heartbeat), nor one
        from a pod that has another worker registered. With maxWorkers, rejoin_slot asks the API
        server first about one never seen here."""
        ended = self._ended.get(worker_id)
        if (ended is not None and ended.on_purpose and ended.queue in (None, queue.key)) \
                or worker_id in self._workers or worker_id in self._rejoining:
            return False
        return pod is None or not any(w.pod == pod for w in self._members(queue.key))

    def expired_in(self, worker_id: str, identity: str) -> QueueKey | None:
        """The queue of the worker whose registration, made by `identity`, expired as this replica
        knows (None: not so): for a worker that authenticates with a Kubernetes identity, which
        names no queue, to rejoin."""
        ended = self._ended.get(worker_id)
        if ended is None or ended.on_purpose or ended.identity != identity:
            return None
        return ended.queue

    def rejoin(self, queue: QueueObject, worker_id: str, *, pod: str | None = None,
               hostname: str | None = None, identity: str | None = None) -> Worker | None:
        """Registers again, as /start would, a worker of a queue without maxWorkers that may_rejoin;
        None (nothing done) for one that may not. Raises Full over the Bounds on registrations in all
        (it heartbeats, so it never waits for a first heartbeat)."""
        if queue.spec.max_workers is not None or not self.may_rejoin(queue, worker_id, pod=pod):
            return None
        self._check_room(queue)
        interval = self._pace_since_ended(queue, worker_id, pod)
        worker = self._new_worker(queue, worker_id, lease=lease_name(queue.name, worker_id), slot=None, pod=pod,
                                  hostname=hostname, system_info=None, interval=interval, identity=identity)
        self._add(worker)
        self._rejoined(worker, queue)
        return worker

    async def rejoin_slot(self, queue: QueueObject, worker_id: str, *, pod: str | None = None,
                          hostname: str | None = None, identity: str | None = None) -> Worker | None:
        """Registers again a worker of a queue with maxWorkers that may_rejoin, in a free slot as
        /start would; None when it may not or every slot is taken (the caller tells which, having
        asked may_rejoin). Raises the API error (or a timeout) when the API server cannot be asked.

        One never seen here may hold a slot whose Lease this replica's watch has not brought yet (the
        other replica registered it): a second slot would shrink the queue. Or its expiry was seen by
        a replica gone since (a restart): refused, it would run on unlisted for the rest of its life.
        The API server's Leases tell which (a consistent read), the first registers it as they say."""
        limit = queue.spec.max_workers
        if limit is None or not self.may_rejoin(queue, worker_id, pod=pod):
            return None
        self._rejoining.add(worker_id)  # a second heartbeat meanwhile must not claim a second slot
        try:
            if worker_id not in self._ended:
                held = await self._registered_elsewhere(queue, worker_id)
                if held is not None:
                    return held
            if self._left(worker_id):
                return None
            worker = await self.claim(queue, worker_id, limit=limit, pod=pod, hostname=hostname,
                                      interval=self._pace_since_ended(queue, worker_id, pod), identity=identity)
        finally:
            self._rejoining.discard(worker_id)
        if worker is not None and self._left(worker_id):
            self.abandoned(queue, worker_id)  # its slot given back at once
            return None
        if worker is not None:
            self._rejoined(worker, queue)
        return worker

    def _left(self, worker_id: str) -> bool:
        """Whether the worker disconnected (disconnect_unseen) while its heartbeat was rejoining it."""
        ended = self._ended.get(worker_id)
        return ended is not None and ended.on_purpose

    async def _registered_elsewhere(self, queue: QueueObject, worker_id: str) -> Worker | None:
        """The worker as its Lease in the API server shows it, taken in as the watch will; None if none."""
        await self._take_in_listed(queue, lambda held: held.worker_id == worker_id)
        return self._workers.get(worker_id)

    def _check_room(self, queue: QueueObject) -> None:
        """Raises Full when one more registration would pass the Bounds on registrations in all."""
        registered = len(self._members(queue.key))  # O(1) but with a namesake's registrations among them
        bounds = self._bounds
        in_namespace = self._by_namespace.get(queue.namespace, 0)
        scope, limit = (("in this queue", bounds.workers_per_queue) if registered >= bounds.workers_per_queue else
                        ("in this namespace", bounds.workers_per_namespace)
                        if in_namespace >= bounds.workers_per_namespace else
                        ("in all queues", bounds.workers) if len(self._workers) >= bounds.workers else (None, 0))
        if scope is not None:
            self.refused += 1
            raise Full(pending=False, scope=scope, limit=limit)

    def _pace_since_ended(self, queue: QueueObject, worker_id: str, pod: str | None) -> float | None:
        """The interval a worker coming back shows by its heartbeat since the last one heard before
        its registration ended (a pace slower than 2.5 expected intervals is what ended it)."""
        ended = self._ended.get(worker_id)
        if ended is None or ended.heard_at is None:
            return None
        q, gap = queue.spec.heartbeat_interval_seconds, self._clock() - ended.heard_at
        return paced_interval(self._first_interval(queue, pod), q, gap) if gap > 0 else None

    def _first_interval(self, queue: QueueObject, pod: str | None) -> float:
        """The pace to expect of a worker before it shows its own: an operator-run pod's is what its
        environment says, which the queue's spec may no longer (its pod is not made again for that)."""
        given = self._pod_interval(queue.key, pod) if pod is not None else None
        return given if given is not None else first_interval(queue.spec.heartbeat_interval_seconds, pod=pod)

    def _rejoined(self, worker: Worker, queue: QueueObject) -> None:
        self.rejoined += 1
        ended = self._ended.get(worker.worker_id)
        if ended is not None and not ended.on_purpose:
            # Told after its WorkerExpired; a new worker's first heartbeat on another replica is not news.
            self._events.post(involved=_involved(worker, queue.name), reason="WorkerRejoined",
                              message=f"worker {worker.worker_id} sent a heartbeat after its registration "
                              "expired; registered again", warning=False)

    async def claim(self, queue: QueueObject, worker_id: str, *, limit: int, pod: str | None = None,
                    hostname: str | None = None, system_info: wire.WorkerSystemInfo | None = None,
                    interval: float | None = None, identity: str | None = None) -> Worker | None:
        """Registers a worker in one of `limit` slots, the API server arbitrating; None when all are taken.

        Raises the API error (or a timeout) when the API server cannot be asked."""
        async with asyncio.timeout(CLAIM_DEADLINE_SECONDS):
            return await self._claim(queue, worker_id, limit=limit, pod=pod, hostname=hostname,
                                     system_info=system_info, interval=interval, identity=identity)

    def abandoned(self, queue: QueueObject, worker_id: str) -> None:
        """/start gave up on a claim whose answer did not come (its deadline, a cut connection), and its
        worker exits: the API server may have made the slot Lease all the same, which nobody would
        renew, keeping others out of the slot until it expired. Remembered as ended on purpose, it is
        deleted as soon as the watch shows it here (lease_upserted), or at once if it has already.
        The id was issued by that very /start: no other worker's registration can be its."""
        shown = self._workers.get(worker_id)
        if shown is None:
            self._remember(worker_id, _Ended(on_purpose=True, heard_at=None, queue=queue.key))
            return
        self._forget(worker_id)
        self._bury(shown, on_purpose=True)
        if shown.stored:
            self._spawn(self._delete_quietly(shown, "abandoned", on_purpose=True))

    async def _claim(self, queue: QueueObject, worker_id: str, *, limit: int, pod: str | None,
                     hostname: str | None, system_info: wire.WorkerSystemInfo | None,
                     interval: float | None, identity: str | None) -> Worker | None:
        rechecked = False
        while True:
            busy: list[asyncio.Future[None]] = []
            worker = await self._claim_free(queue, worker_id, limit=limit, pod=pod, hostname=hostname,
                                            system_info=system_info, interval=interval, identity=identity,
                                            busy=busy)
            if worker is None and not busy and not rechecked and not self._watching():
                # Full as known here, with the Lease watch down: slots freed elsewhere meanwhile (their
                # workers gone, their Leases deleted) look taken, and a worker turned away exits for good.
                rechecked = True
                if await self._forget_unlisted(queue):
                    continue
            if worker is not None or not busy:
                return worker
            # Only slots another /start here is claiming are left: full only if those claims succeed
            # (one failing on the API server leaves its slot free, and this is no full queue).
            await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)

    async def _forget_unlisted(self, queue: QueueObject) -> bool:
        """Forgets, as expired, the queue's registrations stored before a listing of its Leases that the
        listing lacks (deleted by another replica while this one's watch was down); whether any was. At
        most one listing per queue every RECHECK_SECONDS (full queues get /start after /start); one that
        fails leaves the queue full as known."""
        now = self._monotonic()
        if now - self._rechecked.get(queue.key, float("-inf")) < RECHECK_SECONDS:
            return False
        if len(self._rechecked) >= RECHECKS_KEPT:
            self._rechecked.clear()
        self._rechecked[queue.key] = now
        before = {w.worker_id: w for w in self._members(queue.key) if w.stored}
        try:
            items = await self._listed(queue)
        except client_.ERRORS as exc:
            logger.debug("listing the Leases of %s/%s failed: %s", *queue.key, exc)
            return False
        listed = {str((item.get("metadata") or {}).get("name", "")) for item in items}
        gone = [w for w in before.values() if self._workers.get(w.worker_id) is w and w.lease not in listed]
        for worker in gone:
            self._ended_elsewhere(worker, expired=True)
        return bool(gone)

    async def _claim_free(self, queue: QueueObject, worker_id: str, *, limit: int, pod: str | None,
                          hostname: str | None, system_info: wire.WorkerSystemInfo | None,
                          interval: float | None, identity: str | None,
                          busy: list[asyncio.Future[None]]) -> Worker | None:
        now = self._clock()
        # Registered otherwise than in slots 0..limit-1 count too: those made before maxWorkers was set
        # (no slot), or in slots past a limit lowered since. A pod's own worker is replaced.
        others = sum(1 for w in self.live(queue.key) if w.worker_id != worker_id and (pod is None or w.pod != pod))
        if others >= limit:
            return None
        # Claims under way here are workers too once they succeed: with them, the queue may be full
        # (workers registered outside the slots leave a free slot each of those claims could not see).
        under_way = [claiming for slot in range(limit)
                     if (claiming := self._claiming.get((queue.namespace, slot_lease_name(queue.name, slot))))]
        if under_way and others + len(under_way) >= limit:
            busy.extend(under_way)
            return None
        for slot in range(limit):
            key = (queue.namespace, slot_lease_name(queue.name, slot))
            holder = self._workers.get(self._by_lease.get(key, ""))
            gone = holder is not None and namesakes(holder, queue)  # its Lease goes with its queue
            replaceable = holder is None or gone or holder.expired(now) or (pod is not None and holder.pod == pod)
            if not replaceable:
                continue
            claiming = self._claiming.get(key)
            if claiming is not None:
                busy.append(claiming)
                continue
            worker = self._new_worker(queue, worker_id, lease=key[1], slot=slot, pod=pod, hostname=hostname,
                                      system_info=system_info, interval=interval, identity=identity)
            body = lease_body(worker, queue_name=queue.name)
            claimed = self._claiming[key] = asyncio.get_running_loop().create_future()
            try:
                stored = await (self._calls.create(body) if holder is None else
                                self._replace(body, holder, expired_only=not gone and (
                                    pod is None or holder.pod != pod)))
                if stored is None and holder is None:
                    stored = await self._take_unknown(body, created_at=queue.created_at)
            finally:
                del self._claiming[key]
                claimed.set_result(None)
            if stored is None:
                own = self._workers.get(worker_id)
                if own is not None and own.slot is not None:
                    # The slot's Lease is this very worker's, alive (renewed by the other replica, whose
                    # renewal the watch has not brought here yet): taken in, it is its slot. A second
                    # one, claimed further on, would hold two.
                    return own
                continue  # somebody else was faster: try the next slot
            worker.stored, worker.dirty, worker.written_at = True, False, self._monotonic()
            worker.version = leasecalls.version(stored)
            if holder is not None:
                self._taken_over(holder)
            self._add(worker)
            self._replace_pod_worker(queue.key, pod, keep=worker_id)
            return worker
        return None

    def heartbeat(self, worker: Worker, *, status: str, tasks_processed: int, current_task_id: str | None,
                  system_info: wire.WorkerSystemInfo | None) -> bool:
        """Records a heartbeat; False, and nothing done, for a worker no longer registered here."""
        if self._workers.get(worker.worker_id) is not worker:
            return False
        now = self._clock()
        # Heard of before, and since this replica knew of it: the gap shows its pace. One that began
        # before (this replica was away, or not started yet) holds that time too, no pace of the worker's.
        if worker.heard() and worker.renewed_at >= worker.seen_at:
            queue = self._queue_of(worker.queue)
            if queue is not None:
                gap = now - worker.renewed_at
                if gap > 0:  # none after the clock stepped back: the last renewal is still to come
                    interval = paced_interval(worker.interval, queue.spec.heartbeat_interval_seconds, gap)
                    self._set_duration(worker, lease_duration(interval))
        # Always past the registration, even at the Lease's microseconds (a rejoin's comes at once):
        # other replicas tell a heartbeat by a renew time later than the acquire time.
        worker.renewed_at = max(now, worker.renewed_at + 1e-5)
        worker.status, worker.tasks_processed, worker.current_task_id = status, tasks_processed, current_task_id
        if system_info is not None:
            worker.system_info = system_info_json(system_info) or worker.system_info
            if worker.hostname is None and system_info.hostname:  # registered again by a heartbeat without it
                worker.hostname = bounded_hostname(system_info.hostname)
        if not worker.heartbeats_here:
            self._renewal_rate += 1.0 / worker.interval
            self._heard_of(worker)
        worker.heartbeats_here += 1
        worker.token_refused = False
        self.heartbeats += 1
        self._mark(worker)
        return True

    def token_refused(self, worker_id: str, token_digest: bytes) -> None:
        """A call for this worker was refused for its token (see Worker.token_refused): noted, and told
        once, if the token is the one the worker was issued its id with (the id's MAC shows it). Anyone
        else's made-up token proves nothing about the worker."""
        worker = self._workers.get(worker_id)
        if worker is None or worker.token_refused or \
                not queues.issued_worker_id(worker_id, [token_digest], pod=worker.pod):
            return
        worker.token_refused = True
        queue = self._queue_of(worker.queue)
        if queue is not None:
            self._events.post(involved=_involved(worker, queue.name), reason="WorkerTokenRefused", warning=True,
                              message=f"worker {worker_id} is refused: the token it started with no longer opens "
                                      "the queue (revoked or rotated); it expires unless it starts again")

    async def disconnect(self, worker: Worker, *, reason: str, exit_code: int | None,
                         deadline: float | None = None) -> None:
        """Ends a registration at once; the Event says why. A failed delete is made again later.
        `deadline` (loop time): when the caller must be answered, its deletion done or not."""
        self._forget(worker.worker_id)
        self._bury(worker, on_purpose=True)
        queue = self._queue_of(worker.queue)
        if worker.stored:
            # Waited for (the other replicas learn of the end from the deletion: a replacement's
            # /start there must not meet it in maxWorkers), but within the worker's own timeout.
            deleting = self._spawn(self._delete_quietly(worker, "disconnected", on_purpose=True))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_left_until(deadline)):  # not wait_for: it may swallow a cancel
                    await asyncio.shield(deleting)
        if queue is not None:
            self._post_disconnected(_involved(worker, queue.name), worker.worker_id, reason, exit_code)

    async def disconnect_unseen(self, queue: QueueObject, worker_id: str, *, reason: str,
                                exit_code: int | None, deadline: float | None = None) -> bool:
        """Ends, at its disconnect, a worker of `queue` with no registration here: another replica
        registered it, and this one's watch has not brought its Lease yet (or it was never written:
        that replica writes in batches). Remembered first as ended on purpose, so that its Lease is
        deleted whenever it is seen here (lease_upserted), and a rejoin under way gives its slot
        back, never taken for a live worker; then its Lease is read in the API server (a consistent
        read) to be deleted now, within the worker's timeout. A read that fails leaves the deletion
        to the watch. False (nothing done) when the id is known here as another queue's (a namesake
        made again since)."""
        known = self._workers.get(worker_id)
        if known is not None:  # known meanwhile: a heartbeat rejoined it, or the watch brought it
            if known.queue_uid != queue.uid:
                return False
            await self.disconnect(known, reason=reason, exit_code=exit_code, deadline=deadline)
            return True
        if self._left(worker_id):
            return True  # told twice: ended already
        self._remember(worker_id, _Ended(True, None, queue.key))
        # Its deletion, begun when its Lease is taken in, is waited for as a known worker's is (and
        # goes before a sweep's): a replacement's /start elsewhere must not meet it in maxWorkers.
        self._disconnecting[worker_id] = None
        try:
            async with asyncio.timeout(_left_until(deadline)):
                await self._take_in_stored(queue, worker_id)
                deleting = self._disconnecting.get(worker_id)
                if deleting is not None:
                    await asyncio.shield(deleting)
        except client_.ERRORS as exc:  # a timeout among them
            logger.info("the Lease of disconnected worker %s of %s/%s not read or deleted in time (%s): deleted "
                        "once seen", worker_id, queue.namespace, queue.name, type(exc).__name__)
        finally:
            self._disconnecting.pop(worker_id, None)
        self._post_disconnected(_queue_involved(queue.name, queue.namespace, queue.uid), worker_id, reason, exit_code)
        return True

    def _post_disconnected(self, involved: dict[str, Any], worker_id: str, reason: str, exit_code: int | None) -> None:
        code = "none" if exit_code is None else str(exit_code)
        self._events.post(involved=involved, reason="WorkerDisconnected",
                          message=f"worker {worker_id} disconnected: reason {reason[:100]!r}, exit code {code}",
                          warning=exit_code not in (None, 0))

    async def _take_in_stored(self, queue: QueueObject, worker_id: str) -> None:
        """Takes in, as the watch will, the worker's Lease if the API server holds it: read by its name
        (one GET), or among the queue's slots with maxWorkers."""
        if queue.spec.max_workers is not None:
            # A listing begun after this call (_listed): a disconnect must find a Lease made a moment
            # ago, or its slot stays taken; shared, so that disconnects of made-up ids cost one at a time.
            await self._take_in_listed(queue, lambda held: held.worker_id == worker_id)
            return
        path = f"{resources.leases_path(queue.namespace)}/{lease_name(queue.name, worker_id)}"
        try:
            found = await self._client.request("GET", path, timeout=leasecalls.API_TIMEOUT)
        except client_.ApiError as exc:
            if exc.not_found:
                return
            raise
        held = worker_from_lease(found, seen_at=self._clock(), now=self._clock())
        if held is not None and held.queue_uid == queue.uid and held.worker_id == worker_id:
            self.lease_upserted(found)

    def pods_deleted(self, queue: QueueKey, uid: str, deleted: Iterable[str]) -> None:
        """Ends the registrations of the queue's (`uid`'s) workers whose pod the supervisor just deleted:
        their slots go to the pods made in their place."""
        gone = set(deleted)
        for worker in list(self._by_queue.get(queue, {}).values()):
            if worker.pod in gone and worker.queue_uid == uid:
                self._end(worker, "its pod has ended")

    def pods_ended(self, queue: QueueKey, uid: str, alive_pods: Iterable[str]) -> None:
        """Ends the registrations of the queue's (`uid`'s) workers whose pod is no longer alive: those of
        a namesake made again since were not in that queue's pod listing, and are not ended for it."""
        alive = set(alive_pods)
        for worker in list(self._by_queue.get(queue, {}).values()):
            if worker.pod is not None and worker.pod not in alive and worker.queue_uid == uid:
                self._end(worker, "its pod has ended")

    # --- background -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._tick)
                if self._monotonic() - self._last_sweep >= 1.0:
                    self._last_sweep = self._monotonic()
                    self._mind_the_clock(self._last_sweep)
                    self._sweep(ending=self._active())
                    if self._active():
                        self._delete_left_behind()
                    self._log.settle()
                    self.refusals.settle()
                self._flush()
        finally:
            # Deletions under way are let finish, briefly: a worker that said goodbye just before a
            # rolling update would otherwise hold its place (a slot) until its Lease lapsed.
            self._stopping = True  # a deletion failing now is not scheduled again
            self.refusals.stop()
            for handle, again in list(self._retries.values()):
                handle.cancel()
                again()
            self._retries.clear()
            await asyncio.sleep(0)  # each retry's task begins, and so is among the deletions waited for
            if self._deletions:
                await asyncio.wait(set(self._deletions), timeout=SHUTDOWN_DELETE_SECONDS)
            for task in list(self._writes):
                task.cancel()
            await asyncio.gather(*self._writes, return_exceptions=True)

    def write_rate(self) -> float:
        """Writes a second this replica may make: enough to renew what it keeps alive, plus a base."""
        return self._base_rate + 1.25 * max(self._renewal_rate, 0.0)

    def _delete_left_behind(self) -> None:
        """Deletes the Leases marked as their worker's end that are still there (MARKED_GRACE_SECONDS)."""
        now = self._monotonic()
        for key, (worker, seen) in list(self._marked.items()):
            if now - seen >= MARKED_GRACE_SECONDS:
                del self._marked[key]  # a deletion that fails is made again by _delete_quietly itself
                self._spawn(self._delete_quietly(worker, "ended", on_purpose=True))

    def peer_lost(self) -> None:
        """Another replica left the peering: the heartbeats its Service sent it meanwhile were lost, not
        missed by their workers, so this replica counts as blind for a while (see _blind_at). Without
        it, the replica left ended the registrations of live workers whose heartbeats went there, and
        gave their maxWorkers slots to the next /start (their heartbeats then 409 for good)."""
        now = self._clock()
        if self._peer_lost_last is None or now - self._peer_lost_last > PEER_LOST_QUIET_SECONDS:
            self._peer_lost_since = now  # a loss after a quiet spell: forgiven afresh
        self._peer_lost_last = now
        # A peer whose keep-alives come late again and again (its clock behind, a loaded API server)
        # leaves the peering again and again: that must not keep dead workers registered for good.
        self._peer_lost_until = min(now + PEER_LOST_FORGIVEN_SECONDS, self._peer_lost_since + BLIND_FORGIVEN_SECONDS)

    def _mind_the_clock(self, monotonic: float) -> None:
        """Expiry is timed by the wall clock, which other replicas and the Leases share. When it steps
        forward, or this replica stood still (its heartbeats unread meanwhile), every live worker would
        seem to have missed its heartbeats: each lease is moved on by the time lost (and a forward step
        counts as blind, _blind_at, for Leases read since). When it steps back, the times noted before
        are taken as now at most: else they would hold dead workers, and their slots, for the step."""
        wall = self._clock()
        last, self._swept_at = self._swept_at, (wall, monotonic)
        if last is None:
            return
        elapsed = monotonic - last[1]
        step = wall - last[0] - elapsed
        if step < -CLOCK_STEP_SECONDS:
            self._stepped_back(wall)
        # Each lease is moved on by the time lost, no more: a loop blocked again and again must not keep
        # a dead worker (and its slot) for good.
        lost = (step if step > CLOCK_STEP_SECONDS else 0.0) + (elapsed - 1.0 if elapsed > STALL_SECONDS else 0.0)
        if lost > 0:
            for worker in self._workers.values():
                worker.seen_at = max(worker.renewed_at, worker.seen_at) + lost
        if step > CLOCK_STEP_SECONDS:
            # Other replicas' renewals now read as older by the step: a Lease read here (a takeover)
            # counts from now. Not moved again by the sweep: the registrations here were, just above.
            self._blind_at = max(self._blind_at, wall)
            self._forgiven_at = max(self._forgiven_at, self._blind_at)
        if (abs(step) > CLOCK_STEP_SECONDS or elapsed > STALL_SECONDS) and (self._workers or self._ended):
            # A heartbeat gap across it shows no pace of the worker's.
            for worker_id, ended in self._ended.items():
                if ended.heard_at is not None:
                    self._ended[worker_id] = ended._replace(heard_at=None)
            if step < -CLOCK_STEP_SECONDS:
                self._log.warning("clock_stepped", "the clock stepped back %.1f s: times of workers noted before "
                                  "are taken as now", -step)
            else:
                what = f"the clock stepped ahead {step:.1f} s" if step > CLOCK_STEP_SECONDS else (
                    f"this replica stood still for {elapsed:.1f} s")
                self._log.warning("clock_stepped", "%s: no worker's lease counts that time as missed heartbeats",
                                  what)

    def _stepped_back(self, wall: float) -> None:
        for worker in self._workers.values():
            heard = worker.heard()
            worker.registered_at = min(worker.registered_at, wall)
            worker.renewed_at = min(worker.renewed_at, wall)
            if heard:  # a heartbeat is told by a renewal later than the registration
                worker.renewed_at = max(worker.renewed_at, worker.registered_at + 1e-5)
            # Past the last renewal, as a step ahead leaves it: the gap to the next heartbeat, short by
            # the step, is no pace of the worker's (taken for one, the worker expired before its next).
            worker.seen_at = max(min(worker.seen_at, wall), worker.renewed_at + 1e-5)
            if worker.since is not None:
                worker.since = min(worker.since, wall)
            self._unfile(worker)
            self._file_expiry(worker, worker.expires_at())
        for worker_id, ended in self._ended.items():
            if ended.since is not None and ended.since > wall:
                self._ended[worker_id] = ended._replace(since=wall)
        self._blind_at, self._forgiven_at = min(self._blind_at, wall), min(self._forgiven_at, wall)
        if self._blind_since is not None:
            self._blind_since = min(self._blind_since, wall)
        self._peer_lost_since = min(self._peer_lost_since, wall)
        if self._peer_lost_last is not None:
            self._peer_lost_last = min(self._peer_lost_last, wall)
        self._peer_lost_until = min(self._peer_lost_until, wall + PEER_LOST_FORGIVEN_SECONDS)

    def _sweep(self, *, ending: bool) -> None:
        """Expired workers: a registration never written is just forgotten (no write for a worker that
        never heartbeat); a written one's Lease is deleted by the active replica. Only the workers
        due by the time they were filed under are looked at; one renewed since is filed again."""
        now = self._clock()
        if self._watching():
            self._blind_since = None
        else:
            self._blind_since = now if self._blind_since is None else self._blind_since
            if now - self._blind_since <= BLIND_FORGIVEN_SECONDS:
                self._blind_at = now
        if now <= self._peer_lost_until:
            self._blind_at = now
        if self._blind_at > self._forgiven_at:
            # A registration with a Lease may have been renewed by another replica unseen: as the time
            # a restart took, the time this replica was blind to that does not count.
            for worker in self._workers.values():
                if worker.stored:
                    worker.seen_at = max(worker.seen_at, self._blind_at)
            self._forgiven_at = self._blind_at
        seconds = self._expiry_seconds
        while seconds and seconds[0] <= now:
            second = heapq.heappop(seconds)
            for worker in self._expiries.pop(second).values():
                if self._workers.get(worker.worker_id) is not worker or worker.filed != second:
                    continue  # forgotten meanwhile, or filed under an earlier second since (looked at then)
                worker.filed = None
                if not worker.expired(now):
                    self._file_expiry(worker, worker.expires_at())
                elif not worker.stored:
                    self._forget(worker.worker_id)
                    self._bury(worker, on_purpose=False)
                elif ending:
                    self._end(worker, "no heartbeat within its lease", on_purpose=False)
                else:
                    self._file_expiry(worker, now + 1.0)  # the active replica ends it; looked at again

    def _flush(self) -> None:
        now = self._monotonic()
        self._pace.rate = self.write_rate()
        for worker in self._in_write_order(now):
            if worker.held_until > now:  # marked in the turn its write was spawned: it follows that one
                self._unmark(worker)
                worker.dirty = True
                continue
            if self._writing >= WRITES_IN_FLIGHT or not self._pace.take(now):
                return
            self._unmark(worker)
            worker.written_at = now
            worker.held_until = math.inf  # from now, not from the task's first step
            self._writing += 1
            self._spawn(self._write(worker)).add_done_callback(self._written)

    def _written(self, _: asyncio.Task[None]) -> None:
        self._writing -= 1

    def _in_write_order(self, now: float) -> Iterator[Worker]:
        """What the writer writes, first things first: renewals of Leases that have gone unwritten
        for an interval, then workers a heartbeat proved alive (new ones, unconfirmed ones), then
        the other renewals that are due, then registrations that have not heartbeat yet, oldest first.

        The lapsing renewals lead: another replica knows a worker by its Lease alone, and expires it
        about 1.5 intervals after its last renewal. Behind a burst of new workers' first heartbeats
        (which the budget, sized for renewals, does not allow for), live workers were expired so."""
        due = sorted((w for w in self._renewals.values() if now - w.written_at >= 0.8 * w.interval),
                     key=lambda w: w.renewed_at)
        lapsing = [w for w in due if now - w.written_at >= w.interval]
        rest = [w for w in due if now - w.written_at < w.interval]
        return itertools.chain(lapsing, list(self._urgent.values()), rest, self._oldest_creates())

    def _oldest_creates(self) -> Iterator[Worker]:
        while self._creates:  # each one yielded leaves the dict before the next is asked for
            yield next(iter(self._creates.values()))

    def _mark(self, worker: Worker) -> None:
        """Something newer than the Lease is known here: queue it for the writer (once the write under
        way, or the wait after a failed one, is over: heartbeats must not add writes to a failing API
        server's load, nor race the write they would follow)."""
        worker.dirty = True
        if worker.held_until > self._monotonic():
            return
        key = worker.worker_id
        if worker.heartbeats_here and (not worker.stored or not worker.confirmed):
            self._creates.pop(key, None)
            self._renewals.pop(key, None)
            self._urgent[key] = worker
        elif not worker.stored:
            self._creates[key] = worker
        elif key not in self._urgent:
            self._renewals[key] = worker

    def _unmark(self, worker: Worker) -> None:
        worker.dirty = False
        for pending in (self._urgent, self._creates, self._renewals):
            pending.pop(worker.worker_id, None)

    def _end(self, worker: Worker, why: str, *, on_purpose: bool = True) -> None:
        self._forget(worker.worker_id)
        self._bury(worker, on_purpose=on_purpose)
        if worker.stored:
            self._spawn(self._delete_quietly(worker, why, on_purpose=on_purpose))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    async def _write(self, worker: Worker) -> None:
        queue = self._queue_of(worker.queue)
        worker.held_until = math.inf
        if queue is None or queue.uid != worker.queue_uid:
            worker.held_until = 0.0
            self._forget(worker.worker_id)
            return
        try:
            failed = await self._write_lease(worker, queue)
        finally:
            worker.held_until = 0.0
        if failed:
            worker.write_failures += 1
            # Doubling, with jitter so that workers failing together (an outage) are not retried
            # together; within a quarter of the interval, so that the Lease is renewed before it lapses.
            ceiling = max(RETRY_SECONDS, worker.interval / 4)
            jitter = random.uniform(0.8, 1.0)  # noqa: S311 - no secret
            delay = pace.doubling(worker.write_failures, RETRY_SECONDS, ceiling) * jitter
            now = self._monotonic()
            worker.held_until = now + delay
            # A renewal waits on written_at, a create on the timer.
            worker.written_at = now - 0.8 * worker.interval + delay
            asyncio.get_running_loop().call_later(delay, self._retry, worker)
            return
        worker.write_failures = 0
        if worker.dirty and self._workers.get(worker.worker_id) is worker:
            self._mark(worker)  # heard of again while it was written

    async def _write_lease(self, worker: Worker, queue: QueueObject) -> bool:
        """One write of the worker's Lease; True if the API server could not be asked (to retry)."""
        body = lease_body(worker, queue_name=queue.name)
        heartbeat_written = worker.heartbeats_here > 0
        try:
            if not worker.stored:
                created = await self._calls.create(body)
                if created is not None:
                    worker.version = leasecalls.version(created)
                    if worker.worker_id not in self._workers:
                        # Ended (a disconnect, its pod gone, expired) while this create was in flight,
                        # and not deleted then, there being no Lease yet: nobody else would.
                        worker.stored = True
                        ended = self._ended.get(worker.worker_id)
                        await self._delete_quietly(worker, "ended while its registration was written",
                                                   on_purpose=ended is not None and ended.on_purpose)
                        return False
                # Written already by a replica its heartbeat reached: newer, unless one reached us too.
                elif heartbeat_written and not await self._renew(worker, body):
                    # The Lease in the way was deleted meanwhile (its expired registration's): made anew.
                    worker.dirty = True
                    return False
                self._stored(worker)
            elif not await self._renew(worker, body):
                if self._workers.get(worker.worker_id) is worker:  # the watch has not told already
                    # Deleted meanwhile by the other replica. A heartbeat was just heard here, so it
                    # is taken for an expiry there (the worker may come back); judged by that
                    # heartbeat, it would look ended on purpose, and be refused for the rest of its
                    # life. A disconnect is told by the watch, by the Lease as it was deleted.
                    self._ended_elsewhere(worker, expired=True)
                return False
            worker.confirmed = worker.confirmed or heartbeat_written
        except client_.ERRORS as exc:
            if isinstance(exc, client_.ApiError) and exc.namespace_terminating:
                # Refused until the namespace is gone, and the worker's queue with it: nothing to warn of.
                logger.debug("the registration of worker %s is not written: its namespace is being deleted",
                             worker.worker_id)
            else:
                self._log.warning("lease_write_failed", "writing the registration of worker %s failed, retrying: %s",
                                  worker.worker_id, type(exc).__name__ if not str(exc) else exc)
            return True
        except Exception:
            # A fault of this code's, or an answer no one foresaw: retried as any failure. Ended here,
            # the worker was held as "under way" for good, and its Lease never renewed again.
            self._log.log(logging.ERROR, "lease_write_error", "writing the registration of worker %s failed, "
                          "retrying", worker.worker_id, exc_info=True)
            return True
        return False

    def _retry(self, worker: Worker) -> None:
        worker.held_until = 0.0  # the wait is over, whatever the clocks of the timer and _monotonic say
        if self._workers.get(worker.worker_id) is worker:
            self._mark(worker)

    async def _delete_quietly(self, worker: Worker, why: str, *, on_purpose: bool, wait: float = RETRY_SECONDS,
                              tries: int = 1) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._deletions.add(task)
            task.add_done_callback(self._deletions.discard)
        try:
            # A disconnect's goes first: its worker waits for it, and other replicas free its slot
            # once they see it. The rest (a sweep's, thousands after an outage) a few at a time.
            async with contextlib.nullcontext() if why == "disconnected" else self._deleting:
                deleted = await self._calls.delete(worker, unless_renewed=why.startswith("no heartbeat"),
                                             mark=why if on_purpose else None)
        except Exception as exc:  # not only the API server's: whatever it is, a deletion dropped holds a slot
            if not isinstance(exc, client_.ERRORS):
                self._log.log(logging.ERROR, "lease_delete_error", "deleting the registration of worker %s "
                              "failed", worker.worker_id, exc_info=True)
            cause = type(exc).__name__ if not str(exc) else exc
            if isinstance(exc, client_.ApiError) and exc.refused and tries >= DELETE_REFUSED_TRIES:
                self._log.warning("lease_delete_refused", "deleting the registration of worker %s was refused %d "
                                  "times, given up (its Lease is left): %s", worker.worker_id, tries, cause)
                return
            # Made again until it is done: forgotten here, a Lease left behind would expire nowhere,
            # and a slot it holds (maxWorkers) would stay taken until a relist. Spread out: deletions
            # that failed together (an outage) are not all tried again in the same instant.
            wait = wait * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, no secret
            self._log.warning("lease_delete_failed", "deleting the registration of worker %s failed, again in "
                              "%.1fs: %s", worker.worker_id, wait, cause)
            if self._stopping:
                return  # its Lease lapses (README: a worker's life, 3)
            later = min(wait * 2, DELETE_RETRY_MAX_SECONDS)
            key = (worker.namespace, worker.lease)
            again = functools.partial(self._delete_again, worker, why, on_purpose, later, tries + 1)
            superseded = self._retries.pop(key, None)
            if superseded is not None:
                superseded[0].cancel()  # this one deletes the same Lease: one retry of it is enough
            self._retries[key] = (asyncio.get_running_loop().call_later(wait, again), again)
            return
        if deleted and why.startswith("no heartbeat"):
            queue = self._queue_of(worker.queue)
            if queue is not None:
                # Refused for its token, it did call: "no heartbeat" alone sends one looking for a network fault.
                what = "no heartbeat with a token that opens its queue (its calls were refused: the token was " \
                    "revoked or rotated)" if worker.token_refused else "no heartbeat"
                self._events.post(involved=_involved(worker, queue.name), reason="WorkerExpired",
                                  message=f"worker {worker.worker_id} sent {what} for {worker.duration:.0f}s; "
                                  "its registration ended", warning=True)

    def _delete_again(self, worker: Worker, why: str, on_purpose: bool, wait: float, tries: int) -> None:
        self._retries.pop((worker.namespace, worker.lease), None)
        again = self._workers.get(worker.worker_id)
        # Unless registered again meanwhile in this same Lease (a rejoin); one that rejoined into
        # another slot (maxWorkers) would otherwise hold two.
        if again is None or (again.namespace, again.lease) != (worker.namespace, worker.lease):
            self._spawn(self._delete_quietly(worker, why, on_purpose=on_purpose, wait=wait, tries=tries))

    # --- API-server writes that the registry's memory decides (the calls: leasecalls.py) -----------

    async def _renew(self, worker: Worker, body: dict[str, Any]) -> bool:
        """Writes a renewal over the Lease version known here (see LeaseCalls.renew); False if the Lease
        is gone. A worker whose slot another worker took meanwhile is let go."""
        renewal = await self._calls.renew(worker, body)
        if renewal is leasecalls.Renewal.TAKEN and self._workers.get(worker.worker_id) is worker:
            self._taken_over(worker)  # its slot went to another worker meanwhile
        return renewal is not leasecalls.Renewal.GONE

    async def _take_unknown(self, body: dict[str, Any], *, created_at: float) -> dict[str, Any] | None:
        """Takes over a slot whose Lease exists but is held by no worker known here, if that holder
        has expired: one passed over as a worker's earlier slot (see lease_upserted), left by a delete
        that a restart ended, would otherwise keep its slot taken for good."""
        current = await self._calls.read(body)
        if current is None:  # deleted since the create met it: free again
            return await self._calls.create(body)
        if left_by_another_queue(current, body, created_at=created_at):
            # Its queue deleted and this one made under its name: the garbage collector deletes the
            # Lease in a while, or never (`--cascade=orphan` leaves it without an owner). Its holder
            # is registered with no queue that exists: the slot is this queue's at once.
            return await self._calls.overwrite(body, current)
        # A time far ahead, in a version of the Lease read here for the first time: a renewal now (a
        # replica whose clock runs ahead); read again unchanged, still one made at that first read.
        now = self._clock()
        lease = (str(current["metadata"].get("namespace", "")), str(current["metadata"].get("name", "")))
        version = str(current["metadata"].get("resourceVersion", ""))
        first = self._first_read.get(lease)
        if first is None or first[0] != version:
            if len(self._first_read) >= ENDED_KEPT:
                self._first_read.clear()
            first = self._first_read[lease] = (version, now)
        found = worker_from_lease(current, seen_at=self._blind_at, now=now, far_ahead_as=first[1])  # (see _blind_at)
        if found is None:
            # Not a registration: not ours to take, unless it is this queue's slot with its holder
            # cleared (as one releases a Lease by hand): a free slot, or it would be held for good.
            return await self._calls.overwrite(body, current) if _released(current, body) else None
        ended = self._ended.get(found.worker_id)
        if ended is not None and ended.on_purpose and ended.queue == found.queue:
            # Its worker disconnected here, and its Lease's delete failed (the API server away, retried
            # later, and safe then: it deletes only a Lease its worker still holds). The slot is free:
            # a 409 now would make the worker asking exit for good.
            return await self._calls.overwrite(body, current)
        if not found.expired(now):
            self.lease_upserted(current)  # what the watch will bring: the holder is alive
            return None
        return await self._calls.overwrite(body, current)

    async def _replace(self, body: dict[str, Any], holder: Worker, *, expired_only: bool,
                       current: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Takes over a slot; None if it changed meanwhile (another claimant won) or, `expired_only`,
        if the Lease shows a renewal that keeps its holder alive (written by the other replica, which
        heard a heartbeat the watch has not brought here yet). `current`: the Lease just read, if so."""
        if current is None:
            current = await self._calls.read(body)
            if current is None:
                # Deleted by the other replica (its holder expired there, or left), and this replica's
                # watch has not told yet: the slot is free.
                return await self._calls.create(body)
        now = self._clock()
        seen = current["metadata"].get("resourceVersion") == holder.version  # (see worker_from_lease)
        stored = worker_from_lease(current, seen_at=self._blind_at, now=now,
                                   far_ahead_as=None if seen else now)  # (see _blind_at)
        if stored is None and _released(current, body):
            return await self._calls.overwrite(body, current)
        if stored is None or stored.worker_id != holder.worker_id:
            return None
        if expired_only and not stored.expired(self._clock()):
            self.lease_upserted(current)  # what the watch will bring: the holder is alive
            return None
        return await self._calls.overwrite(body, current)

    # --- memory -----------------------------------------------------------------------------------

    def _add(self, worker: Worker) -> None:
        self.refusals.registered(worker)
        previous = self._workers.get(worker.worker_id)
        if previous is not None:
            self._unfile(previous)
            _uncount(self._by_namespace, previous.namespace)
            self._unindex(previous)
        self._workers[worker.worker_id] = worker
        if worker.identity is not None:
            self._by_identity.setdefault(worker.identity, {}).setdefault(worker.queue, {})[worker.worker_id] = worker
        namespace = worker.queue[0]
        self._by_namespace[namespace] = self._by_namespace.get(namespace, 0) + 1
        members = self._by_queue.setdefault(worker.queue, {})
        replaced = members.get(worker.worker_id)
        uids = self._uids.get(worker.queue)
        if uids is None:
            uids = self._uids[worker.queue] = collections.Counter()
        if replaced is not None:
            _uncount(uids, replaced.queue_uid)
        members[worker.worker_id] = worker
        uids[worker.queue_uid] += 1
        if worker.stored:
            self._by_lease[(worker.namespace, worker.lease)] = worker.worker_id
        if worker.filed is not None:
            self._unfile(worker)  # whatever it was filed under before it was added is not looked at
        self._file_expiry(worker, worker.expires_at())
        if worker.dirty:
            self._mark(worker)
        self._notify(worker.queue)

    def _stored(self, worker: Worker) -> None:
        """The worker's Lease exists (written by us, or seen by the watch)."""
        worker.stored = True
        if self._workers.get(worker.worker_id) is worker:
            self._by_lease[(worker.namespace, worker.lease)] = worker.worker_id

    def _file_expiry(self, worker: Worker, moment: float) -> None:
        second = math.ceil(moment)
        if worker.filed is not None and worker.filed <= second:
            return  # looked at by then, and filed again if it has not expired
        if worker.filed is not None:
            self._unfile(worker)
        worker.filed = second
        bucket = self._expiries.get(second)
        if bucket is None:
            bucket = self._expiries[second] = {}
            heapq.heappush(self._expiry_seconds, second)
        bucket[worker.worker_id] = worker

    def _unfile(self, worker: Worker) -> None:
        bucket = self._expiries.get(worker.filed) if worker.filed is not None else None
        if bucket is not None and bucket.get(worker.worker_id) is worker:
            del bucket[worker.worker_id]  # an empty bucket goes when its second comes
        worker.filed = None

    def _forget(self, worker_id: str) -> None:
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        self._unfile(worker)
        _uncount(self._by_namespace, worker.namespace)
        self._unindex(worker)
        self._unmark(worker)
        if worker.heartbeats_here:
            self._renewal_rate -= 1.0 / worker.interval
        self._heard_of(worker)
        members = self._by_queue.get(worker.queue)
        if members is not None and members.pop(worker_id, None) is not None:
            _uncount(self._uids[worker.queue], worker.queue_uid)
            if not members:
                del self._by_queue[worker.queue]
                del self._uids[worker.queue]
        if self._by_lease.get((worker.namespace, worker.lease)) == worker_id:
            del self._by_lease[(worker.namespace, worker.lease)]
        self._notify(worker.queue)

    def _unindex(self, worker: Worker) -> None:
        identity = worker.identity
        by_queue = self._by_identity.get(identity) if identity is not None else None
        registered = by_queue.get(worker.queue) if by_queue is not None else None
        if identity is None or by_queue is None or registered is None or registered.pop(worker.worker_id, None) is None:
            return
        if not registered:
            del by_queue[worker.queue]
            if not by_queue:
                del self._by_identity[identity]

    def _ended_elsewhere(self, worker: Worker, *, expired: bool | None = None) -> None:
        """Its Lease was deleted by another replica: on purpose (a disconnect, its pod gone) unless it
        had expired (by the deleted Lease when known, else by what is known here)."""
        self._forget(worker.worker_id)
        lapsed = worker.expired(self._clock()) if expired is None else expired
        self._bury(worker, on_purpose=not lapsed)

    def _set_duration(self, worker: Worker, duration: float) -> None:
        """A worker's lease duration changes with the pace its heartbeats show."""
        if duration == worker.duration:
            return
        held = self._workers.get(worker.worker_id) is worker  # not one already forgotten
        if held and worker.heartbeats_here:
            self._renewal_rate += EXPIRY_INTERVALS / duration - 1.0 / worker.interval
        shorter = duration < worker.duration
        worker.duration = duration
        if held and shorter:
            self._file_expiry(worker, worker.expires_at())  # due earlier than it is filed under

    def _taken_over(self, holder: Worker) -> None:
        """Its slot went to another worker, it having expired (or its pod having a new one): ended
        not on purpose, so that it may come back (to a 409 while every slot is taken, as README says)."""
        self._forget(holder.worker_id)
        self._bury(holder, on_purpose=False)

    def _bury(self, worker: Worker, *, on_purpose: bool) -> None:
        """Remembers how a registration ended (the last ENDED_KEPT of them)."""
        self._remember(worker.worker_id, _Ended(on_purpose, worker.renewed_at if worker.heard() else None,
                                                worker.queue, worker.since, worker.hostname,
                                                system_pid(worker.system_info), worker.identity))

    def _remember(self, worker_id: str, ended: _Ended) -> None:
        self._ended.pop(worker_id, None)
        self._ended[worker_id] = ended
        while len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]

    def _heard_of(self, worker: Worker) -> None:
        """The worker no longer waits for its first heartbeat (it sent one, or it is gone)."""
        if not worker.pending:
            return
        worker.pending = False
        self.pending -= 1
        _uncount(self._pending_by_namespace, worker.namespace)
        left = self._pending[worker.queue] - 1
        if left:
            self._pending[worker.queue] = left
        else:
            del self._pending[worker.queue]

    def _replace_pod_worker(self, queue: QueueKey, pod: str | None, keep: str | None = None) -> None:
        """A pod runs one worker: a second /start from it ends the first registration."""
        if pod is None:
            return
        for worker in list(self._by_queue.get(queue, {}).values()):
            if worker.pod == pod and worker.worker_id != keep:
                self._end(worker, "replaced by a new registration from its pod")

    def _notify(self, queue: QueueKey) -> None:
        for listener in self._listeners:
            listener(queue)


def _released(current: dict[str, Any], claim: dict[str, Any]) -> bool:
    """Whether a Lease is the claimed slot's, of the same queue, with no holder: released by hand
    (the operator always writes one)."""
    return (not (current.get("spec") or {}).get("holderIdentity")
            and queues.queue_owner(current) == queues.queue_owner(claim))


def namesakes(worker: Worker, queue: QueueObject) -> bool:
    """Whether a registration filed under the queue's name is a namesake's: of another uid, made before
    the queue was. Not one made after (its queue is a later one than this replica knows yet)."""
    return worker.queue_uid != queue.uid and worker.registered_at < queue.created_at


def _uncount(uids: collections.Counter[str], uid: str) -> None:
    uids[uid] -= 1
    if uids[uid] <= 0:
        del uids[uid]


def _left_until(deadline: float | None) -> float:
    if deadline is None:
        return DISCONNECT_WAIT_SECONDS
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _involved(worker: Worker, queue_name: str) -> dict[str, Any]:
    return _queue_involved(queue_name, worker.namespace, worker.queue_uid)


def _queue_involved(name: str, namespace: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": resources.API_VERSION, "kind": "WorkerQueue",
            "metadata": {"name": name, "namespace": namespace, "uid": uid}}
