"""What a worker calls after /start (heartbeat, disconnect, its executions), the live-worker list,
and DELETE of a queue. Each route: authenticate, read the body, find the object, authorize, act."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import pydantic
from aiohttp import web

from workerqueue_operator.api import bodies, callers, errors
from workerqueue_operator.api.keys import KUBE, LOG, REGISTRY, STORE, TEMPORAL
from workerqueue_operator.core import executions, queues, temporal
from workerqueue_operator.core import registry as registry_
from workerqueue_operator.core import workers as workers_
from workerqueue_operator.core.leases import Worker, system_pid
from workerqueue_operator.core.queues import QueueObject, Resolution
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import wire

logger = logging.getLogger(__name__)

HEARTBEAT_ROUTE = "/api/v1/workers/{worker_id}/heartbeat"
DISCONNECT_ROUTE = "/api/v1/workers/{worker_id}/disconnect"
WORKERS_ROUTE = "/api/v1/worker-queues/{queue_id}/workers"
EXECUTIONS_ROUTE = "/api/v1/worker-queues/{queue_id}/executions"
QUEUE_ROUTE = "/api/v1/worker-queues/{queue_id}"

NOT_FOUND = "Worker not found"
MAX_LIMIT = 100


async def _worker(request: web.Request, caller: callers.Caller, *, expired: bool = False
                  ) -> tuple[Worker, Resolution] | web.Response:
    """The registered worker of the path, if this caller may act for it (with `expired`, also one
    past its lease that is not ended yet)."""
    worker = request.app[REGISTRY].get(request.match_info["worker_id"], expired=expired)
    resolution = request.app[STORE].resolution(worker.queue) if worker is not None else None
    if worker is None or resolution is None or resolution.queue.uid != worker.queue_uid:
        return errors.detail(404, NOT_FOUND)
    if caller.worker is not None and caller.worker.pod != worker.pod:  # its own pod's worker only
        return errors.detail(403, "This token belongs to another worker")
    if caller.identity is not None and caller.identity.registrant != worker.identity:
        # A Kubernetes identity, for the workers it registered only: one allowed to start workers on a
        # queue could otherwise end another pod's worker, or take its registration for its own.
        return errors.detail(403, "This worker was registered by another identity")
    denied = await callers.authorize(request, caller, resolution, verb="create", subresource="start",
                                     token_message="This token may not act for workers of this worker queue")
    if denied is None and request.app[REGISTRY].get(worker.worker_id, expired=expired) is not worker:
        # Ended (its disconnect, its expiry) while the review was made: acting on it now would
        # bring back what was let go.
        return errors.detail(404, NOT_FOUND)
    return denied or (worker, resolution)


async def _caller_and_body(request: web.Request, model: type[bodies.M]
                           ) -> tuple[callers.Caller, bodies.M] | web.Response:
    caller = await callers.authenticate(request)
    if isinstance(caller, web.Response):
        token = callers.bearer(request)
        if caller.status == 401 and token is not None:  # a live worker whose token was revoked, maybe
            request.app[REGISTRY].token_refused(request.match_info["worker_id"], queues.digest(token))
        return caller
    body = await bodies.read(request, model)
    if isinstance(body, web.Response):
        return body
    return caller, body


def refused(request: web.Request, queue: QueueObject, exc: registry_.Full) -> web.Response:
    """The answer when a registration would pass the registry's Bounds."""
    request.app[LOG].warning("registrations_refused", "a worker of %s/%s was refused: %s",
                             queue.namespace, queue.name, exc)
    if exc.pending:  # gone as soon as starting workers heartbeat
        return errors.detail(503, "Too many workers are starting at once, try again", headers={"Retry-After": "5"})
    return errors.detail(503, "Too many workers are registered, try again later", headers={"Retry-After": "30"})


def _issuer(request: web.Request, caller: callers.Caller) -> Resolution | None:
    """The queue that issued the path's worker id to this caller (to the calling pod, for a pod's
    token), for a worker with no registration here; for a Kubernetes identity, which names no queue,
    the queue whose registration of it, by that identity, expired here. None if none did."""
    worker_id = request.match_info["worker_id"]
    store = request.app[STORE]
    if caller.identity is not None:
        # Its expired registration is the proof: not the id's MAC, keyed by a queue token that a
        # rotation may have unlisted since (it never held one).
        key = request.app[REGISTRY].expired_in(worker_id, caller.identity.registrant)
        return store.resolution(key) if key is not None else None
    key = store.queue_of_token(caller.token_digest)
    resolution = store.resolution(key) if key is not None else None
    if resolution is None:
        return None
    pod = caller.worker.pod if caller.worker is not None else None
    # A pod's id is keyed by its own token (by the queue's when an earlier version issued it).
    keys = resolution.token_digests
    return resolution if queues.issued_worker_id(worker_id, (caller.token_digest, *keys) if pod else keys,
                                                 pod=pod) else None


async def _rejoin(request: web.Request, caller: callers.Caller, hostname: str | None
                  ) -> tuple[Worker, Resolution] | web.Response:
    """A heartbeat of a worker with no registration here (see Registry.may_rejoin): registered again
    when its queue issued its id (_issuer) and would register it at /start; for a Kubernetes
    identity, one that may still start workers on that queue. Anything else is the 404 of an unknown
    worker, as before."""
    worker_id = request.match_info["worker_id"]
    registry = request.app[REGISTRY]
    resolution = _issuer(request, caller)
    pod = caller.worker.pod if caller.worker is not None else None
    if (resolution is None or resolution.queue.spec.suspend or resolution.queue.deleting
            or not registry.may_rejoin(resolution.queue, worker_id, pod=pod)):
        return errors.detail(404, NOT_FOUND)
    if caller.identity is not None:
        denied = await callers.authorize(request, caller, resolution, verb="create", subresource="start",
                                         token_message="This token may not act for workers of this worker queue")
        if denied is not None:
            return denied
    queue = resolution.queue
    identity = caller.identity.registrant if caller.identity is not None else None
    if queue.spec.max_workers is None:
        try:
            worker = registry.rejoin(queue, worker_id, pod=pod, hostname=hostname or pod, identity=identity)
        except registry_.Full as exc:
            return refused(request, queue, exc)
        if worker is not None and identity is not None:
            await registry.write_now(worker)  # as at /start: another replica must find whose polls these are
    else:
        try:
            worker = await registry.rejoin_slot(queue, worker_id, pod=pod, hostname=hostname or pod,
                                                identity=identity)
        except client_.ERRORS as exc:
            return registry_unavailable(request, queue, exc)
        if worker is None:
            # Its disconnect came meanwhile (an unknown worker to it now), or every slot is taken.
            return errors.detail(404, NOT_FOUND) if not registry.may_rejoin(queue, worker_id, pod=pod) else full(queue)
    if worker is None:
        return errors.detail(404, NOT_FOUND)
    request.app[LOG].log(logging.INFO, "workers_rejoined", "worker %s of %s/%s had no registration here: "
                         "registered again from its heartbeat", worker_id, queue.namespace, queue.name)
    return worker, resolution


def inactive(request: web.Request, queue: QueueObject) -> str | None:
    """Why the queue takes no new worker now, as the watch last told ("suspended", "deleting"), or None:
    checked again after /start registered one, which may wait for the API server (a claim) meanwhile."""
    current = request.app[STORE].queue(queue.key)
    if current is None or current.uid != queue.uid:
        return None  # deleted meanwhile: its registrations go with it
    return "suspended" if current.spec.suspend else "deleting" if current.deleting else None


def full(queue: QueueObject) -> web.Response:
    """The answer when every slot of a queue with maxWorkers is taken."""
    return errors.detail(409, f"Worker queue '{queue.name}' is full (maxWorkers={queue.spec.max_workers})")


def registry_unavailable(request: web.Request, queue: QueueObject, exc: Exception) -> web.Response:
    """The answer when a slot cannot be claimed for want of the API server: logged paced, as an
    outage meets every call at once."""
    request.app[LOG].warning("registry_unavailable", "registering a worker of %s/%s failed: %s: %s",
                             queue.namespace, queue.name, type(exc).__name__, exc)
    return errors.detail(503, "The worker registry is temporarily unavailable, try again")


async def heartbeat(request: web.Request) -> web.Response:
    call = await _caller_and_body(request, wire.WorkerHeartbeatRequest)
    if isinstance(call, web.Response):
        return call
    caller, body = call
    found = await _worker(request, caller, expired=True)  # a heartbeat proves it alive again
    if isinstance(found, web.Response) and found.status == 404:
        found = await _rejoin(request, caller,
                              body.system_info.hostname if body.system_info is not None else None)
    if isinstance(found, web.Response):
        return found
    worker, resolution = found
    # `logs` are dropped on purpose: they never go to the API server.
    if not request.app[REGISTRY].heartbeat(
            worker, status=body.status, tasks_processed=body.tasks_processed, current_task_id=body.current_task_id,
            system_info=body.system_info):
        return errors.detail(404, NOT_FOUND)
    return web.json_response({"status": "ok", "worker_id": worker.worker_id,
                              "heartbeat_interval": resolution.queue.spec.heartbeat_interval_seconds})


async def disconnect(request: web.Request) -> web.Response:
    # Its worker waits 10 s: time spent on its token (a pod's Secret not seen yet) is taken from the wait
    # for its Lease's deletion.
    deadline = asyncio.get_running_loop().time() + registry_.DISCONNECT_WAIT_SECONDS
    call = await _caller_and_body(request, wire.WorkerDisconnectRequest)
    if isinstance(call, web.Response):
        return call
    caller, body = call
    found = await _worker(request, caller, expired=True)  # past its lease, not ended yet: ended now
    if isinstance(found, web.Response) and found.status == 404:
        # Registered by another replica, its Lease not seen here yet: ended all the same, or it would
        # hold its place (a slot of maxWorkers) until it expired.
        resolution = _issuer(request, caller)
        if resolution is None:
            return found
        if caller.identity is not None:
            denied = await callers.authorize(request, caller, resolution, verb="create", subresource="start",
                                             token_message="This token may not act for workers of this worker queue")
            if denied is not None:
                return denied
        worker_id = request.match_info["worker_id"]
        if not await request.app[REGISTRY].disconnect_unseen(resolution.queue, worker_id, reason=body.reason,
                                                             exit_code=body.exit_code, deadline=deadline):
            return found  # a registration of another queue (a namesake made again): not this caller's
        return web.json_response({"status": "disconnected", "worker_id": worker_id})
    if isinstance(found, web.Response):
        return found
    worker, _ = found
    await request.app[REGISTRY].disconnect(worker, reason=body.reason, exit_code=body.exit_code, deadline=deadline)
    return web.json_response({"status": "disconnected", "worker_id": worker.worker_id})


async def _queue(request: web.Request, caller: callers.Caller, *, verb: str, message: str
                 ) -> Resolution | web.Response:
    resolution = request.app[STORE].serving(request.match_info["queue_id"])
    if resolution is None:
        return errors.detail(404, "Worker queue not found")
    denied = await callers.authorize(request, caller, resolution, verb=verb, token_message=message)
    return denied or resolution


async def list_workers(request: web.Request) -> web.Response:
    caller = await callers.authenticate(request)
    if isinstance(caller, web.Response):
        return caller
    resolution = await _queue(request, caller, verb="get", message="This token may not read this worker queue")
    if isinstance(resolution, web.Response):
        return resolution
    live = request.app[REGISTRY].live(resolution.queue.key)
    return web.json_response([w.info() for w in live])


_LIMIT: pydantic.TypeAdapter[int] = pydantic.TypeAdapter(Annotated[int, pydantic.Field(ge=1, le=MAX_LIMIT)])


def _query(request: web.Request) -> tuple[int, str] | web.Response:
    """`limit` and `status`, checked as FastAPI checks query parameters."""
    problems: list[dict[str, Any]] = []
    given = request.query.getall("limit", [])
    # The last one, as Starlette reads a repeated parameter; 10 is the reference's default.
    raw_limit = given[-1] if given else "10"
    limit = 0
    try:
        # pydantic's own parsing, as FastAPI's: "5.0" is 5, and a digit of another script no number.
        limit = _LIMIT.validate_python(raw_limit)
    except pydantic.ValidationError as exc:
        problems += [{**error, "loc": ["query", "limit"]} for error in errors.validation_errors(exc)]
    status = request.query.get("status", "all")
    if status != "all" and status not in executions.STATUSES:
        problems.append({"type": "enum", "loc": ["query", "status"], "input": status,
                         "msg": "Input should be 'all', " + ", ".join(f"'{s}'" for s in executions.STATUSES)})
    if problems:
        return errors.unprocessable(problems)
    return limit, status


async def _asking_worker(request: web.Request, caller: callers.Caller, resolution: Resolution, *, starts: bool
                         ) -> tuple[str, float | None, int | None] | web.Response | None:
    """(hostname, since, pid) of the worker that asks, None when none does (the whole queue is shown), or
    the answer to give at once. A pod's worker by its token; a Kubernetes identity's by the worker
    it registered in this queue. Several, or one without a hostname, cannot be told apart: none is
    shown (`[]`), as for a queue token. An identity with none sees the whole queue only if it may not
    start workers there (`starts`) and its token is bound to no pod (a person, a tool with a read-only
    Role): any other may be a worker whose registration expired (it heartbeats more slowly than
    expected, the API server was away), which waits (`[]`) rather than take another's execution."""
    if caller.worker is not None:  # a pod's: its hostname is its own
        # Since its token was made, to the microsecond: seconds before its worker can take anything
        # (its pod made, started). Allowing for the clocks there would show it what a namesake pod took
        # just before (its queue deleted and made again at once: `kubectl replace --force`).
        return caller.worker.hostname or workers_.pod_hostname(caller.worker.pod), caller.worker.since, None
    identity = caller.identity
    if identity is None:
        return None
    try:
        registered = await request.app[REGISTRY].registrations_of(resolution.queue, identity.registrant)
    except client_.ERRORS as exc:
        return registry_unavailable(request, resolution.queue, exc)
    if not registered:
        return None if identity.pod_uid is None and not starts else web.json_response([])
    if identity.pod_uid is not None:
        # All in its pod: the newest is the worker that asks (its container restarted since the others).
        registered = [max(registered, key=lambda w: w.since or 0.0)]
    if len(registered) > 1 or not registered[0].hostname:
        return web.json_response([])
    since = registered[0].since
    # Its first take follows its registration at once: the clocks may differ that much. Outside a pod
    # its host may run other workers: its process, from the system_info it sent, tells them apart.
    return (registered[0].hostname, None if since is None else since - executions.UNTAKEN_MARGIN_SECONDS,
            system_pid(registered[0].system_info))


async def _executions_reader(request: web.Request, caller: callers.Caller
                             ) -> tuple[Resolution, bool] | web.Response:
    """The queue, and whether the caller may start workers on it, or the answer to give at once. A
    Kubernetes identity RBAC allows to start workers there may read its executions as a worker (the
    Role that lets a worker `/start` is enough); one allowed only to `get` the queue reads it all."""
    if caller.identity is None:
        found = await _queue(request, caller, verb="get", message="This token may not read this worker queue")
        return found if isinstance(found, web.Response) else (found, True)
    resolution = request.app[STORE].serving(request.match_info["queue_id"])
    if resolution is None:
        return errors.detail(404, "Worker queue not found")
    starts = await callers.allowed(request, caller, resolution, verb="create", subresource="start")
    if isinstance(starts, web.Response):
        return starts
    if not starts:
        reads = await callers.allowed(request, caller, resolution, verb="get")
        if isinstance(reads, web.Response):
            return reads
        if not reads:
            return errors.detail(403, f"{caller.identity.username} may neither create workerqueues/start nor get "
                                      "workerqueues on this worker queue")
    return resolution, starts


async def list_executions(request: web.Request) -> web.Response:
    caller = await callers.authenticate(request)
    if isinstance(caller, web.Response):
        return caller
    query = _query(request)
    if isinstance(query, web.Response):
        return query
    limit, status = query
    reader = await _executions_reader(request, caller)
    if isinstance(reader, web.Response):
        return reader
    resolution, starts = reader
    target = resolution.temporal
    if target is None:  # its Temporal key missing, or no Temporal at all
        reason = resolution.problem.message if resolution.problem else "not resolved"
        return errors.detail(503, f"Worker queue is not ready: {reason}")
    if caller.identity is None and caller.worker is None:
        # A queue token is shared: nothing tells which worker asks, and any execution listed could
        # make it exit (see core/executions.py). It sees none, so it never exits on another's work.
        return web.json_response([])
    host = await _asking_worker(request, caller, resolution, starts=starts)
    if isinstance(host, web.Response):
        return host
    access = request.app[TEMPORAL]
    try:
        if host is not None:
            view = await executions.for_worker(access, target.endpoint, target.task_queue, limit=MAX_LIMIT,
                                               hostname=host[0], since=host[1], pid=host[2])
            view = [e for e in view if status == "all" or e["status"] == status]
        else:
            found = await access.executions(target.endpoint, target.task_queue, limit=MAX_LIMIT)
            view = executions.queue_view(found, status=status, limit=limit)
    except temporal.TemporalUnavailable as exc:
        return errors.detail(503, f"Temporal is unavailable: {exc}")
    return web.json_response(view)


async def delete_queue(request: web.Request) -> web.Response:
    caller = await callers.authenticate(request)
    if isinstance(caller, web.Response):
        return caller
    resolution = request.app[STORE].serving(request.match_info["queue_id"])
    if resolution is None:
        return errors.detail(404, "Worker queue not found")
    queue = resolution.queue
    if caller.identity is None:
        if not callers.opens(request, caller, resolution):
            return errors.detail(403, "This token may not delete this worker queue")
        if not queue.spec.ephemeral:
            return errors.detail(403, "Only ephemeral worker queues may be deleted with a queue token")
    else:
        denied = await callers.authorize(request, caller, resolution, verb="delete", token_message="")
        if denied is not None:
            return denied
    try:  # gone already (or made again since: not the queue asked about), what was asked is done
        await resources.delete_exact(request.app[KUBE], resources.queue_path(queue.namespace, queue.name), queue.uid,
                                     timeout=5.0)
    except client_.ApiError as exc:
        logger.warning("deleting WorkerQueue %s/%s failed: %s", queue.namespace, queue.name, exc)
        return errors.detail(503, "The worker queue could not be deleted now, try again")
    except client_.ERRORS as exc:  # ApiError taken above
        logger.warning("deleting WorkerQueue %s/%s failed: %s", queue.namespace, queue.name, type(exc).__name__)
        return errors.detail(503, "The worker queue could not be deleted now, try again")
    logger.info("WorkerQueue deleted through the API", extra={"queue": f"{queue.namespace}/{queue.name}"})
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post(HEARTBEAT_ROUTE, heartbeat)
    app.router.add_post(DISCONNECT_ROUTE, disconnect)
    app.router.add_get(WORKERS_ROUTE, list_workers)
    app.router.add_get(EXECUTIONS_ROUTE, list_executions)
    app.router.add_delete(QUEUE_ROUTE, delete_queue)
