"""Runs the operator: kopf, the informers feeding the Store, the status reconciler, the HTTP API.

On SIGINT/SIGTERM (handlers/embedded.py) kopf returns, the HTTP API drains, and everything else
started here is stopped in `finally`, so no task outlives the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import kopf
from aiohttp import web
from kopf._cogs.clients import errors as kopf_errors

import workerqueue_operator
from workerqueue_operator import handlers
from workerqueue_operator.api import app as app_
from workerqueue_operator.api import keys, logs, serving
from workerqueue_operator.core import activity as activity_
from workerqueue_operator.core import leases, reviews, temporal
from workerqueue_operator.core import registry as registry_
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.feed import Feed
from workerqueue_operator.core.reconciler import LiveStatus, Reconciler
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store
from workerqueue_operator.core.supervisor import Supervisor
from workerqueue_operator.handlers import embedded
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import informer, resources
from workerqueue_operator.models import settings as settings_

logger = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 5.0
EVENTS_FLUSH_SECONDS = 2.0
"""How long a stopping operator goes on posting the Events still waiting."""
CLOCK_TOLERANCE_SECONDS = 2.0
"""Past this between this replica's clock and the API server's, a WARNING: peering and Leases assume agreement."""
CLOCK_CHECK_SECONDS = 600.0


def configure_logging(verbose: bool, *, plain: bool = False) -> None:
    """JSON lines (kopf's format, `extra` fields included) for log pipelines; `plain`: text for a person."""
    if plain:
        kopf.configure(verbose=verbose, log_format=kopf.LogFormat.FULL, log_prefix=True)
    else:
        kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON)
    wanted: list[logging.Filter] = [RoutineKopfMessages()] + ([] if plain else [LoggerField()])
    for handler in logging.getLogger().handlers:  # on the handler: it sees every logger's records
        for f in wanted:
            if not any(isinstance(had, type(f)) for had in handler.filters):
                handler.addFilter(f)


class LoggerField(logging.Filter):
    """Names the logger in each JSON line (kopf's format leaves it out), so that a log pipeline can
    tell the operator's own lines from aiohttp's, kopf's or the Kubernetes client's."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.logger = record.name
        return True


class RoutineKopfMessages(logging.Filter):
    """kopf says "Handler 'pod-event' succeeded." at INFO for every event of every object: routine,
    so DEBUG here (shown with -v only). It logs each API call it will retry at ERROR: a blip of the
    API server would page whoever alerts on ERROR, so WARNING here; one it gives up on stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.levelno == logging.INFO and message.endswith(" succeeded."):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        if record.levelno == logging.ERROR and record.name.startswith("kopf.") and message.startswith(
                "Request attempt ") and ("; will retry: " in message or "; will re-authenticate: " in message):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


SECRETS_PAGE_SIZE = 100
"""Secrets listed a page at a time: a Secret may hold up to 1 MiB, and each page is read whole and
parsed on the event loop (500 such Secrets: some 650 MiB and seconds of /start held up)."""
SECRET_READS_WAIT_SECONDS = 10.0
"""After the first lists, how long worker calls also wait for the Secrets read one by one (Watches._listed)."""


def counted(informers: list[informer.Informer], *, namespaced: bool) -> list[informer.Informer]:
    """The informers readiness depends on: not those of a namespace that refuses the operator (403).
    Its admins may delete the operator's RoleBinding, as they may anything in it; the namespace is
    then served as last seen, and every other team must not lose the operator with it. A namespace
    refuses when any of its watches is refused (a Role without Leases serves it only in part). All of
    them when every namespace refuses: no team is served (its Roles forgotten, say), and readiness
    says so."""
    if not namespaced:
        return informers
    refusing = {_namespace_of(i) for i in informers if i.refused}
    kept = [i for i in informers if _namespace_of(i) not in refusing]
    return kept or informers


def _namespace_of(watch: informer.Informer) -> str:
    return watch.name.partition("/")[2]  # "secrets/team-a"


class Watches:
    """The informers of every watched scope, started in the order that keeps start-up cheap.

    Not kopf's: peering pauses kopf's watches on a standby replica, and these informers feed the
    Store that /start serves from, which every replica keeps current and no pause may stop. kopf
    watches only worker pods (to trigger the supervisor) and the peering object; the latter is
    watched here too, for Activity, whose decision must not wait on kopf's pause.
    """

    def __init__(self, client: client_.KubeClient, feed: Feed, settings: settings_.Settings,
                 activity: Activity, registry: Registry, peering: str | None = None) -> None:
        scopes: tuple[str | None, ...] = settings.namespaces or (None,)
        # The API server leaves out Secret types no queue uses (Helm releases): never sent, never parsed.
        secret_params = ({"fieldSelector": ",".join(f"type!={t}" for t in settings.ignored_secret_types)}
                         if settings.ignored_secret_types else {})
        self.queues = [
            informer.Informer(client, resources.queues_path(ns), on_upsert=feed.queue_upserted,
                              on_delete=feed.queue_deleted, name=f"workerqueues/{ns or '*'}",
                              hold=functools.partial(feed.holding_news, ns))
            for ns in scopes]
        self.secrets = [
            informer.Informer(client, resources.secrets_path(ns), on_upsert=feed.secret_upserted,
                              on_delete=feed.secret_deleted, name=f"secrets/{ns or '*'}", params=secret_params,
                              page_size=SECRETS_PAGE_SIZE)
            for ns in scopes]
        # Worker registrations: only the Leases this operator labels, not every Lease of the cluster.
        self.leases = [
            informer.Informer(client, resources.leases_path(ns), on_upsert=registry.lease_upserted,
                              on_delete=registry.lease_deleted, name=f"leases/{ns or '*'}",
                              params={"labelSelector": leases.WATCHED})
            for ns in scopes]
        # The peering object tells who is the active replica; kopf keeps its own view to itself.
        self.peerings = [
            informer.Informer(client, resources.peerings_path(),
                              on_upsert=lambda body: activity.observed(informer.object_key(body), body),
                              on_delete=lambda key, _: activity.observed(key, None),
                              name="peering/*", params={"fieldSelector": f"metadata.name={peering}"},
                              # kopf writes a keep-alive every few seconds: a watch silent for two
                              # lifetimes is stalled, and hides a replica that came to lead.
                              idle_seconds=min(informer.IDLE_SECONDS,
                                               max(10.0, 2.0 * settings.peering_lifetime_seconds)))
        ] if peering is not None else []
        self._feed = feed
        self._namespaces = settings.namespaces
        self.listing = serving.Listing(listed=False)
        """Set once every informer /start depends on has listed (the API's calls wait for it)."""

    @property
    def all(self) -> list[informer.Informer]:
        """The informers /start depends on (not the peering one: a standby serves all the same)."""
        return [*self.queues, *self.secrets, *self.leases]

    def _counted(self) -> list[informer.Informer]:
        return counted(self.all, namespaced=bool(self._namespaces))

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self._counted())

    def secrets_current(self) -> bool:
        """Whether every Secret made until a moment ago is known: listed, and watched since."""
        return all(i.synced.is_set() and i.down_since is None and not i.listing for i in self._counted()
                   if i in self.secrets)

    def leases_watched(self) -> bool:
        """Whether the Lease watches work (not failing since they last did; before the first list,
        there is no renewal anyone could have missed)."""
        return all(i.down_since is None for i in self._counted() if i in self.leases)

    def down_for(self) -> float:
        """Seconds the longest-failing watch has been failing; 0 when all are well."""
        return max((i.down_for() for i in self._counted()), default=0.0)

    def counts(self, read: Callable[[informer.Informer], int]) -> dict[str, float]:
        """One of the informers' counters, by resource, for the metrics."""
        return {i.name: read(i) for i in (*self.all, *self.peerings)}

    async def _known(self, i: informer.Informer) -> None:
        """Until the informer has listed; a namespace that refuses the operator holds up no other (see
        _counted)."""
        await (i.settled if self._namespaces else i.synced).wait()

    async def _listed(self) -> None:
        await asyncio.gather(*(self._known(i) for i in self.all))
        # Secrets the lists do not bring (another namespace's default key, an ignored type) are read
        # then: a /start meanwhile would be 503 "not read yet", as fatal to its worker as a 401.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SECRET_READS_WAIT_SECONDS
        # Polled: once per start, for seconds at most; no event says "every used Secret is known".
        while self._feed.secrets_unread() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        self.listing.done.set()

    async def run(self, reconciler: Reconciler) -> None:
        # Queues first, so that the Secret list keeps exactly the Secrets they use (no reads one by
        # one); statuses only once both are known, so that no queue flaps through "not found".
        tasks = [asyncio.create_task(i.run(), name=f"informer {i.name}")
                 for i in (*self.peerings, *self.queues, *self.leases)]
        tasks.append(asyncio.create_task(self._listed(), name="first lists"))
        try:
            await asyncio.gather(*(self._known(i) for i in self.queues))
            tasks += [asyncio.create_task(i.run(), name=f"informer {i.name}") for i in self.secrets]
            await asyncio.gather(*(self._known(i) for i in self.secrets))
            self._feed.secrets_synced(listed=lambda key: any(i.knows(key) for i in self.secrets))
            # What exists now (kopf, the clients, every queue) lives as long as the process: out of the
            # collector's sight, a full collection no longer walks it while /start is busy.
            gc.freeze()
            tasks.append(asyncio.create_task(reconciler.run(), name="status reconciler"))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class StartupError(Exception):
    """The operator cannot start as configured; the message says which setting and why."""


class HandlersStopped(Exception):
    """kopf, which runs the handlers, stopped on an error of its own (its message says which)."""


def _kopf_failure(exc: BaseException) -> str:
    """A kopf or client error in a line: an API error's status and message, not the Status it holds."""
    if isinstance(exc, kopf_errors.APIError):
        return f"{type(exc).__name__} ({exc.status}): {exc.message or 'no message'}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


API_WAIT_MAX_SECONDS = 10.0
"""The longest pause between two tries of an API server that does not answer at start."""
API_WAIT_LOG_SECONDS = 30.0
"""How often that wait is told in the log."""


async def api_server_answers(client: client_.KubeClient, stopping: asyncio.Event) -> bool:
    """Waits until the API server answers; False if told to stop first. kopf, started before, gives up
    on one that is out of reach (a minute of retries) with a traceback, and the pod crash-loops, each
    restart further behind; meanwhile this replica stays up, not ready. A 401 is no outage: the
    credentials are wrong, and that is said at once."""
    delay, told = 1.0, -math.inf
    while not stopping.is_set():
        asked = asyncio.create_task(client.request("GET", "/version", timeout=API_WAIT_MAX_SECONDS))
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait((asked, stop), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not asked.done():
            asked.cancel()
            await asyncio.gather(asked, return_exceptions=True)
            return False
        try:
            asked.result()
            return True
        except aiohttp.ClientConnectorCertificateError as exc:
            # No outage: the kubeconfig's CA (or the server named) is not the API server's.
            raise StartupError(f"the API server's certificate is not trusted ({exc.certificate_error})") from None
        except aiohttp.ClientPayloadError:
            raise StartupError("the API server's address answers something that is not the Kubernetes API (its "
                               "/version is no JSON object): is the server URL right?") from None
        except client_.ApiError as exc:
            if exc.status == 401:
                raise StartupError("the API server refused the operator's credentials (401 Unauthorized): its "
                                   "ServiceAccount token, or its kubeconfig's user, is not valid there") from None
            if exc.status < 500 and exc.status != 429:
                return True  # it answers (a 403 for /version is a choice of its RBAC)
            reason = f"{exc.status} {exc.reason}"
        except client_.ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if time.monotonic() - told >= API_WAIT_LOG_SECONDS:
            told = time.monotonic()
            logger.warning("the API server does not answer (%s): the handlers start once it does", reason,
                           extra={"kind": "api_server_unanswered"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stopping.wait()
        delay = min(delay * 2, API_WAIT_MAX_SECONDS)
    return False


def _certificate(settings: settings_.Settings) -> serving.Certificate | None:
    if not (settings.tls_cert_file and settings.tls_key_file):
        return None
    try:
        return serving.Certificate(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; its text names no file
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StartupError(f"the TLS certificate {settings.tls_cert_file} and key {settings.tls_key_file} "
                           f"(WQ_TLS_CERT_FILE, WQ_TLS_KEY_FILE) cannot be loaded: {reason}") from None


METRICS_CONNECTIONS = 32
"""Connections open at once on settings.metrics_port: scrapers, a few at a time."""


async def serve_metrics(app: web.Application, settings: settings_.Settings,
                        certificate: serving.Certificate | None = None) -> tuple[web.AppRunner, int]:
    """/metrics on settings.metrics_port, with the API's TLS and timeouts; the runner and its port."""
    assert settings.metrics_port is not None
    # Nothing to finish on SIGTERM but a scrape: 1 s.
    runner, _, port = await _serve(app_.make_metrics_app(app[keys.METRICS]), app[keys.LOG], settings,
                                   port=settings.metrics_port, limit=METRICS_CONNECTIONS, busy=set(),
                                   certificate=certificate, shutdown_timeout=1.0)
    return runner, port


async def serve_http(app: web.Application, settings: settings_.Settings,
                     certificate: serving.Certificate | None = None) -> tuple[web.AppRunner, int]:
    # The pass-through's connections to the upstream hosts are fds too: as many idle as in use at most,
    # and each proxied websocket one more beside its worker's connection.
    upstream_fds = 2 * settings.upstream_max_connections + settings.upstream_max_websockets
    metrics_fds = METRICS_CONNECTIONS if settings.metrics_port is not None else 0
    limit = serving.connection_limit(settings.http_max_connections,
                                     settings.http_reserved_fds + settings.temporal_max_clients + metrics_fds,
                                     upstream_fds)
    if limit < settings.http_max_connections:
        logger.warning("HTTP connections limited to %d by the fd limit (RLIMIT_NOFILE) less http_reserved_fds, "
                       "temporal_max_clients and the upstream connections", limit)
    # On SIGTERM, requests still in flight get SHUTDOWN_SECONDS: /start takes microseconds (a pod's
    # refusal up to 2 s more, to record it), and a stream passed through to an upstream is then cut,
    # so that its worker retries elsewhere well within the pod's termination grace period (the
    # chart's 30 s) instead of holding it up.
    runner, listener, port = await _serve(app, app[keys.LOG], settings, port=settings.http_port, limit=limit,
                                          busy=app[keys.BUSY], certificate=certificate,
                                          shutdown_timeout=SHUTDOWN_SECONDS)
    app[keys.METRICS].gauge("workerqueue_http_connections", "Open HTTP connections.", lambda: listener.open)
    app[keys.METRICS].gauge("workerqueue_http_connections_limit",
                            "The cap on open HTTP connections (WQ_HTTP_MAX_CONNECTIONS, lowered to fit the fd limit).",
                            lambda: listener.limit)
    return runner, port


async def _serve(app: web.Application, log: logs.Throttled, settings: settings_.Settings, *, port: int, limit: int,
                 busy: set[object], certificate: serving.Certificate | None,
                 shutdown_timeout: float) -> tuple[web.AppRunner, serving.Listener, int]:
    """`app` listening on settings.http_host:`port` through a Listener of `limit` connections."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout,
                           logger=serving.server_logger(log), keepalive_timeout=settings.http_idle_timeout_seconds,
                           lingering_time=serving.LINGERING_SECONDS)
    await runner.setup()
    assert runner.server is not None
    listener = serving.Listener(runner.server, limit=limit, busy=busy, log=log, certificate=certificate,
                                handshake_timeout=settings.http_idle_timeout_seconds)
    try:
        bound = await serving.serve(runner, settings.http_host, port, listener=listener)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, listener, bound


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
    `priority` runs the handlers (worker pods) and writes statuses; every replica serves the HTTP API from
    its own watches.
    """
    version = workerqueue_operator.__version__
    certificate = _certificate(settings)
    client = client_.KubeClient(await client_.load_configuration_within(kubeconfig))
    store = Store(settings=settings)
    # Our identity in the peering object is the one we give kopf, so that we can read kopf's verdict.
    identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
    events = EventPoster(client, instance=identity)  # which replica posted an Event
    peerings = [("", peering)] if peering is not None else []  # the ClusterKopfPeering (handlers.configure)
    activity = Activity(identity=identity, priority=priority, peerings=peerings)
    activity.confirm_with(lambda key: resources.read_peering(client, *key, timeout=activity_.READ_SECONDS))
    reconciler = Reconciler(store=store, client=client, resync_seconds=settings.status_resync_seconds, events=events,
                            activity=activity, watched_namespaces=settings.namespaces,
                            ignored_secret_types=settings.ignored_secret_types)
    # Routine Events (a token Secret created, ...) wait while queues wait for their status.
    events.defer_routine(reconciler.behind)
    registry = Registry(client=client, events=events, queue_of=store.queue, active=activity.is_active,
                        watching=lambda: watches.leases_watched(),
                        bounds=registry_.Bounds.of(settings), pod_interval=store.pod_interval)
    activity.on_peer_lost(registry.peer_lost)
    temporal_ = temporal.Temporal(timeout=settings.temporal_timeout_seconds, max_clients=settings.temporal_max_clients)
    supervisor = Supervisor(store=store, client=client, settings=settings, events=events, activity=activity,
                            registry=registry, temporal=temporal_, statuses_behind=reconciler.behind,
                            secrets_listed=False)
    feed = Feed(store, reconciler, supervisor)
    watches = Watches(client, feed, settings, activity, registry, peering)
    reviewer = reviews.Reviewer(
        client.lane(settings.auth_max_concurrent_reviews), audiences=settings.token_review_audiences,
        ttl=settings.auth_cache_seconds,
        negative_ttl=settings.auth_negative_cache_seconds, timeout=settings.auth_review_timeout_seconds,
        max_concurrent=settings.auth_max_concurrent_reviews)
    kopf_ready = asyncio.Event()

    def ready() -> bool:
        # A watch failing for long means stale memory: better no traffic than wrong answers.
        return kopf_ready.is_set() and watches.synced() and watches.down_for() < settings.watch_unready_seconds

    app = app_.make_app(store=store, reviewer=reviewer, registry=registry, temporal_=temporal_, kube=client,
                        settings=settings, version=version, ready=ready,
                         secrets_current=watches.secrets_current, invalid_count=reconciler.invalid_count,
                        listing=watches.listing)
    app[keys.METRICS].family("workerqueue_watch_failures_total",
                             "Failed lists and watches of the operator's own informers, by resource.",
                             kind="counter", label="resource", read=lambda: watches.counts(lambda i: i.failures))
    app[keys.METRICS].family("workerqueue_watch_object_failures_total",
                             "Objects the operator failed to take in from its watches, by resource (a bug: "
                             "see the log); each is skipped until it changes.",
                             kind="counter", label="resource",
                             read=lambda: watches.counts(lambda i: i.callback_failures))
    app[keys.METRICS].family("workerqueue_watch_idle_restarts_total",
                             "Watches that received nothing, not even the API server's bookmark a minute, "
                             f"for {informer.IDLE_SECONDS:g} s and were watched again, by resource (their "
                             "connection may have died unheard).", kind="counter", label="resource",
                             read=lambda: watches.counts(lambda i: i.idle_restarts))
    app[keys.METRICS].family("workerqueue_watch_cut_restarts_total",
                             "Watches whose connection was cut mid-stream (the API server restarting, a proxy) "
                             "and that were watched again from the last version seen, by resource.",
                             kind="counter", label="resource", read=lambda: watches.counts(lambda i: i.cut_restarts))
    app[keys.METRICS].family("workerqueue_reconcile_failures_total",
                             "Passes over a queue that failed and are retried, by controller (status: its "
                             "status and token Secret; workers: its worker pods); see the log.",
                             kind="counter", label="controller",
                             read=lambda: {"status": reconciler.failed, "workers": supervisor.failed})
    app[keys.METRICS].family("workerqueue_temporal_reads_total",
                             "Temporal read for a queue, by kind (check: the reachability of a queue that does "
                             "not scale, at most WQ_TEMPORAL_CHECKS_PER_SECOND; scaling: a scaling queue's "
                             "backlog and busy workers; a suspended single-execution queue's busy workers are "
                             "read at its checks).",
                             kind="counter", label="kind", read=lambda: supervisor.reads)
    app[keys.METRICS].gauge("workerqueue_temporal_clients",
                            "Temporal connections kept (one per endpoint and API key; at most "
                            "WQ_TEMPORAL_MAX_CLIENTS).", lambda: temporal_.clients)
    app[keys.METRICS].gauge("workerqueue_events_dropped_total",
                            "Events not posted because too many were waiting (see the log).",
                            lambda: events.dropped, kind="counter")
    app[keys.METRICS].gauge("workerqueue_events_limited_total",
                            "Events not posted because their object got more than its pace allows (see the log).",
                            lambda: events.limited, kind="counter")
    app[keys.METRICS].gauge("workerqueue_events_failed_total",
                            "Events the API server did not take (an outage, a quota, RBAC; see the log).",
                            lambda: events.failed, kind="counter")
    app[keys.METRICS].gauge("workerqueue_events_coalesced_total",
                            "Events folded into an identical one still waiting to be posted.",
                            lambda: events.coalesced, kind="counter")
    app[keys.METRICS].gauge("workerqueue_events_waiting", "Distinct Events waiting to be posted.",
                            lambda: events.waiting)
    clock_offset = [0.0]
    app[keys.METRICS].gauge("workerqueue_clock_offset_seconds",
                            "The API server's clock minus this replica's, as last read (to about a second).",
                            lambda: clock_offset[0])
    app[keys.METRICS].gauge("workerqueue_active_replica",
                            "1 on the replica that changes the cluster (kopf peering), 0 on a standby.",
                            lambda: int(activity.is_active()))
    try:
        http, port = await serve_http(app, settings, certificate)
    except OSError as exc:  # the port taken, an address the pod does not have: one line, no traceback
        await temporal_.close()
        await client.close()
        raise StartupError(f"cannot listen on {settings.http_host}:{settings.http_port} "
                           f"(WQ_HTTP_HOST, and --port or WQ_HTTP_PORT): {exc.strerror or exc}") from None
    logger.info("HTTP API listening", extra={"host": settings.http_host, "port": port})
    metrics_http: web.AppRunner | None = None
    if settings.metrics_port is not None:
        try:
            metrics_http, metrics_port = await serve_metrics(app, settings, certificate)
        except OSError as exc:
            await http.cleanup()
            await temporal_.close()
            await client.close()
            raise StartupError(f"cannot listen on {settings.http_host}:{settings.metrics_port} "
                               f"(WQ_HTTP_HOST, WQ_METRICS_PORT): {exc.strerror or exc}") from None
        logger.info("metrics listening", extra={"host": settings.http_host, "port": metrics_port})
    if on_listening is not None:
        on_listening(port)

    # Our loops run forever: one that ends has a bug. The operator then stops (its pod restarts),
    # saying why, rather than serving from memory nothing keeps current any more.
    stopping = asyncio.Event()
    died: list[str] = []

    def loud(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        logger.error("%s stopped: %s; stopping the operator", task.get_name(),
                     f"{type(exc).__name__}: {exc}" if exc else "returned", exc_info=exc)
        died.append(task.get_name())
        stopping.set()

    tasks = [asyncio.create_task(watches.run(reconciler), name="watches"),
             asyncio.create_task(activity.run(), name="activity"),
             asyncio.create_task(supervisor.run(), name="worker supervisor"),
             poster := asyncio.create_task(events.run(), name="event poster"),
             asyncio.create_task(registry.run(), name="worker registry"),
             asyncio.create_task(LiveStatus(store=store, registry=registry, client=client,
                                                            activity=activity, listed=watches.synced).run(),
                                 name="live worker counts")]
    if certificate is not None:
        tasks.append(asyncio.create_task(certificate.watch(settings.tls_reload_seconds), name="TLS certificate"))
    if stop_flag is not None:
        tasks.append(asyncio.create_task(_relay(stop_flag, stopping), name="stop flag"))
    tasks.append(asyncio.create_task(_stand_down(stopping, activity), name="stand-down"))
    tasks.append(asyncio.create_task(_watch_clock(client, clock_offset), name="clock"))
    for task in tasks:
        task.add_done_callback(loud)
    kopf_registry = handlers.registry(settings=settings, supervisor=supervisor, kubeconfig=kubeconfig)
    try:
        # SIGTERM during that wait stops the operator too (as PID 1, it would ignore the signal).
        with embedded.stop_signals(lambda _: stopping.set()):
            answers = await api_server_answers(client, stopping)
        if answers:  # else told to stop meanwhile
            await embedded.operator(
                registry=kopf_registry,
                clusterwide=not settings.namespaces,
                namespaces=list(settings.namespaces),
                # Standalone unless replicas share a peering object: then one reconciles, all serve HTTP.
                standalone=peering is None,
                peering_name=peering,
                priority=priority,
                identity=cast(Any, identity),  # kopf's Identity is a NewType of str
                ready_flag=kopf_ready,
                stop_flag=stopping,
            )
    except (kopf.LoginError, kopf_errors.APIError, aiohttp.ClientError, OSError) as exc:
        # kopf gives up so (the API server out of reach at its start, a verb its RBAC lacks): said in a
        # line; kopf has logged its own traceback. Not when a loop of ours died first (said below), nor
        # on the way out of a stop asked for.
        said = _kopf_failure(exc)
        if not died and not stopping.is_set():
            raise HandlersStopped(said) from None
        logger.warning("kopf stopped with an error while the operator stopped: %s", said)
    else:
        if not died:
            await _drain(app[keys.DRAIN], settings.http_drain_seconds)
    finally:
        for task in tasks:
            task.remove_done_callback(loud)
            if task is not poster:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*(t for t in tasks if t is not poster), return_exceptions=True)
        await http.cleanup()
        if metrics_http is not None:
            await metrics_http.cleanup()
        # Last, once nothing more can report: the Events of the last seconds (the answers just given
        # included), within a bound, for the API server may be what is failing.
        if not poster.done():
            left = await events.flush(EVENTS_FLUSH_SECONDS)
            if left:
                logger.warning("stopping with %d Events not posted", left)
        poster.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(poster, return_exceptions=True)
        await temporal_.close()
        await client.close()
    if died:
        raise RuntimeError(f"stopped because {', '.join(died)} stopped")


async def _drain(drain: serving.Drain, seconds: float) -> None:
    """The HTTP API's last `seconds`, once kopf has stopped (a standby, if any, takes over the pods):
    all but the listener's closing goes on (watches, the registry, heartbeats). A second SIGTERM or
    SIGINT ends it at once."""
    if seconds <= 0:
        return
    drain.begin()
    logger.info("stopping: serving %gs more while this replica leaves the Service's endpoints", seconds)
    cut = asyncio.Event()
    with embedded.stop_signals(lambda _: cut.set()), contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await cut.wait()


def clock_doubt(offset: float) -> str | None:
    """What to say of the API server's clock running `offset` seconds ahead of this replica's."""
    if abs(offset) <= CLOCK_TOLERANCE_SECONDS:
        return None
    return (f"this replica's clock is {abs(offset):.0f}s {'behind' if offset > 0 else 'ahead of'} the API server's: "
            "kopf peering judges keep-alives and the worker registry expires Leases by the clocks of the replicas "
            "that wrote them, so replicas whose clocks differ by seconds may both act or expire live workers; "
            "synchronise the nodes' clocks (NTP)")


async def _watch_clock(client: client_.KubeClient, offset: list[float]) -> None:
    """Compares this replica's clock with the API server's now and then (`offset[0]`, a metric)."""
    while True:
        try:
            measured = await client.clock_offset()
        except client_.ERRORS as exc:  # the API server's failures are told by every other loop
            logger.debug("reading the API server's clock failed: %s", exc)
        except Exception:  # a bug here must not stop the operator, as the end of this task would
            logger.exception("reading the API server's clock failed")
        else:
            if measured is not None:
                offset[:] = [measured]
                doubt = clock_doubt(measured)
                if doubt is not None:
                    logger.warning(doubt)
        await asyncio.sleep(CLOCK_CHECK_SECONDS)


async def _stand_down(stopping: asyncio.Event, activity: Activity) -> None:
    """The replica acts no more from the moment it is told to stop: kopf leaves the peering object
    before it returns, and the next replica acts from then (alone: nobody until the next one starts)."""
    await stopping.wait()
    activity.stand_down()
    await asyncio.Event().wait()  # its own end must not count as a loop that died


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
    await asyncio.Event().wait()  # the relay's own end must not count as a loop that died
