"""The live-worker registry on the real API server: heartbeats, disconnect, expiry, restarts,
maxWorkers across two replicas, DELETE of a queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes import client as k8s

from tests.integration.conftest import Kube, OperatorProcess, deletions_refused, wait_for
from tests.integration.test_start import service_account_token
from tests.proxy import Proxy
from workerqueue_operator.core import leases, queues, refusals
from workerqueue_operator.core import registry as registry_
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.reconciler import LiveStatus
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import times
from workerqueue_operator.models.settings import Settings

pytestmark = pytest.mark.usefixtures("operator")

TEMPORAL = {"host": "temporal.example:7233", "namespace": "agents"}


def ready_queue(kube: Kube, namespace: str, name: str, **spec: object) -> tuple[str, str]:
    """(queue id, queue token) of a new Ready queue."""
    queue_id = f"{name}-{namespace}"
    kube.create_queue(namespace, name, queueId=queue_id, temporal=TEMPORAL, **spec)
    kube.wait_condition(namespace, name, "True")
    return queue_id, kube.queue_token(namespace, name)


def heartbeat(operator: OperatorProcess, worker_id: str, token: str, **body: object) -> int:
    payload = {"status": "active", "tasks_processed": 0, "current_task_id": None, "worker_metadata": {}, **body}
    return operator.call("POST", f"/api/v1/workers/{worker_id}/heartbeat", token, payload).status


def test_a_worker_registers_heartbeats_and_disconnects(operator: OperatorProcess, kube: Kube, namespace: str):
    queue_id, token = ready_queue(kube, namespace, "life")
    started = operator.start_worker(queue_id, token, {"system_info": {"hostname": "box-1", "cpu_count": 2}})
    assert started.status == 200
    worker_id = started.json()["worker_id"]
    lease = wait_for(lambda: kube.registrations(namespace).get(worker_id), what="the worker's Lease")
    assert lease.metadata.owner_references[0].name == "life"
    assert lease.spec.lease_duration_seconds == 150  # 2.5 x the default 60-s interval

    assert heartbeat(operator, worker_id, token, status="busy", tasks_processed=2, current_task_id="e-1",
                     system_info={"hostname": "box-1"}, logs=["secret-looking log line"]) == 200
    listed = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
    assert [(w["id"], w["status"], w["tasks_processed"], w["current_task_id"], w["hostname"]) for w in listed] == [
        (worker_id, "busy", 2, "e-1", "box-1")]
    assert listed[0]["last_heartbeat"] is not None
    wait_for(lambda: kube.workers(namespace, "life").get("live") == 1, what="status.workers.live = 1")

    # Logs are never stored in the API server.
    wait_for(lambda: '"busy"' in kube.registrations(namespace)[worker_id].metadata.annotations[
        "agentcontrol.dev/worker"], what="the heartbeat written to the Lease")
    assert "secret-looking" not in str(kube.registrations(namespace)[worker_id])

    # Errors: unknown worker, another queue's token, a malformed body.
    _, other_token = ready_queue(kube, namespace, "other")
    assert heartbeat(operator, "00000000-0000-4000-8000-000000000000", token) == 404
    assert heartbeat(operator, worker_id, other_token) == 403
    malformed = operator.call("POST", f"/api/v1/workers/{worker_id}/heartbeat", token, {"tasks_processed": "many"})
    assert malformed.status == 422 and malformed.json()["detail"][0]["loc"] == ["body", "tasks_processed"]
    assert operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", other_token).status == 403
    assert operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", None).status == 401

    bye = operator.call("POST", f"/api/v1/workers/{worker_id}/disconnect", token,
                        {"reason": "shutdown", "exit_code": 0, "error_message": None})
    assert bye.status == 200
    assert worker_id not in kube.registrations(namespace)
    assert heartbeat(operator, worker_id, token) == 404
    assert operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json() == []
    wait_for(lambda: any(e.reason == "WorkerDisconnected" and "exit code 0" in e.message
                         for e in kube.events(namespace, "life")), what="a WorkerDisconnected Event")
    wait_for(lambda: kube.workers(namespace, "life").get("live") == 0, what="status.workers.live = 0")


@pytest.mark.parametrize("capped", [False, True])
def test_a_lease_deleted_by_hand_lets_its_live_worker_back_at_its_next_heartbeat(
        operator: OperatorProcess, kube: Kube, namespace: str, capped: bool):
    """`kubectl delete lease`: not its worker's end. Taken for a disconnect, the live worker was 404
    at every heartbeat for good (its slot given to another), until the operator restarted."""
    queue_id, token = ready_queue(kube, namespace, "by-hand", **({"maxWorkers": 2} if capped else {}))
    worker_id = operator.start_worker(queue_id, token).json()["worker_id"]
    assert heartbeat(operator, worker_id, token) == 200
    lease = wait_for(lambda: kube.registrations(namespace).get(worker_id), what="the worker's Lease")
    kube.coordination.delete_namespaced_lease(lease.metadata.name, namespace)
    wait_for(lambda: operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json() == [],
             what="the deletion seen")
    assert heartbeat(operator, worker_id, token) == 200
    wait_for(lambda: kube.registrations(namespace).get(worker_id), what="its Lease written again")
    listed = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
    assert [w["id"] for w in listed] == [worker_id]
    # A disconnect is its end: a late heartbeat does not bring it back.
    assert operator.call("POST", f"/api/v1/workers/{worker_id}/disconnect", token,
                         {"reason": "shutdown", "exit_code": 0}).status == 200
    assert heartbeat(operator, worker_id, token) == 404


def test_the_registry_survives_an_operator_restart(operator: OperatorProcess, kube: Kube, namespace: str):
    queue_id, token = ready_queue(kube, namespace, "restart")
    worker_id = operator.start_worker(queue_id, token).json()["worker_id"]
    assert heartbeat(operator, worker_id, token, status="busy", tasks_processed=5) == 200
    wait_for(lambda: '"tasksProcessed":5' in (kube.registrations(namespace).get(worker_id) or k8s.V1Lease(
        metadata=k8s.V1ObjectMeta(annotations={"agentcontrol.dev/worker": ""}))).metadata.annotations[
        "agentcontrol.dev/worker"], what="the heartbeat written")
    operator.stop()
    operator.start()
    listed = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
    assert [(w["id"], w["tasks_processed"]) for w in listed] == [(worker_id, 5)]
    assert heartbeat(operator, worker_id, token) == 200


def test_a_refusal_record_left_long_ago_is_deleted_and_none_is_taken_for_a_registration_or_a_slot(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """Records of pods turned away at /start (see test_peering.py) go with their pod; one whose pod
    someone else deleted is deleted once seen expired, by a restart's list here."""
    queue_id, token = ready_queue(kube, namespace, "refrs", maxWorkers=1)
    uid = kube.custom.get_namespaced_custom_object("agentcontrol.dev", "v1alpha1", namespace, "workerqueues",
                                                   "refrs")["metadata"]["uid"]
    with operator.paused():  # started again whatever fails: every later test needs it
        for pod, age in (("refrs-w0", 5.0), ("refrs-w9", refusals.REFUSAL_SECONDS + 60)):
            refusal = leases.Refusal(queue=(namespace, "refrs"), queue_uid=uid, pod=pod, at=time.time() - age,
                                     why="409: full")
            kube.coordination.create_namespaced_lease(namespace, leases.refusal_lease_body(refusal, queue_name="refrs"))

    def names() -> list[str]:
        return sorted(lease.metadata.name for lease in kube.coordination.list_namespaced_lease(namespace).items)

    wait_for(lambda: names() == ["refrs-w0-refused"], what="the expired record deleted, the fresh one kept")
    # The one slot is free: a record is no registration.
    assert operator.start_worker(queue_id, token).status == 200
    assert operator.start_worker(queue_id, token).status == 409
    listed = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
    assert len(listed) == 1


def test_a_worker_with_a_kubernetes_identity_joins_again_after_it_expired(
        operator: OperatorProcess, kube: Kube, namespace: str):
    """Its heartbeats name no queue, and its token is no queue's: it got 404 for the rest of its
    life, running on unlisted (past maxWorkers, its slot given to another)."""
    queue_id, _ = ready_queue(kube, namespace, "sa", heartbeatIntervalSeconds=10)
    kube.grant(namespace, "start-workers", resource="workerqueues/start", verb="create", queue="sa",
               account="agent")
    token = service_account_token(kube, namespace, "agent")
    worker_id = operator.start_worker(queue_id, token).json()["worker_id"]
    assert heartbeat(operator, worker_id, token) == 200
    assert heartbeat(operator, worker_id, token) == 200  # it keeps the queue's 10 s: expires in 25 s
    wait_for(lambda: worker_id not in kube.registrations(namespace) and any(
        e.reason == "WorkerExpired" and worker_id in e.message for e in kube.events(namespace, "sa")),
        timeout=40, interval=1, what="the registration expired")
    # Not for another identity: not its registration to bring back (nor may it start workers there).
    assert heartbeat(operator, worker_id, service_account_token(kube, namespace, "other")) == 404
    assert heartbeat(operator, worker_id, token) == 200
    wait_for(lambda: worker_id in kube.registrations(namespace), what="the Lease written again")
    assert operator.call("POST", f"/api/v1/workers/{worker_id}/disconnect", token, {"reason": "shutdown"}).status == 200
    assert heartbeat(operator, worker_id, token) == 404  # a goodbye is final


def test_a_worker_whose_heartbeats_stop_expires_and_joins_again_when_they_resume(
        operator: OperatorProcess, kube: Kube, namespace: str):
    queue_id, token = ready_queue(kube, namespace, "quiet", heartbeatIntervalSeconds=10)
    worker_id = operator.start_worker(queue_id, token).json()["worker_id"]
    # Two heartbeats show it keeps the queue's 10 s (a worker that did not say is given 60, see below).
    assert heartbeat(operator, worker_id, token) == 200
    assert heartbeat(operator, worker_id, token) == 200
    wait_for(lambda: (kube.registrations(namespace).get(worker_id) or k8s.V1Lease(spec=k8s.V1LeaseSpec()))
             .spec.lease_duration_seconds == 25, what="the Lease, 2.5 intervals of 10 s")
    # 2.5 intervals of 10 s without a heartbeat: gone, with a Warning saying so.
    wait_for(lambda: worker_id not in kube.registrations(namespace), timeout=40, interval=1,
             what="the Lease deleted after expiry")
    assert operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json() == []
    wait_for(lambda: any(e.reason == "WorkerExpired" for e in kube.events(namespace, "quiet")),
             what="a WorkerExpired Event")

    # It was only cut off: its next heartbeat registers it again, Lease and all.
    assert heartbeat(operator, worker_id, token, status="busy", system_info={"hostname": "box-2"}) == 200
    listed = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
    assert [(w["id"], w["status"], w["hostname"]) for w in listed] == [(worker_id, "busy", "box-2")]
    lease = wait_for(lambda: kube.registrations(namespace).get(worker_id), what="the Lease written again")
    assert lease.spec.holder_identity == worker_id and lease.metadata.owner_references[0].name == "quiet"
    wait_for(lambda: any(e.reason == "WorkerRejoined" and worker_id in e.message
                         for e in kube.events(namespace, "quiet")), what="a WorkerRejoined Event")
    assert operator.call("POST", f"/api/v1/workers/{worker_id}/disconnect", token, {"reason": "shutdown"}).status == 200
    wait_for(lambda: worker_id not in kube.registrations(namespace), what="the Lease deleted at disconnect")
    assert heartbeat(operator, worker_id, token) == 404  # a goodbye is final

    # One that a replica registered and stopped before writing its Lease: its id shows the queue
    # issued it, so its first heartbeat here registers it.
    never_written = queues.new_worker_id(queues.digest(token))
    assert heartbeat(operator, never_written, token) == 200
    wait_for(lambda: never_written in kube.registrations(namespace), what="its Lease written")
    # An id the queue did not issue stays unknown.
    assert heartbeat(operator, queues.new_worker_id(queues.digest("another-token")), token) == 404


def test_a_worker_that_heartbeats_slower_than_its_queue_says_is_never_expired_between_its_heartbeats(
        operator: OperatorProcess, kube: Kube, namespace: str):
    # The real worker ignores the interval /start answers: it beats every HEARTBEAT_INTERVAL s of its
    # own environment, 60 when unset. Here every 30 s against a queue that says 10 (2.5 x 10 = 25 s).
    queue_id, token = ready_queue(kube, namespace, "slow", heartbeatIntervalSeconds=10, maxWorkers=1)
    answer = operator.start_worker(queue_id, token).json()
    assert answer["heartbeat_interval"] == 10
    worker_id = answer["worker_id"]
    assert heartbeat(operator, worker_id, token) == 200
    lease = wait_for(lambda: kube.registrations(namespace).get(worker_id), what="its Lease")
    assert lease.spec.lease_duration_seconds == 150  # 2.5 x the real worker's default 60 s, until it shows its own

    time.sleep(30)
    assert operator.start_worker(queue_id, token).status == 409  # its slot was never free meanwhile
    assert heartbeat(operator, worker_id, token) == 200
    # 2.5 x its pace: 30 s and the time the calls took, in whole seconds up.
    wait_for(lambda: 75 <= kube.registrations(namespace)[worker_id].spec.lease_duration_seconds <= 90,
             what="the Lease's duration at the pace it keeps")
    listed = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
    assert [w["id"] for w in listed] == [worker_id]
    assert not [e for e in kube.events(namespace, "slow") if e.reason in ("WorkerExpired", "WorkerRejoined")]


def test_max_workers_holds_under_concurrent_starts_on_two_replicas(
        operator: OperatorProcess, kube: Kube, namespace: str, kubeconfig: Path, tmp_path: Path):
    queue_id, token = ready_queue(kube, namespace, "capped", maxWorkers=5)
    second = OperatorProcess(kubeconfig, tmp_path / "second.log").start()
    try:
        replicas = [operator, second]
        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(lambda i: replicas[i % 2].start_worker(queue_id, token), range(50)))
        statuses = sorted(a.status for a in answers)
        assert statuses == [200] * 5 + [409] * 45, statuses
        refused = next(a for a in answers if a.status == 409)
        assert refused.json() == {"detail": "Worker queue 'capped' is full (maxWorkers=5)"}
        winners = [a.json()["worker_id"] for a in answers if a.status == 200]
        assert sorted(kube.registrations(namespace)) == sorted(winners)

        # A worker that disconnects frees its slot, for either replica.
        bye = second.call("POST", f"/api/v1/workers/{winners[0]}/disconnect", token, {"reason": "shutdown"})
        assert bye.status == 200
        wait_for(lambda: operator.start_worker(queue_id, token).status == 200, what="a freed slot taken")
        assert operator.start_worker(queue_id, token).status == 409
    finally:
        second.stop()


def test_workers_started_on_one_replica_may_heartbeat_on_the_other_at_once(
        operator: OperatorProcess, kube: Kube, namespace: str, kubeconfig: Path, tmp_path: Path):
    queue_id, token = ready_queue(kube, namespace, "spread")
    second = OperatorProcess(kubeconfig, tmp_path / "second.log").start()
    try:
        ids = [operator.start_worker(queue_id, token).json()["worker_id"] for _ in range(30)]
        # Each first heartbeat reaches the other replica at once, most before their Leases are
        # written (the first replica writes them paced): none is lost.
        assert [heartbeat(second, w, token, status="busy", tasks_processed=1) for w in ids] == [200] * 30
        wait_for(lambda: sorted(kube.registrations(namespace)) == sorted(ids), what="one Lease per worker")

        def listed(replica: OperatorProcess) -> list[tuple[str, str, int]]:
            answer = replica.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
            return sorted((w["id"], w["status"], w["tasks_processed"]) for w in answer)

        expected = sorted((w, "busy", 1) for w in ids)
        wait_for(lambda: listed(second) == expected == listed(operator), what="every worker listed as it heartbeat")
        # ...and the Leases hold the heartbeats: the first replica never wrote its older state over them.
        wait_for(lambda: all('"status":"busy"' in lease.metadata.annotations["agentcontrol.dev/worker"]
                             for lease in kube.registrations(namespace).values()), what="the heartbeats written")
        assert listed(operator) == expected
    finally:
        second.stop()


def test_a_worker_of_a_capped_queue_that_expired_takes_a_free_slot_again_or_is_told_it_is_full(
        operator: OperatorProcess, kube: Kube, namespace: str):
    queue_id, token = ready_queue(kube, namespace, "one-slot", maxWorkers=1, heartbeatIntervalSeconds=10)
    first = operator.start_worker(queue_id, token).json()["worker_id"]
    assert heartbeat(operator, first, token) == 200
    assert heartbeat(operator, first, token) == 200  # at the queue's pace: expires 25 s after
    wait_for(lambda: not kube.registrations(namespace), timeout=40, interval=1, what="the slot freed by expiry")
    second = operator.start_worker(queue_id, token)
    assert second.status == 200  # the slot is free: /start gives it away
    # The first one is back: nothing free, and it is told so (the worker logs it and goes on).
    back = operator.call("POST", f"/api/v1/workers/{first}/heartbeat", token, {"status": "active"})
    assert back.status == 409 and back.json() == {"detail": "Worker queue 'one-slot' is full (maxWorkers=1)"}
    bye = operator.call("POST", f"/api/v1/workers/{second.json()['worker_id']}/disconnect", token, {"reason": "x"})
    assert bye.status == 200
    # A slot free again: its next heartbeat claims it, Lease and all.
    assert heartbeat(operator, first, token, status="busy") == 200
    lease = kube.registrations(namespace).get(first)
    assert lease is not None and lease.metadata.name == "one-slot-slot-0"
    assert operator.start_worker(queue_id, token).status == 409
    assert [w["id"] for w in operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()] == [
        first]
    # One the queue issued but this replica never saw holds no slot (the API server says): full.
    assert operator.call("POST", f"/api/v1/workers/{queues.new_worker_id(queues.digest(token))}/heartbeat", token,
                         {"status": "active"}).status == 409
    # Its expiry seen by a replica gone since: the next one gives it the slot back, not a 404 for life.
    assert operator.call("POST", f"/api/v1/workers/{first}/disconnect", token, {"reason": "x"}).status == 200
    third = operator.start_worker(queue_id, token).json()["worker_id"]
    assert heartbeat(operator, third, token) == 200
    assert heartbeat(operator, third, token) == 200  # at the queue's pace, as above
    wait_for(lambda: not kube.registrations(namespace), timeout=40, interval=1, what="the slot freed by expiry")
    operator.stop()
    operator.start()
    assert heartbeat(operator, third, token) == 200
    lease = kube.registrations(namespace).get(third)
    assert lease is not None and lease.metadata.name == "one-slot-slot-0"


def test_delete_a_queue_through_the_api(operator: OperatorProcess, kube: Kube, namespace: str):
    fixed_id, fixed_token = ready_queue(kube, namespace, "fixed")
    eph_id, eph_token = ready_queue(kube, namespace, "eph", ephemeral=True)
    worker_id = operator.start_worker(eph_id, eph_token).json()["worker_id"]

    # A queue token deletes its own ephemeral queue only.
    refused = operator.call("DELETE", f"/api/v1/worker-queues/{fixed_id}", fixed_token)
    assert refused.status == 403 and "ephemeral" in refused.json()["detail"]
    assert operator.call("DELETE", f"/api/v1/worker-queues/{eph_id}", fixed_token).status == 403
    assert operator.call("DELETE", f"/api/v1/worker-queues/{eph_id}", None).status == 401
    assert operator.call("DELETE", f"/api/v1/worker-queues/nope-{namespace}", eph_token).status == 404
    # ...while its worker is still registered.
    assert heartbeat(operator, worker_id, eph_token) == 200
    assert operator.call("DELETE", f"/api/v1/worker-queues/{eph_id}", eph_token).status == 204
    wait_for(lambda: not kube.queue_exists(namespace, "eph"), what="the ephemeral queue deleted")
    wait_for(lambda: worker_id not in kube.registrations(namespace), what="its registration collected")

    # A Kubernetes identity needs RBAC `delete` on that queue.
    kube.grant(namespace, "delete-fixed", resource="workerqueues", verb="delete", queue="fixed", account="admin")
    denied = operator.call("DELETE", f"/api/v1/worker-queues/{fixed_id}",
                           service_account_token(kube, namespace, "nobody"))
    assert denied.status == 403 and "may not delete" in denied.json()["detail"]
    allowed = operator.call("DELETE", f"/api/v1/worker-queues/{fixed_id}",
                            service_account_token(kube, namespace, "admin"))
    assert allowed.status == 204, allowed.body
    wait_for(lambda: not kube.queue_exists(namespace, "fixed"), what="the queue deleted")


@contextlib.asynccontextmanager
async def in_process(kube: Kube, namespace: str, kubeconfig: Path, name: str, now: list[float] | None = None,
                     watching: list[bool] | None = None,
                     **spec: Any) -> AsyncIterator[tuple[queues.QueueObject, client_.KubeClient, Registry]]:
    """A queue, and a registry running in-process on the real API server (its clock `now[0]` when
    given, its watch and its writer driven by the test, its Lease watch working while `watching[0]`):
    the other replica is the test's own writes."""
    queue = queues.QueueObject.from_body(
        kube.create_queue(namespace, name, queueId=f"{name}-{namespace}", temporal=TEMPORAL, **spec))
    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    clock = (lambda: now[0]) if now is not None else time.time
    try:
        yield queue, client, Registry(client=client, events=EventPoster(client), clock=clock,
                                      queue_of=lambda key: queue if key == queue.key else None,
                                      watching=(lambda: watching[0]) if watching is not None else lambda: True)
    finally:
        await client.close()


async def written_worker(reg: Registry, queue: queues.QueueObject, worker_id: str) -> leases.Worker:
    """A worker registered from a heartbeat, its Lease written by the writer (driven by hand)."""
    worker = reg.rejoin(queue, worker_id)
    assert worker is not None
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    await asyncio.sleep(0.2)  # the writer's bucket fills
    reg._flush()
    await asyncio.gather(*reg._writes)
    return worker


async def test_a_dead_workers_lease_is_deleted_after_the_clock_stepped_back(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """An NTP step back of 10 s: its Lease held the renewal time noted before the step, later than the
    one taken as now since, which the sweep's delete took for a renewal elsewhere. The worker was
    forgotten here, and its Lease left for good (no WorkerExpired)."""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "back", now=now) as (queue, _, reg):
        worker = await written_worker(reg, queue, "w-back")
        reg._mind_the_clock(0.0)
        now[0] -= 9.0  # a second on, the clock 10 s back
        reg._mind_the_clock(1.0)
        assert "w-back" in kube.registrations(namespace)
        now[0] += worker.duration + 1
        reg._sweep(ending=True)
        await asyncio.gather(*reg._writes)
        assert "w-back" not in kube.registrations(namespace)


async def lease_deletions_refused(client: client_.KubeClient, namespace: str) -> None:
    """Returns once the admission policy of deletions_refused is in force for Leases (it takes a moment)."""
    probe = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "probe", "namespace": namespace}}
    await client.request("POST", resources.leases_path(namespace), body=probe)
    began = time.monotonic()
    while True:
        try:
            await client.request("DELETE", f"{resources.leases_path(namespace)}/probe")
        except client_.ApiError as exc:
            if exc.status == 403:
                return
            raise
        assert time.monotonic() - began < 30, "the admission policy never took effect"
        await client.request("POST", resources.leases_path(namespace), body=probe)
        await asyncio.sleep(0.5)


async def test_a_deletion_the_api_server_refuses_outright_is_given_up_after_a_few_tries(
    kube: Kube, namespace: str, kubeconfig: Path, kubectl: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    """Retried for good, each refused deletion kept its worker and a warning a minute, and a churning
    fleet's grew without bound."""
    async with in_process(kube, namespace, kubeconfig, "refused") as (queue, client, reg):
        worker = await written_worker(reg, queue, "w-1")
        assert kube.coordination.read_namespaced_lease(worker.lease, namespace) is not None  # its Lease written
        with deletions_refused(kubectl, namespace, group="coordination.k8s.io", resource="leases",
                               message="Lease deletions are refused here"):
            await lease_deletions_refused(client, namespace)
            deletes: list[str] = []
            original = client.request

            async def counted(method: str, path: str, **kwargs: Any) -> Any:
                if method == "DELETE":
                    deletes.append(path)
                return await original(method, path, **kwargs)

            monkeypatch.setattr(client, "request", counted)
            reg._forget(worker.worker_id)
            await reg._delete_quietly(worker, "disconnected", on_purpose=True, wait=0.2)
            deadline = asyncio.get_running_loop().time() + 30
            while "given up" not in caplog.text:  # ~0.2 + ~0.4 s between tries, longer on a loaded machine
                assert asyncio.get_running_loop().time() < deadline, deletes
                await asyncio.sleep(0.1)
            assert "refused 3 times, given up" in caplog.text
            await asyncio.sleep(1.5)  # a negative: a fourth would have come ~0.8 s after the third
            assert len(deletes) == registry_.DELETE_REFUSED_TRIES
        left = kube.coordination.read_namespaced_lease(worker.lease, namespace)  # left to lapse
        # Marked as its worker's end, once, before the first deletion: other replicas never let it back.
        assert left.metadata.annotations[leases.ENDED_ANNOTATION] == "disconnected"


async def test_deletions_ended_together_are_made_a_few_at_a_time(
    kube: Kube, namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch,
):
    """A sweep after an outage ends thousands of workers at once: each deletion was its own call at
    once, thousands in flight at the API server together."""
    async with in_process(kube, namespace, kubeconfig, "many") as (queue, client, reg):
        ended = [reg.rejoin(queue, f"w-{i}") for i in range(3 * registry_.DELETE_CONCURRENCY)]
        in_flight, most = [0], [0]
        original = client.request

        async def counted(method: str, path: str, **kwargs: Any) -> Any:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            try:
                return await original(method, path, **kwargs)
            finally:
                in_flight[0] -= 1

        monkeypatch.setattr(client, "request", counted)
        await asyncio.gather(*(reg._delete_quietly(worker, "no heartbeat within its lease", on_purpose=False)
                               for worker in ended if worker is not None))
        assert most[0] == registry_.DELETE_CONCURRENCY


async def test_lookups_of_registrations_unknown_here_share_a_listing_begun_after_them(
    kube: Kube, namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch,
):
    """Each poll of an identity with no registration (or heartbeat of an id unknown here, which a
    token holder may mint at will) was a LIST of its own, as many at once as there were calls. Shared,
    a listing must still have begun after the call: a registration made a moment ago on the other
    replica must be found, or its worker is shown the whole queue."""
    async with in_process(kube, namespace, kubeconfig, "lookups", maxWorkers=2) as (queue, client, reg):
        lists: list[str] = []
        original = client.request
        registered = asyncio.Event()

        async def counted(method: str, path: str, **kwargs: Any) -> Any:
            if method == "GET" and path == resources.leases_path(namespace):
                lists.append(path)
                if len(lists) == 1:  # the other replica registers y while the first listing is under way
                    answer = await original(method, path, **kwargs)
                    await registered.wait()
                    return answer
            return await original(method, path, **kwargs)

        monkeypatch.setattr(client, "request", counted)
        first = asyncio.create_task(reg.registrations_of(queue, "system:serviceaccount:x:first"))
        await asyncio.sleep(0.2)
        other_replica = registry_.Registry(client=client, events=EventPoster(client), queue_of=lambda key: queue)
        assert await other_replica.claim(queue, "w-y", limit=2, identity="system:serviceaccount:x:y") is not None
        later = [asyncio.create_task(reg.registrations_of(queue, "system:serviceaccount:x:y")) for _ in range(10)]
        await asyncio.sleep(0.2)
        registered.set()
        assert await first == []
        found = await asyncio.gather(*later)
        assert all([w.worker_id for w in each] == ["w-y"] for each in found)
        assert len(lists) == 2  # ten lookups, one listing: the one begun after them
        # A disconnect looks afresh too.
        await reg.disconnect_unseen(queue, "w-unknown", reason="shutdown", exit_code=0)
        assert len(lists) == 3


async def test_a_stopping_replica_finishes_the_lease_deletions_under_way(
    kube: Kube, namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch,
):
    """A worker that disconnected just before a rolling update: its deletion was cancelled with the
    registry, and its Lease held its place until it lapsed, then ended in a WorkerExpired Warning."""
    async with in_process(kube, namespace, kubeconfig, "leaving") as (queue, client, reg):
        worker = await written_worker(reg, queue, "w-1")
        assert kube.coordination.read_namespaced_lease(worker.lease, namespace) is not None  # its Lease written
        original = client.request

        async def slow_deletes(method: str, path: str, **kwargs: Any) -> Any:
            if method == "DELETE":
                await asyncio.sleep(0.5)
            return await original(method, path, **kwargs)

        monkeypatch.setattr(client, "request", slow_deletes)
        running = asyncio.create_task(reg.run())
        leaving = asyncio.create_task(reg.disconnect(worker, reason="shutdown", exit_code=0))
        await asyncio.sleep(0.1)  # its deletion under way
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await leaving
        with pytest.raises(k8s.ApiException) as gone:
            kube.coordination.read_namespaced_lease(worker.lease, namespace)
        assert gone.value.status == 404


async def test_an_expired_registration_renewed_elsewhere_meanwhile_keeps_its_lease(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """The active replica's sweep finds a worker expired while a heartbeat of it reached the other
    replica, which wrote it to the Lease (the watch has not brought it here yet): the Lease stays,
    and the worker is registered again from it. Deleting it would end a live worker, and the other
    replica, seeing its fresh Lease deleted, would take that for a disconnect and refuse it for good.
    The registry runs in-process on the real API server, its clock and its watch by hand."""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "kept", now) as (queue, client, reg):
        worker = reg.rejoin(queue, "w-kept")  # as a heartbeat registers one: written at once
        assert worker is not None
        reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
        await asyncio.sleep(0.2)  # the writer's bucket fills
        reg._flush()
        await asyncio.gather(*reg._writes)
        renewed = times.micro_rfc3339(now[0] + 20)  # the other replica's write of a later heartbeat
        kube.coordination.patch_namespaced_lease(worker.lease, namespace, {"spec": {"renewTime": renewed}})
        now[0] += worker.duration + 1
        reg._sweep(ending=True)
        await asyncio.gather(*reg._writes)
        lease = await client.request("GET", f"{resources.leases_path(namespace)}/{worker.lease}")
        assert lease["spec"]["renewTime"] == renewed
        reg.lease_upserted(lease)  # the watch brings it
        assert reg.get("w-kept") is not None


async def test_workers_renewed_elsewhere_while_this_replica_could_not_see_it_are_not_expired(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """Two replicas, the API server out of reach for longer than a lease: the other replica heard
    the worker's heartbeats but could write none, and this one (the active) ended the worker from
    memory alone. Once the API server was back, its deletion raced the other's renewal: a live
    worker's Lease deleted, its slot free for another. The time it was blind does not count."""
    now, watching = [time.time()], [True]
    async with in_process(kube, namespace, kubeconfig, "blind", now, watching) as (queue, client, reg):
        worker = await written_worker(reg, queue, "w-blind")
        watching[0] = False  # the API server out of reach: the Lease watch fails
        now[0] += worker.duration + 1
        reg._sweep(ending=True)
        watching[0] = True  # back; the other replica's renewal is not written yet
        now[0] += worker.duration - 2
        reg._sweep(ending=True)
        await asyncio.gather(*reg._writes, *reg._deletions)
        assert reg.get("w-blind") is worker
        lease = await client.request("GET", f"{resources.leases_path(namespace)}/{worker.lease}")
        renewed = times.micro_rfc3339(now[0])  # the other replica's write of the heartbeat it heard
        kube.coordination.patch_namespaced_lease(worker.lease, namespace, {"spec": {"renewTime": renewed}})
        reg.lease_upserted(await client.request("GET", f"{resources.leases_path(namespace)}/{worker.lease}"))
        now[0] += worker.duration + 1  # and then no heartbeat anywhere: it expires as ever
        reg._sweep(ending=True)
        await asyncio.gather(*reg._writes, *reg._deletions)
        assert reg.get("w-blind") is None and lease["metadata"]["name"] == worker.lease
        assert worker.lease not in {item.metadata.name for item in
                                    kube.coordination.list_namespaced_lease(namespace).items}


async def test_a_lease_watch_down_for_good_keeps_no_dead_worker_registered_for_good(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """Its time forgiven without end, a watch that never came back (RBAC without `watch` in one
    namespace) kept every dead worker registered, and its slot taken, for good."""
    now, watching = [time.time()], [True]
    async with in_process(kube, namespace, kubeconfig, "forgot", now, watching) as (queue, _, reg):
        worker = await written_worker(reg, queue, "w-dead")
        watching[0] = False
        for _ in range(int(registry_.BLIND_FORGIVEN_SECONDS // 30) + 1):
            now[0] += 30
            reg._sweep(ending=True)
        now[0] += worker.duration + 1
        reg._sweep(ending=True)
        await asyncio.gather(*reg._writes, *reg._deletions)
        assert reg.get("w-dead", expired=True) is None


async def test_a_renewal_given_up_after_the_lease_changed_under_it_twice_is_a_write_failure(
    kube: Kube, namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch,
):
    """A renewal meeting 409, read again and meeting 409 once more, is left to the writer's retry: it
    did not get through, and `workerqueue_registry_write_failures_total` said nothing of it."""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "moving", now) as (queue, client, reg):
        worker = await written_worker(reg, queue, "w-moving")
        assert reg.write_failures == 0
        request = client.request
        changes = iter(range(1000))

        async def changed_first(method: str, path: str, **options: Any) -> Any:
            if method == "PATCH" and path.endswith(f"/{worker.lease}"):  # another writer, just before
                kube.coordination.patch_namespaced_lease(
                    worker.lease, namespace, {"metadata": {"annotations": {"test/changed": str(next(changes))}}})
            return await request(method, path, **options)

        monkeypatch.setattr(client, "request", changed_first)
        now[0] += 5
        reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
        await reg._write(worker)
        assert next(changes) == 2 and reg.write_failures == 1  # two renewals tried, neither written
        monkeypatch.setattr(client, "request", request)
        reg._flush()
        await asyncio.gather(*reg._writes)


async def test_a_registration_refused_because_its_namespace_is_going_is_no_write_failure(
    kube: Kube, namespace: str, kubeconfig: Path, caplog: pytest.LogCaptureFixture,
):
    """A namespace being deleted refuses every create in it (403 NamespaceTerminating): the Leases of
    its workers go with it, and an alert on write failures would fire for a team deleting its namespace."""
    hold = {"metadata": {"name": "hold", "finalizers": ["agentcontrol.dev/test-hold"]}}
    kube.core.create_namespaced_config_map(namespace, hold)
    try:
        async with in_process(kube, namespace, kubeconfig, "going") as (queue, _, reg):
            kube.core.delete_namespace(namespace)
            wait_for(lambda: kube.core.read_namespace(namespace).status.phase == "Terminating", what="terminating")
            worker = reg.rejoin(queue, "w-going")
            assert worker is not None
            reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
            await reg._write(worker)
            assert (reg.writes, reg.write_failures) == (1, 0) and not worker.stored
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "w-going" in r.getMessage()]
    finally:
        kube.core.patch_namespaced_config_map("hold", namespace, {"metadata": {"finalizers": None}})


async def test_a_renewal_heard_earlier_never_overwrites_a_later_one_written_by_the_other_replica(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """Both replicas write the renewals of the heartbeats they hear. The other replica wrote a later
    heartbeat's renewal; this one's write of an earlier heartbeat comes after (slow, or its watch
    behind): the Lease keeps the later renew time. The registry runs in-process, its clock by hand."""
    now = [time.time()]
    beat = {"status": "active", "tasks_processed": 0, "current_task_id": None, "system_info": None}
    async with in_process(kube, namespace, kubeconfig, "late", now) as (queue, client, reg):
        worker = reg.rejoin(queue, "w-late")
        assert worker is not None
        reg.heartbeat(worker, **beat)
        await reg._write(worker)
        later_renewal = times.micro_rfc3339(now[0] + 20)  # the other replica's write of a later heartbeat
        kube.coordination.patch_namespaced_lease(worker.lease, namespace, {"spec": {"renewTime": later_renewal}})
        now[0] += 5
        reg.heartbeat(worker, **beat)  # heard here before that one
        await reg._write(worker)
        lease = await client.request("GET", f"{resources.leases_path(namespace)}/{worker.lease}")
        assert lease["spec"]["renewTime"] == later_renewal
        assert reg.get("w-late") is worker  # still registered here; the watch brings the later renewal
        assert (reg.writes, reg.write_failures) == (2, 0)  # a 409 tells how the Lease stands: no failure

        now[0] += 30  # a heartbeat here later than both: written over them
        reg.heartbeat(worker, **beat)
        await reg._write(worker)
        lease = await client.request("GET", f"{resources.leases_path(namespace)}/{worker.lease}")
        assert lease["spec"]["renewTime"] == times.micro_rfc3339(worker.renewed_at)


async def test_a_slot_whose_worker_disconnected_here_is_free_though_its_lease_is_not_deleted_yet(
    kube: Kube, namespace: str, kubeconfig: Path, kubectl: Any,
):
    """maxWorkers: a disconnect whose Lease deletion failed (retried later). The next /start met that
    Lease in the slot, its holder not expired, and got 409: its worker exited for good."""
    async with in_process(kube, namespace, kubeconfig, "blip", maxWorkers=1) as (queue, client, reg):
        old = await reg.claim(queue, "w-old", limit=1)
        assert old is not None
        with deletions_refused(kubectl, namespace, group="coordination.k8s.io", resource="leases",
                               message="Lease deletions are refused here"):
            await lease_deletions_refused(client, namespace)
            await reg.disconnect(old, reason="shutdown", exit_code=0, deadline=asyncio.get_running_loop().time() + 2)
            assert "w-old" in kube.registrations(namespace)  # its Lease is still there
            new = await reg.claim(queue, "w-new", limit=1)
        assert new is not None and new.slot == 0
        assert set(kube.registrations(namespace)) == {"w-new"}
        await asyncio.sleep(3)  # the deletion made again: of w-old's Lease only, which is gone
        assert set(kube.registrations(namespace)) == {"w-new"}


async def test_a_renewal_never_takes_back_a_slot_another_worker_took_meanwhile(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """maxWorkers: the other replica gave an expired worker's slot to a new worker; a late heartbeat
    of the old one heard here, before the watch told, leaves the slot to the new worker (two holders
    of one slot would pass maxWorkers). The old registration ends here not on purpose."""
    async with in_process(kube, namespace, kubeconfig, "slots", maxWorkers=1) as (queue, client, reg):
        old = await reg.claim(queue, "w-old", limit=1)
        assert old is not None
        kube.coordination.patch_namespaced_lease(old.lease, namespace, {"spec": {"holderIdentity": "w-new"}})
        reg.heartbeat(old, status="active", tasks_processed=0, current_task_id=None, system_info=None)
        await reg._write(old)
        lease = await client.request("GET", f"{resources.leases_path(namespace)}/{old.lease}")
        assert lease["spec"]["holderIdentity"] == "w-new"
        assert reg.get("w-old") is None
        assert not reg._ended["w-old"].on_purpose  # may come back, to find the queue full


async def test_a_slot_freed_while_it_is_taken_over_is_taken_not_passed_over(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """maxWorkers: an expired holder's Lease read, then deleted by the other replica (its expiry, or a
    disconnect) before the write over it. The slot is free, and the write takes it: a PUT of a Lease,
    which the API server makes anew when it is gone. Passed over, with no other slot free, the worker
    asking would be told the queue is full (409), and exit."""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "freed-late", now=now, maxWorkers=1) as (queue, _, reg):
        old = await reg.claim(queue, "w-old", limit=1)
        assert old is not None
        now[0] += old.duration + 1
        overwrite = reg._calls.overwrite

        async def after_its_delete(body: dict[str, Any], current: dict[str, Any]) -> dict[str, Any] | None:
            kube.coordination.delete_namespaced_lease(old.lease, namespace)  # the other replica's, meanwhile
            return await overwrite(body, current)

        reg._calls.overwrite = after_its_delete  # type: ignore[method-assign]
        new = await reg.claim(queue, "w-new", limit=1)
        assert new is not None and new.lease == old.lease
        assert {w: lease.metadata.name for w, lease in kube.registrations(namespace).items()} == {
            "w-new": "freed-late-slot-0"}


async def test_a_capped_worker_never_seen_here_gets_its_own_slot_never_a_second(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """maxWorkers: a heartbeat of a worker this replica never saw. Its Lease, written by the other
    replica, may not have come through the watch yet: it is that registration, and a second slot
    would shrink the queue. The API server is asked; with no Lease of it there it claims a free slot."""
    async with in_process(kube, namespace, kubeconfig, "capped", maxWorkers=2) as (queue, client, reg):
        other = Registry(client=client, events=EventPoster(client), queue_of=lambda key: queue)  # the other replica
        held = await other.claim(queue, "w-held", limit=2)
        assert held is not None and reg.may_rejoin(queue, "w-held")
        found = await reg.rejoin_slot(queue, "w-held")
        assert found is not None and found.lease == held.lease and reg.rejoined == 0
        back = await reg.rejoin_slot(queue, "w-back")  # expired before this replica started
        assert back is not None and back.slot == 1 and reg.rejoined == 1
        assert {w: lease.metadata.name for w, lease in kube.registrations(namespace).items()} == {
            "w-held": "capped-slot-0", "w-back": "capped-slot-1"}


async def test_max_workers_counts_workers_registered_outside_its_slots(kube: Kube, namespace: str, kubeconfig: Path):
    """maxWorkers set on a queue with workers registered without it, or lowered while slots past the
    new limit are held: those count, and /start finds the queue full until enough of them are gone."""
    async with in_process(kube, namespace, kubeconfig, "uncapped") as (queue, _, reg):
        for i in range(3):
            reg.register(queue, f"outside-{i}")
        capped = dataclasses.replace(queue, spec=queue.spec.model_copy(update={"max_workers": 2}))
        assert await reg.claim(capped, "outside-new", limit=2) is None
        assert len(reg.live(queue.key)) == 3
    async with in_process(kube, namespace, kubeconfig, "lowered", maxWorkers=5) as (queue, _, reg):
        held = [await reg.claim(queue, f"lowered-{i}", limit=5) for i in range(5)]
        assert all(held)
        await reg.disconnect(held[0], reason="shutdown", exit_code=0)  # slot 0 free, slots 2-4 held
        lowered = dataclasses.replace(queue, spec=queue.spec.model_copy(update={"max_workers": 2}))
        assert await reg.claim(lowered, "lowered-new", limit=2) is None
        for worker in held[1:3]:
            await reg.disconnect(worker, reason="shutdown", exit_code=0)
        assert await reg.claim(lowered, "lowered-new", limit=2) is None  # 2 still live, in slots 3 and 4
        await reg.disconnect(held[3], reason="shutdown", exit_code=0)
        new = await reg.claim(lowered, "lowered-new", limit=2)
        assert new is not None and new.slot == 0


async def test_max_workers_counts_claims_under_way_with_workers_registered_outside_its_slots(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """Two /start at once on a queue given maxWorkers=2 with one worker registered before it: the
    second waits for the first's claim rather than take the other free slot, and is turned away."""
    async with in_process(kube, namespace, kubeconfig, "racing") as (queue, _, reg):
        reg.register(queue, "before-the-cap")
        capped = dataclasses.replace(queue, spec=queue.spec.model_copy(update={"max_workers": 2}))
        claimed = await asyncio.gather(*(reg.claim(capped, f"racing-{i}", limit=2) for i in range(2)))
        assert sorted(worker is None for worker in claimed) == [False, True]
        assert len(reg.live(queue.key)) == 2


async def test_a_start_behind_a_claim_that_fails_gets_the_slot_not_a_full_queue(
    kube: Kube, namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch,
):
    """The last slot is being claimed by one /start when another comes: that one is not told the
    queue is full before the first claim has succeeded. Here it fails (the API server), and the
    slot goes to the second."""
    async with in_process(kube, namespace, kubeconfig, "behind", maxWorkers=1) as (queue, _, reg):
        create = reg._calls.create
        calls = 0

        async def first_fails(body: dict[str, Any]) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(0.5)
                raise client_.ApiError(503, "ServiceUnavailable", "etcd is away")
            return await create(body)

        monkeypatch.setattr(reg._calls, "create", first_fails)
        first = asyncio.create_task(reg.claim(queue, "behind-first", limit=1))
        await asyncio.sleep(0.1)
        second = await reg.claim(queue, "behind-second", limit=1)
        with pytest.raises(client_.ApiError):
            await first
        assert second is not None and second.slot == 0


async def test_a_slot_claim_on_a_slow_api_server_fails_within_its_deadline(
    kube: Kube, namespace: str, kubeconfig: Path, proxied_kubeconfig: tuple[Path, Proxy],
    monkeypatch: pytest.MonkeyPatch,
):
    """Each call of a claim is bounded, and so is the claim: with every slot taken by Leases this
    replica has not seen yet, it tries them one by one, each answered late (1 s a chunk here)."""
    body = kube.create_queue(namespace, "slow", queueId=f"slow-{namespace}", temporal=TEMPORAL, maxWorkers=10)
    queue = queues.QueueObject.from_body(body)
    direct = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    config, proxy = proxied_kubeconfig
    slow = client_.KubeClient(client_.load_configuration(str(config)))
    try:
        first = Registry(client=direct, events=EventPoster(direct), queue_of=lambda key: queue)
        for i in range(10):
            assert await first.claim(queue, f"w-{i}", limit=10) is not None
        other = Registry(client=slow, events=EventPoster(slow), queue_of=lambda key: queue)  # sees none of them
        monkeypatch.setattr(registry_, "CLAIM_DEADLINE_SECONDS", 3.0)
        proxy.latency = 1.0
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await other.claim(queue, "w-late", limit=10)
        assert time.monotonic() - began < 6
    finally:
        await direct.close()
        await slow.close()


async def test_a_slot_is_never_taken_from_a_worker_whose_lease_the_other_replica_renewed(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """maxWorkers: the holder looks expired here (its heartbeats reach the other replica, whose
    renewals the watch has not brought yet), but its Lease says it is alive: a /start here finds
    the queue full, rather than giving the live worker's slot away (maxWorkers + 1 workers)."""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "alive", now, maxWorkers=1) as (queue, client, reg):
        holder = await reg.claim(queue, "w-alive", limit=1)
        assert holder is not None
        now[0] += holder.duration + 1
        renewed = times.micro_rfc3339(now[0] - 1)  # the other replica's write of its latest heartbeat
        kube.coordination.patch_namespaced_lease(holder.lease, namespace, {"spec": {"renewTime": renewed}})
        assert await reg.claim(queue, "w-new", limit=1) is None
        lease = await client.request("GET", f"{resources.leases_path(namespace)}/{holder.lease}")
        assert lease["spec"]["holderIdentity"] == "w-alive"
        assert reg.get("w-alive") is holder  # the renewal read on the way is known here now


async def test_a_disconnect_that_meets_a_renewal_in_flight_still_frees_the_slot(
    kube: Kube, namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch,
):
    """The delete is conditional on the Lease version it read; a renewal written between that read
    and the delete (the other replica's, or this one's in flight) makes it read again, not give up:
    a Lease left behind would hold its slot until a restart."""
    async with in_process(kube, namespace, kubeconfig, "bye", maxWorkers=1) as (queue, client, reg):
        worker = await reg.claim(queue, "w-bye", limit=1)
        assert worker is not None
        original = client.request
        renewals: list[str] = []

        async def renewal_lands_first(method: str, path: str, **kwargs: Any) -> Any:
            if method == "DELETE" and not renewals:
                renewals.append(times.micro_rfc3339(time.time()))
                kube.coordination.patch_namespaced_lease(worker.lease, namespace, {"spec": {"renewTime": renewals[0]}})
            return await original(method, path, **kwargs)

        monkeypatch.setattr(client, "request", renewal_lands_first)
        await reg.disconnect(worker, reason="shutdown", exit_code=0)
        assert renewals and "w-bye" not in kube.registrations(namespace)
        assert await reg.claim(queue, "w-next", limit=1) is not None


async def test_a_worker_that_leaves_while_its_lease_is_first_written_leaves_no_lease(
    kube: Kube, namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch,
):
    """A disconnect while the Lease's create is in flight deletes nothing (there is no Lease yet);
    the create that lands after it deletes what it made."""
    async with in_process(kube, namespace, kubeconfig, "gone") as (queue, client, reg):
        worker = reg.register(queue, "w-gone")
        original = client.request

        async def leaves_meanwhile(method: str, path: str, **kwargs: Any) -> Any:
            answer = await original(method, path, **kwargs)
            if method == "POST" and path.endswith("/leases"):
                await reg.disconnect(worker, reason="shutdown", exit_code=0)
            return answer

        monkeypatch.setattr(client, "request", leaves_meanwhile)
        await reg._write(worker)
        assert "w-gone" not in kube.registrations(namespace)


async def test_a_worker_that_leaves_here_while_the_other_replica_writes_its_lease_leaves_no_lease(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """Registered here, its first heartbeat went to the other replica, which wrote its Lease; its
    disconnect came here before the watch brought that Lease. Nobody deleted it: it stayed, renewed
    by the other replica, until a restart."""
    async with in_process(kube, namespace, kubeconfig, "split") as (queue, client, reg):
        worker = reg.register(queue, "w-split")
        written = await client.request("POST", resources.leases_path(namespace),  # by the other replica
                                       body=leases.lease_body(worker, queue_name=queue.name))
        await reg.disconnect(worker, reason="shutdown", exit_code=0)
        assert "w-split" in kube.registrations(namespace)
        reg.lease_upserted(written)  # the watch brings it
        await asyncio.gather(*reg._writes)
        assert "w-split" not in kube.registrations(namespace)
        assert reg.get("w-split") is None and not reg.may_rejoin(queue, "w-split")


async def test_a_disconnect_of_a_worker_the_other_replica_registered_frees_its_slot_at_once(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """maxWorkers: registered by the other replica, its disconnect came here before the watch brought
    its Lease. It was answered 404 and nothing ended: the slot stayed taken until the Lease expired
    (2.5 intervals), and /start elsewhere met a full queue meanwhile."""
    async with in_process(kube, namespace, kubeconfig, "gone", maxWorkers=1) as (queue, client, reg):
        other = Registry(client=client, events=EventPoster(client), queue_of=lambda key: queue)  # the other replica
        held = await other.claim(queue, "w-gone", limit=1)
        assert held is not None and reg.get("w-gone") is None
        await reg.disconnect_unseen(queue, "w-gone", reason="shutdown", exit_code=0)
        await asyncio.gather(*reg._writes)
        assert "w-gone" not in kube.registrations(namespace)
        assert not reg.may_rejoin(queue, "w-gone")  # a late heartbeat does not bring it back
        assert await reg.claim(queue, "w-next", limit=1) is not None  # the slot is free


async def test_a_disconnect_of_a_worker_registered_elsewhere_is_answered_once_its_lease_is_gone(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """Its deletion was begun in the background, behind the deletions of a sweep (thousands after an
    outage, a few at a time): the worker was answered, exited, and its pod's replacement met the slot
    still taken (409) at /start on the other replica."""
    async with in_process(kube, namespace, kubeconfig, "prompt", maxWorkers=1) as (queue, client, reg):
        other = Registry(client=client, events=EventPoster(client), queue_of=lambda key: queue)
        assert await other.claim(queue, "w-prompt", limit=1) is not None
        busy = [await reg._deleting.acquire() for _ in range(registry_.DELETE_CONCURRENCY)]  # a sweep's under way
        await reg.disconnect_unseen(queue, "w-prompt", reason="shutdown", exit_code=0,
                                    deadline=asyncio.get_running_loop().time() + 8)
        assert "w-prompt" not in kube.registrations(namespace)
        for _ in busy:
            reg._deleting.release()


async def test_a_disconnect_while_a_heartbeat_rejoins_the_worker_leaves_no_slot_taken(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """maxWorkers: its last heartbeat and its disconnect both reach a replica that has not seen it.
    The rejoin, reading the Leases, went on to claim a slot after the disconnect had been answered:
    held until it expired, then a WorkerExpired Warning."""
    async with in_process(kube, namespace, kubeconfig, "both", maxWorkers=1) as (queue, _, reg):
        rejoining = asyncio.create_task(reg.rejoin_slot(queue, "w-both"))
        await asyncio.sleep(0)  # the rejoin reads the Leases
        await reg.disconnect_unseen(queue, "w-both", reason="shutdown", exit_code=0)
        assert await rejoining is None
        await asyncio.gather(*reg._writes)
        assert kube.registrations(namespace) == {}
        assert await reg.claim(queue, "w-next", limit=1) is not None  # the slot is free


async def test_a_disconnect_before_the_other_replica_wrote_the_lease_deletes_it_once_written(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """Registered by the other replica, which writes in batches: no Lease yet when its disconnect
    came here. The Lease written after is deleted when the watch brings it, never taken as live."""
    async with in_process(kube, namespace, kubeconfig, "late") as (queue, client, reg):
        other = Registry(client=client, events=EventPoster(client), queue_of=lambda key: queue)
        worker = other.register(queue, "w-late")
        await reg.disconnect_unseen(queue, "w-late", reason="shutdown", exit_code=0)
        written = await client.request("POST", resources.leases_path(namespace),  # by the other replica, after
                                       body=leases.lease_body(worker, queue_name=queue.name))
        reg.lease_upserted(written)  # the watch brings it
        await asyncio.gather(*reg._writes)
        assert "w-late" not in kube.registrations(namespace)
        assert reg.get("w-late") is None and reg.live(queue.key) == []


async def test_a_slot_held_by_a_lease_unknown_here_is_taken_once_its_holder_expired(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """A slot Lease this replica does not track (a worker's earlier slot, passed over once it moved,
    whose delete a restart ended) kept its slot taken for good: every claim met AlreadyExists."""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "stale", now, maxWorkers=1) as (queue, client, reg):
        def slot_lease(worker_id: str, renewed: float) -> dict[str, Any]:
            return leases.lease_body(leases.Worker(
                worker_id=worker_id, queue=queue.key, queue_uid=queue.uid, queue_id=queue.queue_id,
                lease=leases.slot_lease_name(queue.name, 0), duration=25.0, registered_at=renewed,
                renewed_at=renewed, seen_at=renewed, slot=0), queue_name=queue.name)

        path = f"{resources.leases_path(namespace)}/{leases.slot_lease_name(queue.name, 0)}"
        await client.request("POST", resources.leases_path(namespace), body=slot_lease("w-fresh", now[0]))
        assert await reg.claim(queue, "w-new", limit=1) is None  # its holder is alive: the queue is full
        assert reg.get("w-fresh") is not None  # and known here from now on
        await client.request("DELETE", path)
        reg.lease_deleted((namespace, leases.slot_lease_name(queue.name, 0)), None)
        await client.request("POST", resources.leases_path(namespace), body=slot_lease("w-old", now[0] - 600))
        taken = await reg.claim(queue, "w-new", limit=1)
        assert taken is not None and taken.slot == 0
        assert (await client.request("GET", path))["spec"]["holderIdentity"] == "w-new"


async def test_a_worker_whose_expired_slot_could_not_be_freed_holds_one_slot_after_it_rejoins(
    kube: Kube, namespace: str, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch,
):
    """The expired worker's delete fails (the API server away); its next heartbeat registers it again,
    in the slot it held (known to nobody now, its holder expired). The delete made again later must
    leave that registration be: one worker, one slot. (Registered again in another slot, on the other
    replica, see test_registry.py's unit test of a worker that rejoined into another slot.)"""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "twice", now, maxWorkers=2) as (queue, client, reg):
        worker = await reg.claim(queue, "w-1", limit=2)
        assert worker is not None and worker.slot == 0
        original = client.request
        failed: list[str] = []

        async def first_delete_fails(method: str, path: str, **kwargs: Any) -> Any:
            if method == "DELETE" and not failed:
                failed.append(path)
                raise aiohttp.ClientConnectionError("the API server is away")
            return await original(method, path, **kwargs)

        monkeypatch.setattr(client, "request", first_delete_fails)
        now[0] += worker.duration + 1
        reg._sweep(ending=True)
        await asyncio.gather(*reg._writes)
        assert failed
        rejoined = await reg.rejoin_slot(queue, "w-1")
        # Its own expired slot, still there and held by no worker known here, is taken over.
        assert rejoined is not None and rejoined.slot == 0

        def held() -> list[str]:
            return sorted(lease.metadata.name for lease in kube.coordination.list_namespaced_lease(namespace).items
                          if lease.spec.holder_identity == "w-1")

        await asyncio.sleep(registry_.RETRY_SECONDS + 1)  # the delete made again leaves the slot it holds now
        assert held() == [rejoined.lease]


async def test_a_slot_whose_lease_the_other_replica_deleted_is_taken_before_the_watch_tells(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """The slot's holder expired and the other replica deleted its Lease; this replica's watch has
    not told yet. A /start here takes the free slot: the 404 of the Lease's read was a 503 before."""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "freed", now, maxWorkers=1) as (queue, _client, reg):
        gone = await reg.claim(queue, "w-lapsed", limit=1)
        assert gone is not None
        now[0] += gone.duration + 1
        kube.coordination.delete_namespaced_lease(gone.lease, namespace)
        taken = await reg.claim(queue, "w-next", limit=1)
        assert taken is not None and taken.slot == 0
        assert {w: lease.metadata.name for w, lease in kube.registrations(namespace).items()} == {
            "w-next": "freed-slot-0"}


async def test_a_capped_worker_renewed_elsewhere_after_it_expired_here_rejoins_its_own_slot(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """Its heartbeats reached the other replica, whose renewal came late: this replica took it for
    expired and left its Lease (renewed meanwhile). Its next heartbeat here, before the watch brings
    that renewal, registers it in that same slot, never in a second one as well."""
    now = [time.time()]
    async with in_process(kube, namespace, kubeconfig, "own", now, maxWorkers=3) as (queue, client, reg):
        worker = await reg.claim(queue, "w-own", limit=3)
        assert worker is not None and worker.slot == 0
        now[0] += worker.duration + 1
        await client.request("PATCH", f"{resources.leases_path(namespace)}/{worker.lease}",
                             body={"spec": {"renewTime": times.micro_rfc3339(now[0])}},
                             content_type=client_.MERGE_PATCH)  # the other replica's renewal
        reg._sweep(ending=True)
        await asyncio.gather(*reg._writes)
        assert reg.get("w-own") is None and reg.may_rejoin(queue, "w-own")
        rejoined = await reg.rejoin_slot(queue, "w-own")
        assert rejoined is not None and rejoined.slot == 0
        leases_held = kube.coordination.list_namespaced_lease(namespace).items
        assert [(lease.spec.holder_identity, lease.metadata.name) for lease in leases_held] == [("w-own", "own-slot-0")]


async def test_a_renewal_that_finds_the_lease_deleted_by_the_other_replica_lets_the_worker_come_back(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """The other replica ended the worker for want of heartbeats; a late one heard here finds its
    Lease gone. The worker is alive: its next heartbeat registers it again, rather than a 404 for
    the rest of its life. A Lease the other replica marked as its worker's end (a disconnect) is
    told by the watch, and that worker is not let back."""
    now = [time.time()]
    beat = {"status": "active", "tasks_processed": 0, "current_task_id": None, "system_info": None}
    async with in_process(kube, namespace, kubeconfig, "back", now) as (queue, client, reg):
        expired, left = reg.rejoin(queue, "w-expired"), reg.rejoin(queue, "w-left")
        assert expired is not None and left is not None
        for worker in (expired, left):
            reg.heartbeat(worker, **beat)
            await reg._write(worker)
        bodies = {w.worker_id: await client.request("GET", f"{resources.leases_path(namespace)}/{w.lease}")
                  for w in (expired, left)}
        now[0] += expired.duration + 1
        for worker in (expired, left):  # the other replica deletes both: one expired there, one left
            kube.coordination.delete_namespaced_lease(worker.lease, namespace)
            reg.heartbeat(worker, **beat)  # heard here before the watch told
            await reg._write(worker)
            assert reg.get(worker.worker_id) is None
        assert reg.may_rejoin(queue, "w-expired") and reg.may_rejoin(queue, "w-left")
        bodies["w-left"]["metadata"]["annotations"][leases.ENDED_ANNOTATION] = "disconnected"  # marked: a disconnect
        for worker in (expired, left):
            reg.lease_deleted((namespace, worker.lease), bodies[worker.worker_id])  # the watch tells
        assert reg.may_rejoin(queue, "w-expired") and not reg.may_rejoin(queue, "w-left")
        assert reg.rejoin(queue, "w-expired") is not None


async def test_a_live_count_no_registration_tells_of_is_written_by_the_audit(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """The replica before this one wrote live=1 and stopped; its worker disconnected meanwhile (its
    Lease deleted, the count not written yet). No Lease is left to tell this replica: the audit
    compares every queue's count with its status, rather than the queue showing a live worker for good."""
    async with in_process(kube, namespace, kubeconfig, "stale") as (queue, client, reg):
        await resources.patch_queue_status(client, namespace, "stale", {"workers": {"live": 1}})
        store = Store(settings=Settings())
        store.upsert_queue(queues.QueueObject.from_body(kube.get_queue(namespace, "stale")))
        store.upsert_queue(queues.QueueObject.from_body(kube.create_queue(
            namespace, "idle", queueId=f"idle-{namespace}", temporal=TEMPORAL)))
        live = LiveStatus(store=store, registry=reg, client=client, activity=Activity(identity="me", priority=0))
        assert live.due() == []
        live.audit()
        assert live.due() == [queue.key]  # the idle queue shows 0 already: nothing to write
        await live._write(queue.key)
        assert kube.get_queue(namespace, "stale")["status"]["workers"]["live"] == 0


async def test_a_live_count_is_audited_as_soon_as_the_leases_are_listed_and_not_before(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """A replica just started: the status says live=1, written by the replica before, whose worker left
    while none ran. Compared before the Leases are all listed, a registry half filled would write
    wrong counts; once they are, at once, rather than at the next audit a minute later."""
    async with in_process(kube, namespace, kubeconfig, "started") as (_, client, reg):
        await resources.patch_queue_status(client, namespace, "started", {"workers": {"live": 1}})
        store = Store(settings=Settings())
        store.upsert_queue(queues.QueueObject.from_body(kube.get_queue(namespace, "started")))
        listed = [False]
        live = LiveStatus(store=store, registry=reg, client=client, activity=Activity(identity="me", priority=0),
                          listed=lambda: listed[0])
        await live.tick()
        assert kube.get_queue(namespace, "started")["status"]["workers"]["live"] == 1
        listed[0] = True
        await live.tick()
        assert kube.get_queue(namespace, "started")["status"]["workers"]["live"] == 0


async def test_a_live_count_the_api_server_keeps_refusing_is_tried_less_and_less_often(
    kube: Kube, namespace: str, kubeconfig: Path, caplog: pytest.LogCaptureFixture,
):
    """A queue served as last seen whose writes are refused for good (its namespace's RoleBinding
    removed): written every 5 s for ever, a WARNING each, and each write taken from the budget of
    every other queue's count."""
    async with in_process(kube, namespace, kubeconfig, "kept") as (queue, _, reg):
        store = Store(settings=Settings())
        store.upsert_queue(queue)
        configuration = client_.load_configuration(str(kubeconfig))
        configuration.api_key = {"authorization": f"Bearer {service_account_token(kube, namespace, 'unbound')}"}
        configuration.cert_file = configuration.key_file = configuration.refresh_api_key_hook = None
        unbound = client_.KubeClient(configuration)  # may write no status: 403
        now = [1000.0]
        live = LiveStatus(store=store, registry=reg, client=unbound, activity=Activity(identity="me", priority=0),
                          clock=lambda: now[0])
        reg.register(queue, "w-1")
        tried = []
        for second in range(0, 80):
            now[0] = 1000.0 + second
            if queue.key in live.due():
                tried.append(second)
            await live.tick()
        assert tried == [0, 5, 15, 35, 75]  # 5 s doubling (a success starts again from 5 s)
        failed = [r for r in caplog.records if "writing the live worker count" in r.getMessage()]
        assert 1 <= len(failed) < len(tried)  # paced
        await unbound.close()


async def test_a_live_count_that_changes_back_before_the_watch_shows_the_last_write_is_still_written(
    kube: Kube, namespace: str, kubeconfig: Path,
):
    """live=1 is written; the worker leaves before the watch has brought that write: the queue still
    shows 0 here, equal to the count now only by chance. The 0 is written once the watch shows the 1,
    rather than the queue showing one live worker for good."""
    async with in_process(kube, namespace, kubeconfig, "live") as (queue, client, reg):
        store = Store(settings=Settings())
        store.upsert_queue(queue)
        live = LiveStatus(store=store, registry=reg, client=client, activity=Activity(identity="me", priority=0))

        def shown() -> int:
            return int((kube.get_queue(namespace, "live").get("status") or {}).get("workers", {}).get("live", 0))

        async def write_if_dirty() -> None:  # as LiveStatus.run does, for one queue
            if live._dirty.pop(queue.key, "clean") is None:
                await live._write(queue.key)

        worker = reg.register(queue, "w-live")
        await write_if_dirty()
        assert shown() == 1
        await reg.disconnect(worker, reason="shutdown", exit_code=0)
        await write_if_dirty()  # the watch still shows 0 here: nothing written
        assert shown() == 1
        store.upsert_queue(queues.QueueObject.from_body(kube.get_queue(namespace, "live")))  # the watch tells
        await write_if_dirty()
        assert shown() == 0


def test_a_worker_rejoining_a_queue_made_again_under_its_name_stays_registered(
        operator: OperatorProcess, kube: Kube, namespace: str):
    """`kubectl delete --cascade=orphan`, then the same queue again with the same token: each heartbeat
    registered its worker again, renewing the Lease its first registration left without an owner, and
    the watch, seeing a Lease of no queue, forgot it again at once: never listed, at every heartbeat."""
    from workerqueue_operator.models import spec as spec_

    token = "a-token-that-outlives-its-queue-0123456789"
    kube.put_secret(namespace, "kept", token=token)
    auth = {"tokenSecretRefs": [{"name": "kept", "key": "token"}]}
    queue_id = f"kept-{namespace}"
    kube.create_queue(namespace, "kept", queueId=queue_id, temporal=TEMPORAL, auth=auth)
    kube.wait_condition(namespace, "kept", "True")
    worker_id = operator.start_worker(queue_id, token).json()["worker_id"]
    assert heartbeat(operator, worker_id, token) == 200
    wait_for(lambda: worker_id in kube.registrations(namespace), what="its Lease")
    kube.custom.delete_namespaced_custom_object(spec_.GROUP, spec_.VERSION, namespace, spec_.PLURAL, "kept",
                                                propagation_policy="Orphan")
    wait_for(lambda: not kube.queue_exists(namespace, "kept") and not kube.registrations(namespace)[
        worker_id].metadata.owner_references, what="the queue gone, its worker's Lease left without an owner")

    kube.create_queue(namespace, "kept", queueId=queue_id, temporal=TEMPORAL, auth=auth)
    kube.wait_condition(namespace, "kept", "True")
    uid = kube.get_queue(namespace, "kept")["metadata"]["uid"]

    def listed() -> list[str]:
        return [w["id"] for w in operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()]

    wait_for(lambda: heartbeat(operator, worker_id, token) == 200 and listed() == [worker_id], timeout=10,
             what="the worker registered again")
    for _ in range(3):  # and it stays so, heartbeat after heartbeat
        time.sleep(0.5)
        assert heartbeat(operator, worker_id, token) == 200
        assert listed() == [worker_id]
    owners = kube.registrations(namespace)[worker_id].metadata.owner_references
    assert [(o.name, o.uid) for o in owners or []] == [("kept", uid)]


def test_a_queue_made_again_under_its_name_takes_the_slots_its_namesake_left(
        operator: OperatorProcess, kube: Kube, namespace: str):
    """`kubectl delete --cascade=orphan`, then the same queue again: the Leases of the first one's
    workers, left without an owner, held its maxWorkers slots for good (every /start 409, none listed)."""
    from workerqueue_operator.models import spec as spec_

    queue_id, token = ready_queue(kube, namespace, "again", maxWorkers=2)
    old = [operator.start_worker(queue_id, token).json()["worker_id"] for _ in range(2)]
    wait_for(lambda: sorted(kube.registrations(namespace)) == sorted(old), what="the first queue's Leases")
    kube.custom.delete_namespaced_custom_object(spec_.GROUP, spec_.VERSION, namespace, spec_.PLURAL, "again",
                                                propagation_policy="Orphan")
    wait_for(lambda: not kube.queue_exists(namespace, "again") and not any(
        lease.metadata.owner_references for lease in kube.registrations(namespace).values()),
        what="the queue gone, its Leases left without an owner")

    queue_id, token = ready_queue(kube, namespace, "again", maxWorkers=2)
    answers = [operator.start_worker(queue_id, token) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 409]
    new = sorted(a.json()["worker_id"] for a in answers[:2])
    wait_for(lambda: sorted(kube.registrations(namespace)) == new, what="the slots' Leases taken over")
    listed = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
    assert sorted(w["id"] for w in listed) == new


def test_a_slot_lease_released_by_hand_is_a_free_slot(operator: OperatorProcess, kube: Kube, namespace: str):
    """Clearing holderIdentity is how a Lease is released (client-go's leader election does so): the
    slot was held for good, every heartbeat and /start of the queue 409 until the Lease was deleted."""
    queue_id, token = ready_queue(kube, namespace, "released", maxWorkers=1, heartbeatIntervalSeconds=10)
    first = operator.start_worker(queue_id, token).json()["worker_id"]
    assert heartbeat(operator, first, token) == 200
    wait_for(lambda: kube.registrations(namespace).get(first), what="its Lease")
    kube.coordination.patch_namespaced_lease("released-slot-0", namespace, {"spec": {"holderIdentity": None}})
    workers = f"/api/v1/worker-queues/{queue_id}/workers"
    wait_for(lambda: operator.call("GET", workers, token).json() == [], what="the release seen")
    assert heartbeat(operator, first, token) == 200  # registered again, in the slot released
    assert [w["id"] for w in operator.call("GET", workers, token).json()] == [first]
    assert wait_for(lambda: kube.registrations(namespace).get(first), what="its Lease again").metadata.name == (
        "released-slot-0")
    assert operator.start_worker(queue_id, token).status == 409  # one worker at most, as ever


def test_a_slot_lease_renewed_far_ahead_by_hand_holds_its_slot_no_longer_than_its_lease(
        operator: OperatorProcess, kube: Kube, namespace: str):
    """Its renewTime edited a day ahead (or written by a replica whose clock ran far ahead), a dead
    worker held its maxWorkers slot for that day: every /start of the queue 409."""
    queue_id, token = ready_queue(kube, namespace, "ahead", maxWorkers=1, heartbeatIntervalSeconds=10)
    first = operator.start_worker(queue_id, token).json()["worker_id"]
    assert heartbeat(operator, first, token) == 200
    time.sleep(10.5)
    # 10.5 s later: its lease is 28 s (2.5 x 11) from now on, 30 s (2.5 x 12) on a machine so busy
    # that the heartbeats arrived more than 11 s apart.
    assert heartbeat(operator, first, token) == 200
    lease = wait_for(lambda: (held := kube.registrations(namespace).get(first)) and held.spec.lease_duration_seconds
                     in (28, 30) and held, what="its Lease renewed at its pace")
    ahead = times.micro_rfc3339(time.time() + 86_400)
    kube.coordination.patch_namespaced_lease(lease.metadata.name, namespace, {"spec": {"renewTime": ahead}})
    # The worker sends nothing more (SIGTERM: no goodbye).
    assert operator.start_worker(queue_id, token).status == 409
    wait_for(lambda: operator.start_worker(queue_id, token).status == 200, timeout=60, interval=2,
             what="the slot free once the dead worker's lease has run out")
