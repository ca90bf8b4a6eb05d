"""Two replicas under kopf peering: only the active one changes pods, and a standby takes over."""

from __future__ import annotations

import datetime
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ROOT, Kube, OperatorProcess, established, frozen, http, wait_for
from workerqueue_operator.devcluster.controlplane import ControlPlane

TEMPORAL = {"host": "temporal:7233", "namespace": "agents"}
LIFETIME = 20
"""Seconds a keep-alive counts here: longer than the freeze checked below, so that the standby may not act."""


@pytest.fixture(scope="module")
def peering_crds(kubectl: Callable[..., Any]) -> None:
    kubectl("apply", "--server-side", "-f", str(ROOT / "charts" / "workerqueue-operator" / "crds"))
    established(kubectl, "clusterkopfpeerings.kopf.dev")


def peering(namespace: str) -> str:
    """The test's ClusterKopfPeering, one per test (the operator's, also for given namespaces)."""
    return f"wq-peering-{namespace}"


@pytest.fixture
def replicas(peering_crds: None, crd_installed: None, kube: Kube, namespace: str, kubeconfig: Path, tmp_path: Path,
             operator: OperatorProcess) -> Iterator[Callable[..., OperatorProcess]]:
    kube.custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering(namespace)}})
    started: list[OperatorProcess] = []

    def replica(name: str, priority: int, **env: str) -> OperatorProcess:
        proc = OperatorProcess(kubeconfig, tmp_path / f"{name}.log",
                               env={"WQ_NAMESPACES": namespace, "WQ_PEERING_LIFETIME_SECONDS": str(LIFETIME),
                                    "WQ_WORKER_RESYNC_SECONDS": "2", **env},
                               args=["--peering", peering(namespace), "--priority", str(priority)])
        started.append(proc)
        return proc.start()

    with operator.paused():  # the session's operator is standalone: it would act beside them
        try:
            yield replica
        finally:
            for proc in started:
                if proc.process is not None and proc.process.poll() is None:
                    os.killpg(proc.process.pid, signal.SIGCONT)
                proc.stop()
            kube.custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering(namespace))


def active(op: OperatorProcess) -> bool:
    return op.metric("workerqueue_active_replica") == 1


def alive(kube: Kube, namespace: str) -> list[str]:
    return kube.pod_names(namespace, "se")


def lifetime_left(kube: Kube, namespace: str, op: OperatorProcess) -> float:
    """Seconds until the replica's last keep-alive expires, by the peering object."""
    assert op.process is not None
    status = kube.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings",
                                                    peering(namespace)).get("status") or {}
    (mine,) = [v for k, v in status.items() if f"/{op.process.pid}/" in k]
    seen = datetime.datetime.fromisoformat(mine["lastseen"])
    return (seen + datetime.timedelta(seconds=LIFETIME) - datetime.datetime.now(datetime.UTC)).total_seconds()


def standby_and_leader(replicas: Callable[..., OperatorProcess], kube: Kube, namespace: str,
                       **env: str) -> tuple[OperatorProcess, OperatorProcess]:
    """A replica that ran a queue's first worker alone, then a replica of a higher priority that took over."""
    standby = replicas("standby", 100, **env)
    wait_for(lambda: active(standby), what="the only replica active")
    kube.create_queue(namespace, "se", queueId=f"se-{namespace}", singleExecution=True, temporal=TEMPORAL)
    wait_for(lambda: alive(kube, namespace) == ["se-w0"], what="the first worker")
    leader = replicas("leader", 200, **env)
    wait_for(lambda: active(leader) and not active(standby), timeout=LIFETIME + 10, what="the leader taking over")
    assert leader.process is not None
    return standby, leader


def test_a_standby_changes_no_pod_and_takes_over_when_the_active_one_dies(
    replicas: Callable[..., OperatorProcess], kube: Kube, namespace: str,
):
    standby, leader = standby_and_leader(replicas, kube, namespace)

    # Frozen, the leader still counts as alive until its last keep-alive is LIFETIME seconds old:
    # whatever happens meanwhile is for it to do, not for the standby (whose own resync runs every 2 s).
    while True:
        os.killpg(leader.process.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        left = lifetime_left(kube, namespace, leader)
        if left > 8:
            break
        os.killpg(leader.process.pid, signal.SIGCONT)  # too close to a keep-alive: freeze after it
        seen = lifetime_left(kube, namespace, leader)
        wait_for(lambda s=seen: lifetime_left(kube, namespace, leader) > s + 1, timeout=LIFETIME, what="a keep-alive")
    kube.core.delete_namespaced_pod("se-w0", namespace)
    wait_for(lambda: alive(kube, namespace) == [], what="the pod gone")
    time.sleep(max(0.0, frozen + left - 2 - time.monotonic()))
    assert alive(kube, namespace) == [], "the standby created a pod while the active replica was alive"
    assert not active(standby)

    os.killpg(leader.process.pid, signal.SIGCONT)
    wait_for(lambda: alive(kube, namespace) == ["se-w1"], what="the leader replacing the pod once thawed")
    wait_for(lambda: active(leader) and not active(standby), timeout=LIFETIME + 10, what="the leader leading")

    # Handover: the leader dies without a word; the standby takes over once its keep-alive expires.
    # How fast is measured by `make bench`; the bound here is only generous.
    leader.stop(signal.SIGKILL)
    kube.core.delete_namespaced_pod("se-w1", namespace)
    wait_for(lambda: alive(kube, namespace) == ["se-w2"], timeout=LIFETIME + 40, what="the standby replacing it")
    assert active(standby)


def test_a_stopping_active_replica_hands_over_at_once_and_serves_on_while_it_drains(
    replicas: Callable[..., OperatorProcess], kube: Kube, namespace: str,
):
    """A rollout: the active replica gets SIGTERM. It leaves the peering object as it stops, so the
    standby takes over the pods at once, not a keep-alive lifetime later, while the old replica's
    HTTP API still serves (unready) for its drain. Lifetime and drain are both long here, so that a
    takeover only by the keep-alive's expiry would come after the old replica had exited."""
    long = {"WQ_PEERING_LIFETIME_SECONDS": "300", "WQ_HTTP_DRAIN_SECONDS": "120"}
    standby, leader = standby_and_leader(replicas, kube, namespace, **long)

    os.killpg(leader.process.pid, signal.SIGTERM)
    wait_for(lambda: http("GET", f"{leader.url}/readyz").status == 503, what="the leader draining")
    kube.core.delete_namespaced_pod("se-w0", namespace)
    wait_for(lambda: alive(kube, namespace) == ["se-w1"], timeout=90, what="the standby replacing the pod")
    assert active(standby) and not active(leader)
    assert leader.process.poll() is None and http("GET", f"{leader.url}/healthz").status == 200

    os.killpg(leader.process.pid, signal.SIGTERM)  # a second signal: no more draining
    assert leader.process.wait(timeout=30) == 0


def test_a_stopping_active_replica_acts_no_more_from_its_signal_on(
    replicas: Callable[..., OperatorProcess], kube: Kube, namespace: str, control_plane: ControlPlane,
):
    """kopf leaves the peering object while it stops, before it returns, and the standby acts from
    then: the stopping replica must act no more from the signal on, or both would for a while. Here
    kopf's stop is held up by a frozen API server, its last writes waiting on it."""
    long = {"WQ_PEERING_LIFETIME_SECONDS": "300", "WQ_HTTP_DRAIN_SECONDS": "120"}
    _, leader = standby_and_leader(replicas, kube, namespace, **long)
    with frozen(control_plane.pid("kube-apiserver")):
        os.killpg(leader.process.pid, signal.SIGTERM)
        # Nothing but the signal ends its activity here: its peering lifetime is 300 s, and kopf's
        # stop (which would take it out of the peering object) waits on the frozen API server.
        wait_for(lambda: not active(leader), timeout=30, what="the stopping replica no longer active")
        assert http("GET", f"{leader.url}/readyz").status == 200, "kopf is still stopping: no drain yet"


def test_a_pod_turned_away_at_start_by_the_standby_is_replaced_by_the_active_one_not_counted_as_a_crash(
    replicas: Callable[..., OperatorProcess], kube: Kube, namespace: str,
):
    """/start reaches any replica (the Service fronts all of them), so the one that turns a pod's
    worker away is often not the one that supervises pods: the refusal is recorded in a Lease. With
    backoffLimit 1, one such exit taken for a crash would stop the queue until its spec changed."""
    standby = replicas("standby", 100)
    wait_for(lambda: active(standby), what="the only replica active")
    leader = replicas("leader", 200)
    wait_for(lambda: active(leader) and not active(standby), timeout=LIFETIME + 10, what="the leader taking over")
    queue_id = f"ref-{namespace}"
    kube.create_queue(namespace, "ref", queueId=queue_id, singleExecution=True, maxWorkers=1, temporal=TEMPORAL,
                      worker={"backoffLimit": 1})
    wait_for(lambda: kube.pod_names(namespace, "ref") == ["ref-w0"], what="the first pod")
    kube.wait_condition(namespace, "ref", "True")
    wait_for(lambda: standby.start_worker(queue_id, kube.queue_token(namespace, "ref")).status == 200,
             what="the one slot taken through the standby")
    assert standby.start_worker(queue_id, kube.secret_value(namespace, "ref-w0-token", "token")).status == 409
    assert kube.coordination.read_namespaced_lease("ref-w0-refused", namespace).spec.renew_time is not None

    kube.set_phase(namespace, "ref-w0", "Failed", exit_code=1, reason="Error")
    wait_for(lambda: kube.pod_names(namespace, "ref") == ["ref-w1"], what="the leader replacing the pod")
    assert kube.workers(namespace, "ref").get("consecutiveFailures", 0) == 0
    assert kube.condition(namespace, "ref", "Ready")["status"] == "True"
    kube.wait_events(namespace, "ref", "WorkerRefused")
    assert "WorkerFailed" not in [e.reason for e in kube.events(namespace, "ref")]
    # The record goes with its pod.
    wait_for(lambda: "ref-w0-refused" not in [lease.metadata.name for lease in kube.coordination.list_namespaced_lease(
        namespace).items], what="the refusal's Lease deleted")
