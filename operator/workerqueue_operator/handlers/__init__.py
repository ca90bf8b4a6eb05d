"""kopf handlers: thin guards that delegate to `core`. Each registry is fresh, never the global one.

kopf watches worker pods only (and its peering object): WorkerQueues reach the worker supervisor
through the operator's own informer, which every replica keeps (see core/supervisor.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import kopf

from workerqueue_operator.core import workers
from workerqueue_operator.core.supervisor import Supervisor
from workerqueue_operator.k8s import client
from workerqueue_operator.models import settings as settings_

PREFIX = "agentcontrol.dev"
POD_SELECTOR = ",".join(f"{key}={value}" for key, value in workers.MANAGED_BY.items())


def registry(*, settings: settings_.Settings, supervisor: Supervisor,
             kubeconfig: str | None = None) -> kopf.OperatorRegistry:
    """kopf's handlers. `kubeconfig`: the file given to `run --kubeconfig`, which then wins over an
    in-cluster ServiceAccount, as it does for the operator's own client (k8s.client)."""
    reg = kopf.OperatorRegistry()
    operator_settings = settings

    # Real ids: kopf names handlers after their function, which inside here reads
    # `registry.<locals>.pod_changed` in every log line and Event.
    @kopf.on.login(registry=reg, id="login")
    def login(**kwargs: Any) -> Any:
        # kopf's own loaders read $KUBECONFIG when called (the `kubernetes` package reads it at import).
        if kubeconfig is not None:  # else, in a pod, kopf would watch one cluster and we write another
            return kopf.login_with_kubeconfig(**kwargs)
        info = kopf.login_with_service_account(**kwargs)
        # In a pod, kopf assumes https://kubernetes.default.svc:443; the API server is where the kubelet
        # says (KUBERNETES_SERVICE_HOST/PORT), the one our own client (k8s.client) talks to.
        server = client.in_cluster_server(os.environ)
        if info is not None and server is not None:
            info = dataclasses.replace(info, server=server)
        return info or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=reg, id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The one handler is an on.event one, which keeps no progress, diff-base or finalizer; should
        # kopf ever write any, it goes to annotations under our prefix, never into our schema'd status.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
        settings.persistence.finalizer = f"{PREFIX}/finalizer"
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.peering.lifetime = operator_settings.peering_lifetime_seconds
        # One ClusterKopfPeering, also for an operator of given namespaces: kopf pauses everything until
        # it has read the peering object of each namespace, and a namespace that refuses the operator
        # (its admins may delete the RoleBinding) would then pause it for every other one.
        settings.peering.clusterwide = True
        settings.networking.request_timeout = 60
        # Watching given namespaces needs no namespace listing (nor the RBAC for it).
        settings.scanning.disabled = bool(operator_settings.namespaces)
        # The handler's `labels=` filters in kopf, after each event arrived: without a selector sent to
        # the API server, every pod of the cluster would be streamed here and parsed.
        settings.watching.label_selectors["v1", "pods"] = POD_SELECTOR

    @kopf.on.event("", "v1", "pods", labels=workers.MANAGED_BY, registry=reg, id="pod-event")
    async def pod_changed(body: kopf.Body, **_: Any) -> None:  # async: kopf runs a plain def in a thread
        supervisor.pod_event(body)

    return reg
