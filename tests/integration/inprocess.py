"""The status writer and the worker supervisor in-process on the real API server, their Store fed by
the test, so that the order of events is exactly the test's (see the `in_process` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from tests.integration.conftest import Kube
from workerqueue_operator.core import queues
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.feed import Feed
from workerqueue_operator.core.reconciler import Reconciler
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store
from workerqueue_operator.core.supervisor import Supervisor
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models.settings import Settings


async def eventually(predicate: Callable[[], Any], *, timeout: float = 10, what: str = "") -> None:
    """wait_for, yielding to the event loop the in-process parts run on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running(work: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """`work` runs as a task while in the block."""
    task = asyncio.create_task(work())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class InProcess:
    """The status writer and the worker supervisor run here, in-process on the real API server, with
    their Store fed by hand, so that the order of events is exactly a test's; the session's operator
    is paused meanwhile (it would write the status itself)."""

    def __init__(self, kube: Kube, kubeconfig: Path, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name, self.key = kube, namespace, name, (namespace, name)
        self.secret = (namespace, f"{name}-token")
        self.spec = {"queueId": f"{name}-{namespace}", "temporal": {"host": "t:7233", "namespace": "n"},
                     "auth": {"tokenSecretRefs": [{"name": self.secret[1], "key": "token"}]}}
        self.client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
        self.store = Store(settings=Settings())
        activity = Activity(identity="test", priority=0)
        self.writer = Reconciler(store=self.store, client=self.client, resync_seconds=3600,
                                 events=EventPoster(self.client), activity=activity)
        self.supervisor = Supervisor(store=self.store, client=self.client, settings=Settings(),
                                     events=EventPoster(self.client), activity=activity)
        kube.put_secret(namespace, self.secret[1], token="t")

    async def create_ready(self) -> None:
        """The queue made, seen (as the watch would tell), and its status written: Ready."""
        self.store.upsert_queue(queues.QueueObject.from_body(self.kube.create_queue(self.namespace, self.name,
                                                                                    **self.spec)))
        self.store.fill_secret(self.secret, {"token": "t"})
        await self.writer.reconcile(self.key)
        assert (self.kube.condition(self.namespace, self.name) or {}).get("status") == "True"

    def watched(self) -> None:
        """The watch catches up: the Store holds the queue as the API server has it now."""
        self.store.refresh_queue(queues.QueueObject.from_body(self.kube.get_queue(self.namespace, self.name)))

    def writer_with(self, *, client: client_.KubeClient | None = None, activity: Activity | None = None,
                    **options: Any) -> Reconciler:
        """A status writer of its own on the Store, through `client` (the harness's by default), standing
        by or active as `activity` says (standalone, active, by default), made with `options`."""
        client = client or self.client
        return Reconciler(store=self.store, client=client, resync_seconds=options.pop("resync_seconds", 3600),
                          events=options.pop("events", None) or EventPoster(client),
                          activity=activity or Activity(identity="test", priority=0), **options)

    def supervisor_with(self, **settings: Any) -> Supervisor:
        """A supervisor of its own on the Store, with these settings (a replica started anew, say)."""
        return Supervisor(store=self.store, client=self.client, settings=Settings(**settings),
                          events=EventPoster(self.client), activity=Activity(identity="test", priority=0))

    async def tokens_watched(self) -> None:
        """The Secret watch catches up on the namespace's worker tokens: made or gone, as the API server
        has them now."""
        feed = Feed(self.store, self.writer, self.supervisor)
        listed = (await self.client.get(resources.secrets_path(self.namespace)))["items"]
        for body in listed:
            feed.secret_upserted(body)
        there = {body["metadata"]["name"] for body in listed}
        for secret in self.store.worker_credential_secrets(self.key).values():
            if secret[1] not in there:
                feed.secret_deleted(secret, None)

    async def first_pod_with_registry(self, **registry: Any) -> tuple[Registry, Supervisor, queues.QueueObject]:
        """A supervisor of its own with a worker registry (made with `registry`), the queue Ready and its
        first pod made: the registry, the supervisor and the queue."""
        made = Registry(client=self.client, events=EventPoster(self.client), queue_of=self.store.queue, **registry)
        supervisor = Supervisor(store=self.store, client=self.client, settings=Settings(),
                                events=EventPoster(self.client), activity=Activity(identity="test", priority=0),
                                registry=made)
        await self.create_ready()
        self.watched()
        await supervisor._reconcile(self.key)
        queue = self.store.queue(self.key)
        assert queue is not None and self.kube.pod_names(self.namespace, self.name) == [f"{self.name}-w0"]
        return made, supervisor, queue

    async def first_pod_on(self, *, shift: list[float], local: list[float] | None = None) -> Supervisor:
        """A single-execution queue, Ready, its first pod made by a supervisor of its own whose wall
        clock runs `shift[0]` s ahead (and its monotonic clock `local[0]`), which the test moves."""
        self.spec.update(singleExecution=True)
        supervisor = Supervisor(store=self.store, client=self.client, settings=Settings(),
                                events=EventPoster(self.client), activity=Activity(identity="test", priority=0),
                                clock=lambda: time.time() + shift[0],
                                monotonic=lambda: time.monotonic() + (local[0] if local else 0.0))
        await self.create_ready()
        self.watched()
        await supervisor._reconcile(self.key)
        assert self.kube.pod_names(self.namespace, self.name) == [f"{self.name}-w0"]
        return supervisor

    async def first_pod_finished(self) -> None:
        """A single-execution queue, Ready, its first pod made (seen by the watch) and succeeded."""
        self.spec.update(singleExecution=True)
        await self.create_ready()
        self.watched()
        await self.supervisor.reconcile(self.key)
        assert self.kube.pod_names(self.namespace, self.name) == [f"{self.name}-w0"]
        self.watched()
        self.kube.set_phase(self.namespace, f"{self.name}-w0", "Succeeded", exit_code=0)
