"""Informer callbacks into the Store: queues parsed once per spec, Secrets kept only when a queue uses
them (or they hold a worker's token), and the worker supervisor and status writer told."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from workerqueue_operator.core import queues, workers
from workerqueue_operator.core import status as status_
from workerqueue_operator.core.reconciler import Reconciler
from workerqueue_operator.core.store import Store, WorkerCredential
from workerqueue_operator.core.supervisor import Supervisor
from workerqueue_operator.k8s import informer, resources

logger = logging.getLogger(__name__)


class Feed:
    """Turns informer callbacks into Store updates (and Secret reads for newly used Secrets), and
    tells the worker supervisor of queues (on every replica: it acts only while active)."""

    def __init__(self, store: Store, reconciler: Reconciler, supervisor: Supervisor) -> None:
        self._store = store
        self._reconciler = reconciler
        self._supervisor = supervisor
        # Until the Secrets have been listed once, a Secret a queue uses will come through the list;
        # after that, one that is still unknown passed by before it was used, and is read on its own.
        self.secrets_listed = False

    def secrets_synced(self, listed: Callable[[informer.ObjectKey], bool] = lambda _: False) -> None:
        """`listed`: whether the Secret list brought that Secret."""
        self.secrets_listed = True
        self._supervisor.secrets_synced()
        unknown = self._store.unknown_secrets()
        # The queues were listed before the Secrets, so a used Secret the list did not bring does not
        # exist, as far as the watch can tell: a token Secret the operator generates (an Opaque one in
        # a watched namespace) is known absent without a GET each (10,000 new queues: 10,000 GETs).
        # Unless the list did bring it, before its queue came (made, or changed to use it, meanwhile):
        # it was passed by then as no queue's. That one, and any other (of an ignored type, outside the
        # watched namespaces), is read once.
        generated = {name for name in unknown & self._store.generated_token_secrets() if not listed(name)}
        for name in generated:
            self._store.fill_secret(name, None)
        self._reconciler.fetch_secrets(unknown - generated)

    def secrets_unread(self) -> bool:
        """Whether a Secret some queue uses is not known yet (its read on its way)."""
        return bool(self._store.unknown_secrets())

    def holding_news(self, namespace: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Around a relist of queues of `namespace` (None: all): see Store.holding_news."""
        return self._store.holding_news(namespace)

    def queue_upserted(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata", {})
        previous = self._store.queue((meta.get("namespace", ""), meta.get("name", "")))
        if previous is not None and previous.same_spec(body):
            # Most events are status writes (ours): no parsing, validating or resolving again.
            queue = previous.with_body(body)
            self._store.refresh_queue(queue)
            self._supervisor.queue_changed(queue)
            return
        try:
            queue = queues.QueueObject.from_body(body)
        except (ValueError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
            # The API server's schema makes this rare: a queue stored under an older, looser CRD. An
            # earlier spec is not served meanwhile: this one may have revoked a token it lists.
            meta = body.get("metadata", {})
            message = status_.spec_errors(exc)
            logger.warning("ignoring WorkerQueue %s/%s: %s", meta.get("namespace"), meta.get("name"), message)
            if previous is not None:
                self._store.remove_queue(previous.key)
            self._reconciler.spec_invalid(body, message)
            return
        self._reconciler.spec_valid(queue.key)
        if previous is not None and previous.uid != queue.uid:
            # Made again under the same name, its deletion unseen (a relist): nothing the supervisor
            # knew of the old one (a refused create's back-off, a Temporal reading) is this one's.
            self._supervisor.queue_deleted(queue.key)
        missing = self._store.upsert_queue(queue)
        if missing and self.secrets_listed:
            self._reconciler.fetch_secrets(missing)
        self._supervisor.queue_changed(queue)

    def queue_deleted(self, key: informer.ObjectKey, body: dict[str, Any] | None) -> None:
        self._reconciler.spec_valid(key)
        self._store.remove_queue(key)
        self._supervisor.queue_deleted(key)

    def secret_upserted(self, body: dict[str, Any]) -> None:
        name = informer.object_key(body)
        credential = workers.credential_from_secret(body)
        if credential is not None:
            self._store.upsert_worker_credential(
                name, WorkerCredential(queue=credential.queue, pod=credential.pod, queue_uid=credential.queue_uid,
                                       since=workers.made_at(body), hostname=credential.hostname,
                                       interval=credential.interval),
                credential.token)
        else:
            self._store.remove_worker_credential(name)  # no longer one (its label or owner taken away)
        if self._store.is_used(name):
            self._store.upsert_secret(name, self._store.secret_data(body), resources.version_of(body))

    def secret_deleted(self, key: informer.ObjectKey, body: dict[str, Any] | None) -> None:
        self._store.remove_worker_credential(key)
        if body is not None and self._store.namesakes_token(body):
            known, data = self._store.secret_state(key)
            if not known or data != queues.decode_secret_data(body):
                return  # its successor's may be known already; only what it held itself goes with it
        self._store.upsert_secret(key, None)
