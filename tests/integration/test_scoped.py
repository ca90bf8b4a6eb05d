"""An operator watching named namespaces, with its default Temporal key in a namespace it does not watch."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s

from tests.integration.conftest import Kube, OperatorProcess, wait_for
from workerqueue_operator.devcluster.temporal import TemporalServer


@pytest.fixture
def other_namespace(kube: Kube) -> Iterator[str]:
    name = f"ops-{uuid.uuid4().hex[:8]}"
    kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield name
    kube.core.delete_namespace(name)


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
