"""The HTTP app over a Store fed directly, for unit tests (no cluster, no Temporal is reached)."""

from __future__ import annotations

import collections
import contextlib
import socket
import weakref
from collections.abc import Callable, Iterator

import kubernetes
from aiohttp import web

from workerqueue_operator.api import app as app_
from workerqueue_operator.api import serving
from workerqueue_operator.core import reviews, temporal
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.registry import Bounds, Registry
from workerqueue_operator.core.store import Store
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.models.settings import Settings


@contextlib.contextmanager
def unreachable() -> Iterator[client_.KubeClient]:
    """A client of an API server nobody answers for: a port bound, never listening (connections refused)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        yield client_.KubeClient(kubernetes.client.Configuration(host=f"http://127.0.0.1:{unused.getsockname()[1]}"))


class NoReviews(reviews.Reviewer):
    """Kubernetes identities are tested against the real API server; here every other token is unknown."""

    def __init__(self, unavailable: reviews.Unavailable | None = None) -> None:
        self.outcomes = collections.defaultdict(int)
        self._in_flight = 0
        self.unavailable = unavailable  # set: every review fails so

    async def authenticate(self, token: str, token_digest: bytes, *, peer: str = "") -> reviews.Identity | None:
        if self.unavailable is not None:
            raise self.unavailable
        return None


class Allowed(NoReviews):
    """Every token a ServiceAccount's, allowed everything (the real API server's answers are tested
    in tests/integration/test_worker_life.py)."""

    async def authenticate(self, token: str, token_digest: bytes, *, peer: str = "") -> reviews.Identity | None:
        return reviews.Identity(username="system:serviceaccount:team-a:runner", uid="u", groups=(), extra=())

    async def may(self, identity: reviews.Identity, token_digest: bytes, namespace: str, name: str, *,
                  verb: str = "create", subresource: str = "start", peer: str = "") -> bool:
        return True


def make_app(store: Store, *, settings: Settings | None = None, version: str = "9.9.9",
             reviewer: reviews.Reviewer | None = None,
             secrets_current: Callable[[], bool] = lambda: True,
             invalid_count: Callable[[], int] = lambda: 0,
             listing: serving.Listing | None = None, ready: Callable[[], bool] = lambda: True) -> web.Application:
    # Nobody answers there (a port bound, never listening): the one write made at once, a refused
    # pod's record, fails at once, as it may.
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    kube = client_.KubeClient(kubernetes.client.Configuration(host=f"http://127.0.0.1:{unused.getsockname()[1]}"))
    settings = settings or Settings()
    registry = Registry(client=kube, events=EventPoster(kube), queue_of=store.queue,
                        bounds=Bounds.of(settings))
    app = app_.make_app(store=store, reviewer=reviewer or NoReviews(), registry=registry,
                        temporal_=temporal.Temporal(), kube=kube, settings=settings, version=version,
                        ready=ready, secrets_current=secrets_current, invalid_count=invalid_count,
                        listing=listing)

    async def close(app: web.Application) -> None:
        await kube.close()

    app.on_cleanup.append(close)
    weakref.finalize(app, unused.close)  # also for an app never started
    return app
