"""Typed application state of the HTTP API (aiohttp AppKeys), shared by the route modules."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from workerqueue_operator.api import logs, metrics, serving, unseen
from workerqueue_operator.core import reviews, temporal
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.models import settings as settings_

STORE = web.AppKey("store", Store)
REVIEWER = web.AppKey("reviewer", reviews.Reviewer)
SETTINGS = web.AppKey("settings", settings_.Settings)
METRICS = web.AppKey("metrics", metrics.Metrics)
READY: web.AppKey[Callable[[], bool]] = web.AppKey("ready")
OPENAPI = web.AppKey("openapi", bytes)
REGISTRY = web.AppKey("registry", Registry)
TEMPORAL = web.AppKey("temporal", temporal.Temporal)
KUBE = web.AppKey("kube", client_.KubeClient)
LOG = web.AppKey("log", logs.Throttled)
"""Throttled lines about clients and upstream problems (api/logs.py)."""
BUSY: web.AppKey[set[object]] = web.AppKey("busy")
"""The connections whose request is being handled: never closed to make room (api/serving.py)."""
DRAIN = web.AppKey("drain", serving.Drain)
"""Set when the replica stops: its last seconds of serving (api/serving.py)."""
UNSEEN = web.AppKey("unseen", unseen.UnseenTokens)
"""Per-worker tokens held until the Secret watch brings them (api/unseen.py)."""
LISTING = web.AppKey("listing", serving.Listing)
"""Set once the replica's watches have listed: worker calls wait for it (api/serving.py)."""
