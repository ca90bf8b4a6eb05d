"""Runs the operator: kopf, the informers feeding the Store, the status reconciler, the HTTP API.

kopf owns the process's signals: on SIGINT/SIGTERM it returns, and everything else started here
is stopped in `finally`, so no task outlives the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
from collections.abc import Callable
from typing import Any

import kopf
from aiohttp import web
from pydantic import ValidationError

import workerqueue_operator
from workerqueue_operator import handlers
from workerqueue_operator.api import app as app_
from workerqueue_operator.core import queues, reviews, temporal, workers
from workerqueue_operator.core import registry as registry_
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.reconciler import LiveStatus, Reconciler
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store, WorkerCredential
from workerqueue_operator.core.supervisor import Supervisor
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import informer, resources
from workerqueue_operator.models import settings as settings_

logger = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 5.0


def configure_logging(verbose: bool) -> None:
    # kopf's JSON format: one object per line, `extra` fields included; structured for log pipelines.
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON)


class Feed:
    """Turns informer callbacks into Store updates (and Secret reads for newly used Secrets)."""

    def __init__(self, store: Store, reconciler: Reconciler) -> None:
        self._store = store
        self._reconciler = reconciler
        # Until the Secrets have been listed once, a Secret a queue uses will come through the list;
        # after that, one that is still unknown passed by before it was used, and is read on its own.
        self.secrets_listed = False

    def secrets_synced(self) -> None:
        self.secrets_listed = True
        self._reconciler.fetch_secrets(self._store.unknown_secrets())

    def queue_upserted(self, body: dict[str, Any]) -> None:
        try:
            queue = queues.QueueObject.from_body(body)
        except (ValidationError, KeyError) as exc:
            # The API server's schema makes this rare (e.g. a CRD older than the operator).
            meta = body.get("metadata", {})
            logger.warning("ignoring WorkerQueue %s/%s: %s", meta.get("namespace"), meta.get("name"),
                           str(exc).splitlines()[0])
            return
        missing = self._store.upsert_queue(queue)
        if missing and self.secrets_listed:
            self._reconciler.fetch_secrets(missing)

    def queue_deleted(self, key: informer.ObjectKey, body: dict[str, Any] | None) -> None:
        self._store.remove_queue(key)

    def secret_upserted(self, body: dict[str, Any]) -> None:
        name = informer.object_key(body)
        credential = workers.credential_from_secret(body)
        if credential is not None:
            queue, pod, token = credential
            self._store.upsert_worker_credential(name, WorkerCredential(queue=queue, pod=pod), token)
        if self._store.is_used(name):
            self._store.upsert_secret(name, queues.decode_secret_data(body))

    def secret_deleted(self, key: informer.ObjectKey, body: dict[str, Any] | None) -> None:
        self._store.remove_worker_credential(key)
        self._store.upsert_secret(key, None)


class Watches:
    """The informers of every watched scope, started in the order that keeps start-up cheap."""

    def __init__(self, client: client_.KubeClient, feed: Feed, namespaces: tuple[str, ...],
                 registry: Registry) -> None:
        scopes: tuple[str | None, ...] = namespaces or (None,)
        self.queues = [
            informer.Informer(client, resources.queues_path(ns), on_upsert=feed.queue_upserted,
                              on_delete=feed.queue_deleted, name=f"workerqueues/{ns or '*'}")
            for ns in scopes]
        self.secrets = [
            informer.Informer(client, resources.secrets_path(ns), on_upsert=feed.secret_upserted,
                              on_delete=feed.secret_deleted, name=f"secrets/{ns or '*'}")
            for ns in scopes]
        # Worker registrations: only the Leases this operator labels, not every Lease of the cluster.
        self.leases = [
            informer.Informer(client, resources.leases_path(ns), on_upsert=registry.lease_upserted,
                              on_delete=registry.lease_deleted, name=f"leases/{ns or '*'}",
                              label_selector=registry_.SELECTOR)
            for ns in scopes]
        self._feed = feed

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in (*self.queues, *self.secrets, *self.leases))

    async def run(self, reconciler: Reconciler) -> None:
        # Queues first, so that the Secret list keeps exactly the Secrets they use (no reads one by
        # one); statuses only once both are known, so that no queue flaps through "not found".
        tasks = [asyncio.create_task(i.run(), name=f"informer {i.name}") for i in (*self.queues, *self.leases)]
        try:
            await asyncio.gather(*(i.synced.wait() for i in self.queues))
            tasks += [asyncio.create_task(i.run(), name=f"informer {i.name}") for i in self.secrets]
            await asyncio.gather(*(i.synced.wait() for i in self.secrets))
            self._feed.secrets_synced()
            # What exists now (kopf, the clients, every queue) lives as long as the process: out of the
            # collector's sight, a full collection no longer walks it while /start is busy.
            gc.freeze()
            tasks.append(asyncio.create_task(reconciler.run(), name="status reconciler"))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def serve_http(app: web.Application, settings: settings_.Settings) -> tuple[web.AppRunner, int]:
    context = None
    if settings.tls_cert_file and settings.tls_key_file:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    # On SIGTERM, requests still in flight get SHUTDOWN_SECONDS: /start takes microseconds, and a
    # stream passed through to an upstream is then cut, so that its worker retries elsewhere well
    # within the pod's termination grace period (the chart's 30 s) instead of holding it up.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port, ssl_context=context)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else settings.http_port
    return runner, int(bound)


async def run(
    settings: settings_.Settings,
    *,
    kubeconfig: str | None = None,
    stop_flag: asyncio.Event | None = None,
    peering: str | None = None,
    priority: int = 0,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """The whole operator, until SIGINT/SIGTERM (main thread) or `stop_flag`.

    With `peering`, replicas coordinate through that kopf peering object: the one with the highest
    `priority` runs the handlers (worker pods); every replica serves the HTTP API and keeps statuses.
    """
    version = workerqueue_operator.__version__
    client = client_.KubeClient(client_.load_configuration(kubeconfig))
    store = Store(settings=settings, version=version)
    events = EventPoster(client)
    reconciler = Reconciler(store=store, client=client, resync_seconds=settings.status_resync_seconds, events=events,
                            watched_namespaces=settings.namespaces)
    feed = Feed(store, reconciler)
    registry = Registry(client=client, events=events, queue_of=store.queue)
    watches = Watches(client, feed, settings.namespaces, registry)
    reviewer = reviews.Reviewer(client, audiences=settings.token_review_audiences, ttl=settings.auth_cache_seconds)
    temporal_ = temporal.Temporal(timeout=settings.temporal_timeout_seconds)
    kopf_ready = asyncio.Event()

    def ready() -> bool:
        return kopf_ready.is_set() and watches.synced()

    app = app_.make_app(store=store, reviewer=reviewer, registry=registry, temporal_=temporal_, kube=client,
                        settings=settings, version=version, ready=ready)
    http, port = await serve_http(app, settings)
    logger.info("HTTP API listening", extra={"host": settings.http_host, "port": port})
    if on_listening is not None:
        on_listening(port)

    background = asyncio.create_task(watches.run(reconciler), name="watches")
    supervisor = Supervisor(store=store, client=client, settings=settings, events=events, registry=registry)
    background_supervisor = asyncio.create_task(supervisor.run(), name="worker supervisor")
    background_events = asyncio.create_task(events.run(), name="event poster")
    background_registry = asyncio.create_task(registry.run(), name="worker registry")
    live_status = LiveStatus(store=store, registry=registry, client=client)
    background_live = asyncio.create_task(live_status.run(), name="live worker counts")
    kopf_registry = handlers.registry(settings=settings, supervisor=supervisor)
    try:
        await kopf.operator(
            registry=kopf_registry,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            # Standalone unless replicas share a peering object: then one reconciles, all serve HTTP.
            standalone=peering is None,
            peering_name=peering,
            priority=priority,
            ready_flag=kopf_ready,
            stop_flag=stop_flag,
            memo=kopf.Memo(store=store, client=client, settings=settings),
        )
    finally:
        tasks = (background, background_supervisor, background_events, background_registry, background_live)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await http.cleanup()
        await temporal_.close()
        await client.close()
