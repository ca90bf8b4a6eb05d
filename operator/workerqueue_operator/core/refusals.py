"""The workers of operator-made pods that /start turned away: remembered, so that their pods' failures
are not counted as crashes.

Such a worker exits 1 on its refusal and never retries (worker-protocol.md), so its pod fails; the
refusal was this operator's (a full or not ready queue, the API server unavailable), and workers.plan
asks `why` before it counts the failure. This module decides when a refusal is written to a Lease of
its own (once per pod and half a refusal period, before the worker is answered: the replica that
supervises pods may be another one), how long it is remembered (REFUSAL_SECONDS, or until its pod's
worker registers), and when its Lease goes without its pod's supervisor (sweep). What the Lease holds
is in leases.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from workerqueue_operator.core import leasecalls, pacedlog
from workerqueue_operator.core.leases import (
    Refusal,
    Worker,
    is_refusal,
    refusal_from_lease,
    refusal_lease_body,
    refusal_lease_name,
)
from workerqueue_operator.core.queues import QueueKey, QueueObject
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources

logger = logging.getLogger(__name__)

REFUSALS_KEPT = 10_000
"""How many worker pods turned away at /start are remembered, for their pod's end (see start_refused)."""
REFUSAL_SECONDS = 600.0
"""How long a refusal is remembered: the worker exits at once on it, its pod ends seconds later."""
REFUSAL_WRITE_SECONDS = 2.0
"""The refusal's Lease is written within this, before the worker is answered; else it is known here only."""
REFUSAL_RETRY_SECONDS = 5.0
"""A refusal's Lease that failed to be written is written again this much later, doubling up to a minute,
while the refusal is remembered and younger than half REFUSAL_SECONDS: its pod's failure comes seconds
after the refusal, and is counted as a crash by a replica that knows nothing of it."""
REFUSAL_SWEEP_MARGIN = 30.0
"""A refusal's Lease goes with its pod once a listing of the queue's pods begun this long after the
refusal misses that pod: room for the clocks of replicas to differ (see sweep)."""
REFUSAL_SWEEP_MAX = 100
"""Refusal Leases deleted by one sweep at most (all within leasecalls.API_TIMEOUT); the rest by the next."""


class _Refused(NamedTuple):
    monotonic: float
    wall: float
    why: str
    written_at: float | None = None
    """When (monotonic) its Lease was last written: /start refusing the pod again soon writes none."""
    lease_uid: str = ""
    """Of its Lease, to delete that very one with its pod."""
    queue_name: str = ""


class PodListing(NamedTuple):
    """A queue's pods as the supervisor last listed them: which queue (its uid), when the listing
    began (wall clock), and the pods' names."""

    queue_uid: str
    at: float
    pods: frozenset[str]


@dataclass(frozen=True)
class QueueRef:
    """A queue as a pod's token names it, for a refusal at /start where this replica does not see it."""

    namespace: str
    name: str
    uid: str

    @property
    def key(self) -> QueueKey:
        return (self.namespace, self.name)


class Refusals:
    """The refusals this replica knows of: made here, or brought by the Lease watch (see seen). Owned by
    the Registry, which tells it of the workers it registers and lends it its calls and tasks."""

    def __init__(
        self,
        *,
        client: client_.KubeClient,
        calls: leasecalls.LeaseCalls,
        workers_of: Callable[[QueueKey], Iterable[Worker]],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[Any]],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._client = client
        self._calls = calls
        self._workers_of = workers_of
        """The registrations filed under a queue's name (the registry's)."""
        self._spawn = spawn
        """Starts a task the registry ends with itself (see Registry.run)."""
        self._clock = clock
        self._monotonic = monotonic
        self._refused: dict[tuple[str, str, str], _Refused] = {}
        """When (monotonic, wall clock) and why /start turned away a pod's worker, by (namespace, pod,
        queue uid), oldest first: see start_refused. The uid: a queue made again under its name names
        its pods the same."""
        self._writes: dict[tuple[str, str, str], asyncio.Task[Any]] = {}
        self._retries: dict[tuple[str, str, str], asyncio.TimerHandle] = {}
        """Records whose write failed, waiting to be written again (see _write_again)."""
        self._stopped = False
        self._log = pacedlog.PacedLog(logger)

    async def start_refused(self, queue: QueueObject | QueueRef, pod: str, why: str, *, wait: bool = True) -> None:
        """/start turned away the worker of a pod the operator made. That worker exits 1 and never
        retries (worker-protocol.md), so its pod fails; the refusal was this operator's (a full or not
        ready queue, the API server unavailable), not a crash of the worker, and must not count
        towards the queue's crash loop (see workers.plan).

        Remembered here, and written to a Lease (within REFUSAL_WRITE_SECONDS) before the worker is
        answered, so before its pod fails: the replica that supervises pods may be another one, or
        restart meanwhile. Without `wait` (the API server failing already) it is written meanwhile."""
        key = (queue.namespace, pod, queue.uid)
        known = self._refused.get(key)
        now = self._monotonic()
        written_at, lease_uid = (known.written_at, known.lease_uid) if known is not None else (None, "")
        self._remember(key, _Refused(now, self._clock(), why, written_at, lease_uid, queue.name))
        # Once per pod and half a refusal period, one write at a time: a pod token presented in a
        # loop, or by many callers at once, makes no more writes.
        if written_at is not None and now - written_at < REFUSAL_SECONDS / 2:
            return
        task = self._writes.get(key)
        if task is None:
            task = self._writes[key] = self._spawn(self._write(queue, pod, why))  # the registry ends it
            task.add_done_callback(lambda _: self._writes.pop(key, None))
        if wait:
            # A caller that leaves does not cut the write short, nor is it failed by a write that the
            # registry's stop cut short.
            await asyncio.wait({task})

    async def _write(self, queue: QueueObject | QueueRef, pod: str, why: str, *,
                     retry: float | None = None) -> None:
        key = (queue.namespace, pod, queue.uid)
        retry = REFUSAL_RETRY_SECONDS if retry is None else retry
        known = self._refused.get(key)
        at = known.wall if known is not None else self._clock()  # when it was refused, not when written
        body = refusal_lease_body(Refusal(queue=queue.key, queue_uid=queue.uid, pod=pod, at=at, why=why),
                                  queue_name=queue.name)
        path = f"{resources.leases_path(queue.namespace)}/{body['metadata']['name']}"
        try:
            async with asyncio.timeout(REFUSAL_WRITE_SECONDS):
                created = await self._calls.create(body)
                if created is None:
                    # An earlier record of this pod's, or of a namesake queue's pod: made anew. A Lease
                    # of that name that is no such record is someone else's.
                    existing = await self._client.request("GET", path, timeout=REFUSAL_WRITE_SECONDS)
                    if not is_refusal(existing):
                        logger.warning("the Lease %s/%s is in the way of a refusal record; it is known to this "
                                       "replica only", queue.namespace, body["metadata"]["name"])
                        return
                    await resources.delete_exact(self._client, path, existing["metadata"]["uid"])
                    created = await self._calls.create(body)
        except client_.ERRORS as exc:  # a timeout too
            cause = type(exc).__name__ if not str(exc) else exc
            if isinstance(exc, client_.ApiError) and exc.refused:  # RBAC, a policy: no retry mends it
                self._log.warning("refusal_write_refused", "recording the refusal of pod %s/%s was refused, known "
                                  "to this replica only: %s", queue.namespace, pod, cause)
                return
            if self._stopped:  # a write under way at the stop: none after it
                return
            self._log.warning("refusal_write_failed", "recording the refusal of pod %s/%s failed, known to this "
                              "replica only (tried again in %.0fs): %s", queue.namespace, pod, retry, cause)
            self._retries[key] = asyncio.get_running_loop().call_later(retry, self._write_again, queue, pod,
                                                                       min(retry * 2, 60.0))
            return
        current = self._refused.get(key)
        if created is not None and current is not None:
            self._refused[key] = current._replace(written_at=self._monotonic(),
                                                  lease_uid=(created.get("metadata") or {}).get("uid", ""))

    def _write_again(self, queue: QueueObject | QueueRef, pod: str, retry: float) -> None:
        key = (queue.namespace, pod, queue.uid)
        self._retries.pop(key, None)
        refused = self._refused.get(key)
        # Not if forgotten (its worker registered after all, or too many since), written or being
        # written meanwhile (/start refused the pod again), or old: its pod has long failed by then.
        if refused is None or refused.written_at is not None or key in self._writes \
                or self._monotonic() - refused.monotonic >= REFUSAL_SECONDS / 2:
            return
        task = self._writes[key] = self._spawn(self._write(queue, pod, refused.why, retry=retry))
        task.add_done_callback(lambda _: self._writes.pop(key, None))

    def stop(self) -> None:
        """The registry stops: no record is written again after it (its task would outlive it)."""
        self._stopped = True
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()

    def settle(self) -> None:
        """Logs what the paced log left out, once its pace allows (the registry's tick calls it)."""
        self._log.settle()

    def _remember(self, key: tuple[str, str, str], refused: _Refused) -> None:
        self._refused.pop(key, None)
        self._refused[key] = refused
        if len(self._refused) > REFUSALS_KEPT:
            del self._refused[next(iter(self._refused))]

    def registered(self, worker: Worker) -> None:
        """The registry holds a registration of this worker (made or taken in): a refusal of its pod
        before it was made is over."""
        if worker.pod is None or not self._refused:
            return
        key = (worker.namespace, worker.pod, worker.queue_uid)
        refused = self._refused.get(key)
        # Registered after all, by a /start after the refusal; not the Lease of the very claim that
        # was answered 503 for taking too long, which the watch may bring after it.
        if refused is not None and worker.registered_at > refused.wall:
            del self._refused[key]

    def seen(self, body: dict[str, Any]) -> None:
        """A refusal's Lease, written here or by another replica: brought by the watch, or read by the
        supervisor before the watch brought it. Any other Lease is left out."""
        refusal = refusal_from_lease(body)
        if refusal is None:
            return
        key = (refusal.queue[0], refusal.pod, refusal.queue_uid)
        age = max(0.0, self._clock() - refusal.at)
        known = self._refused.get(key)
        if age > REFUSAL_SECONDS:
            # Its pod went without the supervisor (deleted by someone else): seen again by a relist.
            meta = body["metadata"]
            self._spawn(self._delete_expired(f"{resources.leases_path(meta['namespace'])}/{meta['name']}",
                                             meta.get("uid", "")))
            return
        if known is not None and known.wall >= refusal.at:
            if not known.lease_uid:
                self._refused[key] = known._replace(lease_uid=body["metadata"].get("uid", ""))
            return
        # Not once its pod's worker registered after it (a Lease seen again by a relist).
        if any(w.pod == refusal.pod and w.queue_uid == refusal.queue_uid and w.registered_at > refusal.at
               for w in self._workers_of(refusal.queue)):
            return
        written = self._monotonic() - age
        uid = body["metadata"].get("uid", "")
        self._remember(key, _Refused(written, refusal.at, refusal.why, written, uid, refusal.queue[1]))

    async def _delete_expired(self, path: str, uid: str) -> None:
        try:
            await resources.delete_exact(self._client, path, uid)
        except client_.ERRORS as exc:
            logger.debug("deleting the expired refusal %s failed: %s", path, exc)

    def lease_uid(self, queue: QueueObject, pod: str) -> str:
        """The uid of the Lease recording a refusal of this pod's worker, as known here ("": none)."""
        found = self._refused.get((queue.namespace, pod, queue.uid))
        return found.lease_uid if found is not None else ""

    def why(self, queue: QueueObject, pod: str) -> str:
        """Why /start last turned away this pod's worker ("": it did not, or registered it since, as
        this replica knows)."""
        found = self._refused.get((queue.namespace, pod, queue.uid))
        # An expired one is kept until sweep deletes its Lease: forgotten, it would stay for good.
        if found is None or self._monotonic() - found.monotonic > REFUSAL_SECONDS:
            return ""
        return found.why

    async def sweep(self, listing: Callable[[QueueKey], PodListing | None]) -> int:
        """Deletes the refusal Leases that nothing else would: those of pods deleted without the
        supervisor (by a user, say), and expired ones. The active replica's, from its resync;
        `listing` gives a queue's pods as last listed there (None: not listed). How many it deleted."""
        now, stale = self._monotonic(), []
        for key, refused in self._refused.items():
            namespace, pod, queue_uid = key
            listed = listing((namespace, refused.queue_name))
            gone = (listed is not None and listed.queue_uid == queue_uid and pod not in listed.pods
                    and listed.at - refused.wall > REFUSAL_SWEEP_MARGIN)
            if (gone or now - refused.monotonic > REFUSAL_SECONDS) and key not in self._writes:
                stale.append((key, refused))
                if len(stale) == REFUSAL_SWEEP_MAX:
                    break
        deleted = 0
        try:
            # All within one bound, and none after a failure: the resync that calls it waits meanwhile.
            async with asyncio.timeout(leasecalls.API_TIMEOUT):
                for key, refused in stale:
                    if refused.lease_uid:
                        path = f"{resources.leases_path(key[0])}/{refusal_lease_name(key[1])}"
                        await resources.delete_exact(self._client, path, refused.lease_uid)
                        deleted += 1
                    if self._refused.get(key) is refused:
                        del self._refused[key]
        except client_.ERRORS as exc:  # a timeout too: the rest are tried again by the next sweep
            logger.warning("deleting refusal records failed after %d of %d: %s", deleted, len(stale),
                           type(exc).__name__ if not str(exc) else exc)
        return deleted
