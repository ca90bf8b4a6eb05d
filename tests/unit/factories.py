"""Small builders of Kubernetes-shaped dicts for unit tests of pure logic."""

from __future__ import annotations

import base64
from typing import Any

from workerqueue_operator.core import queues

UID = "5d0a0f8e-2b1c-4c8e-9a51-3a2f4b6c7d8e"
"""The uid of every queue built here unless told otherwise."""


def queue_body(
    name: str = "q1",
    namespace: str = "team-a",
    *,
    uid: str = UID,
    created: str = "2026-01-01T00:00:00Z",
    generation: int = 1,
    **spec: Any,
) -> dict[str, Any]:
    spec.setdefault("temporal", {"host": "temporal.example:7233", "namespace": "agents"})
    return {
        "apiVersion": "agentcontrol.dev/v1alpha1",
        "kind": "WorkerQueue",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation,
                     "creationTimestamp": created},
        "spec": spec,
    }


def queue(name: str = "q1", namespace: str = "team-a", **kwargs: Any) -> queues.QueueObject:
    return queues.QueueObject.from_body(queue_body(name, namespace, **kwargs))


def secret_body(name: str, namespace: str = "team-a", **data: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }
