"""Carries out worker plans: lists a queue's pods, then creates, deletes, records and reports.

Fed by the queue informer (through the Store, on every replica), by kopf's pod events (which
peering pauses on a standby) and by a resync of its own: so every reconcile first asks `Activity`
whether this replica is the active one. A standby keeps track of the queues all the same, so that
it acts at once when it takes over. kopf does not watch queues: a second watch of 10,000 queues
cost as much memory and CPU as the operator's own. One
reconcile per queue at a time; pod names are deterministic, so a retried or concurrent create
fails with AlreadyExists instead of making a second pod (also in the moment two replicas overlap).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from workerqueue_operator.core import workers
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.queues import QueueKey, QueueObject
from workerqueue_operator.core.reconciler import queue_ref_body
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store
from workerqueue_operator.core.workqueue import WorkQueue
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models import spec as spec_

logger = logging.getLogger(__name__)


def owner_key(pod: Mapping[str, Any]) -> QueueKey | None:
    """The queue that controls a pod, from its ownerReference."""
    meta = pod.get("metadata", {})
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == spec_.KIND and ref.get("apiVersion") == resources.API_VERSION:
            return (meta.get("namespace", ""), ref["name"])
    return None


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
        clock: Callable[[], float] = time.time,
        concurrency: int = 32,
    ) -> None:
        self._store = store
        self._activity = activity
        self._client = client
        self._events = events
        self._registry = registry
        self._settings = settings
        self._clock = clock
        self._queue: WorkQueue[QueueKey] = WorkQueue(self.reconcile, name="workers", concurrency=concurrency)
        # Queues that have or may have workers; the others (workers run elsewhere) cost nothing here.
        self._tracked: set[QueueKey] = set()
        # status.workers as last written: newer than what the watch may have delivered so far.
        self._written: dict[tuple[str, str, str], spec_.WorkersStatus] = {}
        # A queue that becomes able to serve (e.g. its Secret appears) may now get its workers.
        self._serving: dict[QueueKey, bool] = {}
        store.subscribe(self._store_changed)
        activity.subscribe(self._activity_changed)

    # --- fed by the queue informer (every replica) and kopf's pod events (the active one) --------

    def queue_changed(self, queue: QueueObject) -> None:
        key = queue.key
        if key not in self._tracked:
            # status.workers.live alone (the registry's count) says nothing about pods.
            if not (workers.manages_pods(queue.spec) or set(queue.status.get("workers") or {}) - {"live"}
                    or (queue.namespace, queue.name, queue.uid) in self._written):
                return  # a queue whose workers run elsewhere, and always did: nothing to look at
            self._tracked.add(key)
        self._queue.add(key)

    def queue_deleted(self, key: QueueKey) -> None:
        self._tracked.discard(key)
        self._serving.pop(key, None)
        for written in [w for w in self._written if w[:2] == key]:
            del self._written[written]

    def pod_event(self, body: Mapping[str, Any]) -> None:
        key = owner_key(body)
        if key is not None and key in self._tracked:
            self._queue.add(key)

    def _store_changed(self, key: QueueKey) -> None:
        if key not in self._tracked:
            return
        resolution = self._store.resolution(key)
        serving = resolution is not None and (resolution.config is not None or resolution.awaiting_generated_token)
        if self._serving.get(key) != serving:
            self._serving[key] = serving
            self._queue.add(key)

    def _activity_changed(self, active: bool) -> None:
        # What we wrote may have been overwritten by the other replica meanwhile: the watch says.
        self._written.clear()
        if active:
            for key in self._tracked:
                self._queue.add(key)

    async def run(self) -> None:
        resync = asyncio.create_task(self._resync())
        try:
            await self._queue.run()
        finally:
            resync.cancel()
            await asyncio.gather(resync, return_exceptions=True)

    async def _resync(self) -> None:
        # Reconcile from what exists even when no event comes (a missed watch event, a stuck pod).
        while True:
            await asyncio.sleep(self._settings.worker_resync_seconds)
            if self._activity.is_active():
                for key in list(self._tracked):
                    self._queue.add(key)

    # --- the reconcile --------------------------------------------------------------------------

    async def reconcile(self, key: QueueKey) -> None:
        if not self._activity.is_active():
            return  # only the active replica changes pods
        queue = self._store.queue(key)
        if queue is None or queue.deleting:
            return  # deleting a queue deletes its pods: the garbage collector owns that
        written_key = (queue.namespace, queue.name, queue.uid)
        pods = await self._list_pods(queue)
        if not self._activity.is_active():
            return  # paused while listing
        alive = [p["metadata"]["name"] for p in pods if workers.Pod.from_body(p).alive]
        if self._registry is not None:
            # A worker whose pod ended never says goodbye (SIGTERM sends no disconnect): it is gone now.
            self._registry.pods_ended(key, alive)
        previous_index = (self._written.get(written_key) or spec_.WorkersStatus.model_validate(
            queue.status.get("workers") or {})).next_index
        await self._delete_orphan_credentials(key, {p["metadata"]["name"] for p in pods}, previous_index)
        previous = self._written.get(written_key) or spec_.WorkersStatus.model_validate(
            queue.status.get("workers") or {})
        now = self._clock()
        created = workers.from_rfc3339(queue.created) if queue.created else now
        plan = workers.plan(queue, [workers.Pod.from_body(p) for p in pods], previous=previous, now=now,
                            created=created, settings=self._settings)

        resolution = self._store.resolution(key)
        create = plan.create
        status = plan.workers
        if create and (resolution is None or (resolution.config is None and not resolution.awaiting_generated_token)):
            # Workers of a queue that cannot serve /start would only fail: wait until it can. The token
            # Secret the operator is creating right now is no reason to wait (pods refer to it by name).
            create, status = (), status.model_copy(update={"next_index": previous.next_index})
        if status != previous:
            await self._write_status(queue, status)
        involved = queue_ref_body(queue)

        for event in plan.events:
            self._events.post(involved=involved, reason=event.reason,
                              message=event.message, warning=event.warning)
        await asyncio.gather(*(self._delete_pod(queue.namespace, name) for name in plan.delete))
        if create:
            refused = await self._create_pods(queue, create)
            if refused != status.last_error:
                await self._write_status(queue, status.model_copy(update={"last_error": refused}))
        if plan.delete_queue is not None:
            self._events.post(involved=involved, reason=plan.delete_queue.reason,
                              message=plan.delete_queue.message, warning=plan.delete_queue.warning)
            await self._delete_queue(queue)
        elif plan.requeue_after is not None:
            self._queue.add_after(key, plan.requeue_after)

    async def _list_pods(self, queue: QueueObject) -> list[dict[str, Any]]:
        selector = f"{workers.QUEUE_LABEL}={workers.queues_label(queue)}"
        listing = await self._client.get(resources.pods_path(queue.namespace), {"labelSelector": selector})
        # Only pods this very queue controls: a deleted and re-created namesake owns none of them.
        return [p for p in listing.get("items", [])
                if any(ref.get("uid") == queue.uid and ref.get("controller")
                       for ref in p.get("metadata", {}).get("ownerReferences") or [])]

    async def _write_status(self, queue: QueueObject, status: spec_.WorkersStatus) -> None:
        # `live` is the registry's to write: a copy here would be stale.
        payload = status.model_dump(by_alias=True, mode="json", exclude={"live"})
        if await resources.patch_queue_status(self._client, queue.namespace, queue.name, {"workers": payload}):
            self._written[(queue.namespace, queue.name, queue.uid)] = status

    async def _create_pods(self, queue: QueueObject, indices: tuple[int, ...]) -> str | None:
        """Creates the pods; returns the API server's reason when it refuses the pod itself."""
        inputs = workers.PodInputs(
            control_plane_url=self._control_plane_url(),
            secrets_digest=workers.secrets_digest(queue, self._store.secrets, self._settings),
            owner=resources.owner_reference(queue_ref_body(queue)),
        )
        bodies = [workers.build_pod(queue, i, inputs=inputs, settings=self._settings) for i in indices]
        # Each pod's own token first, so that its worker can call /start as soon as it runs.
        await asyncio.gather(*(resources.create_if_absent(
            self._client, resources.secrets_path(queue.namespace),
            workers.credential_secret_body(queue, b["metadata"]["name"], secrets.token_urlsafe(32)))
            for b in bodies))
        results = await asyncio.gather(
            *(resources.create_if_absent(self._client, resources.pods_path(queue.namespace), b) for b in bodies),
            return_exceptions=True)
        refused: str | None = None
        involved = queue_ref_body(queue)
        for body, result in zip(bodies, results, strict=True):
            name = body["metadata"]["name"]
            if result is True:
                self._events.post(involved=involved, reason="WorkerCreated",
                                  message=f"created worker pod {name}")
            elif isinstance(result, client_.ApiError) and result.status in (400, 403, 422):
                refused = f"pod {name} was refused: {result.message}"
                self._events.post(involved=involved, reason="PodCreationFailed",
                                  message=refused, warning=True)
            elif isinstance(result, BaseException):
                raise result
        return refused

    async def _delete_pod(self, namespace: str, name: str) -> None:
        for path in (f"{resources.pods_path(namespace)}/{name}",
                     f"{resources.secrets_path(namespace)}/{workers.credential_secret_name(name)}"):
            try:
                await self._client.delete(path)
            except client_.ApiError as exc:
                if not exc.not_found:
                    raise

    async def _delete_orphan_credentials(self, key: QueueKey, pods: set[str], next_index: int) -> None:
        """Per-worker tokens whose pod is gone (deleted from outside, or never created)."""
        for pod, secret in self._store.worker_credential_secrets(key).items():
            index = workers.pod_index(pod)
            if pod not in pods and index is not None and index < next_index:
                try:
                    await self._client.delete(f"{resources.secrets_path(secret[0])}/{secret[1]}")
                except client_.ApiError as exc:
                    if not exc.not_found:
                        raise

    async def _delete_queue(self, queue: QueueObject) -> None:
        try:
            await self._client.delete(resources.queue_path(queue.namespace, queue.name),
                                      {"kind": "DeleteOptions", "apiVersion": "v1",
                                       "preconditions": {"uid": queue.uid}, "propagationPolicy": "Background"})
        except client_.ApiError as exc:
            if not (exc.not_found or exc.conflict):
                raise

    def _control_plane_url(self) -> str:
        s = self._settings
        return (s.worker_control_plane_url or s.public_url or f"http://127.0.0.1:{s.http_port}").rstrip("/")
