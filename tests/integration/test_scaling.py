"""Workers sized by the work: backlog-driven scaling of operator-run pods (run by the local kubelet as
the protocol-faithful test worker) against the real Temporal dev server; TemporalReachable."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.worker import Worker

from tests.integration.conftest import Kube, OperatorProcess, frozen, wait_for
from workerqueue_operator.core.temporal import Endpoint, Temporal
from workerqueue_operator.devcluster import workflows
from workerqueue_operator.devcluster.controlplane import ControlPlane
from workerqueue_operator.devcluster.kubelet import LocalKubelet
from workerqueue_operator.devcluster.temporal import TemporalServer

pytestmark = pytest.mark.usefixtures("operator")


def scaling_queue(temporal: TemporalServer, queue_id: str, *, min_idle: int, max_: int) -> dict[str, object]:
    return {"queueId": queue_id, "singleExecution": True, "heartbeatIntervalSeconds": 10,
            "temporal": {"host": temporal.address, "namespace": temporal.namespace},
            "scaling": {"minIdle": min_idle, "max": max_}}


def start_kubelet(kubelet: Callable[..., LocalKubelet], operator: OperatorProcess, namespace: str) -> LocalKubelet:
    return kubelet(namespaces=[namespace], overrides={"CONTROL_PLANE_URL": operator.url})


@contextmanager
def sampled(kube: Kube, namespace: str, queue: str) -> Iterator[list[int]]:
    """The number of alive pods, sampled continuously while the block runs."""
    counts: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            counts.append(len(kube.pod_names(namespace, queue)))
            stop.wait(0.05)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join()


@contextmanager
def telling(kube: Kube, namespace: str, name: str) -> Iterator[None]:
    """A failed wait inside says what the queue showed then: its scaling Events and status."""
    try:
        yield
    except AssertionError as exc:
        events = [f"{e.last_timestamp:%H:%M:%S} {e.reason}: {e.message}" for e in kube.events(namespace, name)]
        status = kube.get_queue(namespace, name).get("status") or {}
        raise AssertionError(f"{exc}\nevents:\n  " + "\n  ".join(events)
                             + f"\nstatus.workers: {status.get('workers')}\nstatus.temporal: {status.get('temporal')}"
                             + f"\nconditions: {status.get('conditions')}") from exc


@pytest.mark.parametrize("per_worker", [1, None], ids=["one-workflow-each", "several-workflows-each"])
async def test_backlog_scales_pods_up_to_max_turns_them_over_and_back_to_zero(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
        kubelet: Callable[..., LocalKubelet], per_worker: int | None):
    queue_id = f"scale-{namespace}"
    kube.create_queue(namespace, "scale", **scaling_queue(temporal, queue_id, min_idle=0, max_=5))
    overrides = {"CONTROL_PLANE_URL": operator.url}
    if per_worker is not None:
        overrides["WORKFLOWS_PER_WORKER"] = str(per_worker)
    kubelet(namespaces=[namespace], overrides=overrides)
    wait_for(lambda: (kube.condition(namespace, "scale", "TemporalReachable") or {}).get("status") == "True",
             timeout=60, what="TemporalReachable")  # a first probe on a busy machine may time out (shown False)
    await asyncio.sleep(3)
    assert kube.pod_names(namespace, "scale", alive=False) == []  # idle, minIdle 0: no pod at all

    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    with sampled(kube, namespace, "scale") as counts:
        handles = await asyncio.gather(*(client.start_workflow(
            "AgentExecutionWorkflow", {"execution_id": f"e{i}", "duration_seconds": 2.0, "local_activity": True},
            id=f"scale-{i}-{secrets.token_hex(3)}", task_queue=queue_id) for i in range(10)))
        if per_worker == 1:
            # Within the backlog's polling, not the supervisor's 30-s resync; how fast is `make bench`'s.
            wait_for(lambda: len(kube.pod_names(namespace, "scale")) == 5, timeout=20, interval=0.05,
                     what="5 pods from the backlog's polling")
        # else a worker may take the whole backlog before the operator has seen it: then fewer pods
        # are right, and only the bounds below hold.
        # The pods turn over until every workflow is done.
        await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 180)
        with telling(kube, namespace, "scale"):
            wait_for(lambda: kube.pod_names(namespace, "scale", alive=False) == [], timeout=60,
                     what="back to 0 pods after the grace period")
    assert max(counts) == 5 if per_worker == 1 else 1 <= max(counts) <= 5, f"sampled {max(counts)} pods at most"
    workers = kube.workers(namespace, "scale")
    assert workers["desired"] == 0 and workers["failed"] == 0
    access = Temporal(timeout=5.0, coalesce=0.0)
    try:
        ran = await access.executions(Endpoint(temporal.address, temporal.namespace), queue_id, limit=20)
    finally:
        await access.close()
    pods = {str(e.holder).partition("@")[2] for e in ran}
    assert len(ran) == 10 and all(e.status == "completed" for e in ran)
    if per_worker == 1:
        # Each pod ran one workflow and went; with 5 at most at once, the other 5 workflows waited
        # in the backlog until replacements took them.
        assert len(pods) == 10 and workers["nextIndex"] >= 10
    else:
        # A worker's Temporal worker may take several workflows at once (as the real one may): the
        # backlog can be gone before any worker exits, so fewer pods may have run them all.
        assert 1 <= len(pods) <= 10 and workers["nextIndex"] >= 1
    kube.wait_events(namespace, "scale", "ScaledDown")
    scaled = kube.wait_events(namespace, "scale", "ScaledUp")[0]
    assert "backlog" in scaled.message and "busy" in scaled.message and "minIdle 0" in scaled.message
    # status.temporal is written at a bounded rate (every 5 s at most), so it shows the end soon after.
    wait_for(lambda: kube.get_queue(namespace, "scale")["status"]["temporal"]["backlog"] == 0, timeout=45,
             what="status.temporal.backlog 0")


async def test_min_idle_keeps_idle_workers_and_temporal_outages_change_nothing(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
        kubelet: Callable[..., LocalKubelet]):
    queue_id = f"idle-{namespace}"
    kube.create_queue(namespace, "idle", **scaling_queue(temporal, queue_id, min_idle=2, max_=4))
    start_kubelet(kubelet, operator, namespace)
    wait_for(lambda: len(kube.pod_names(namespace, "idle")) == 2, timeout=30, what="2 idle workers")
    wait_for(lambda: (kube.get_queue(namespace, "idle")["status"].get("temporal") or {}).get("pollers") == 2,
             timeout=60, what="2 pollers in status.temporal")
    await asyncio.sleep(5)  # longer than the grace period: idle workers up to minIdle stay
    assert len(kube.pod_names(namespace, "idle")) == 2
    pods = kube.pod_names(namespace, "idle")

    temporal.stop()
    try:
        down = kube.wait_condition(namespace, "idle", "False", "TemporalUnavailable", type_="TemporalReachable",
                                   timeout=30)
        assert "Temporal at" in down["message"] and down["reason"] == "TemporalUnavailable"
        await asyncio.sleep(5)
        assert kube.pod_names(namespace, "idle") == pods  # no scaling change while Temporal cannot tell
        assert kube.workers(namespace, "idle")["desired"] == 2
    finally:
        temporal.start()
    kube.wait_condition(namespace, "idle", "True", "Reachable", type_="TemporalReachable", timeout=60)
    assert kube.pod_names(namespace, "idle") == pods


async def test_the_backlog_is_read_on_after_a_status_write_slower_than_its_interval(
        kube: Kube, namespace: str, temporal: TemporalServer, control_plane: ControlPlane):
    """A scaling queue with workers reads its backlog every second and writes what it found to
    status.temporal. A write slower than that (the API server frozen here for 8 s) used to lose the
    next reading for good: the queue's backlog was never read again, and new work got no worker."""
    # No kubelet: the pods stay Pending, and every workflow waits in the backlog.
    queue_id = f"slow-{namespace}"
    kube.create_queue(namespace, "slow", **scaling_queue(temporal, queue_id, min_idle=0, max_=3))
    wait_for(lambda: kube.condition(namespace, "slow", "TemporalReachable"), timeout=30, what="TemporalReachable")
    client = await Client.connect(temporal.address, namespace=temporal.namespace)

    async def start(name: str) -> None:
        await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 1},
                                    id=f"slow-{name}-{secrets.token_hex(3)}", task_queue=queue_id)

    await start("a")
    wait_for(lambda: kube.pod_names(namespace, "slow") == ["slow-w0"], timeout=30, what="a worker for the first")
    await start("b")  # its reading changes status.temporal: a write within 5 s, while the API server is frozen
    with frozen(control_plane.pid("kube-apiserver")):
        await asyncio.sleep(8)
    wait_for(lambda: kube.pod_names(namespace, "slow") == ["slow-w0", "slow-w1"], timeout=30,
             what="a worker for the second")
    await start("c")
    with telling(kube, namespace, "slow"):
        wait_for(lambda: kube.pod_names(namespace, "slow") == ["slow-w0", "slow-w1", "slow-w2"], timeout=30,
                 what="a worker for the third: the backlog still read")


async def test_an_ephemeral_queue_scales_to_its_max_and_goes_once_its_work_is_done(
        kube: Kube, namespace: str, temporal: TemporalServer):
    # No kubelet: the test moves the pods through their phases; Temporal is real.
    queue_id = f"eph-{namespace}"
    kube.create_queue(namespace, "eph", **scaling_queue(temporal, queue_id, min_idle=0, max_=2),
                      ephemeral=True, ttlSecondsAfterFinished=1)
    wait_for(lambda: kube.condition(namespace, "eph", "TemporalReachable"), timeout=30, what="TemporalReachable")
    assert kube.pod_names(namespace, "eph", alive=False) == []  # nothing waits: no pod, and the queue stays

    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    handles = [await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 1},
                                           id=f"eph-{i}-{secrets.token_hex(3)}", task_queue=queue_id)
               for i in range(3)]
    wait_for(lambda: kube.pod_names(namespace, "eph") == ["eph-w0", "eph-w1"], timeout=30, what="2 pods (max 2)")
    await asyncio.sleep(2)
    assert kube.pod_names(namespace, "eph") == ["eph-w0", "eph-w1"]  # the third waits: max is 2

    kube.set_phase(namespace, "eph-w0", "Succeeded", exit_code=0, reason="Completed")
    wait_for(lambda: "eph-w2" in kube.pod_names(namespace, "eph"), timeout=30, what="eph-w0 replaced")
    for handle in handles:  # the work is gone (as if workers had run it)
        await handle.terminate("done")
    for pod in ("eph-w1", "eph-w2"):
        kube.set_phase(namespace, pod, "Succeeded", exit_code=0, reason="Completed")
    wait_for(lambda: not kube.queue_exists(namespace, "eph"), timeout=30, what="the finished queue deleted")


async def test_a_worker_running_another_workflows_activity_is_not_deleted_as_idle(
        kube: Kube, namespace: str, temporal: TemporalServer):
    """Any worker polling the task queue may take any workflow's activity (the real worker's LLM step
    is one): a pod that holds no workflow but runs an activity is busy. The pods are run by hand here
    (no kubelet): a Temporal worker of `act-w0`'s identity takes the workflows, one of `act-w1`'s
    their activities. Once the activities stop, `act-w1` is idle, and goes."""
    queue_id = f"act-{namespace}"
    kube.create_queue(namespace, "act", **scaling_queue(temporal, queue_id, min_idle=0, max_=2))
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    ids = [f"act-{i}-{secrets.token_hex(3)}" for i in range(2)]
    for workflow_id in ids:  # waiting for a worker: two pods wanted
        await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 60}, id=workflow_id,
                                    task_queue=queue_id)
    with telling(kube, namespace, "act"):
        wait_for(lambda: kube.pod_names(namespace, "act") == ["act-w0", "act-w1"], timeout=30, what="two workers")
    for pod in ("act-w0", "act-w1"):
        kube.set_phase(namespace, pod, "Running")
    activities = workflows.Activities(control_plane_url="http://127.0.0.1:1", api_key="unused",
                                      progress=workflows.Progress(), log=lambda _: None)
    holder = Worker(client, task_queue=queue_id, workflows=list(workflows.WORKFLOWS), identity="1@act-w0")
    runner = Worker(client, task_queue=queue_id, activities=[activities.run_execution], identity="2@act-w1")
    try:
        async with holder:
            async with runner:
                async def running_on_w1() -> bool:
                    for workflow_id in ids:
                        described = await client.get_workflow_handle(workflow_id).describe()
                        if not any(a.last_worker_identity == "2@act-w1"
                                   for a in described.raw_description.pending_activities):
                            return False
                    return True

                deadline = time.monotonic() + 30
                while not await running_on_w1():  # held by act-w0, their activities on act-w1
                    assert time.monotonic() < deadline, "the activities never ran on act-w1"
                    await asyncio.sleep(0.2)
                with telling(kube, namespace, "act"):
                    with sampled(kube, namespace, "act") as counts:
                        await asyncio.sleep(8)  # over twice the grace period (3 s)
                    assert min(counts) == 2, "a worker running an activity was deleted as idle"
            # The activities are cut off with their worker: act-w1 runs none now, and goes.
            with telling(kube, namespace, "act"):
                wait_for(lambda: kube.pod_names(namespace, "act") == ["act-w0"], timeout=30, what="act-w1 gone")
    finally:
        for workflow_id in ids:
            with contextlib.suppress(Exception):
                await client.get_workflow_handle(workflow_id).terminate("test over")


async def test_a_suspended_single_execution_pool_stops_its_idle_workers_and_lets_the_busy_finish(
        kube: Kube, namespace: str, temporal: TemporalServer):
    """Without scaling, a suspended queue's idle workers went on polling, each to take the next workflow
    of a queue that says it is suspended. Temporal now tells which hold an execution (as for a scaling
    queue): the others go. The pods are run by hand: a Temporal worker of `sus-w0`'s identity holds one."""
    queue_id = f"sus-{namespace}"
    kube.create_queue(namespace, "sus", queueId=queue_id, singleExecution=True, replicas=2,
                      temporal={"host": temporal.address, "namespace": temporal.namespace})
    with telling(kube, namespace, "sus"):
        wait_for(lambda: kube.pod_names(namespace, "sus") == ["sus-w0", "sus-w1"], timeout=30, what="two workers")
    for pod in ("sus-w0", "sus-w1"):
        kube.set_phase(namespace, pod, "Running")
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    workflow_id = f"sus-{secrets.token_hex(3)}"
    holder = Worker(client, task_queue=queue_id, workflows=list(workflows.WORKFLOWS), identity="1@sus-w0")
    try:
        async with holder:
            handle = await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 60}, id=workflow_id,
                                                 task_queue=queue_id)
            deadline = time.monotonic() + 30
            while not any(e.HasField("workflow_task_started_event_attributes")
                          for e in (await handle.fetch_history()).events):
                assert time.monotonic() < deadline, "sus-w0 never took the workflow"
                await asyncio.sleep(0.2)
            kube.patch_queue(namespace, "sus", {"suspend": True})
            with telling(kube, namespace, "sus"):
                wait_for(lambda: kube.pod_names(namespace, "sus") == ["sus-w0"], timeout=30, what="idle sus-w1 gone")
                with sampled(kube, namespace, "sus") as counts:
                    await asyncio.sleep(3)
                assert min(counts) == 1, "the worker holding an execution was deleted"
            stopping = [e.message for e in kube.wait_events(namespace, "sus", "Suspending")]
            assert stopping == ["the queue is suspended: stopping sus-w1"]
    finally:
        with contextlib.suppress(Exception):
            await client.get_workflow_handle(workflow_id).terminate("test over")


def test_reachability_checks_keep_to_their_rate_however_many_queues_there_are(
        operator: OperatorProcess, kubeconfig: Path, kube: Kube, namespace: str, temporal: TemporalServer,
        tmp_path: Path):
    """Each queue's Temporal checked every second would be 12 calls a second for 12 queues (10,000
    queues at the default 30 s were 333 a second). Held to 1 a second, each is checked less often, and
    every one still is; a queue made meanwhile is checked before those checked already."""
    names = [f"q{i}" for i in range(12)]
    temporal_ = {"host": temporal.address, "namespace": temporal.namespace}
    own = OperatorProcess(kubeconfig, tmp_path / "own.log", env={
        "WQ_NAMESPACES": namespace, "WQ_TEMPORAL_CHECK_SECONDS": "1", "WQ_TEMPORAL_CHECKS_PER_SECOND": "1"})
    with operator.paused():  # the session's operator would check them too, and write what it found
        try:
            for name in names:
                kube.create_queue(namespace, name, queueId=f"{name}-{namespace}", temporal=temporal_)
            own.start()
            for name in names:
                kube.wait_condition(namespace, name, "True", "Reachable", type_="TemporalReachable", timeout=60)
            def checks() -> float:
                return own.metric("workerqueue_temporal_reads_total", kind="check")

            before, began = checks(), time.monotonic()
            wait_for(lambda: checks() - before >= 4, what="4 more checks")  # they go on
            time.sleep(max(0.0, 8 - (time.monotonic() - began)))  # 8 s at least, to see their pace
            made = checks() - before
            elapsed = time.monotonic() - began
            assert made <= 1 * elapsed + 2, (made, elapsed)  # 1 a second, where unheld were 12
            assert own.metric("workerqueue_temporal_reads_total", kind="scaling") == 0

            # The 12 wait their turn, each every 12 s: a new queue's first check goes ahead of them,
            # one of the next few checks, not after the 12 (counted, not timed: checks keep their pace).
            before = checks()
            kube.create_queue(namespace, "late", queueId=f"late-{namespace}", temporal=temporal_)
            kube.wait_condition(namespace, "late", "True")
            kube.wait_condition(namespace, "late", "True", "Reachable", type_="TemporalReachable", timeout=60)
            assert checks() - before < 12, checks() - before
        finally:
            own.stop()
