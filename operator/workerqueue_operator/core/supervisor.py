"""Carries out worker plans: lists a queue's pods, then creates, deletes, records and reports.

Fed by the queue informer (through the Store, on every replica), by kopf's pod events (which
peering pauses on a standby) and by a resync of its own: so every reconcile first asks `Activity`
whether this replica is the active one. A standby keeps track of the queues all the same, so that
it acts at once when it takes over. kopf does not watch queues: a second watch of 10,000 queues
cost as much memory and CPU as the operator's own.

It also watches each queue's Temporal task queue (`_poll`, on the active replica): TemporalReachable
and `status.temporal` for every queue, and the demand (backlog, busy pods) that sizes the pods of
scaling queues. The backlog of a scaling queue is read every `backlog_poll_seconds` while it has
work or workers, the interval doubling up to `backlog_idle_poll_seconds` while it has neither; a
changed demand reconciles the queue at once. Status is written only on change and at most every
`temporal_status_seconds` per queue (a reachability change at once).

One reconcile per queue at a time; pod names are deterministic, so a retried or concurrent create
fails with AlreadyExists instead of making a second pod (also in the moment two replicas overlap).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from workerqueue_operator.core import leases, pace, pacedlog, queues, workers
from workerqueue_operator.core import status as status_
from workerqueue_operator.core import temporal as temporal_
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.pace import Pace
from workerqueue_operator.core.queues import QueueKey, QueueObject, SecretName
from workerqueue_operator.core.reconciler import Conflicts, queue_ref_body
from workerqueue_operator.core.registry import PodListing, Registry
from workerqueue_operator.core.shares import FairGate
from workerqueue_operator.core.store import Store
from workerqueue_operator.core.workqueue import WorkQueue, together
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models import spec as spec_
from workerqueue_operator.models import times

logger = logging.getLogger(__name__)

TEMPORAL_REACHABLE = "TemporalReachable"
_TICK = 0.1
_PROBES = 16  # concurrent Temporal probes: a thousand queues must not dial a thousand connections at once


class _CredentialFailed(client_.ApiError):
    """Creating a pod's token Secret failed: said by status and reason only, as ApiError.quiet."""


def _failure(exc: Exception) -> str:
    """A failed call in a few words: the server's Status, else the error's type and text."""
    if isinstance(exc, client_.ApiError):
        return f"{exc.status} {exc.reason}: {exc.message}" if exc.message else f"{exc.status} {exc.reason}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class CreateRefusal:
    """The API server refused a queue's pod (its template, Pod Security admission, a full quota): the
    next try waits, doubling as the failures of workers do, until the spec changes or a pod is made.
    Each try writes the status and posts an Event, and the status write alone would start the next."""

    generation: int
    count: int
    retry_at: float
    message: str = ""
    """status.workers.lastError meanwhile: its first write may have met a newer copy of the queue."""

    @staticmethod
    def after(previous: CreateRefusal | None, *, generation: int, now: float, settings: settings_.Settings,
              message: str = "") -> CreateRefusal:
        count = previous.count + 1 if previous is not None and previous.generation == generation else 1
        return CreateRefusal(generation=generation, count=count, retry_at=now + workers.backoff(count, settings),
                       message=message)

    def holds(self, generation: int, now: float) -> bool:
        """Whether pods of the queue at this generation wait still (a changed spec is tried at once)."""
        return generation == self.generation and now < self.retry_at


@dataclass
class _Probe:
    """What this replica knows of one queue's Temporal task queue."""

    target: tuple[object, ...] = ()
    """Endpoint and task queue last probed: a change probes again at once."""
    generation: int = 0
    due: float = 0.0
    interval: float = 0.0
    running: bool = False
    reachable: bool | None = None
    read_generation: int = 0
    """The queue's generation when the check that found `reachable` began: what the condition says."""
    reason: str = ""
    message: str = ""
    shown: spec_.TemporalStatus | None = None
    """status.temporal as last written here, or as the watch showed it when `shown_known` was unset."""
    shown_known: bool = False
    wanted: spec_.TemporalStatus | None = None
    shown_at: float = float("-inf")
    write_failures: int = 0
    write_after: float = 0.0
    """No status write of the probe's before this (time.monotonic()): the last ones failed, and their
    retries back off rather than follow the probes (every second, for a scaling queue)."""


_LISTED = temporal_.SCAN_LIMIT
"""Running workflows of a scaling queue's task queue listed at each reading: as many as a scan reads."""


def reading(found: Sequence[temporal_.Execution], *, listed: int, read_at: float) -> workers.Demand:
    """A scaling queue's work from its running workflows as listed (at most `listed` of them): those
    no worker has taken yet wait (not one whose first task is not due yet: a cron run, a start delay,
    a retry's back-off, which is counted apart); the hosts of the others' holders are busy."""
    running = [e for e in found if e.status == "running"]
    busy = frozenset(host for e in running if (host := temporal_.host_of(e.holder)) is not None)
    # One whose holder was not read in time may wait too: counted so, not to hold a burst's scale-up
    # back; and it keeps every running pod from going meanwhile.
    waiting = sum(1 for e in running if e.holder is None and not e.delayed)
    delayed = sum(1 for e in running if e.holder is None and e.delayed)
    unread = sum(1 for e in running if e.holder_unread)
    if len(found) >= listed:
        unread += 1  # maybe cut: those left out may be held by any running pod
    return workers.Demand(backlog=waiting, busy=busy, unread=unread, delayed=delayed, read_at=read_at)


STATUS_RETRY_MAX_SECONDS = 60.0
"""The longest wait between tries of a probe's status write that keeps failing."""
ORPHAN_GRACE_SECONDS = 60.0
"""A per-worker token without its pod is deleted once it is this old (see _delete_orphan_credentials)."""


def timeline_step(probe: _Probe | None, when: float, *, show: bool) -> Literal["run", "later", "drop"]:
    """What becomes of an entry of the probe timeline that came up at `when`: "drop" when its queue
    is gone or its probe was moved to another time; "later" (the next tick) when it is the probe's
    and the probe, or a write of what it found, is under way: dropped, no probe would come due again
    and the queue's backlog would never be read again (under API-server load a status write takes
    longer than a scaling queue's 1-s interval); a show entry meeting a probe under way is dropped,
    the probe shows what it finds. Else "run"."""
    if probe is None or (not show and when != probe.due):
        return "drop"
    if probe.running:
        return "drop" if show else "later"
    return "run"


def watched_temporal(status: Mapping[str, Any]) -> spec_.TemporalStatus | None:
    """status.temporal as a queue shows it, if any and valid."""
    try:
        return spec_.TemporalStatus.model_validate(status["temporal"])
    except (KeyError, pydantic.ValidationError):
        return None


def owner_key(pod: Mapping[str, Any]) -> QueueKey | None:
    """The queue that controls a pod, from its ownerReference."""
    meta = pod.get("metadata", {})
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == spec_.KIND and ref.get("apiVersion") == resources.API_VERSION:
            return (meta.get("namespace", ""), ref["name"])
    return None


async def _each(*calls: Awaitable[None]) -> list[Exception | None]:
    """Runs the calls together, none stopped by another's failure: what each raised, or None."""
    done = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # a cancellation is no failure to report
    return [outcome if isinstance(outcome, Exception) else None for outcome in done]


class Supervisor:
    def __init__(
        self,
        *,
        store: Store,
        client: client_.KubeClient,
        settings: settings_.Settings,
        events: EventPoster,
        activity: Activity,
        registry: Registry | None = None,
        temporal: temporal_.Temporal | None = None,
        clock: Callable[[], float] = time.time,
        concurrency: int = 32,
        statuses_behind: Callable[[], bool] = lambda: False,
    ) -> None:
        self._store = store
        self._statuses_behind = statuses_behind
        self._activity = activity
        self._client = client
        self._events = events
        self._registry = registry
        self._temporal = temporal
        self._probes: dict[QueueKey, _Probe] = {}
        self._deleted_here: dict[QueueKey, set[str]] = {}
        """Pods this replica deleted, until they are gone: any other pod deleted is so from outside."""
        self._alive_seen: dict[QueueKey, frozenset[str]] = {}
        """The pods alive at the last pass while active: one gone since, not deleted here, was deleted
        from outside (with no kubelet to wait for, or deleted at once, a pod goes between two passes)."""
        self._listed: dict[QueueKey, PodListing] = {}
        """Each queue's pods at its last reconcile here (see _delete_orphan_credentials, _resync)."""
        self._timeline: list[tuple[float, int, QueueKey, bool]] = []  # a heap: (when, seq, queue, show)
        self._log = pacedlog.PacedLog(logger)
        self._seq = 0
        self._demand: dict[QueueKey, workers.Demand] = {}
        self._epoch = 0
        """Counts the changes of this replica's activity: a reading begun before one is not kept."""
        self._alive: dict[QueueKey, int] = {}
        # Two gates: the reachability checks of many queues (an unreachable Temporal takes the whole
        # timeout) must never hold up the backlog reads that size a scaling queue's pods.
        # Namespaces take turns at each when they are full: 200 scaling queues of one team on a Temporal
        # that never answers held all 16 places for its 4-s timeout, again and again, and other teams'
        # queues read their backlog a minute late.
        self._probe_gate = FairGate(_PROBES)
        self._scaling_gate = FairGate(_PROBES)
        # Reachability checks at a bounded rate, so that Temporal is not asked more with every queue
        # made (10,000 queues every 30 s were 333 calls a second); scaling reads are not held to it.
        # Those due wait their turn in two lines, in order: a queue not checked yet for its spec first
        # (made, its Temporal changed), then the rest.
        self._check_pace = Pace(settings.temporal_checks_per_second)
        self._checks_first: dict[QueueKey, None] = {}
        self._checks_due: dict[QueueKey, None] = {}
        self.reads = {"check": 0, "scaling": 0}
        """Temporal read for a queue, by kind (a metric): a reachability check, a scaling queue's reading."""
        self._settings = settings
        self._clock = clock
        self._queue: WorkQueue[QueueKey] = WorkQueue(self.reconcile, name="workers", concurrency=concurrency)
        # Queues that have or may have workers; the others (workers run elsewhere) cost nothing here.
        self._tracked: set[QueueKey] = set()
        # status.workers as last written, with the uid of the queue it was written to and the
        # resourceVersion the write made: newer than what the watch may have delivered so far. Kept by
        # name, so that forgetting a queue is one lookup.
        self._written: dict[QueueKey, tuple[str, spec_.WorkersStatus, str]] = {}
        self._conflicts = Conflicts()
        # A queue that becomes able to serve (e.g. its Secret appears) may now get its workers.
        self._serving: dict[QueueKey, bool] = {}
        self._refused: dict[QueueKey, CreateRefusal] = {}
        self._made_here: dict[QueueKey, set[str]] = {}
        """Pods whose token this replica made (see _coming): its own creates, never another's."""
        store.subscribe(self._store_changed)
        activity.subscribe(self._activity_changed)

    # --- fed by the queue informer (every replica) and kopf's pod events (the active one) --------

    def queue_changed(self, queue: QueueObject) -> None:
        key = queue.key
        probe = self._probes.get(key)
        if probe is not None and probe.generation != queue.generation:
            probe.generation = queue.generation
            self._at(key, probe, 0.0)  # the spec changed (maybe its Temporal)
        elif probe is None:
            self._at(key, self._probes.setdefault(key, _Probe(generation=queue.generation)), 0.0)
        if key not in self._tracked:
            if not (workers.manages_pods(queue.spec) or workers.has_pod_history(queue.status.get("workers"))
                    or self._written_status(queue) is not None):
                return  # a queue whose workers run elsewhere, and always did: nothing to look at
            self._tracked.add(key)
        self._queue.add(key)

    def queue_deleted(self, key: QueueKey) -> None:
        self._tracked.discard(key)
        self._serving.pop(key, None)
        self._refused.pop(key, None)
        self._probes.pop(key, None)
        self._demand.pop(key, None)
        self._alive.pop(key, None)
        self._written.pop(key, None)
        self._listed.pop(key, None)
        self._deleted_here.pop(key, None)
        self._alive_seen.pop(key, None)
        self._made_here.pop(key, None)
        self._conflicts.forget(key)

    def pod_event(self, body: Mapping[str, Any]) -> None:
        key = owner_key(body)
        if key is not None and key in self._tracked:
            self._queue.add(key)

    def _store_changed(self, key: QueueKey) -> None:
        probe = self._probes.get(key)
        if probe is not None and probe.target and self._probed_otherwise(key, probe):
            # The Temporal it was probed for is no longer what it resolves to (its key's Secret deleted
            # or changed): looked at now, not at the next check, temporal_check_seconds later, with what
            # that probe found shown meanwhile. One under way (or writing) looks again when it is done.
            self._at(key, probe, 0.0)
        if key not in self._tracked:
            return
        resolution = self._store.resolution(key)
        serving = resolution is not None and resolution.starts_workers
        if self._serving.get(key) != serving:
            self._serving[key] = serving
            self._queue.add(key)

    def _activity_changed(self, active: bool) -> None:
        # What we wrote may have been overwritten by the other replica meanwhile: the watch says.
        self._written.clear()
        # Temporal as read before: the other replica may have run the work since (a scale-up for work
        # done), or work may have come (an ephemeral queue deleted on an old "nothing waits"). Probes
        # under way now store nothing (their epoch is over).
        self._demand.clear()
        self._alive.clear()
        self._epoch += 1
        # Pods the other replica deleted meanwhile are none of this one's doing, nor from outside.
        self._alive_seen.clear()
        for probe in self._probes.values():
            probe.shown_known = False
        # Made anew: a standby adds nothing to it (it would grow with every queue made meanwhile).
        self._timeline.clear()
        self._checks_first.clear()
        self._checks_due.clear()
        if active:
            for key, probe in self._probes.items():
                self._at(key, probe, probe.due)
            for key in self._tracked:
                self._queue.add(key)

    @property
    def failed(self) -> int:
        """Passes over a queue's worker pods that failed, in all (a metric)."""
        return self._queue.failed

    async def run(self) -> None:
        await together(self._queue.run(), self._resync(), self._poll())

    async def _resync(self) -> None:
        # Reconcile from what exists even when no event comes (a missed watch event, a stuck pod).
        while True:
            await asyncio.sleep(self._settings.worker_resync_seconds)
            if self._activity.is_active():
                for key in list(self._tracked):
                    self._queue.add(key)
                if self._registry is not None:
                    # Refusal records whose pod went without the supervisor (deleted by a user).
                    await self._registry.sweep_refusals(self._listed.get)

    # --- the reconcile --------------------------------------------------------------------------

    async def reconcile(self, key: QueueKey) -> None:
        began = self._store.queue(key)
        try:
            await self._reconcile(key)
        finally:
            now = self._store.queue(key)
            if now is None:
                self.queue_deleted(key)  # deleted meanwhile: what the pass noted of it goes too
            elif began is not None and now.uid != began.uid:
                # Deleted and made again meanwhile (`kubectl replace --force`): the pods the pass noted
                # are the old queue's, and the new one would take them for deleted from outside.
                for noted in (self._listed, self._deleted_here, self._alive_seen, self._alive):
                    noted.pop(key, None)

    async def _reconcile(self, key: QueueKey) -> None:
        if not self._activity.is_active():
            return  # only the active replica changes pods
        queue = self._store.queue(key)
        if queue is None or queue.deleting:
            return  # deleting a queue deletes its pods: the garbage collector owns that
        listed_at = self._clock()
        pods = await self._list_pods(queue)
        if not self._activity.is_active():
            return  # paused while listing
        parsed = [workers.Pod.from_body(p) for p in pods]
        alive = [pod.name for pod in parsed if pod.alive]
        if self._registry is not None:
            # A worker whose pod ended never says goodbye (SIGTERM sends no disconnect): it is gone now.
            self._registry.pods_ended(key, alive)
            # Its worker turned away at /start (by any replica): the pod's failure is no crash. The
            # record is written before the worker is answered, so before its pod fails; one the Lease
            # watch has not brought yet (behind the pod watch, or not synced after a restart) is read.
            # Only until its failure is counted: a failed pod kept for its logs would cost a read a pass.
            counted = set(self._base(queue)[0].counted)
            for pod in parsed:
                if pod.phase == "Failed" and pod.name not in counted and not self._registry.refusal(queue, pod.name):
                    await self._read_refusal(queue, pod.name)
            parsed = [dataclasses.replace(pod, refused=why) if (why := self._registry.refusal(queue, pod.name))
                      else pod for pod in parsed]
        previous, version = self._base(queue)
        listing = PodListing(queue.uid, listed_at, frozenset(p["metadata"]["name"] for p in pods))
        if not self._activity.is_active():
            return  # stood down meanwhile: the next active replica plans from what it lists itself
        # What fails to be cleaned up (a webhook on deletes that is down, say) is tried again after a
        # back-off, at the pass's end: it must not keep the queue's new workers from being made.
        unlisted = self._unlisted_credentials(key, listing, previous.next_index)
        coming = self._coming(key, listing, unlisted)
        failures = await _each(self._delete_orphan_credentials(key, listing, unlisted))
        previous, version = self._base(queue)
        now = self._clock()
        created = times.parse(queue.created) if queue.created else now
        demand = self._demand.get(key)
        outside = self._deleted_outside(key, parsed)
        # Pods the replica before this one may be creating right now count as pods coming: made again
        # here, under the next index, the queue would run a worker too many.
        planned = parsed + [workers.Pod(name=name, phase="Pending", deleting=False, index=workers.pod_index(name))
                            for name in sorted(coming)]
        plan = workers.plan(queue, planned, previous=previous, now=now, created=created, settings=self._settings,
                            demand=demand, deleted_outside=outside)
        if demand is not None and any(name in alive for name in plan.delete):
            # Taken for idle by the workflows they hold: one may run another workflow's activity.
            demand = await self._with_activities(key, demand)
            now = self._clock()  # the reading's age is judged against now, not against before the call
            plan = workers.plan(queue, planned, previous=previous, now=now, created=created,
                                settings=self._settings, demand=demand, deleted_outside=outside)
        if coming:
            # Not deleted as surplus either: a token revoked while its pod is created leaves a pod
            # that never starts. Once listed (or past the grace, an orphan) it is planned as any.
            plan = dataclasses.replace(plan, delete=tuple(name for name in plan.delete if name not in coming))
        alive_before = self._alive.get(key, 0)
        self._alive[key] = len(alive) + len(plan.create)
        if self._alive[key] and not alive_before and key in self._probes:
            self._at(key, self._probes[key], 0.0)  # workers now: back to reading the backlog often

        resolution = self._store.resolution(key)
        create = plan.create
        status = plan.workers
        if create and (resolution is None or not resolution.starts_workers):
            # Workers of a queue that cannot serve /start would only fail: wait until it can. The token
            # Secret the operator is creating right now is no reason to wait: pods sign in with their own.
            create, status = (), status.model_copy(update={"next_index": previous.next_index})
        refusal = self._refused.get(key)
        if create and refusal is not None and refusal.holds(queue.generation, now):
            create, status = (), status.model_copy(update={"next_index": previous.next_index,
                                                           "last_error": refusal.message or status.last_error})
            self._queue.add_after(key, refusal.retry_at - now)
        if not self._activity.is_active():
            return  # each await above may have seen this replica stand down: from then on it acts no more
        if status != previous:
            written = await self._write_status(queue, status, version)
            if written is None:
                return  # counted from an older copy: nothing is done on it (see _write_status)
            version = written
            if not self._activity.is_active():
                return  # the next active replica plans from this write, and creates what it lacks
        self._passed(key, parsed)
        involved = queue_ref_body(queue)

        for event in plan.events:
            self._events.post(involved=involved, reason=event.reason,
                              message=event.message, warning=event.warning)
        deleting = await _each(*(self._delete_pod(queue, name) for name in plan.delete))
        for name, exc in zip(plan.delete, deleting, strict=True):
            if exc is not None:
                self._events.post(involved=involved, reason="PodDeletionFailed", warning=True,
                                  message=f"deleting worker pod {name} or its token failed: {_failure(exc)}; "
                                          "tried again")
        failures += deleting
        if plan.kept is not None and plan.kept in self._store.worker_credential_secrets(key):
            failures += await _each(self._revoke(queue, plan.kept))  # kept for its logs, not for its token
        if not self._activity.is_active():
            return
        if create:
            refused = await self._create_pods(queue, create)
            if refused is None:
                self._refused.pop(key, None)
            else:
                refusal = self._refused[key] = CreateRefusal.after(refusal, generation=queue.generation, now=now,
                                                             settings=self._settings, message=refused)
                self._queue.add_after(key, refusal.retry_at - now)
            if refused != status.last_error and refused != "":
                await self._write_status(queue, status.model_copy(update={"last_error": refused}), version)
        if plan.delete_queue is not None:
            self._events.post(involved=involved, reason=plan.delete_queue.reason,
                              message=plan.delete_queue.message, warning=plan.delete_queue.warning)
            await self._delete_queue(queue)
        elif plan.requeue_after is not None:
            self._queue.add_after(key, plan.requeue_after)
        failed = [exc for exc in failures if exc is not None]
        if failed:
            raise failed[0]  # the work queue tries the pass again after its back-off

    def _deleted_outside(self, key: QueueKey, pods: list[workers.Pod]) -> frozenset[str]:
        """The pods someone else deleted: alive at the last pass (or made since), and being deleted or
        gone now, not by this replica. One already being deleted when this replica first saw it may
        be any replica's doing: this one's before a restart, the other's before a handover (a pod
        terminating for a while, with a sidecar or a long grace period), and is not counted."""
        seen = self._alive_seen.get(key, frozenset())
        listed = {pod.name for pod in pods}
        gone = seen - listed
        deleting = {pod.name for pod in pods if pod.deleting and pod.name in seen}
        return frozenset((gone | deleting) - self._deleted_here.get(key, set()))

    def _passed(self, key: QueueKey, pods: list[workers.Pod]) -> None:
        """The pass's plan is written: its pods are what the next one compares with."""
        listed = {pod.name for pod in pods}
        here = self._deleted_here.get(key)
        if here is not None:
            here &= listed  # gone now: forgotten
        self._alive_seen[key] = frozenset(pod.name for pod in pods if pod.alive)

    async def _with_activities(self, key: QueueKey, demand: workers.Demand) -> workers.Demand:
        """The demand with the pods running an activity now, never taken for idle; unknown (no
        scaling either way) if Temporal cannot tell."""
        target = self._target(key)
        if target is None or self._temporal is None:
            return workers.Demand(backlog=None)
        try:
            identities = await self._temporal.activity_workers(target[1], target[2])
        except temporal_.TemporalUnavailable as exc:
            logger.info("no running idle worker of %s/%s deleted now: %s", *key, exc)
            return dataclasses.replace(demand, activities_unknown=True)
        if identities is None:
            logger.info("no running idle worker of %s/%s deleted now: its running workflows' activities were "
                        "not all told in time", *key)
            return dataclasses.replace(demand, activities_unknown=True)
        running = {host for identity in identities if (host := temporal_.host_of(identity)) is not None}
        return dataclasses.replace(demand, active=frozenset(running))

    async def _list_pods(self, queue: QueueObject) -> list[dict[str, Any]]:
        selector = f"{workers.QUEUE_LABEL}={workers.queues_label(queue)}"
        listing = await self._client.get(resources.pods_path(queue.namespace), {"labelSelector": selector})
        # Only pods this very queue controls: a deleted and re-created namesake owns none of them.
        return [p for p in listing.get("items", [])
                if any(ref.get("uid") == queue.uid and ref.get("controller")
                       for ref in p.get("metadata", {}).get("ownerReferences") or [])]

    async def _write_status(self, queue: QueueObject, status: spec_.WorkersStatus, version: str) -> str | None:
        """Writes status.workers over the version of the queue it was planned from; the version written,
        or None when the queue is gone or was changed since.

        The counts are absolute, made from that copy: over a newer one they could undo a count made
        since (a finished pod counted, then deleted, by the other replica just before a handover, or
        by this one before its watch caught up), and start a worker too many. Changed since, the
        queue is planned again from the newer copy the watch brings.
        """
        # `live` is the registry's to write: a copy here would be stale.
        payload = status.model_dump(by_alias=True, mode="json", exclude={"live"})
        key = queue.key
        try:
            written = await resources.patch_queue_status(self._client, queue.namespace, queue.name,
                                                         {"workers": payload}, resource_version=version)
        except client_.ApiError as exc:
            if not exc.conflict:
                raise
            logger.debug("the status of %s/%s changed meanwhile; planned again from the newer one", *key)
            self._written.pop(key, None)
            self._queue.add_after(key, self._conflicts.refused(key))
            return None
        self._conflicts.forget(key)
        if written:
            self._written[key] = (queue.uid, status, written)
        return written or None

    def _base(self, queue: QueueObject) -> tuple[spec_.WorkersStatus, str]:
        """status.workers to plan from, and the queue's version it is of: this replica's last write
        (with the watch's version once the watch shows it), else the watch's copy."""
        watched = spec_.WorkersStatus.model_validate(queue.status.get("workers") or {})
        written = self._written.get(queue.key)
        if written is not None and written[0] == queue.uid:
            status, version = written[1], written[2]
            # Caught up: the copy shows what was written (others write `live`, status.temporal and
            # conditions beside it, each a newer version). Kept with its old version, every write
            # after another writer's was a conflict. What was written stays the base: a CRD not
            # upgraded drops the generation the counts were planned for, and the copy would lack it.
            unplanned = {"live": 0, "observed_generation": None}
            if watched.model_copy(update=unplanned) == status.model_copy(update=unplanned):
                self._written[queue.key] = (queue.uid, status, queue.resource_version)
                return status, queue.resource_version
            # Behind, unless a spec changed since (the write succeeded over the then current version:
            # a change of generation came after it, and the copy is newer).
            if status.observed_generation == queue.generation:
                return status, version
            del self._written[queue.key]
        return watched, queue.resource_version

    def _written_status(self, queue: QueueObject) -> spec_.WorkersStatus | None:
        written = self._written.get(queue.key)
        return written[1] if written is not None and written[0] == queue.uid else None

    async def _create_pods(self, queue: QueueObject, indices: tuple[int, ...]) -> str | None:
        """Creates the pods; returns the API server's reason when it refuses one ("" when only its
        namespace being deleted did: nothing to report)."""
        inputs = workers.PodInputs(
            control_plane_url=self._control_plane_url(),
            secrets_digest=workers.secrets_digest(queue, self._store.secret_version, self._settings),
            owner=resources.owner_reference(queue_ref_body(queue)),
        )
        bodies = [workers.build_pod(queue, i, inputs=inputs, settings=self._settings) for i in indices]
        async def create(body: dict[str, Any]) -> bool:
            # Each pod's own token first, so that its worker can call /start as soon as it runs; pod by
            # pod, so that the first pods of a burst need not wait for the last tokens.
            credential = workers.credential_secret_body(queue, body["metadata"]["name"], workers.new_worker_token(),
                                                        now=self._clock())
            self._made_here.setdefault(queue.key, set()).add(body["metadata"]["name"])
            try:
                await self._create_credential(queue, credential)
            except client_.ApiError as exc:
                secret = credential["metadata"]["name"]
                raise exc.quiet(f"creating its token Secret {secret} failed ({exc.status} {exc.reason})",
                                kind=_CredentialFailed) from None
            return await resources.create_if_absent(self._client, resources.pods_path(queue.namespace), body)

        results = await asyncio.gather(*(create(b) for b in bodies), return_exceptions=True)
        refused: str | None = None
        never_made: list[str] = []
        involved = queue_ref_body(queue)
        for body, result in zip(bodies, results, strict=True):
            name = body["metadata"]["name"]
            if result is True:
                # Alive from now on, though not listed yet: deleted before the next pass, from outside.
                self._alive_seen[queue.key] = self._alive_seen.get(queue.key, frozenset()) | {name}
                self._events.post(involved=involved, reason="WorkerCreated",
                                  message=f"created worker pod {name}")
            elif isinstance(result, client_.ApiError) and result.namespace_terminating:
                # The queue goes with its namespace: no refusal to report, but the back-off all the
                # same, or each pass would make its status write, and that write the next pass.
                refused = refused or ""
            elif isinstance(result, client_.ApiError) and result.status in (400, 403, 422):
                refused = f"pod {name} was {'not created' if isinstance(result, _CredentialFailed) else 'refused'}: " \
                          f"{result.message}"
                self._events.post(involved=involved, reason="PodCreationFailed",
                                  message=refused, warning=True)
                if not isinstance(result, _CredentialFailed):
                    never_made.append(name)
            elif isinstance(result, client_.ERRORS):
                # The API server failing (a 5xx, an admission webhook it cannot reach, 429, a timeout):
                # backed off as a refusal is. Raised, the pass would be retried at once, since its
                # status write (the next index) comes back through the watch and starts the next.
                failed = f"pod {name} was not created: {_failure(result)}"
                if not refused:  # a refusal's reason says more, and lasts
                    refused = failed
                self._events.post(involved=involved, reason="PodCreationFailed", message=failed, warning=True)
            elif isinstance(result, BaseException):
                raise result
        # The token of a pod the API server refused goes at once: left for the orphan sweep, it read
        # for a minute as a pod another replica may still be creating, and a replica taking over in
        # that minute waited for pods that never come.
        for name in never_made:
            try:
                await self._revoke(queue, name)
            except client_.ERRORS as exc:
                logger.warning("deleting the token of the refused pod %s/%s failed (the orphan sweep will): %s",
                               queue.namespace, name, _failure(exc))
        return refused

    async def _create_credential(self, queue: QueueObject, body: dict[str, Any]) -> None:
        """Creates a pod's token Secret. One of its name may be left by a deleted namesake of the queue
        (`kubectl replace --force`), waiting for the garbage collector: reused, its token would vanish
        under the new worker, and its made-at would show that worker the old pod's executions. It is
        made anew. One that is not a worker token of this queue's name is left as it is (or ours,
        from a retried create)."""
        await resources.create_replacing(self._client, resources.secrets_path(queue.namespace), body,
                                         leftover=lambda existing: workers.namesakes_credential(existing, queue))

    async def _read_refusal(self, queue: QueueObject, pod: str) -> None:
        assert self._registry is not None
        try:
            body = await self._client.get(f"{resources.leases_path(queue.namespace)}/{leases.refusal_lease_name(pod)}")
        except client_.ApiError as exc:
            if exc.not_found:
                return
            raise
        self._registry.refusal_seen(body)

    async def _delete_pod(self, queue: QueueObject, name: str) -> None:
        """Deletes a worker pod, the record of its refusal at /start if any, and its token Secret; a
        Secret of that name the operator did not make for this queue (a user's, left as it was when
        the pod was made) stays."""
        self._deleted_here.setdefault(queue.key, set()).add(name)
        try:
            await self._client.delete(f"{resources.pods_path(queue.namespace)}/{name}")
        except client_.ApiError as exc:
            if not exc.not_found:
                raise
        await self._revoke(queue, name)

    async def _revoke(self, queue: QueueObject, name: str) -> None:
        """Deletes what a worker pod that has ended held: the record of its refusal at /start, if any,
        and its token Secret, if the operator made it for this queue."""
        refusal = self._registry.refusal_lease(queue, name) if self._registry is not None else ""
        if refusal:
            path = f"{resources.leases_path(queue.namespace)}/{leases.refusal_lease_name(name)}"
            try:
                await resources.delete_exact(self._client, path, refusal)
            except client_.ERRORS as exc:
                # Left to expire: deleted as such when a restart lists it, or with its queue.
                logger.warning("deleting the refusal record of pod %s/%s failed: %s", queue.namespace, name, exc)
        path = f"{resources.secrets_path(queue.namespace)}/{workers.credential_secret_name(name)}"
        try:
            secret = await self._client.get(path)
        except client_.ApiError as exc:
            if not exc.not_found:
                raise
            return
        if workers.credential_of(secret, queue):
            await resources.delete_exact(self._client, path, secret["metadata"]["uid"])

    def _unlisted_credentials(self, key: QueueKey, listing: PodListing,
                              next_index: int) -> list[tuple[str, SecretName, float | None]]:
        """Per-worker tokens of a counted index whose pod is not listed: (pod, its Secret, until when
        its pod may still be coming, or None). One made in the last ORPHAN_GRACE_SECONDS whose pod was
        never listed here may be coming: its create may be under way on the replica that stood down a
        moment ago. The others' pods are gone: deleted from outside (listed here before), or never made."""
        now = self._clock()
        previous = self._listed.get(key)
        seen = previous.pods if previous is not None else frozenset()
        found: list[tuple[str, SecretName, float | None]] = []
        for pod, secret in self._store.worker_credential_secrets(key).items():
            index = workers.pod_index(pod)
            if pod in listing.pods or index is None or index >= next_index:
                continue
            credential = self._store.worker_credential_in(secret)
            made = credential.since if credential is not None else None
            young = pod not in seen and made is not None and now - made < ORPHAN_GRACE_SECONDS
            found.append((pod, secret, made + ORPHAN_GRACE_SECONDS if made is not None and young else None))
        return found

    def _coming(self, key: QueueKey, listing: PodListing,
                unlisted: list[tuple[str, SecretName, float | None]]) -> frozenset[str]:
        """Pods another replica may be creating now: not this replica's own (whose creates are over
        by the time it plans again, done or failed)."""
        mine = self._made_here.get(key, set())
        mine &= set(self._store.worker_credential_secrets(key)) - listing.pods  # done with: forgotten
        return frozenset(pod for pod, _, until in unlisted if until is not None and pod not in mine)

    async def _delete_orphan_credentials(self, key: QueueKey, listing: PodListing,
                                         unlisted: list[tuple[str, SecretName, float | None]]) -> None:
        """Deletes the per-worker tokens whose pod is gone; one whose pod may be coming is looked at
        again once that time is over (deleted then, its pod would never start for want of it)."""
        self._listed[key] = listing
        now = self._clock()
        for _, secret, until in unlisted:
            if until is not None:
                self._queue.add_after(key, until - now)
                continue
            try:
                await self._client.delete(f"{resources.secrets_path(secret[0])}/{secret[1]}")
            except client_.ApiError as exc:
                if not exc.not_found:
                    raise

    async def _delete_queue(self, queue: QueueObject) -> None:
        await resources.delete_exact(self._client, resources.queue_path(queue.namespace, queue.name), queue.uid)

    def _control_plane_url(self) -> str:
        s = self._settings
        return (s.worker_control_plane_url or s.public_url or f"http://127.0.0.1:{s.http_port}").rstrip("/")

    # --- Temporal: reachability, status.temporal and the demand of scaling queues ----------------

    def _at(self, key: QueueKey, probe: _Probe, when: float, *, show: bool = False) -> None:
        """Probe the queue's Temporal (or, with `show`, write what the last probe found) at `when`
        (time.monotonic()). Earlier requests stay in the heap and are dropped when they come up."""
        if not show:
            probe.due = when
        if not self._activity.is_active():
            return  # a standby probes nothing: the timeline is made from the probes when it becomes active
        self._seq += 1
        heapq.heappush(self._timeline, (when, self._seq, key, show))

    async def _poll(self) -> None:
        # A heap of what is due when, not a scan of every queue each tick: 10,000 queues cost nothing
        # between their probes.
        tasks: set[asyncio.Task[None]] = set()
        held: list[tuple[float, int, QueueKey, bool]] = []

        def probe_now(key: QueueKey, probe: _Probe, target: tuple[tuple[object, ...], temporal_.Endpoint, str],
                      *, scaling: bool) -> None:
            if target[0] != probe.target:
                probe.target, probe.interval = target[0], 0.0
            self.reads["scaling" if scaling else "check"] += 1
            probe.running = True
            task = asyncio.create_task(self._probe(key, probe, target[1], target[2]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        try:
            while True:
                await asyncio.sleep(_TICK)
                self._log.settle()
                if not self._activity.is_active():
                    continue  # status and scaling are the active replica's
                # While queues wait for their Ready status (10,000 at start-up), reachability and its
                # writes wait too: only scaling queues, whose pods depend on their backlog, go on.
                hold = self._statuses_behind()
                if not hold:
                    for entry in held:
                        heapq.heappush(self._timeline, entry)
                    held.clear()
                loop_now = time.monotonic()
                timeline = self._timeline
                while timeline and timeline[0][0] <= loop_now:
                    entry = heapq.heappop(timeline)
                    _, _, key, show = entry
                    probe = self._probes.get(key)
                    step = timeline_step(probe, entry[0], show=show)
                    if probe is None or step == "drop":
                        continue
                    if step == "later":
                        self._at(key, probe, loop_now + _TICK)  # after this tick's loop: not spun on now
                        continue
                    scaling = self._scaling(key)
                    if hold and not scaling:
                        held.append(entry)
                        continue
                    if show:
                        if probe.wanted != probe.shown:
                            probe.running = True
                            task = asyncio.create_task(self._show(key, probe))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                        continue
                    target = self._target(key)
                    if target is None:
                        self._at(key, probe, loop_now + 1.0)  # not resolved yet (e.g. a Secret missing)
                        # What was found of the Temporal the queue named before is no longer so.
                        probe.reachable, probe.target = None, ()
                        if not probe.running and loop_now >= probe.write_after and \
                                self._unresolved_shown_otherwise(key):
                            probe.running = True
                            task = asyncio.create_task(self._show_unresolved(key, probe))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                        continue
                    if scaling:
                        probe_now(key, probe, target, scaling=True)
                    elif (target[0] != probe.target or probe.interval == 0.0
                          or probe.read_generation != probe.generation):  # not checked yet for what it is
                        self._checks_first[key] = None
                    else:
                        self._checks_due[key] = None
                if not hold:  # those waiting their turn when the hold began wait on too
                    for key, probe, target in self._checks_to_start(loop_now):
                        probe_now(key, probe, target, scaling=False)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _checks_to_start(self, now: float) -> Iterator[tuple[QueueKey, _Probe, tuple[tuple[object, ...],
                                                                                     temporal_.Endpoint, str]]]:
        """The reachability checks waiting their turn that the pace lets start now, first ones first."""
        for waiting in (self._checks_first, self._checks_due):
            while waiting:
                key = next(iter(waiting))
                probe = self._probes.get(key)
                target = self._target(key) if probe is not None else None
                if probe is None or probe.due > now or probe.running or target is None:
                    # Gone; checked since (its next check is on the timeline); a write of what it found
                    # under way; its Temporal no longer resolved: back to the timeline, nothing taken.
                    del waiting[key]
                    if probe is not None and probe.due <= now:
                        self._at(key, probe, now + _TICK)
                    continue
                if not self._check_pace.take(now):
                    return
                del waiting[key]
                yield key, probe, target

    def _probed_otherwise(self, key: QueueKey, probe: _Probe) -> bool:
        """Whether the queue's Temporal resolves to another target than the one last probed (or to none)."""
        target = self._target(key)
        return (target[0] if target is not None else ()) != probe.target

    def _unresolved_shown_otherwise(self, key: QueueKey) -> bool:
        """Whether the queue, its Temporal not resolved, shows TemporalReachable as anything but Unknown
        for its generation."""
        queue = self._store.queue(key)
        resolution = self._store.resolution(key)
        if queue is None or resolution is None or resolution.awaiting_generated_token or (
                resolution.problem is not None and resolution.problem.reason == "SecretPending"):
            return False  # for a moment only (a Secret not read yet, a token being made): no flap
        current = next((c for c in queue.status.get("conditions") or [] if c.get("type") == TEMPORAL_REACHABLE), None)
        return current is not None and (current.get("status") != "Unknown"
                                        or current.get("observedGeneration") != queue.generation)

    async def _show_unresolved(self, key: QueueKey, probe: _Probe) -> None:
        """TemporalReachable turns Unknown while the queue's Temporal cannot be resolved (its key's
        Secret gone, its host taken out of the spec): `True Reachable` of the Temporal it named before
        would stay for as long, under an older generation. Ready says why."""
        try:
            queue = self._store.queue(key)
            resolution = self._store.resolution(key)
            if queue is None or not self._activity.is_active():
                return
            conditions: list[dict[str, Any]] = list(queue.status.get("conditions") or [])
            index = next((i for i, c in enumerate(conditions) if c.get("type") == TEMPORAL_REACHABLE), None)
            if index is None:
                return
            why = resolution.problem.message if resolution is not None and resolution.problem else "not resolved"
            condition = status_.set_condition(
                [conditions[index]], type=TEMPORAL_REACHABLE, status="Unknown", reason="TemporalNotResolved",
                message=f"not checked: the queue's Temporal cannot be resolved ({why})",
                generation=queue.generation, now=resources.now_rfc3339())[0]
            ops = [{"op": "test", "path": f"/status/conditions/{index}/type", "value": TEMPORAL_REACHABLE},
                   {"op": "replace", "path": f"/status/conditions/{index}", "value": condition}]
            try:
                await self._client.patch(f"{resources.queue_path(queue.namespace, queue.name)}/status", ops,
                                         content_type=client_.JSON_PATCH)
            except client_.ApiError as exc:
                if not (exc.not_found or exc.status == 422):
                    raise  # gone, or the conditions moved: looked at again within a second
            probe.write_failures, probe.write_after = 0, 0.0
        except client_.ERRORS as exc:
            self._status_write_failed(key, probe, exc)
        finally:
            probe.running = False

    def _status_write_failed(self, key: QueueKey, probe: _Probe, exc: Exception) -> None:
        """A status write of the probe's failed: the next waits, doubling from 2 s to a minute."""
        probe.write_failures += 1
        wait = pace.doubling(probe.write_failures, 2.0, STATUS_RETRY_MAX_SECONDS)
        probe.write_after = time.monotonic() + wait
        self._log.warning("temporal_status_failed", "writing the Temporal status of %s/%s failed, again in %.0fs: %s",
                          key[0], key[1], wait, exc)

    def _scaling(self, key: QueueKey) -> bool:
        queue = self._store.queue(key)
        return queue is not None and queue.spec.scaling is not None

    def _target(self, key: QueueKey) -> tuple[tuple[object, ...], temporal_.Endpoint, str] | None:
        resolution = self._store.resolution(key)
        target = resolution.probe_target if resolution is not None else None
        if self._temporal is None or target is None:
            return None
        return (target.endpoint.key, target.task_queue), target.endpoint, target.task_queue

    async def _probe(self, key: QueueKey, probe: _Probe, endpoint: temporal_.Endpoint, task_queue: str) -> None:
        assert self._temporal is not None
        generation, epoch = probe.generation, self._epoch
        queue = self._store.queue(key)
        scaling = queue is not None and queue.spec.scaling is not None
        demand: workers.Demand
        try:
            async with (self._scaling_gate if scaling else self._probe_gate).turn(key[0]):
                # As of when Temporal is asked, not when it has answered: a workflow that came in
                # between may be missing from what it tells.
                read_at = self._clock()
                info = await self._temporal.describe_task_queue(endpoint, task_queue)
                if scaling:
                    # Temporal's backlog statistic is cached by the server for seconds (a scale-up would
                    # wait ~5 s for it); the running workflows that no worker has taken yet are known
                    # at once, and so is who holds the others.
                    found = await self._temporal.executions(endpoint, task_queue, limit=_LISTED, running=True,
                                                            fresh=True)
                    demand = reading(found, listed=_LISTED, read_at=read_at)
                else:  # status shows the server's statistic, as `temporal task-queue describe` would
                    demand = workers.Demand(backlog=info.backlog or 0, read_at=read_at)
            probe.reachable, probe.reason, probe.read_generation = True, "Reachable", generation
            probe.message = f"the task queue {task_queue} was described at {endpoint}"
            probe.wanted = spec_.TemporalStatus(pollers=len(info.pollers), backlog=info.backlog,
                                                busy=len(demand.busy) if scaling else None)
        except temporal_.TemporalUnavailable as exc:
            demand = workers.Demand(backlog=None)
            probe.reachable, probe.reason, probe.message = False, "TemporalUnavailable", str(exc)
            probe.read_generation = generation
            queue = self._store.queue(key)
            if queue is not None and queues.default_temporal_key_withheld(queue.spec, self._settings):
                probe.message += ("; the operator's default Temporal API key is not sent to a queue's own host, "
                                  "nor without TLS: name one in spec.temporal.apiKeySecretRef")
        except Exception:
            logger.exception("probing the Temporal of %s/%s failed", *key)
            demand = workers.Demand(backlog=None)
        except BaseException:
            probe.running = False  # left "under way", its queue would never be probed again
            raise
        s = self._settings
        if not scaling:
            probe.interval = s.temporal_check_seconds
        elif (demand.backlog or 0) > 0 or self._alive.get(key):
            probe.interval = s.backlog_poll_seconds
        else:
            probe.interval = min(max(probe.interval * 2, s.backlog_poll_seconds), s.backlog_idle_poll_seconds)
        # The spec changed while this check ran (its Temporal key, say), or its Temporal resolves
        # otherwise now (its key's Secret deleted): the check that change asked for (queue_changed,
        # _store_changed) is this one's next, made now rather than an interval later.
        moved = probe.generation != generation or self._probed_otherwise(key, probe)
        self._at(key, probe, time.monotonic() + (0.0 if moved else probe.interval))
        if scaling and self._probes.get(key) is probe and self._epoch == epoch:  # nor for a queue deleted meanwhile
            before = self._demand.get(key)
            self._demand[key] = demand  # kept fresh even when unchanged: the plan acts on fresh readings only
            if before is None or before != demand or not before.fresh(self._clock()):
                self._queue.add(key)
        try:
            await self._show(key, probe, running=True)
        finally:
            probe.running = False

    async def _show(self, key: QueueKey, probe: _Probe, *, running: bool = False) -> None:
        """Writes the condition when it differs from what the queue shows, and status.temporal when
        it changed and the last write is old enough."""
        try:
            queue = self._store.queue(key)
            if queue is None or probe.reachable is None or not self._activity.is_active():
                return  # a probe begun before a stand-down writes nothing, nor takes the watch's copy as ours
            if self._probes.get(key) is not probe:
                return  # its queue deleted (and maybe made again) meanwhile: what it found is not this one's
            if time.monotonic() < probe.write_after:  # the last writes failed: not at every probe
                self._at(key, probe, probe.write_after, show=True)
                return
            shown = queue.status
            if not probe.shown_known:
                # At start and after a standby spell the queue shows what another replica wrote: kept
                # as ours, a reading equal to ours no longer written, one differing from it never was.
                probe.shown, probe.shown_known = watched_temporal(shown), True
            conditions: list[dict[str, Any]] = list(shown.get("conditions") or [])
            status = "True" if probe.reachable else "False"
            index = next((i for i, c in enumerate(conditions) if c.get("type") == TEMPORAL_REACHABLE), None)
            current = conditions[index] if index is not None else None
            generation = probe.read_generation or queue.generation  # what the check was made for
            ops: list[dict[str, Any]] = []
            if conditions and (current is None or current.get("status") != status or current.get("reason")
                               != probe.reason or current.get("observedGeneration") != generation):
                condition = status_.set_condition(
                    [current] if current else [], type=TEMPORAL_REACHABLE, status=status, reason=probe.reason,
                    message=probe.message, generation=generation, now=resources.now_rfc3339())[0]
                if index is None:
                    # Only onto the queue as seen here: a second probe before the watch brings the first
                    # add would otherwise add it twice (the list is not a map to the API server). Its
                    # version, not the list: the API server compares strings as its own JSON spells them.
                    ops += [{"op": "test", "path": "/metadata/resourceVersion", "value": queue.resource_version},
                            {"op": "add", "path": "/status/conditions/-", "value": condition}]
                else:
                    # Conditions are written by others too: replace ours only if it is still where it was.
                    ops += [{"op": "test", "path": f"/status/conditions/{index}/type", "value": TEMPORAL_REACHABLE},
                            {"op": "replace", "path": f"/status/conditions/{index}", "value": condition}]
            loop_now = time.monotonic()
            wanted = probe.wanted if probe.reachable else probe.shown
            show_numbers = wanted is not None and wanted != probe.shown and (
                loop_now - probe.shown_at >= self._settings.temporal_status_seconds)
            if wanted is not None and wanted != probe.shown and not show_numbers:
                self._at(key, probe, probe.shown_at + self._settings.temporal_status_seconds, show=True)
            if show_numbers and wanted is not None:
                ops.append({"op": "add", "path": "/status/temporal",
                            "value": wanted.model_dump(by_alias=True, mode="json", exclude_none=True)})
            if not ops:
                return
            try:
                await self._client.patch(f"{resources.queue_path(queue.namespace, queue.name)}/status", ops,
                                         content_type=client_.JSON_PATCH)
            except client_.ApiError as exc:
                if not (exc.not_found or exc.status == 422):
                    raise
                return  # gone, or the conditions moved: the next probe tries again
            probe.write_failures, probe.write_after = 0, 0.0
            if show_numbers:
                probe.shown, probe.shown_at = wanted, loop_now
            if (current is None and not probe.reachable) or (current and current.get("status") != status):
                self._events.post(involved=queue_ref_body(queue), reason=probe.reason,
                                  message=probe.message if not probe.reachable else "Temporal is reachable",
                                  warning=not probe.reachable)
        except client_.ERRORS as exc:
            self._status_write_failed(key, probe, exc)
        finally:
            if not running:
                probe.running = False
