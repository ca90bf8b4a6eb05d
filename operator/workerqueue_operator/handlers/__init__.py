"""kopf handlers: thin guards that delegate to `core`. Each registry is fresh, never the global one."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from workerqueue_operator.core.store import Store
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.models import settings as settings_

PREFIX = "agentcontrol.dev"


def registry(*, settings: settings_.Settings, client: client_.KubeClient, store: Store) -> kopf.OperatorRegistry:
    reg = kopf.OperatorRegistry()

    @kopf.on.login(registry=reg)
    def login(**kwargs: Any) -> Any:
        # kopf's own loaders read $KUBECONFIG when called (the `kubernetes` package reads it at import).
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=reg)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Our status has a schema; kopf's bookkeeping goes to annotations under our own prefix.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
        settings.persistence.finalizer = f"{PREFIX}/finalizer"
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60

    return reg
