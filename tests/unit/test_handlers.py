"""kopf's configuration as the operator sets it at startup (no cluster)."""

from __future__ import annotations

from typing import cast

import kopf
from kopf._cogs.structs import references

from workerqueue_operator import handlers
from workerqueue_operator.core.supervisor import Supervisor
from workerqueue_operator.models.settings import Settings

PODS = references.Resource("", "v1", "pods", kind="Pod", singular="pod", namespaced=True, verbs=["list", "watch"])
QUEUES = references.Resource("agentcontrol.dev", "v1alpha1", "workerqueues", kind="WorkerQueue",
                             singular="workerqueue", namespaced=True, verbs=["list", "watch"])


def _configured() -> kopf.OperatorSettings:
    reg = handlers.registry(settings=Settings(), supervisor=cast(Supervisor, object()))  # configure needs none
    (configure,) = [h for h in reg._activities.get_all_handlers() if h.id == "configure"]
    settings = kopf.OperatorSettings()
    configure.fn(settings=settings)
    return settings


def test_the_pod_watch_asks_the_api_server_for_the_operators_pods_only():
    # kopf filters a handler's `labels=` after each event arrived; only a watch selector spares the
    # operator every other pod of the cluster.
    selectors = _configured().watching.label_selectors
    assert selectors.collect(PODS) == ["app.kubernetes.io/managed-by=workerqueue-operator"]
    assert selectors.collect(QUEUES) == []
