"""Kubernetes identities as /start callers: TokenReview says who, SubjectAccessReview says whether.

Both answers are cached briefly by token digest, so a worker fleet calling /start does not turn
into one API-server round trip per call, while a revoked RoleBinding stops working within seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from workerqueue_operator.k8s import client as client_
from workerqueue_operator.models import spec

T = TypeVar("T")


@dataclass(frozen=True)
class Identity:
    username: str
    uid: str
    groups: tuple[str, ...]
    extra: tuple[tuple[str, tuple[str, ...]], ...]


class TTLCache(Generic[T]):
    """A bounded LRU with expiry; concurrent misses for one key share a single lookup."""

    def __init__(self, *, ttl: float, size: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._items: OrderedDict[Any, tuple[float, T]] = OrderedDict()
        self._pending: dict[Any, asyncio.Future[T]] = {}

    async def get(self, key: Any, load: Callable[[], Any]) -> T:
        hit = self._items.get(key)
        if hit is not None and hit[0] > self._clock():
            self._items.move_to_end(key)
            return hit[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value: T = await load()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            self._pending.pop(key, None)
        future.set_result(value)
        if self._ttl > 0:
            self._items[key] = (self._clock() + self._ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


class Reviewer:
    def __init__(self, client: client_.KubeClient, *, audiences: Sequence[str], ttl: float) -> None:
        self._client = client
        self._audiences = list(audiences)
        self._identities: TTLCache[Identity | None] = TTLCache(ttl=ttl)
        self._decisions: TTLCache[bool] = TTLCache(ttl=ttl)

    async def authenticate(self, token: str, token_digest: bytes) -> Identity | None:
        """Who the token belongs to, or None when the API server does not vouch for it."""
        return await self._identities.get(token_digest, lambda: self._token_review(token))

    async def may(self, identity: Identity, token_digest: bytes, namespace: str, name: str, *,
                  verb: str = "create", subresource: str = "start") -> bool:
        """RBAC's answer to: may this identity `verb` `workerqueues[/subresource]` on this queue?
        (/start and the worker's own calls: `create workerqueues/start`.)"""
        return await self._decisions.get(
            (token_digest, namespace, name, verb, subresource),
            lambda: self._access_review(identity, namespace, name, verb, subresource))

    async def _token_review(self, token: str) -> Identity | None:
        review_spec: dict[str, Any] = {"token": token}
        if self._audiences:
            review_spec["audiences"] = self._audiences
        answer = await self._client.create(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review_spec},
        )
        status = answer.get("status", {})
        if not status.get("authenticated"):
            return None
        user = status.get("user", {})
        return Identity(
            username=user.get("username", ""),
            uid=user.get("uid", ""),
            groups=tuple(user.get("groups") or ()),
            extra=tuple(sorted((k, tuple(v)) for k, v in (user.get("extra") or {}).items())),
        )

    async def _access_review(self, identity: Identity, namespace: str, name: str, verb: str,
                             subresource: str) -> bool:
        answer = await self._client.create(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
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
        )
        return bool(answer.get("status", {}).get("allowed"))
