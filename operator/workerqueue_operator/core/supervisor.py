"""Carries out worker plans: lists a queue's pods, then creates, deletes, records and reports.

Fed by the queue informer (through the Store, on every replica), by kopf's pod events (which
peering pauses on a standby) and by a resync of its own: so every reconcile first asks `Activity`
whether this replica is the active one. A standby keeps track of the queues all the same, so that
it acts at once when it takes over. kopf does not watch queues: a second watch of 10,000 queues
cost as much memory and CPU as the operator's own.

Its `probes.TemporalProbes` watches each queue's Temporal task queue (on the active replica):
TemporalReachable and `status.temporal` for every queue, and the demand (backlog, busy pods) that
sizes the pods of scaling queues; a changed demand reconciles the queue at once (see core/probes.py).

One reconcile per queue at a time; pod names are deterministic, so a retried or concurrent create
fails with AlreadyExists instead of making a second pod (also in the moment two replicas overlap).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from workerqueue_operator.core import leases, probes, workers
from workerqueue_operator.core import temporal as temporal_
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.queues import QueueKey, QueueObject, SecretName
from workerqueue_operator.core.reconciler import Conflicts, queue_ref_body
from workerqueue_operator.core.refusals import PodListing
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store
from workerqueue_operator.core.workqueue import WorkQueue, together
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models import spec as spec_
from workerqueue_operator.models import times

logger = logging.getLogger(__name__)


class _CredentialFailed(client_.ApiError):
    """Creating a pod's token Secret failed: said by status and reason only, as ApiError.quiet."""


def _quiet_delete(exc: client_.ApiError, path: str) -> client_.ApiError:
    """A refused delete of a token Secret, said by status and reason: an admission webhook is given
    the object being deleted, its token with it, and may quote it in its refusal."""
    return exc.quiet(f"deleting the token Secret {path.rsplit('/', 1)[-1]} failed ({exc.status} {exc.reason})")


def _token_gone(pod: workers.Pod, tokens: Mapping[str, object], now: float) -> bool:
    """Whether an alive pod's own token Secret may have been deleted, as memory tells: its worker
    cannot start (the kubelet says so), or no token came through the watch within ORPHAN_GRACE_SECONDS
    of the pod's creation (made before the pod, it would have). The API server has the last word
    (_tokens_deleted): the watch may be behind."""
    if not pod.alive or pod.name in tokens:
        return False
    return pod.stuck == "CreateContainerConfigError" or (
        pod.created is not None and now - pod.created >= ORPHAN_GRACE_SECONDS)


def _failed_tokenless(pod: workers.Pod, tokens: Mapping[str, object], counted: set[str]) -> bool:
    """Whether a failed pod not counted yet may have failed for its token Secret's deletion: its
    worker, given the token as its container started, was turned away at /start (401). The operator
    revokes a failed pod's token only once it has counted it."""
    return pod.phase == "Failed" and not pod.deleting and pod.name not in counted and pod.name not in tokens


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
    Its times are this replica's monotonic clock's.
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


ORPHAN_GRACE_SECONDS = 60.0
"""A per-worker token without its pod is deleted once it is this old (see _delete_orphan_credentials)."""
PODS_PAGE_SIZE = 200
"""A queue's pods are listed a page at a time: each page is parsed on the event loop, and a queue of
1,000 pods listed whole (~3 MB) held /start and heartbeats up for ~100 ms, at each of its passes."""


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
        monotonic: Callable[[], float] = time.monotonic,
        concurrency: int = 32,
        statuses_behind: Callable[[], bool] = lambda: False,
        secrets_listed: bool = True,
    ) -> None:
        self._store = store
        self._secrets_listed = secrets_listed
        """Whether the Store holds the per-worker token Secrets (see secrets_synced)."""
        self._activity = activity
        self._client = client
        self._events = events
        self._registry = registry
        self._temporal = temporal
        self._deleted_here: dict[QueueKey, set[str]] = {}
        """Pods this replica deleted, until they are gone: any other pod deleted is so from outside."""
        self._alive_seen: dict[QueueKey, frozenset[str]] = {}
        """The pods alive at the last pass while active: one gone since, not deleted here, was deleted
        from outside (with no kubelet to wait for, or deleted at once, a pod goes between two passes)."""
        self._listed: dict[QueueKey, PodListing] = {}
        """Each queue's pods at its last reconcile here (see _delete_orphan_credentials, _resync)."""
        self._gone: dict[QueueKey, frozenset[str]] = {}
        """Pods once listed here, gone since, whose token Secrets are still there (their deletion
        failed): never taken for pods another replica may be creating."""
        self._alive: dict[QueueKey, int] = {}
        """Each queue's pods alive or being made at its last pass here (the prober reads it)."""
        self._settings = settings
        self._clock = clock
        self._monotonic = monotonic
        """For this replica's own deadlines (back-offs, cached answers): a step of the wall clock, which
        pods' and queues' times are compared with, must not hold them for as long as the step."""
        self._queue: WorkQueue[QueueKey] = WorkQueue(self.reconcile, name="workers", concurrency=concurrency)
        self.prober = probes.TemporalProbes(
            store=store, client=client, settings=settings, events=events, activity=activity, temporal=temporal,
            clock=clock, statuses_behind=statuses_behind, alive=lambda key: self._alive.get(key, 0),
            on_demand=self._queue.add)
        """Each queue's Temporal: its reachability and status.temporal, a scaling queue's demand."""
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
        self._tokens_there: dict[QueueKey, dict[str, float]] = {}
        """Pods whose token the watch has not brought but the API server says is there, each with
        until when (monotonic) that answer holds (see _tokens_deleted)."""
        self._tokenless: dict[QueueKey, set[str]] = {}
        """Pods whose own token the API server said is gone (see _tokens_deleted), while they are listed."""
        self._released: dict[QueueKey, dict[str, float]] = {}
        """Pods of the queue found there though not listed by its label (see _still_there), each with
        when (monotonic) to look again."""
        store.subscribe(self._store_changed)
        activity.subscribe(self._activity_changed)

    # --- fed by the queue informer (every replica) and kopf's pod events (the active one) --------

    def queue_changed(self, queue: QueueObject) -> None:
        key = queue.key
        self.prober.queue_changed(queue)
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
        self.prober.queue_deleted(key)
        self._alive.pop(key, None)
        self._written.pop(key, None)
        self._listed.pop(key, None)
        self._gone.pop(key, None)
        self._deleted_here.pop(key, None)
        self._alive_seen.pop(key, None)
        self._made_here.pop(key, None)
        self._released.pop(key, None)
        self._tokens_there.pop(key, None)
        self._tokenless.pop(key, None)
        self._conflicts.forget(key)

    def pod_event(self, body: Mapping[str, Any]) -> None:
        key = owner_key(body)
        if key is not None and key in self._tracked:
            self._queue.add(key)

    def _store_changed(self, key: QueueKey) -> None:
        self.prober.store_changed(key)
        if key not in self._tracked:
            return
        resolution = self._store.resolution(key)
        serving = resolution is not None and resolution.starts_workers
        if self._serving.get(key) != serving:
            self._serving[key] = serving
            self._queue.add(key)

    def secrets_synced(self) -> None:
        """The Secrets have been listed: the per-worker tokens tell the pods another replica may be
        creating (see _coming). Planned before, a replica just started takes the pods a replica killed
        mid-create left coming for missing ones, makes them anew, then deletes its own as surplus."""
        self._secrets_listed = True
        for key in self._tracked:
            self._queue.add(key)

    def _activity_changed(self, active: bool) -> None:
        # What we wrote may have been overwritten by the other replica meanwhile: the watch says.
        self._written.clear()
        # Pods the other replica deleted meanwhile are none of this one's doing, nor from outside.
        self._alive_seen.clear()
        # Temporal as read before, and the pods alive then, are not acted on; the probe timeline is
        # made anew (see TemporalProbes.activity_changed).
        self._alive.clear()
        self.prober.activity_changed(active)
        if active:
            for key in self._tracked:
                self._queue.add(key)

    @property
    def failed(self) -> int:
        """Passes over a queue's worker pods that failed, in all (a metric)."""
        return self._queue.failed

    @property
    def reads(self) -> dict[str, int]:
        """Temporal read for a queue, by kind (a metric): a reachability check, a scaling queue's reading."""
        return self.prober.reads

    async def run(self) -> None:
        await together(self._queue.run(), self._resync(), self.prober.run())

    async def _resync(self) -> None:
        # Reconcile from what exists even when no event comes (a missed watch event, a stuck pod).
        while True:
            await asyncio.sleep(self._settings.worker_resync_seconds)
            if self._activity.is_active():
                for key in list(self._tracked):
                    self._queue.add(key)
                if self._registry is not None:
                    # Refusal records whose pod went without the supervisor (deleted by a user).
                    await self._registry.refusals.sweep(self._listed.get)

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
                for noted in (self._listed, self._gone, self._deleted_here, self._alive_seen, self._alive,
                              self._released, self._tokens_there, self._tokenless):
                    noted.pop(key, None)

    async def _reconcile(self, key: QueueKey) -> None:
        if not self._activity.is_active() or not self._secrets_listed:
            return  # only the active replica changes pods, once it knows the tokens (see secrets_synced)
        queue = self._store.queue(key)
        if queue is None or queue.deleting:
            return  # deleting a queue deletes its pods: the garbage collector owns that
        listed_at = self._clock()
        pods = await self._list_pods(queue)
        if not self._activity.is_active():
            return  # paused while listing
        tokens, now = self._store.worker_credential_secrets(key), self._clock()
        parsed = [workers.Pod.from_body(p) for p in pods]
        # Memory says so (the Secret watch), and the API server too: the watch may be behind (down, or
        # relisting), and a healthy worker must never be deleted for it. What the API server said is
        # there is taken as there until the resync after.
        names = {pod.name for pod in parsed}
        local = self._monotonic()
        there = {pod: until for pod, until in self._tokens_there.get(key, {}).items() if until > local and pod in names}
        counted = set(self._base(queue)[0].counted)
        suspects = [pod.name for pod in parsed if pod.name not in there and (
            _token_gone(pod, tokens, now) or _failed_tokenless(pod, tokens, counted))]
        gone = await self._tokens_deleted(queue, suspects, there, local) if suspects else set()
        self._tokens_there[key] = there
        # Remembered while the pod is there: counted, a failed one is no suspect any more, and would be
        # kept for its logs in place of a crash's should its deletion fail.
        tokenless = self._tokenless[key] = (self._tokenless.get(key, set()) & names) | gone
        parsed = [dataclasses.replace(pod, token_gone=True) if pod.name in tokenless else pod for pod in parsed]
        for pod in parsed:
            if (pod.alive and pod.name not in tokens and pod.created is not None
                    and pod.created + ORPHAN_GRACE_SECONDS > now):
                self._queue.add_after(key, pod.created + ORPHAN_GRACE_SECONDS - now)  # looked at again then
        alive = [pod.name for pod in parsed if pod.alive]
        if self._registry is not None:
            # A worker whose pod ended never says goodbye (SIGTERM sends no disconnect): it is gone now.
            self._registry.pods_ended(key, queue.uid, alive)
            # Its worker turned away at /start (by any replica): the pod's failure is no crash. The
            # record is written before the worker is answered, so before its pod fails; one the Lease
            # watch has not brought yet (behind the pod watch, or not synced after a restart) is read.
            # Only until its failure is counted: a failed pod kept for its logs would cost a read a pass.
            counted = set(self._base(queue)[0].counted)
            refusals = self._registry.refusals
            for pod in parsed:
                if pod.phase == "Failed" and pod.name not in counted and not refusals.why(queue, pod.name):
                    await self._read_refusal(queue, pod.name)
            parsed = [dataclasses.replace(pod, refused=why) if (why := refusals.why(queue, pod.name))
                      else pod for pod in parsed]
        previous, version = self._base(queue)
        listing = PodListing(queue.uid, listed_at, frozenset(p["metadata"]["name"] for p in pods))
        if not self._activity.is_active():
            return  # stood down meanwhile: the next active replica plans from what it lists itself
        # What fails to be cleaned up (a webhook on deletes that is down, say) is tried again after a
        # back-off, at the pass's end: it must not keep the queue's new workers from being made.
        unlisted = self._unlisted_credentials(key, listing, previous)
        coming = self._coming(key, listing, unlisted)
        failures = await _each(self._delete_orphan_credentials(key, listing, unlisted))
        previous, version = self._base(queue)
        now = self._clock()
        created = times.parse(queue.created) if queue.created else now
        demand = self.prober.demand(key)
        outside = self._deleted_outside(key, parsed)
        # Pods the replica before this one may be creating right now count as pods coming: made again
        # here, under the next index, the queue would run a worker too many.
        planned = parsed + [workers.Pod(name=name, phase="Pending", deleting=False, index=workers.pod_index(name),
                                        coming=True) for name in sorted(coming)]
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
        if self._alive[key] and not alive_before:
            self.prober.workers_came(key)  # workers now: back to reading the backlog often

        resolution = self._store.resolution(key)
        create = plan.create
        status = plan.workers
        if create and (resolution is None or not resolution.starts_workers):
            # Workers of a queue that cannot serve /start would only fail: wait until it can. The token
            # Secret the operator is creating right now is no reason to wait: pods sign in with their own.
            create, status = (), status.model_copy(update={"next_index": previous.next_index})
        refusal, local = self._refused.get(key), self._monotonic()
        if create and refusal is not None and refusal.holds(queue.generation, local):
            create, status = (), status.model_copy(update={"next_index": previous.next_index,
                                                           "last_error": refusal.message or status.last_error})
            self._queue.add_after(key, refusal.retry_at - local)
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
        if self._registry is not None and plan.delete:
            # Their workers' registrations (and maxWorkers slots) end with the deletion, not at the
            # next pass: a replacement made below must not meet its predecessor's slot at /start.
            # Those alone: a pod not listed then may run a worker now (one the replica before was making).
            self._registry.pods_deleted(key, queue.uid, [name for name, exc in zip(plan.delete, deleting, strict=True)
                                                         if exc is None])
        if plan.kept is not None and plan.kept in self._store.worker_credential_secrets(key):
            failures += await _each(self._revoke(queue, plan.kept))  # kept for its logs, not for its token
        if not self._activity.is_active():
            return
        if create:
            refused = await self._create_pods(queue, create)
            if refused is None:
                self._refused.pop(key, None)
            else:
                local = self._monotonic()
                refusal = self._refused[key] = CreateRefusal.after(refusal, generation=queue.generation, now=local,
                                                                   settings=self._settings, message=refused)
                self._queue.add_after(key, refusal.retry_at - local)
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
        target = self.prober.target(key)
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
        params = {"labelSelector": f"{workers.QUEUE_LABEL}={workers.queues_label(queue)}",
                  "limit": str(PODS_PAGE_SIZE)}
        pods: list[dict[str, Any]] = []
        while True:  # the pages of one list are one snapshot: continued, not listed again
            page = await self._client.get(resources.pods_path(queue.namespace), params)
            # Only pods this very queue controls: a deleted and re-created namesake owns none of them.
            pods += [p for p in page.get("items", [])
                     if any(ref.get("uid") == queue.uid and ref.get("controller")
                            for ref in p.get("metadata", {}).get("ownerReferences") or [])]
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return pods
            params = {**params, "continue": token}

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
        skipped: list[str] = []

        async def create(body: dict[str, Any]) -> bool:
            if not self._activity.is_active():
                # Stood down meanwhile: the index stays unused (names are never reused), and the replica
                # now active makes what is missing. Made here too, the queue would run a worker too many.
                return False
            # Each pod's own token first, so that its worker can call /start as soon as it runs; pod by
            # pod, so that the first pods of a burst need not wait for the last tokens.
            credential = workers.credential_secret_body(queue, body["metadata"]["name"], workers.new_worker_token(),
                                                        now=self._clock())
            self._made_here.setdefault(queue.key, set()).add(body["metadata"]["name"])
            secret = credential["metadata"]["name"]
            try:
                there = await self._create_credential(queue, credential)
            except client_.ApiError as exc:
                raise exc.quiet(f"creating its token Secret {secret} failed ({exc.status} {exc.reason})",
                                kind=_CredentialFailed) from None
            if not workers.credential_of(there, queue):
                # A Secret of that name that is no token of this queue (a user's, one orphaned by
                # `--cascade=orphan`): the pod would sign in with it and be turned away (401, counted a
                # failure). Its index is left unused; the next pass makes the pod under the next one.
                logger.warning("worker pod %s/%s not made: Secret %s is there and is not a token of this queue",
                               queue.namespace, body["metadata"]["name"], secret)
                skipped.append(body["metadata"]["name"])
                return False
            # Strict: a template's misspelt field (`resource:`, `nodeselector:`) is PodCreationFailed with
            # the API server's words, not a pod made without it (no limits, no node selector) in silence.
            return await resources.create_if_absent(self._client, resources.pods_path(queue.namespace), body,
                                                    strict=True)

        # In batches of 1, 2, 4, ... until one fails, as a ReplicaSet's slow start: a pod refused (a full
        # ResourceQuota, an admission policy) is refused alike for each of a hundred, and each try cost
        # them all, with a Warning each. Those not tried wait for the next pass, after its back-off.
        results: list[bool | BaseException] = []
        while len(results) < len(bodies) and self._activity.is_active():
            batch = bodies[len(results):2 * len(results) + 1]
            done = await asyncio.gather(*(create(b) for b in batch), return_exceptions=True)
            results.extend(done)
            if any(isinstance(result, BaseException) for result in done):
                break
        bodies = bodies[:len(results)]
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
            elif isinstance(result, client_.ApiError) and result.refused:
                refused = f"pod {name} was {'not created' if isinstance(result, _CredentialFailed) else 'refused'}: " \
                          f"{result.message}"
                if (not isinstance(result, _CredentialFailed) and queue.spec.worker.template is None
                        and "exceeded quota" not in result.message):  # a quota is the namespace's
                    # Whose to fix: the queue's owner has no template to change.
                    refused += " (made from the operator's pod template: WQ_WORKER_POD_TEMPLATE, Helm's worker.*)"
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
        if skipped:
            self._queue.add_after(queue.key, 0)
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

    async def _create_credential(self, queue: QueueObject, body: dict[str, Any]) -> dict[str, Any]:
        """Creates a pod's token Secret. One of its name may be left by a deleted namesake of the queue
        (`kubectl replace --force`), waiting for the garbage collector: reused, its token would vanish
        under the new worker, and its made-at would show that worker the old pod's executions. It is
        made anew. One that is not a worker token of this queue's name is left as it is (or ours,
        from a retried create). Returns the Secret there now."""
        there, _ = await resources.create_replacing(self._client, resources.secrets_path(queue.namespace), body,
                                         leftover=lambda existing: workers.namesakes_credential(existing, queue))
        return there

    async def _read_refusal(self, queue: QueueObject, pod: str) -> None:
        assert self._registry is not None
        try:
            body = await self._client.get(f"{resources.leases_path(queue.namespace)}/{leases.refusal_lease_name(pod)}")
        except client_.ApiError as exc:
            if exc.not_found:
                return
            raise
        self._registry.refusals.seen(body)

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
        refusal = self._registry.refusals.lease_uid(queue, name) if self._registry is not None else ""
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
            try:
                await resources.delete_exact(self._client, path, secret["metadata"]["uid"])
            except client_.ApiError as exc:
                raise _quiet_delete(exc, path) from None

    def _unlisted_credentials(self, key: QueueKey, listing: PodListing,
                              status: spec_.WorkersStatus) -> list[tuple[str, SecretName, float | None]]:
        """Per-worker tokens of a counted index whose pod is not listed: (pod, its Secret, until when
        its pod may still be coming, or None). One made in the last ORPHAN_GRACE_SECONDS whose pod was
        never listed here may be coming: its create may be under way on the replica that stood down a
        moment ago. The others' pods are gone: deleted from outside (listed here before), or never made."""
        now = self._clock()
        previous = self._listed.get(key)
        # Listed at some pass before: a token whose deletion failed is retried, its pod not taken for
        # one coming (a pod too many, then: the queue's new worker was deleted in its place).
        # Counted as finished in the status (by whichever replica): it was made, and is gone now.
        seen = ((previous.pods if previous is not None else frozenset()) | self._gone.get(key, frozenset())
                | set(status.counted))
        found: list[tuple[str, SecretName, float | None]] = []
        for pod, secret in self._store.worker_credential_secrets(key).items():
            index = workers.pod_index(pod)
            if pod in listing.pods or index is None or index >= status.next_index:
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
        self._gone[key] = frozenset(pod for pod, _, until in unlisted if until is None)
        now = self._clock()
        if key in self._released:  # only pods whose token is still there, each until its next look
            names = {name for name, _, _ in unlisted}
            local = self._monotonic()
            self._released[key] = {pod: until for pod, until in self._released[key].items()
                                   if until > local and pod in names}
        for pod, secret, until in unlisted:
            if until is not None:
                self._queue.add_after(key, until - now)
                continue
            if await self._still_there(key, listing.queue_uid, pod):
                continue
            path = f"{resources.secrets_path(secret[0])}/{secret[1]}"
            try:
                await self._client.delete(path)
            except client_.ApiError as exc:
                if not exc.not_found:
                    raise _quiet_delete(exc, path) from None

    async def _tokens_deleted(self, queue: QueueObject, pods: list[str], there: dict[str, float],
                              local: float) -> set[str]:
        """Which of the pods' token Secrets the API server says are gone, or no tokens of this queue's
        any more (one listing of the queue's tokens); none when it cannot tell. Those there go in
        `there`, until the next resync."""
        params = {"labelSelector": f"app.kubernetes.io/component={workers.CREDENTIAL_COMPONENT},"
                                   f"{workers.QUEUE_LABEL}={workers.queues_label(queue)}"}
        try:
            listed = await self._client.get(resources.secrets_path(queue.namespace), params)
        except client_.ERRORS as exc:
            logger.debug("listing the worker tokens of %s/%s failed: %s", *queue.key, _failure(exc))
            return set()
        valid = set()
        for secret in listed.get("items") or []:
            credential = workers.credential_from_secret(secret)
            # As the store takes it: an empty token opens nothing, and a Secret names its pod.
            if credential is not None and credential.token and workers.credential_of(secret, queue) and (
                    secret["metadata"].get("name") == workers.credential_secret_name(credential.pod)):
                valid.add(credential.pod)
        for pod in valid.intersection(pods):
            there[pod] = local + self._settings.worker_resync_seconds
        return set(pods) - valid

    async def _still_there(self, key: QueueKey, uid: str, pod: str) -> bool:
        """Whether a pod of the queue not listed by its label is there all the same: released from the
        queue (someone edited its labels, as one takes a pod out of a ReplicaSet), its worker runs on
        with its token. Replaced as a pod gone, it keeps that token until it is gone too. Listed by
        name (the verb the operator has on pods), and looked at again only at the resync's pace."""
        released = self._released.setdefault(key, {})
        now = self._monotonic()
        if released.get(pod, -math.inf) > now:
            return True
        params = {"fieldSelector": f"metadata.name={pod}"}
        try:
            page = await self._client.get(resources.pods_path(key[0]), params)
        except client_.ApiError as exc:
            raise exc.quiet(f"listing pod {pod} failed ({exc.status} {exc.reason})") from None
        owners = [ref for item in page.get("items") or [] for ref in (item.get("metadata") or {}).get("ownerReferences")
                  or []]
        if any(ref.get("uid") == uid and ref.get("controller") for ref in owners):
            released[pod] = now + self._settings.worker_resync_seconds
            return True
        released.pop(pod, None)
        return False

    async def _delete_queue(self, queue: QueueObject) -> None:
        await resources.delete_exact(self._client, resources.queue_path(queue.namespace, queue.name), queue.uid)

    def _control_plane_url(self) -> str:
        s = self._settings
        return (s.worker_control_plane_url or s.public_url or f"http://127.0.0.1:{s.http_port}").rstrip("/")
