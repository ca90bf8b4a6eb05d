"""An operator watching named namespaces, with its default Temporal key in a namespace it does not watch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.integration.conftest import Kube, OperatorProcess, wait_for
from tests.integration.test_start import service_account_token
from workerqueue_operator.core import queues, reconciler
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.store import Store
from workerqueue_operator.devcluster.temporal import TemporalServer
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models.settings import Settings


def test_default_secret_outside_the_watched_namespaces_is_served_and_refreshed(
    kubeconfig: Path, crd_installed: None, kube: Kube, namespace: str, other_namespace: str, tmp_path: Path,
    operator: OperatorProcess,
):
    kube.put_secret(other_namespace, "temporal-default", key="first")
    scoped = OperatorProcess(kubeconfig, tmp_path / "scoped.log", env={
        "WQ_NAMESPACES": namespace, "WQ_STATUS_RESYNC_SECONDS": "1",
        "WQ_TEMPORAL_HOST": "temporal.default:7233", "WQ_TEMPORAL_NAMESPACE": "defaults",
        "WQ_TEMPORAL_API_KEY_SECRET": f"{other_namespace}/temporal-default:key"})
    with operator.paused():  # the session's operator has other defaults: it would fight over the status
        try:
            scoped.start()
            kube.create_queue(namespace, "scoped", queueId=f"sc-{namespace}")
            kube.wait_condition(namespace, "scoped", "True")
            token = kube.queue_token(namespace, "scoped")
            body = scoped.start_worker(f"sc-{namespace}", token).json()
            assert (body["temporal_host"], body["temporal_api_key"]) == ("temporal.default:7233", "first")
            kube.put_secret(other_namespace, "temporal-default", key="second")
            wait_for(lambda: scoped.start_worker(f"sc-{namespace}", token).json()["temporal_api_key"] == "second",
                     timeout=15, what="the rotated default key, read again without a watch")
        finally:
            scoped.stop()


@pytest.fixture
def many_namespaces(kube: Kube, namespace: str) -> Iterator[list[str]]:
    names = [f"{namespace}-{i}" for i in range(24)]
    for name in names:
        kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield [namespace, *names]
    for name in names:
        kube.core.delete_namespace(name)


def test_an_operator_watching_25_namespaces_has_connections_left_for_its_writes(
    kubeconfig: Path, crd_installed: None, kube: Kube, many_namespaces: list[str], tmp_path: Path,
    operator: OperatorProcess, temporal: TemporalServer,
):
    # Three watches a namespace (queues, Secrets, Leases): 75 held connections, more than the
    # API-server client's pool of 64 for requests.
    scoped = OperatorProcess(kubeconfig, tmp_path / "scoped.log", env={
        "WQ_NAMESPACES": ",".join(many_namespaces),
        "WQ_TEMPORAL_HOST": temporal.address, "WQ_TEMPORAL_NAMESPACE": temporal.namespace})
    with operator.paused():
        try:
            scoped.start()  # ready: every namespace listed and watched
            last = many_namespaces[-1]
            kube.create_queue(last, "last", queueId=f"last-{last}")
            kube.wait_condition(last, "last", "True")  # its token Secret created, its status written
            assert scoped.start_worker(f"last-{last}", kube.queue_token(last, "last")).status == 200
        finally:
            scoped.stop()


async def test_a_default_secret_the_operator_may_not_read_shows_on_the_queue(
    kubeconfig: Path, crd_installed: None, kube: Kube, namespace: str, other_namespace: str,
    operator: OperatorProcess,
):
    """The default Temporal key lives where the operator's Role does not reach (a 403 at every read):
    the queue says so (Ready=False SecretUnreadable, at its current generation), rather than keep the
    Ready=True an earlier run wrote while /start answers 503. The status writer runs in-process as a
    ServiceAccount that may write queue status but not read Secrets over there."""
    with operator.paused():  # the session's operator has other defaults: it would fight over the status
        await _unreadable_default(kubeconfig, kube, namespace, other_namespace)


async def _unreadable_default(kubeconfig: Path, kube: Kube, namespace: str, other_namespace: str) -> None:
    kube.put_secret(other_namespace, "temporal-default", key="k")
    kube.put_secret(namespace, "unread-token", token="t")
    kube.rbac.create_cluster_role(k8s.V1ClusterRole(metadata=k8s.V1ObjectMeta(name=f"status-{namespace}"), rules=[
        k8s.V1PolicyRule(api_groups=["agentcontrol.dev"], resources=["workerqueues/status"], verbs=["patch"]),
        k8s.V1PolicyRule(api_groups=[""], resources=["events"], verbs=["create"])]))
    kube.rbac.create_cluster_role_binding(k8s.V1ClusterRoleBinding(
        metadata=k8s.V1ObjectMeta(name=f"status-{namespace}"),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=f"status-{namespace}"),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="status-writer", namespace=namespace)]))
    token = service_account_token(kube, namespace, "status-writer")
    body = kube.create_queue(namespace, "unread", queueId=f"un-{namespace}",
                             auth={"tokenSecretRefs": [{"name": "unread-token", "key": "token"}]})
    ready = {"type": "Ready", "status": "True", "reason": "Ready", "message": "workers can start",
             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
    kube.custom.patch_namespaced_custom_object_status("agentcontrol.dev", "v1alpha1", namespace, "workerqueues",
                                                      "unread", {"status": {"conditions": [ready]}})
    settings = Settings(temporal_host="temporal.default:7233", temporal_namespace="agents",
                        temporal_api_key_secret=f"{other_namespace}/temporal-default:key")
    store = Store(settings=settings)
    store.upsert_queue(queues.QueueObject.from_body(kube.get_queue(namespace, "unread")))
    store.upsert_secret((namespace, "unread-token"), {"token": "t"})
    configuration = client_.load_configuration(str(kubeconfig))
    configuration.cert_file = configuration.key_file = None
    configuration.api_key = {"authorization": f"Bearer {token}"}
    configuration.refresh_api_key_hook = None  # the kubeconfig's loader would put its own token back
    limited = client_.KubeClient(configuration)
    writer = reconciler.Reconciler(store=store, client=limited, resync_seconds=3600, events=EventPoster(limited),
                                   activity=Activity(identity="test", priority=0))
    running = asyncio.create_task(writer.run())
    try:
        assert store.unknown_secrets() == {(other_namespace, "temporal-default")}
        writer.fetch_secrets(store.unknown_secrets())
        for _ in range(100):
            condition = kube.condition(namespace, "unread")
            if condition is not None and condition["reason"] == "SecretUnreadable":
                break
            await asyncio.sleep(0.1)
        assert condition is not None and condition["status"] == "False"
        assert condition["observedGeneration"] == body["metadata"]["generation"]
        assert f"temporal-default in namespace {other_namespace} could not be read (403 Forbidden" in (
            condition["message"])
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await limited.close()
        kube.rbac.delete_cluster_role_binding(f"status-{namespace}")
        kube.rbac.delete_cluster_role(f"status-{namespace}")


def _queue_with_its_key_missing(kube: Kube, namespace: str, name: str) -> Store:
    """Queue `name`, its token in Secret `<name>-token`, its Temporal key in Secret `<name>-key`, not
    made; and a Store that knows the queue."""
    kube.put_secret(namespace, f"{name}-token", token="t")
    kube.create_queue(namespace, name, queueId=f"{name}-{namespace}",
                      temporal={"host": "t:7233", "namespace": "n",
                                "apiKeySecretRef": {"name": f"{name}-key", "key": "k"}},
                      auth={"tokenSecretRefs": [{"name": f"{name}-token", "key": "token"}]})
    store = Store(settings=Settings())
    store.upsert_queue(queues.QueueObject.from_body(kube.get_queue(namespace, name)))
    return store


async def test_a_secret_made_late_with_a_type_the_watch_leaves_out_is_read_at_the_resync(
    kubeconfig: Path, crd_installed: None, kube: Kube, namespace: str, operator: OperatorProcess,
):
    """Read absent at first, then made with a type the Secret watch leaves out (as Helm's are): no
    watch event tells of it, so the status resync reads the Secrets still missing again."""
    with operator.paused():  # the session's operator would fight over the status
        store = _queue_with_its_key_missing(kube, namespace, "late")
        client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
        writer = reconciler.Reconciler(store=store, client=client, resync_seconds=0.5, events=EventPoster(client),
                                       activity=Activity(identity="test", priority=0),
                                       ignored_secret_types=("helm.sh/release.v1",))
        running = asyncio.create_task(writer.run())
        try:
            writer.fetch_secrets(store.unknown_secrets())
            for _ in range(100):
                if not store.unknown_secrets():
                    break
                await asyncio.sleep(0.05)
            resolution = store.resolution((namespace, "late"))
            assert resolution is not None and resolution.problem is not None
            assert resolution.problem.reason == "SecretNotFound"
            kube.core.create_namespaced_secret(namespace, k8s.V1Secret(
                metadata=k8s.V1ObjectMeta(name="late-key"), type="helm.sh/release.v1", string_data={"k": "key"}))
            for _ in range(100):
                resolution = store.resolution((namespace, "late"))
                if resolution is not None and resolution.ready:
                    break
                await asyncio.sleep(0.1)
            assert resolution is not None and resolution.ready, resolution
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await client.close()


async def test_a_read_answered_after_the_watch_told_newer_does_not_overwrite_it(
    kubeconfig: Path, crd_installed: None, kube: Kube, namespace: str, operator: OperatorProcess,
    monkeypatch: pytest.MonkeyPatch,
):
    """A resync reads a missing Secret again; it is made meanwhile, and the watch tells of it before
    the read's 404 is handled: the 404 must not take the Secret away again until the next resync."""
    with operator.paused():
        store = _queue_with_its_key_missing(kube, namespace, "race")
        store.upsert_secret((namespace, "race-token"), {"token": "t"})
        store.upsert_secret((namespace, "race-key"), None)  # the watch: not there
        read = resources.read_secret

        async def read_then_watch_tells(client: client_.KubeClient, ns: str, name: str) -> Any:
            answer = await read(client, ns, name)  # 404 from the API server
            if name == "race-key":
                kube.put_secret(namespace, "race-key", k="key")
                store.upsert_secret((namespace, "race-key"), {"k": "key"})  # as the watch delivers it
            return answer

        told: list[object] = []
        upsert = store.upsert_secret

        def recording(name: tuple[str, str], data: Any) -> None:
            if name == (namespace, "race-key"):
                told.append(data)
            upsert(name, data)

        monkeypatch.setattr(store, "upsert_secret", recording)
        monkeypatch.setattr(resources, "read_secret", read_then_watch_tells)
        client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
        writer = reconciler.Reconciler(store=store, client=client, resync_seconds=0.3, events=EventPoster(client),
                                       activity=Activity(identity="test", priority=0),
                                       ignored_secret_types=("helm.sh/release.v1",))
        running = asyncio.create_task(writer.run())
        try:
            for _ in range(50):
                if store.secret_state((namespace, "race-key")) != (True, None):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # the 404's handling, had it been let through, and a resync
            assert told and told[0] == {"k": "key"} and None not in told, told
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await client.close()


async def test_a_leftover_token_secret_gone_between_the_create_and_its_read_is_made_anew(
    kubeconfig: Path, crd_installed: None, kube: Kube, namespace: str,
):
    """`kubectl replace --force`: the create meets the old queue's token Secret (409), which the
    garbage collector deletes before it is read back (404): made anew, not a refusal."""
    kube.put_secret(namespace, "gone-worker-token", token="old")
    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    get = client.get

    async def collected_first(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.endswith("/gone-worker-token"):
            kube.core.delete_namespaced_secret("gone-worker-token", namespace)
        return await get(path, *args, **kwargs)

    client.get = collected_first  # type: ignore[method-assign]
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gone-worker-token", "namespace": namespace},
            "stringData": {"token": "new"}}
    try:
        _, made = await resources.create_replacing(client, resources.secrets_path(namespace), body,
                                                   leftover=lambda existing: True)
    finally:
        await client.close()
    assert made and kube.secret_value(namespace, "gone-worker-token", "token") == "new"
