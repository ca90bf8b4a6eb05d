"""The HTTP API: `POST /api/v1/worker-queues/{queue_id}/start`, health, readiness, metrics, OpenAPI,
and the pass-through of every other /api/v1/ call to the caller's upstream (api/passthrough.py).

/start answers from the watch-fed Store only; the API server is asked nothing per request, except
a cached TokenReview/SubjectAccessReview for callers that present a Kubernetes token.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import http_exceptions, web
from aiohttp.typedefs import Middleware

from workerqueue_operator.api import (
    bodies,
    callers,
    errors,
    logs,
    metrics,
    openapi,
    passthrough,
    serving,
    unseen,
    workers,
)
from workerqueue_operator.api.keys import (
    BUSY,
    DRAIN,
    KUBE,
    LISTING,
    LOG,
    METRICS,
    OPENAPI,
    READY,
    REGISTRY,
    REVIEWER,
    SETTINGS,
    STORE,
    TEMPORAL,
    UNSEEN,
)
from workerqueue_operator.core import queues, refusals, reviews, temporal
from workerqueue_operator.core import registry as registry_
from workerqueue_operator.core.queues import QueueObject, Resolution
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store, WorkerCredential
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models import wire

logger = logging.getLogger(__name__)

START_ROUTE = "/api/v1/worker-queues/{queue_id}/start"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


def _control_plane_url(request: web.Request, body: wire.WorkerStartRequest, settings: settings_.Settings) -> str:
    if body.control_plane_url:
        return body.control_plane_url.rstrip("/")
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def start_worker(request: web.Request) -> web.Response:
    queue_id = request.match_info["queue_id"]
    store = request.app[STORE]

    caller = await callers.authenticate(request, starting=True)
    if isinstance(caller, web.Response):
        return caller
    body = await bodies.read(request, wire.WorkerStartRequest)
    if isinstance(body, web.Response):
        return body

    resolution = store.serving(queue_id)
    unseen_queue: WorkerCredential | None = None
    if caller.worker is not None and not _pods_own(resolution, caller.worker) and not _pods_own_known(
            store, caller.worker):
        unseen_queue = caller.worker
        resolution = await _pods_queue(request, caller.worker, queue_id)
    if resolution is None:
        return await _refused_unseen(request, unseen_queue, errors.detail(404, "Worker queue not found"))
    queue = resolution.queue
    denied = await callers.authorize(request, caller, resolution, verb="create", subresource="start",
                                     token_message="This token may not start workers on this worker queue")
    if denied is not None:
        return await _refused_unseen(request, unseen_queue, denied)

    pod = caller.worker.pod if caller.worker is not None else None
    if queue.spec.suspend:
        return await _refused(request, queue, pod, errors.detail(400, "Worker queue is not active (status: suspended)"))
    if queue.deleting:  # held by someone else's finalizer: its pods go with it, and no worker is made for it
        return await _refused(request, queue, pod, errors.detail(400, "Worker queue is not active (status: deleting)"))
    # A pod's worker signs in with its own token: the queue token the operator is still making (a new
    # queue, or its Secret deleted) is no reason to turn it away, as it is for everyone else.
    pod_starts = pod is not None and resolution.starts_workers
    if resolution.config is None or (resolution.problem is not None and not pod_starts):
        reason = resolution.problem.message if resolution.problem else "not resolved"
        return await _refused(request, queue, pod, errors.detail(503, f"Worker queue is not ready: {reason}"))

    # Its second half a MAC by the caller's token, so that a heartbeat can re-register it (workers.py):
    # a pod's own token, or the queue token the worker holds (not another one a rotation unlists
    # first); for a Kubernetes identity, which never re-registers so, the queue's first.
    if caller.identity is None:
        key: bytes | None = caller.token_digest
    else:
        key = resolution.token_digests[0] if resolution.token_digests else None
    worker_id = queues.new_worker_id(key, pod=pod)
    registry = request.app[REGISTRY]
    system_info = body.system_info
    hostname = system_info.hostname if system_info is not None else None
    identity = caller.identity.registrant if caller.identity is not None else None
    if queue.spec.max_workers is None:
        try:
            registered = registry.register(queue, worker_id, pod=pod, hostname=hostname, system_info=system_info,
                                           identity=identity)
        except registry_.Full as exc:
            return await _refused(request, queue, pod, workers.refused(request, queue, exc))
        if identity is not None:
            # Its executions poll may reach another replica at once, which must find whose it is.
            # Not written (the API server away), it is answered all the same, as a queue token's start
            # is (from memory), and written by the writer's retry: a replica that cannot find it
            # meanwhile answers 503 while the API server is away, `[]` for a token bound to a pod.
            await registry.write_now(registered)
            if (inactive := await _inactive_meanwhile(request, queue, worker_id, pod)) is not None:
                return inactive
    else:
        try:
            worker = await registry.claim(queue, worker_id, limit=queue.spec.max_workers, pod=pod,
                                          hostname=hostname, system_info=system_info, identity=identity)
        except client_.ERRORS as exc:
            registry.abandoned(queue, worker_id)
            # The API server failing already: its record is written meanwhile, not waited for.
            return await _refused(request, queue, pod, workers.registry_unavailable(request, queue, exc), wait=False)
        if worker is None:
            return await _refused(request, queue, pod, workers.full(queue))
        if (inactive := await _inactive_meanwhile(request, queue, worker_id, pod)) is not None:
            return inactive

    payload = resolution.config.response_body(
        worker_id=worker_id, control_plane_url=_control_plane_url(request, body, request.app[SETTINGS]),
        own_websocket=caller.identity is None)
    if store.queue(queue.key) is not None:  # deleted meanwhile (a review, a claim): its series went already
        request.app[METRICS].worker_started(queue.namespace, queue.name)
    # DEBUG: at thousands of starts a second an INFO line each is most of the cost; the metric counts them.
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("worker started", extra={"queue_id": queue_id, "worker_id": worker_id,
                                              "queue": f"{queue.namespace}/{queue.name}",
                                              "sdk_version": body.worker_sdk_version})
    return web.Response(body=payload, content_type="application/json")


async def _inactive_meanwhile(request: web.Request, queue: QueueObject, worker_id: str,
                              pod: str | None) -> web.Response | None:
    """The answer when the queue was suspended or set for deletion while its new worker's registration
    waited for the API server (a claim, a write): abandoned, it starts no worker. Asked only after such
    a wait: a /start that waited for nothing saw the queue as it is."""
    status = workers.inactive(request, queue)
    if status is None:
        return None
    request.app[REGISTRY].abandoned(queue, worker_id)
    return await _refused(request, queue, pod, errors.detail(400, f"Worker queue is not active (status: {status})"))


def _pods_own(resolution: Resolution | None, credential: WorkerCredential) -> bool:
    """Whether the queue serving the id is the one the pod was made for (not a deleted namesake)."""
    return resolution is not None and (resolution.queue.key, resolution.queue.uid) == (credential.queue,
                                                                                      credential.queue_uid)


def _pods_own_known(store: Store, credential: WorkerCredential) -> bool:
    """Whether this replica knows the queue the pod was made for: then another id asked for (a wrong
    QUEUE_ID, a queueId changed since) is no lag of its watch, and is answered at once, as before."""
    known = store.queue(credential.queue)
    return known is not None and known.uid == credential.queue_uid


async def _pods_queue(request: web.Request, credential: WorkerCredential, queue_id: str) -> Resolution | None:
    """The queue serving the id, once it is the pod's own: its queue was there when the operator made the
    pod, and not seeing it (its watch behind, or relisting) is this replica's lag. Turned away at once,
    the worker exits, and its pod fails as if it had crashed. Else, after the wait, what serves the id."""
    store = request.app[STORE]

    def own() -> Resolution | None:
        found = store.serving(queue_id)
        return found if _pods_own(found, credential) else None

    try:
        found = await request.app[UNSEEN].until(own, peer=request.remote or "", starting=True)
    except unseen.Crowded:  # no place to wait in: answered from what is known now, as after a wait
        found = None
    return found if found is not None else store.serving(queue_id)


async def _refused_unseen(request: web.Request, credential: WorkerCredential | None,
                          answer: web.Response) -> web.Response:
    """`answer` to a worker whose queue this replica did not know; a pod's (`credential`) is recorded as
    refused (_refused), under the queue it was made for, since the fault may be this replica's."""
    if credential is None:
        return answer
    namespace, name = credential.queue
    made_for = refusals.QueueRef(namespace=namespace, name=name, uid=credential.queue_uid)
    return await _refused(request, made_for, credential.pod, answer)


async def _refused(request: web.Request, queue: QueueObject | refusals.QueueRef, pod: str | None,
                   answer: web.Response, *,
                   wait: bool = True) -> web.Response:
    """`answer`, turning away a worker; one of a pod the operator made is recorded by the registry
    first (within seconds), so that the pod's failure (its worker exits on it) is not taken for a
    crash of the worker."""
    if pod is not None:
        detail = json.loads(answer.body if isinstance(answer.body, bytes) else b"{}").get("detail", "")
        await request.app[REGISTRY].refusals.start_refused(queue, pod, f"{answer.status}: {detail}", wait=wait)
    return answer


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAIN].active:
        return web.json_response({"status": "draining"}, status=503)
    if request.app[READY]():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def not_here(request: web.Request) -> web.Response:
    """/metrics where it is served on a port of its own: as no route (never passed upstream)."""
    return errors.detail(404, "Not Found")


def make_metrics_app(metrics_: metrics.Metrics) -> web.Application:
    """/metrics alone, for settings.metrics_port: the queue and namespace names its labels carry are
    then out of reach of whoever may reach /start. No middleware: scrapes are not /start traffic to
    count, and a connection limit that closes one mid-scrape at worst costs one scrape."""
    app = web.Application()
    app[METRICS] = metrics_
    app.router.add_get("/metrics", metrics_endpoint)
    return app


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


_EVENTS = "text/event-stream"


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


_STARTING = "The operator is starting (its watches have not listed yet), try again"


def observer(*, metrics_: metrics.Metrics, busy: set[object], log: logs.Throttled, drain: serving.Drain,
             listing: serving.Listing) -> Middleware:
    """The middleware every request passes: metrics, and FastAPI-shaped JSON for every error, never
    a traceback per request; while the replica drains, every answer closes its connection; until it
    has listed, calls under /api/ wait (serving.Listing). Its collaborators are bound here, not
    looked up per request: it is on the path of every /start."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status, timed = 500, True
        connection = request.protocol
        busy.add(connection)  # not to be closed to make room for a new connection (see serving.py)
        try:
            try:
                response: web.StreamResponse
                if not listing.done.is_set() and request.path.startswith("/api/") and not await listing.wait():
                    response = errors.detail(503, _STARTING, headers={"Retry-After": "1"})
                else:
                    response = await handler(request)
                status = response.status
                # A websocket or an event stream returns when it ends, minutes or hours later: its life
                # is no latency (it would fill the top bucket and the sum). Counted, not timed.
                timed = not isinstance(response, web.WebSocketResponse) and response.content_type != _EVENTS
            except Exception as exc:
                response, status = _failure(request, exc, log)
            if drain.active:
                response.force_close()
            return response
        finally:
            busy.discard(connection)
            metrics_.observe(_route_name(request), request.method, status, time.perf_counter() - started,
                             timed=timed)

    return observe


def _failure(request: web.Request, exc: Exception, log: logs.Throttled) -> tuple[web.Response, int]:
    """The contract's answer for what a handler raised, and the status to count."""
    if isinstance(exc, web.HTTPException):
        reason = {404: "Not Found", 405: "Method Not Allowed", 413: "Request body too large"}.get(
            exc.status, exc.reason)
        # Headers the status needs travel along: `Allow` of a 405, for one.
        kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return errors.detail(exc.status, reason, headers=kept or None), exc.status
    if isinstance(exc, ConnectionResetError):
        # The client left mid-request: nobody to answer, and not our failure. Counted as 499, as nginx does.
        log.log(logging.DEBUG, "client_disconnected", "client disconnected during %s %s",
                request.method, _route_name(request))
        return errors.detail(400, "Client disconnected"), 499
    if isinstance(exc, (http_exceptions.HttpProcessingError, web.RequestPayloadError)):
        # A body aiohttp cannot decode (broken chunked encoding, ...): FastAPI's words for it.
        log.fault(exc, "bad_request", "bad request body for %s: %s: %s", _route_name(request),
                  type(exc).__name__, logs.what_was_wrong(exc) or "(no reason given)")
        answer = errors.detail(400, "There was an error parsing the body")
        answer.force_close()
        return answer, 400
    log.log(logging.ERROR, "unhandled_error", "unhandled error in %s", _route_name(request), exc_info=exc)
    return errors.detail(500, "Internal Server Error"), 500


def _owned(app: web.Application) -> tuple[list[tuple[re.Pattern[str], str]], list[re.Pattern[str]]]:
    """The /api/v1 routes the operator serves and their methods, but the queue itself, whose DELETE
    only is the operator's (the second list): other calls on it (a GET, say) are the upstream's."""
    owned, deletes = [], []
    for resource in app.router.resources():
        pattern = resource.get_info().get("pattern")
        if not resource.canonical.startswith("/api/v1/") or not pattern:
            continue
        if resource.canonical == workers.QUEUE_ROUTE:
            deletes.append(pattern)
        else:
            owned.append((pattern, ", ".join(sorted({route.method for route in resource}))))
    return owned, deletes


def make_app(
    *,
    store: Store,
    reviewer: reviews.Reviewer,
    registry: Registry,
    temporal_: temporal.Temporal,
    kube: client_.KubeClient,
    settings: settings_.Settings,
    version: str,
    ready: Callable[[], bool],
    secrets_current: Callable[[], bool] = lambda: True,
    invalid_count: Callable[[], int] = lambda: 0,
    listing: serving.Listing | None = None,
) -> web.Application:
    """`invalid_count`: queues whose stored spec cannot be taken (SpecInvalid), which the store does not
    hold; `listing`: set once the watches have listed (None: listed already)."""
    metrics_ = metrics.Metrics()
    log = logs.Throttled(logger, metrics_)
    busy: set[object] = set()
    drain = serving.Drain()
    listing = listing or serving.Listing()
    # aiohttp refuses a body longer than client_max_size: exactly MAX_BODY bytes pass.
    app = web.Application(middlewares=[observer(metrics_=metrics_, busy=busy, log=log, drain=drain,
                                                listing=listing)],
                          client_max_size=bodies.MAX_BODY)
    app[STORE] = store
    app[REVIEWER] = reviewer
    app[REGISTRY] = registry
    app[TEMPORAL] = temporal_
    app[KUBE] = kube
    app[SETTINGS] = settings
    app[READY] = ready
    app[OPENAPI] = json.dumps(openapi.document(version, metrics=settings.metrics_port is None)).encode()
    app[METRICS] = metrics_
    store.subscribe(lambda key: metrics_.know_queue(*key) if store.queue(key) is not None
                    else metrics_.forget_queue(*key))
    for key in store.queue_keys():
        metrics_.know_queue(*key)
    metrics_.keep_upstreams(store.upstream_origins)
    app[LOG] = log
    app.cleanup_ctx.append(log.settling)
    app[BUSY] = busy
    app[DRAIN] = drain
    app[LISTING] = listing
    app[UNSEEN] = unseen.UnseenTokens(secrets_current)
    app[METRICS].family("workerqueue_token_reviews_total",
                        "Kubernetes tokens presented by outcome (authenticated, rejected; rejected_cached: no "
                        "TokenReview made; busy: no review slot free in time; unavailable: the API server did not "
                        "answer in time; not_a_jwt: refused unreviewed).", kind="counter", label="outcome",
                        read=lambda: reviewer.outcomes)
    app[METRICS].gauge("workerqueue_reviews_in_flight",
                       "TokenReviews and SubjectAccessReviews awaiting the API server.", lambda: reviewer.in_flight)
    app[METRICS].gauge("workerqueue_unseen_worker_tokens_total",
                       "Requests held because their per-worker token's Secret was not seen yet by this replica.",
                       lambda: app[UNSEEN].waited, kind="counter")
    app[METRICS].gauge("workerqueue_queues", "WorkerQueues known to this replica.",
                       lambda: store.queue_count + invalid_count())
    app[METRICS].gauge("workerqueue_queues_not_ready", "WorkerQueues that are not Ready (SpecInvalid and CrashLooping "
                       "included; suspended ones only for another reason).",
                       lambda: store.not_ready_count + invalid_count())
    app[METRICS].gauge("workerqueue_queues_suspended", "WorkerQueues suspended (spec.suspend).",
                       lambda: store.suspended_count)
    app[METRICS].gauge("workerqueue_ready", "1 while /readyz answers 200, else 0 (a watch failing for minutes, "
                       "every watched namespace refused, draining).", lambda: int(not drain.active and ready()))
    app[METRICS].gauge("workerqueue_queues_temporal_unreachable",
                       "WorkerQueues whose Temporal the operator cannot reach (TemporalReachable=False).",
                       lambda: store.temporal_unreachable_count)
    app[METRICS].gauge("workerqueue_secrets_cached", "Secrets held because a queue uses them.",
                       lambda: store.secret_count)
    app[METRICS].gauge("workerqueue_workers_live", "Live worker registrations known to this replica.",
                       lambda: registry.total)
    app[METRICS].gauge("workerqueue_workers_pending", "Registrations waiting for their worker's first heartbeat.",
                       lambda: registry.pending)
    app[METRICS].gauge("workerqueue_registrations_refused_total",
                       "/start calls answered 503 because of the registry's bounds (registry_max_*).",
                       lambda: registry.refused, kind="counter")
    app[METRICS].gauge("workerqueue_worker_heartbeats_total", "Heartbeats received by this replica.",
                       lambda: registry.heartbeats, kind="counter")
    app[METRICS].gauge("workerqueue_workers_rejoined_total",
                       "Workers registered again from a heartbeat, their registration not known here.",
                       lambda: registry.rejoined, kind="counter")
    app[METRICS].gauge("workerqueue_registry_writes_total", "Lease writes of the worker registry, made or tried.",
                       lambda: registry.writes, kind="counter")
    app[METRICS].gauge("workerqueue_registry_write_failures_total",
                       "Lease writes of the worker registry that did not get through (the API server out of "
                       "reach, slow or refusing); each is tried again.", lambda: registry.write_failures,
                       kind="counter")
    app.router.add_post(START_ROUTE, start_worker)
    workers.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint if settings.metrics_port is None else not_here)
    app.router.add_get("/openapi.json", openapi_json)
    # Keep last. aiohttp resolves the longest fixed path prefix first, so a route under
    # /api/v1/<something>/ wins over this catch-all even when added after it (a unit test holds it).
    owned, owned_deletes = _owned(app)
    forwarder = passthrough.Passthrough(store=store, settings=settings, metrics=app[METRICS], owned=owned,
                                        owned_deletes=owned_deletes, registry=registry)
    app.cleanup_ctx.append(forwarder.session_context)
    app.on_shutdown.append(forwarder.close_websockets)
    app.router.add_route("*", passthrough.ROUTE, forwarder.handle)
    return app
