"""Kubernetes identities as /start callers: TokenReview says who, SubjectAccessReview says whether.

Both answers are cached briefly by token digest, so a worker fleet calling /start does not turn
into one API-server round trip per call, while a revoked RoleBinding stops working within seconds.

Any caller can send a made-up token, and each would cost the API server a TokenReview. So:
rejected digests are remembered apart (`negative_ttl`, longer, in their own LRU so that a flood of
them cannot evict the identities of real callers); at most `max_concurrent` reviews are in flight;
a caller beyond waits for a free one, but waiting and the review together get `timeout` seconds,
then it is `Unavailable` (busy: the HTTP answer is 503 with Retry-After, not 401, because the token
may well be valid). Waiting rather than refusing at once, because the real worker exits on any
answer but 200: a fleet starting together must not be turned away by its own burst. So a frozen
API server costs a caller seconds, not a hang, and made-up tokens cost at most `max_concurrent`
reviews at a time. Waiters take turns by the caller's address (FairSlots): one client sending
made-up tokens as fast as it can neither fills the waiting room nor makes the others wait behind
all of its own.
Queue tokens never come here: they are checked against watch-fed state first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from workerqueue_operator.k8s import client as client_
from workerqueue_operator.models import spec

T = TypeVar("T")


POD_UID = "authentication.kubernetes.io/pod-uid"
"""What TokenReview adds for a ServiceAccount token bound to a pod (a projected one): that pod's uid."""


@dataclass(frozen=True)
class Identity:
    username: str
    uid: str
    groups: tuple[str, ...]
    extra: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def pod_uid(self) -> str | None:
        """The pod the token is bound to, if it is."""
        values = dict(self.extra).get(POD_UID, ())
        return values[0] if len(values) == 1 and values[0] else None

    @property
    def service_account_namespace(self) -> str | None:
        """The namespace of a ServiceAccount (`system:serviceaccount:<namespace>:<name>`); None for a user."""
        parts = self.username.split(":")
        return parts[2] if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"] and parts[2] else None

    @property
    def registrant(self) -> str:
        """Who a worker registered with this token is, as its registration records it: a token bound
        to a pod is that pod's, so that workers of one ServiceAccount in several pods are told apart."""
        pod_uid = self.pod_uid
        return self.username if pod_uid is None else f"{self.username} (pod {pod_uid})"


class Unavailable(Exception):
    """No answer from the API server: `reason` says why in a few words (never a token)."""

    def __init__(self, review: str, reason: str, *, busy: bool = False) -> None:
        super().__init__(f"{review}: {reason}")
        self.review = review
        self.reason = reason
        self.busy = busy


class TTLCache(Generic[T]):
    """A bounded LRU with expiry; concurrent misses for one key share a single lookup.

    `keep` says which loaded values are cached (all by default).
    """

    def __init__(self, *, ttl: float, size: int = 10_000, clock: Callable[[], float] = time.monotonic,
                 keep: Callable[[T], bool] = lambda value: True) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._keep = keep
        self._items: OrderedDict[Any, tuple[float, T]] = OrderedDict()
        self._pending: dict[Any, asyncio.Future[T]] = {}

    async def get(self, key: Any, load: Callable[[], Any], *, ttl: Callable[[], float | None] | None = None) -> T:
        """The value cached for `key`, else `load()`'s; `ttl`, asked when it is cached, may shorten
        its stay (seconds; None: the cache's own)."""
        hit = self._items.get(key)
        if hit is not None and hit[0] > self._clock():
            self._items.move_to_end(key)
            return hit[1]
        pending = self._pending.get(key)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not pending.cancelled() or (current is not None and current.cancelling()):
                    raise
            # The caller whose lookup it was was cancelled, not this one: it looks up itself.
            return await self.get(key, load)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value: T = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            self._pending.pop(key, None)
        future.set_result(value)
        if self._keep(value):
            self.put(key, value, ttl=ttl() if ttl is not None else None)
        return value

    def put(self, key: Any, value: T, *, ttl: float | None = None) -> None:
        lifetime = self._ttl if ttl is None else min(self._ttl, ttl)
        if lifetime > 0:
            self._items[key] = (self._clock() + lifetime, value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def peek(self, key: Any) -> T | None:
        """The cached value, without loading; None when absent or expired."""
        hit = self._items.get(key)
        return hit[1] if hit is not None and hit[0] > self._clock() else None


def seconds_left(token: str) -> float | None:
    """Seconds until a JWT's `exp` (as the token says: the API server has checked it), None when it
    has none: an identity is not cached past its token's end."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    try:
        return float(exp) - time.time()
    except OverflowError:  # an int too big for a float: as good as none
        return None


class Full(Exception):
    """Turned away from FairSlots: the waiting room is full, and the caller's own waiters are the most."""


class FairSlots:
    """At most `size` holders at once; the others wait, served in turns by key (the caller's address),
    one waiter of each key in turn, so that a key with many waiters holds back the others by at most
    one each. At most `room` wait: a newcomer then makes room by turning away the newest waiter of the
    key with the most waiting, or is turned away itself when that is its own key.
    """

    def __init__(self, size: int, *, room: int) -> None:
        self._free = size
        self._room = room
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self.waiting = 0

    async def acquire(self, key: str) -> None:
        """A slot, to `release()`; raises Full when turned away (now or while waiting)."""
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        if self.waiting >= self._room:
            self._turn_away(key)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(future)
        self.waiting += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release()  # given a slot just as it stopped waiting: passed on
            else:
                self._discard(key, future)
            raise

    def release(self) -> None:
        self._free += 1
        while self._free > 0 and self._waiting:
            key, queue = next(iter(self._waiting.items()))
            future = queue.popleft()
            self.waiting -= 1
            if queue:
                self._waiting.move_to_end(key)  # its next waiter after one of every other key
            else:
                del self._waiting[key]
            if not future.done():  # a cancelled one is gone: its waiter finds it no longer here
                future.set_result(None)
                self._free -= 1

    def _turn_away(self, key: str) -> None:
        most = max(self._waiting, key=lambda k: len(self._waiting[k]))
        if len(self._waiting.get(key, ())) >= len(self._waiting[most]):
            raise Full
        queue = self._waiting[most]
        victim = queue.pop()
        self.waiting -= 1
        if not queue:
            del self._waiting[most]
        # Its waiter may have stopped waiting a moment ago (its deadline: the future is cancelled at
        # once, its task takes it out only when it runs next): gone all the same, room made.
        if not victim.done():
            victim.set_exception(Full())

    def _discard(self, key: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is None or future not in queue:
            return  # given out or turned away already
        queue.remove(future)
        self.waiting -= 1
        if not queue:
            del self._waiting[key]


class Reviewer:
    def __init__(self, client: client_.KubeClient, *, audiences: Sequence[str], ttl: float,
                 negative_ttl: float = 60.0, timeout: float = 4.0, max_concurrent: int = 16) -> None:
        self._client = client
        self._audiences = list(audiences)
        self._timeout = timeout
        self._max_concurrent = max_concurrent
        # Beyond the room: 503 at once, no task piles up behind a freeze.
        self._slots = FairSlots(max_concurrent, room=64 * max_concurrent)
        self._in_flight = 0
        self._identities: TTLCache[Identity | None] = TTLCache(ttl=ttl, keep=lambda identity: identity is not None)
        self._rejected: TTLCache[bool] = TTLCache(ttl=negative_ttl, size=50_000)
        self._decisions: TTLCache[bool] = TTLCache(ttl=ttl)
        self.outcomes: dict[str, int] = {"authenticated": 0, "rejected": 0, "rejected_cached": 0,
                                         "unavailable": 0, "busy": 0, "not_a_jwt": 0}
        """TokenReview outcomes since start, for /metrics."""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def authenticate(self, token: str, token_digest: bytes, *, peer: str = "") -> Identity | None:
        """Who the token belongs to, or None when the API server does not vouch for it. `peer`: the
        caller's address, whose reviews take turns with other addresses'.

        Raises Unavailable when the API server cannot say within the timeout, or too many reviews
        are in flight.
        """
        if self._rejected.peek(token_digest):
            self.outcomes["rejected_cached"] += 1
            return None
        try:
            identity = await self._identities.get(token_digest, lambda: self._token_review(token, peer),
                                                  ttl=lambda: seconds_left(token))
        except Unavailable as exc:
            self.outcomes["busy" if exc.busy else "unavailable"] += 1
            raise
        if identity is None:
            self._rejected.put(token_digest, True)
            self.outcomes["rejected"] += 1
        else:
            self.outcomes["authenticated"] += 1
        return identity

    async def may(self, identity: Identity, token_digest: bytes, namespace: str, name: str, *,
                  verb: str = "create", subresource: str = "start", peer: str = "") -> bool:
        """RBAC's answer to: may this identity `verb` `workerqueues[/subresource]` on this queue?
        (/start and the worker's own calls: `create workerqueues/start`.)"""
        return await self._decisions.get(
            (token_digest, namespace, name, verb, subresource),
            lambda: self._access_review(identity, namespace, name, verb, subresource, peer))

    async def _review(self, kind: str, path: str, body: dict[str, Any], peer: str) -> dict[str, Any]:
        """One review at the API server, bounded in number and in time: waiting for a free slot and
        the API server's answer together take at most `timeout` seconds."""
        busy = Unavailable(kind, f"no review slot free in time ({self._max_concurrent} in flight)", busy=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire(peer)
        except TimeoutError as exc:
            raise busy from exc
        except Full:
            raise Unavailable(kind, f"{self._slots.waiting} callers already wait for a review", busy=True) from None
        try:
            remaining = deadline - loop.time()
            if remaining < self._timeout / 4:  # too little time left for a review to be worth starting
                raise busy
            self._in_flight += 1
            try:
                async with asyncio.timeout(remaining):
                    return await self._client.request("POST", path, body=body, timeout=remaining)
            finally:
                self._in_flight -= 1
        except TimeoutError as exc:
            # str(TimeoutError()) is empty: say what happened instead.
            raise Unavailable(kind, f"TimeoutError: no answer within {self._timeout:g}s") from exc
        except client_.ApiError as exc:
            # By status and reason: an admission webhook on reviews is given the token, and may quote it.
            raise Unavailable(kind, f"ApiError: {exc.status} {exc.reason}") from None
        except client_.ERRORS as exc:
            raise Unavailable(kind, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._slots.release()

    async def _token_review(self, token: str, peer: str) -> Identity | None:
        review_spec: dict[str, Any] = {"token": token}
        if self._audiences:
            review_spec["audiences"] = self._audiences
        answer = await self._review(
            "TokenReview", "/apis/authentication.k8s.io/v1/tokenreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review_spec}, peer,
        )
        status = answer.get("status", {})
        if not status.get("authenticated"):
            return None
        # An authenticator that ignores audiences answers none: the token is then the API server's
        # own, not one meant for this operator (as the TokenReview API asks its clients to check).
        if self._audiences and not set(self._audiences) & set(status.get("audiences") or ()):
            return None
        user = status.get("user", {})
        return Identity(
            username=user.get("username", ""),
            uid=user.get("uid", ""),
            groups=tuple(user.get("groups") or ()),
            extra=tuple(sorted((k, tuple(v)) for k, v in (user.get("extra") or {}).items())),
        )

    async def _access_review(self, identity: Identity, namespace: str, name: str, verb: str,
                             subresource: str, peer: str) -> bool:
        answer = await self._review(
            "SubjectAccessReview", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": identity.username,
                    "uid": identity.uid,
                    "groups": list(identity.groups),
                    "extra": {k: list(v) for k, v in identity.extra},
                    "resourceAttributes": {
                        "namespace": namespace,
                        "verb": verb,
                        "group": spec.GROUP,
                        "resource": spec.PLURAL,
                        "subresource": subresource,
                        "name": name,
                    },
                },
            },
            peer,
        )
        return bool(answer.get("status", {}).get("allowed"))
