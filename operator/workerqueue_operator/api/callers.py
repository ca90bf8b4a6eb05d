"""Who is calling, and may they: how the operator's own worker-facing routes authenticate and authorize.
(The pass-through, api/passthrough.py, takes the same credentials in the same order, and forwards
with the queue's upstream key rather than answering itself.)

Three kinds of credentials, checked in this order so that the common ones never reach the API server:
a queue token (opens its queue), a per-worker token (opens its queue, and says which operator-run pod
is asking), or a Kubernetes token (TokenReview says who, SubjectAccessReview whether).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from aiohttp import web

from workerqueue_operator.api import errors
from workerqueue_operator.api.keys import LOG, REVIEWER, STORE, UNSEEN
from workerqueue_operator.api.unseen import Crowded
from workerqueue_operator.core import queues, reviews, workers
from workerqueue_operator.core.queues import Resolution
from workerqueue_operator.core.store import WorkerCredential

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    token_digest: bytes
    identity: reviews.Identity | None = None
    """Set for a Kubernetes identity."""
    worker: WorkerCredential | None = None
    """Set for a per-worker token: the pod (and its queue) it was made for."""


def bearer(request: web.Request) -> str | None:
    """The bearer token of the Authorization header; None without one or when it cannot be a token.

    RFC 6750's b64token, loosened to any visible ASCII: a token Secret may hold any such string,
    while anything else (a non-ASCII byte, a control character) cannot be a token and must not
    reach a hash or a TokenReview.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not queues.visible_ascii(token):
        return None
    return token


def _review_unavailable(request: web.Request, exc: reviews.Unavailable, what: str) -> web.Response:
    log = request.app[LOG]
    if exc.busy:
        log.warning("reviews_busy", "%s not made: %s", exc.review, exc.reason)
        return errors.detail(503, f"{what} is busy, try again", headers={"Retry-After": "1"})
    log.warning("reviews_unavailable", "%s failed: %s", exc.review, exc.reason)
    return errors.detail(503, f"{what} is temporarily unavailable, try again")


async def authenticate(request: web.Request, *, starting: bool = False) -> Caller | web.Response:
    """Who calls. `starting`: a /start, which its worker waits longer for than its other calls."""
    token = bearer(request)
    if token is None:
        return errors.unauthorized("Not authenticated")
    token_digest = queues.digest(token)
    store = request.app[STORE]
    # A pod's own token first, as Store.queue_of_token: another queue listing its Secret as a queue
    # token (its name can be guessed) must not turn the pod into that queue's caller.
    credential = store.worker_credential(token_digest)
    if credential is not None:
        return Caller(token_digest, worker=credential)
    if store.is_queue_token(token_digest):
        return Caller(token_digest)
    conflict = store.conflict_of_token(token_digest)
    if conflict is not None:
        return errors.detail(409, conflict)
    if workers.is_worker_token(token):  # made by the operator: maybe for a pod whose Secret is on its way
        found = await unseen_worker(request, token_digest, starting=starting)
        return found if isinstance(found, web.Response) else Caller(token_digest, worker=found)
    return await kubernetes_caller(request, token, token_digest)


_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
"""A JSON Web Token (a ServiceAccount's, an OIDC one): a header (`{"` in base64url), payload and signature."""


async def kubernetes_caller(request: web.Request, token: str, token_digest: bytes) -> Caller | web.Response:
    """The Kubernetes identity a token is (TokenReview), or the 401 (503) answer. Only a JWT is
    reviewed: anything else (a queue token rotated out or not seen yet, an organization's key) would be
    sent to the API server, its audit log and its webhook authenticators, for nothing."""
    if not _JWT.fullmatch(token):
        request.app[REVIEWER].outcomes["not_a_jwt"] += 1
        return errors.unauthorized("Invalid authentication credentials")
    try:
        identity = await request.app[REVIEWER].authenticate(token, token_digest, peer=request.remote or "")
    except reviews.Unavailable as exc:
        return _review_unavailable(request, exc, "Authentication")
    if identity is None:
        return errors.unauthorized("Invalid authentication credentials")
    return Caller(token_digest, identity=identity)


async def unseen_worker(request: web.Request, token_digest: bytes, *, starting: bool = False
                        ) -> WorkerCredential | web.Response:
    """A per-worker token (`workers.is_worker_token`) this replica does not know: its credential once
    its Secret comes (made by another replica a moment ago, say), else 503 while the Secret watch is
    down (or too many such tokens are awaited to wait for one more), else 401. A worker exits on a
    401: none must be told so for a Secret not seen yet."""
    store = request.app[STORE]
    unseen = request.app[UNSEEN]
    try:
        credential = await unseen.until(lambda: store.worker_credential(token_digest),
                                        peer=request.remote or "", starting=starting)
    except Crowded:
        return errors.detail(503, "Too many worker credentials are awaited, try again", headers={"Retry-After": "1"})
    if credential is not None:
        return credential
    if not unseen.current():
        request.app[LOG].warning("worker_token_unseen", "a per-worker token is unknown while the Secret watch "
                                 "is down: answered 503")
        return errors.detail(503, "Worker credentials are being loaded, try again", headers={"Retry-After": "1"})
    return errors.unauthorized("Invalid authentication credentials")  # the mark is no Kubernetes token's


def opens(request: web.Request, caller: Caller, resolution: Resolution) -> bool:
    """Whether a queue or per-worker token belongs to this queue."""
    if caller.worker is not None:  # made for this very queue, not a deleted namesake
        return caller.worker.queue == resolution.queue.key and caller.worker.queue_uid == resolution.queue.uid
    return request.app[STORE].opens(resolution, caller.token_digest)


async def allowed(request: web.Request, caller: Caller, resolution: Resolution, *, verb: str,
                  subresource: str = "") -> bool | web.Response:
    """For a Kubernetes identity, RBAC's answer on this queue (503 when it cannot be asked)."""
    assert caller.identity is not None
    queue = resolution.queue
    try:
        return await request.app[REVIEWER].may(caller.identity, caller.token_digest, queue.namespace, queue.name,
                                               verb=verb, subresource=subresource, peer=request.remote or "")
    except reviews.Unavailable as exc:
        return _review_unavailable(request, exc, "Authorization")


async def authorize(request: web.Request, caller: Caller, resolution: Resolution, *, verb: str,
                    subresource: str = "", token_message: str) -> web.Response | None:
    """None when the caller may act on the queue; else the 403 (or 503) answer."""
    if caller.identity is None:
        return None if opens(request, caller, resolution) else errors.detail(403, token_message)
    decision = await allowed(request, caller, resolution, verb=verb, subresource=subresource)
    if isinstance(decision, web.Response):
        return decision
    if not decision:
        what = f"workerqueues/{subresource}" if subresource else "workerqueues"
        return errors.detail(403, f"{caller.identity.username} may not {verb} {what} on this worker queue")
    return None
