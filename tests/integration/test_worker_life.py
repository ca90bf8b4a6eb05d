"""A worker's whole life against the operator: operator-run pods (run by the local kubelet as the
protocol-faithful test worker), the real Temporal dev server, the registry and /executions."""

from __future__ import annotations

import asyncio
import datetime
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client as k8s
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from tests.integration.conftest import Kube, OperatorProcess, wait_for
from tests.integration.test_start import service_account_token
from workerqueue_operator.core import queues
from workerqueue_operator.core import registry as registry_
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.devcluster import workflows
from workerqueue_operator.devcluster.kubelet import LocalKubelet
from workerqueue_operator.devcluster.temporal import TemporalServer
from workerqueue_operator.k8s import client as client_

pytestmark = pytest.mark.usefixtures("operator")


def queue_spec(temporal: TemporalServer, queue_id: str, **spec: object) -> dict[str, object]:
    return {"queueId": queue_id, "singleExecution": True, "heartbeatIntervalSeconds": 10,
            "temporal": {"host": temporal.address, "namespace": temporal.namespace}, **spec}


async def run_workflow(temporal: TemporalServer, task_queue: str, workflow_id: str, seconds: float = 1.0) -> None:
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    await asyncio.wait_for(client.execute_workflow(
        "AgentExecutionWorkflow", {"execution_id": workflow_id, "duration_seconds": seconds},
        id=workflow_id, task_queue=task_queue), 60)


async def run_as(temporal: TemporalServer, task_queue: str, host: str, control_plane_url: str, api_key: str,
                 pid: int | None = None) -> str:
    """Runs one short workflow with a worker on `host` (Temporal identity `<pid>@<host>`, this process's
    pid unless given); its id."""
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    activities = workflows.Activities(control_plane_url=control_plane_url, api_key=api_key,
                                      progress=workflows.Progress(), log=lambda _: None)
    workflow_id = f"exec-{secrets.token_hex(4)}"
    async with Worker(client, task_queue=task_queue, workflows=list(workflows.WORKFLOWS),
                      activities=[activities.run_execution], identity=f"{pid or os.getpid()}@{host}"):
        await asyncio.wait_for(client.execute_workflow("AgentExecutionWorkflow", {"duration_seconds": 0.1},
                                                       id=workflow_id, task_queue=task_queue), 60)
    return workflow_id


def registered_pods(kube: Kube, namespace: str) -> set[str]:
    return {lease.metadata.labels.get("agentcontrol.dev/pod") for lease in kube.registrations(namespace).values()}


def start_kubelet(kubelet: Callable[..., LocalKubelet], operator: OperatorProcess, namespace: str) -> LocalKubelet:
    # The pods' CONTROL_PLANE_URL is the operator's in-cluster Service; here it listens on loopback.
    return kubelet(namespaces=[namespace], overrides={"CONTROL_PLANE_URL": operator.url})


def pool_of(kube: Kube, namespace: str, name: str, replicas: int, *, temporal: TemporalServer,
            kubelet: Callable[..., LocalKubelet], operator: OperatorProcess) -> str:
    """A single-execution pool whose `replicas` workers run (the local kubelet's) and registered; its queue id."""
    queue_id = f"{name}-{namespace}"
    kube.create_queue(namespace, name, **queue_spec(temporal, queue_id, replicas=replicas))
    start_kubelet(kubelet, operator, namespace)
    wait_for(lambda: len(registered_pods(kube, namespace)) == replicas, timeout=60,
             what=f"{replicas} workers registered")
    return queue_id


@pytest.mark.parametrize("named_task_queue", [False, True], ids=["own-task-queue", "named-task-queue"])
async def test_a_single_execution_worker_lives_its_whole_life(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
        kubelet: Callable[..., LocalKubelet], named_task_queue: bool):
    # On a named task queue its pod's hostname (so its Temporal identity) carries the queue's uid.
    queue_id = f"life-{namespace}"
    task_queue = f"named-{namespace}" if named_task_queue else queue_id
    named = {"taskQueueName": task_queue} if named_task_queue else {}
    kube.create_queue(namespace, "life", **queue_spec(temporal, queue_id, **named))
    start_kubelet(kubelet, operator, namespace)
    wait_for(lambda: registered_pods(kube, namespace) == {"life-w0"}, timeout=60, what="life-w0 registered")
    hostname = kube.core.read_namespaced_pod("life-w0", namespace).spec.hostname
    assert (hostname == "life-w0") is not named_task_queue

    await run_workflow(temporal, task_queue, f"exec-{secrets.token_hex(4)}")
    # It reads its execution completed twice, waits 2 s, disconnects and exits 0: its pod Succeeded
    # and is deleted, its registration ended, and a fresh worker takes its place.
    wait_for(lambda: "life-w0" not in kube.pod_names(namespace, "life", alive=False), timeout=60,
             what="life-w0 gone")
    assert "life-w0" not in registered_pods(kube, namespace)
    disconnects = kube.wait_events(namespace, "life", "WorkerDisconnected")
    assert "exit code 0" in disconnects[0].message
    assert kube.workers(namespace, "life")["succeeded"] == 1
    wait_for(lambda: registered_pods(kube, namespace) == {"life-w1"}, timeout=60, what="the next worker")


async def test_a_pool_turns_over_one_worker_per_workflow(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
        kubelet: Callable[..., LocalKubelet]):
    queue_id = pool_of(kube, namespace, "pool", 3, temporal=temporal, kubelet=kubelet, operator=operator)

    for done in (1, 2, 3):
        before = set(kube.pod_names(namespace, "pool"))
        await run_workflow(temporal, queue_id, f"exec-{done}-{secrets.token_hex(4)}")
        wait_for(lambda d=done: kube.workers(namespace, "pool").get("succeeded") == d, timeout=60,
                 what=f"{done} worker(s) finished")
        # Exactly one worker left per workflow; the others (which saw that execution finish) stay.
        await asyncio.sleep(6)  # three more polls: a wrongly latched worker would have exited by now
        assert kube.workers(namespace, "pool")["succeeded"] == done
        assert len(before - set(kube.pod_names(namespace, "pool"))) == 1
        wait_for(lambda: len(registered_pods(kube, namespace)) == 3, timeout=60, what="the pool back to 3")


async def test_a_suspended_pool_lets_its_busy_worker_finish_and_keeps_waiting_work_for_its_resume(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
        kubelet: Callable[..., LocalKubelet]):
    # Suspend as the workers live it: the idle worker goes, the busy one finishes its execution and
    # exits on it, no worker takes a workflow while the queue is suspended, and one does on resume.
    queue_id = pool_of(kube, namespace, "rest", 2, temporal=temporal, kubelet=kubelet, operator=operator)
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    first = f"exec-1-{secrets.token_hex(4)}"
    handle = await client.start_workflow("AgentExecutionWorkflow", {"execution_id": first, "duration_seconds": 12},
                                         id=first, task_queue=queue_id)
    deadline = time.monotonic() + 30
    while (holder := await taken_by(client, first)) is None:
        assert time.monotonic() < deadline, "no worker took the workflow"
        await asyncio.sleep(0.2)
    busy = holder.split("@", 1)[1]
    kube.patch_queue(namespace, "rest", {"suspend": True})
    wait_for(lambda: kube.pod_names(namespace, "rest") == [busy], timeout=30, what="the idle worker gone")
    await asyncio.wait_for(handle.result(), 60)
    wait_for(lambda: kube.pod_names(namespace, "rest") == [], timeout=60, what=f"{busy} done and gone")
    # Counted by the pass that deletes the pod, written after it: read once written.
    wait_for(lambda: kube.workers(namespace, "rest").get("succeeded") == 1, what=f"{busy} counted succeeded")

    second = f"exec-2-{secrets.token_hex(4)}"
    waiting = await client.start_workflow("AgentExecutionWorkflow", {"execution_id": second, "duration_seconds": 0.1},
                                          id=second, task_queue=queue_id)
    await asyncio.sleep(6)  # a pass or two of the supervisor: a worker made while suspended would be here
    assert kube.pod_names(namespace, "rest") == [] and await taken_by(client, second) is None
    kube.patch_queue(namespace, "rest", {"suspend": False})
    await asyncio.wait_for(waiting.result(), 60)
    taker = await taken_by(client, second)
    assert taker is not None and taker.split("@", 1)[1] not in {"rest-w0", "rest-w1"}
    wait_for(lambda: kube.workers(namespace, "rest").get("succeeded") == 2, timeout=60, what="its worker done too")


async def taken_by(client: Client, workflow_id: str, run_id: str | None = None) -> str | None:
    """The Temporal identity of the worker that took a run (the latest by default), None if none has."""
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    return next((e.workflow_task_started_event_attributes.identity for e in history.events
                 if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED), None)


async def run_hosts(client: Client, workflow_id: str) -> list[str]:
    """The host of the worker that took each run of a workflow, first run first."""
    hosts: list[tuple[datetime.datetime, str]] = []
    async for run in client.list_workflows(f"WorkflowId = '{workflow_id}'"):
        identity = await taken_by(client, workflow_id, run.run_id)
        hosts.append((run.start_time, identity.split("@", 1)[1] if identity else ""))
    return [host for _, host in sorted(hosts)]


async def test_every_worker_of_an_execution_that_goes_on_in_new_runs_waits_for_its_end(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
        kubelet: Callable[..., LocalKubelet]):
    # Continued as new, an execution goes on in a new run that any worker of the pool may take: the
    # worker of an earlier run that exited when its run closed would leave the pool one short while
    # its execution runs on, and a run's worker shown another run would wait for the wrong one.
    queue_id = f"chain-{namespace}"
    kube.create_queue(namespace, "chain", **queue_spec(temporal, queue_id, replicas=2))
    start_kubelet(kubelet, operator, namespace)
    wait_for(lambda: registered_pods(kube, namespace) == {"chain-w0", "chain-w1"}, timeout=60,
             what="2 workers registered")
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    workflow_id = f"exec-{secrets.token_hex(4)}"
    handle = await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 3, "continue_as_new": 3},
                                         id=workflow_id, task_queue=queue_id)
    ended = asyncio.ensure_future(asyncio.wait_for(handle.result(), 120))  # follows the runs to the last
    while not ended.done():
        assert kube.workers(namespace, "chain").get("succeeded", 0) == 0, await run_hosts(client, workflow_id)
        assert set(kube.pod_names(namespace, "chain")) == {"chain-w0", "chain-w1"}
        await asyncio.sleep(0.5)
    assert ended.result() == "done"
    hosts = await run_hosts(client, workflow_id)
    assert len(hosts) == 4
    # Each worker that took a run exits once the last run has completed; a worker that took none stays.
    wait_for(lambda: kube.workers(namespace, "chain").get("succeeded") == len(set(hosts)), timeout=60,
             what=f"the workers of {hosts} finished")
    await asyncio.sleep(6)  # three more polls: a worker wrongly latched would have exited by now
    assert kube.workers(namespace, "chain")["succeeded"] == len(set(hosts))
    assert not set(hosts) & set(kube.pod_names(namespace, "chain"))


def test_a_deleted_pods_worker_is_gone_at_once(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
        kubelet: Callable[..., LocalKubelet]):
    # Heartbeats every 60 s: its registration would expire only after 150 s, so an end within the
    # wait's minute is the pod's deletion seen, not the expiry.
    kube.create_queue(namespace, "gone", **queue_spec(temporal, f"gone-{namespace}", heartbeatIntervalSeconds=60))
    start_kubelet(kubelet, operator, namespace)
    wait_for(lambda: registered_pods(kube, namespace) == {"gone-w0"}, timeout=60, what="gone-w0 registered")
    kube.core.delete_namespaced_pod("gone-w0", namespace)  # SIGTERM: the worker says no goodbye
    wait_for(lambda: "gone-w0" not in registered_pods(kube, namespace), timeout=60,
             what="the registration of the deleted pod's worker ended")
    # Its own token went with it.
    wait_for(lambda: not kube.has_secret(namespace, "gone-w0-token"), timeout=60, what="gone-w0-token deleted")


async def test_executions_are_per_worker_and_temporal_outages_are_503(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer):
    queue_id = f"exq-{namespace}"
    kube.create_queue(namespace, "exq", **queue_spec(temporal, queue_id, replicas=2))
    wait_for(lambda: len(kube.pod_names(namespace, "exq")) == 2, what="two pods")
    mine = wait_for(lambda: kube.has_secret(namespace, "exq-w0-token") and kube.secret_value(
        namespace, "exq-w0-token", "token"), what="exq-w0's token")
    theirs = kube.secret_value(namespace, "exq-w1-token", "token")
    queue_token = kube.queue_token(namespace, "exq")
    path = f"/api/v1/worker-queues/{queue_id}/executions?limit=5&status=all"
    assert operator.call("GET", path, mine).json() == []

    async def work() -> str:
        client = await Client.connect(temporal.address, namespace=temporal.namespace)
        activities = workflows.Activities(control_plane_url=operator.url, api_key=mine,
                                          progress=workflows.Progress(), log=lambda _: None)
        async with Worker(client, task_queue=queue_id, workflows=list(workflows.WORKFLOWS),
                          activities=[activities.run_execution], identity=f"{os.getpid()}@exq-w0"):
            workflow_id = f"exec-{secrets.token_hex(4)}"
            await client.execute_workflow("AgentExecutionWorkflow", {"duration_seconds": 0.1}, id=workflow_id,
                                          task_queue=queue_id)
            return workflow_id
    workflow_id = await asyncio.wait_for(work(), 60)

    def listed(token: str) -> object:
        answer = operator.call("GET", path, token)
        assert answer.status == 200, answer.body
        return answer.json()
    # Temporal's visibility may list it running for a moment after it completed.
    wait_for(lambda: [(e["id"], e["status"]) for e in listed(mine)] == [(workflow_id, "completed")],
             what="exq-w0's execution, completed")
    assert listed(theirs) == []  # another worker never sees it, so it never exits on it
    assert listed(queue_token) == []  # a shared queue token cannot say which worker asks

    temporal.stop()
    try:
        began = time.monotonic()
        down = operator.call("GET", path, mine, timeout=15)
        assert down.status == 503 and "Temporal is unavailable" in down.json()["detail"]
        assert time.monotonic() - began < 10  # its Temporal timeout is 4 s; a hang would be the call's 15 s
    finally:
        temporal.start()
    wait_for(lambda: operator.call("GET", path, mine).status == 200, timeout=30, what="Temporal back")


async def test_namesake_queues_sharing_a_task_queue_see_only_their_own_pods_executions(
        operator: OperatorProcess, kube: Kube, namespace: str, other_namespace: str, temporal: TemporalServer):
    # A task queue the spec names can be shared, and pods of namesake queues in two namespaces have
    # the same names: with the pod's name for hostname, the other queue's worker was shown this
    # execution (it took the same Temporal identity for its own), and exited on it without working.
    task_queue = f"shared-{namespace}"
    path = "/api/v1/worker-queues/{}/executions?limit=5&status=all"
    for ns in (namespace, other_namespace):
        kube.create_queue(ns, "twin", **queue_spec(temporal, f"twin-{ns}", taskQueueName=task_queue))
    tokens = {ns: wait_for(lambda ns=ns: kube.has_secret(ns, "twin-w0-token") and kube.secret_value(
        ns, "twin-w0-token", "token"), what=f"{ns}/twin-w0's token") for ns in (namespace, other_namespace)}
    # The token Secret is made just before its pod: wait for the pod too.
    hostnames = {ns: wait_for(lambda ns=ns: "twin-w0" in kube.pod_names(ns, "twin")
                              and kube.core.read_namespaced_pod("twin-w0", ns).spec.hostname,
                              what=f"{ns}/twin-w0") for ns in (namespace, other_namespace)}
    assert hostnames[namespace] != hostnames[other_namespace]

    workflow_id = await run_as(temporal, task_queue, hostnames[namespace], operator.url, tokens[namespace])
    wait_for(lambda: [(e["id"], e["status"]) for e in operator.call(
        "GET", path.format(f"twin-{namespace}"), tokens[namespace]).json()] == [(workflow_id, "completed")],
        what="its execution shown to the worker that ran it, completed")
    theirs = operator.call("GET", path.format(f"twin-{other_namespace}"), tokens[other_namespace])
    assert (theirs.status, theirs.json()) == (200, [])


async def test_a_queue_made_again_under_its_queue_id_shows_its_new_pods_none_of_the_old_executions(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer):
    # Pod names (so hostnames, so Temporal identities) start again at -w0 when a queue is deleted and
    # made again, while its task queue (named by its queueId) keeps the executions the old pods ran.
    # A new -w0 shown the old -w0's completed execution would exit at once without doing any work:
    # the pool turns over for nothing, and an ephemeral queue is deleted with its workflow never run.
    queue_id = f"again-{namespace}"
    path = f"/api/v1/worker-queues/{queue_id}/executions?limit=5&status=all"

    def pod_token() -> str:
        return wait_for(lambda: kube.has_secret(namespace, "again-w0-token") and kube.secret_value(
            namespace, "again-w0-token", "token"), what="again-w0's token")

    kube.create_queue(namespace, "again", **queue_spec(temporal, queue_id))
    old = pod_token()

    async def work() -> str:
        client = await Client.connect(temporal.address, namespace=temporal.namespace)
        async with Worker(client, task_queue=queue_id, workflows=list(workflows.WORKFLOWS),
                          activities=[workflows.Activities(control_plane_url=operator.url, api_key=old,
                                                           progress=workflows.Progress(),
                                                           log=lambda _: None).run_execution],
                          identity=f"{os.getpid()}@again-w0"):
            workflow_id = f"exec-{secrets.token_hex(4)}"
            await client.execute_workflow("AgentExecutionWorkflow", {"duration_seconds": 0.1}, id=workflow_id,
                                          task_queue=queue_id)
            return workflow_id
    workflow_id = await asyncio.wait_for(work(), 60)
    # Temporal's visibility may list it running for a moment after it completed.
    wait_for(lambda: [(e["id"], e["status"]) for e in operator.call("GET", path, old).json()]
             == [(workflow_id, "completed")], what="the old again-w0's execution, completed")

    kube.delete_queue(namespace, "again")
    wait_for(lambda: not kube.queue_exists(namespace, "again"), what="the queue gone")
    wait_for(lambda: not kube.has_secret(namespace, "again-w0-token"), timeout=90,
             what="its token garbage-collected")
    wait_for(lambda: not kube.pod_names(namespace, "again", alive=False), timeout=90,
             what="its pod garbage-collected")
    kube.create_queue(namespace, "again", **queue_spec(temporal, queue_id))
    new = pod_token()
    assert new != old
    answer = wait_for(lambda: (r := operator.call("GET", path, new)).status == 200 and r,
                      what="the new again-w0 served")
    made = kube.core.read_namespaced_secret("again-w0-token", namespace).metadata.creation_timestamp
    assert answer.json() == [], (made, operator.logs()[-3000:])  # nothing of its own yet: it waits for work


async def first_pods_worker(operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
                            name: str, queue_id: str) -> tuple[str, str, Client, workflows.Activities]:
    """A single-execution queue whose first pod's worker the test plays (no kubelet runs the pod): that
    pod's token, its /executions path as the worker polls it, a Temporal client, and the worker's activities."""
    kube.create_queue(namespace, name, **queue_spec(temporal, queue_id))
    token = wait_for(lambda: kube.has_secret(namespace, f"{name}-w0-token") and kube.secret_value(
        namespace, f"{name}-w0-token", "token"), what=f"{name}-w0's token")
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    activities = workflows.Activities(control_plane_url=operator.url, api_key=token, progress=workflows.Progress(),
                                      log=lambda _: None)
    return token, f"/api/v1/worker-queues/{queue_id}/executions?limit=5&status=all", client, activities


async def test_a_worker_sees_its_execution_behind_a_burst_of_newer_ones(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer):
    # A burst of more workflows than one listing shows (100), the oldest taken first: a worker whose
    # execution is not among the newest would never see it end, never exit, and take one workflow
    # after another for the rest of its life instead of one.
    queue_id = f"burst-{namespace}"
    mine, path, client, activities = await first_pods_worker(operator, kube, namespace, temporal, "burst", queue_id)
    workflow_id = f"exec-{secrets.token_hex(4)}"
    async with Worker(client, task_queue=queue_id, workflows=list(workflows.WORKFLOWS),
                      activities=[activities.run_execution], identity=f"{os.getpid()}@burst-w0"):
        await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 600}, id=workflow_id,
                                    task_queue=queue_id)
        shown = wait_for(lambda: operator.call("GET", path, mine).json(), what="burst-w0's execution")
        assert [(e["id"], e["status"]) for e in shown] == [(workflow_id, "running")]
    # Its worker is away (the execution runs on, waiting for it); 120 newer ones wait for workers.
    await asyncio.gather(*(client.start_workflow("AgentExecutionWorkflow", {}, id=f"later-{i}-{workflow_id}",
                                                 task_queue=queue_id) for i in range(120)))
    await asyncio.sleep(1.5)  # past the listing shared by polls within a second
    shown = operator.call("GET", path, mine).json()
    assert [(e["id"], e["status"]) for e in shown] == [(workflow_id, "running")]
    await client.get_workflow_handle(workflow_id).terminate()
    shown = wait_for(lambda: [e for e in operator.call("GET", path, mine).json() if e["status"] != "running"],
                     what="burst-w0's execution over")
    # Terminated reads cancelled, shown to its worker as failed (core/executions.py): it exits on either.
    assert [(e["id"], e["status"]) for e in shown] == [(workflow_id, "failed")]


async def test_a_worker_is_shown_nothing_while_more_run_than_a_listing_reads(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer):
    # Its worker holds two executions; then 999 newer ones wait for workers: a listing reads 1,000
    # (temporal.SCAN_LIMIT), so its first is left out. Shown its second, the worker would latch onto
    # it and exit when it closed, its first still running on it; shown nothing, it keeps waiting.
    queue_id = f"cut-{namespace}"
    mine, path, client, activities = await first_pods_worker(operator, kube, namespace, temporal, "cut", queue_id)

    def shown() -> list[tuple[str, str]]:
        return [(e["id"], e["status"]) for e in operator.call("GET", path, mine).json()]

    first, second = (f"{name}-{secrets.token_hex(4)}" for name in ("first", "second"))
    async with Worker(client, task_queue=queue_id, workflows=list(workflows.WORKFLOWS),
                      activities=[activities.run_execution], identity=f"{os.getpid()}@cut-w0"):
        for workflow_id in (first, second):
            await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 600}, id=workflow_id,
                                        task_queue=queue_id)
            for _ in range(100):
                if await taken_by(client, workflow_id):
                    break
                await asyncio.sleep(0.2)
            assert await taken_by(client, workflow_id) == f"{os.getpid()}@cut-w0"
        wait_for(lambda: shown() == [(first, "running")], what="cut-w0's first execution")
    newer = [f"newer-{i}-{first}" for i in range(999)]
    turns = asyncio.Semaphore(32)

    async def start(workflow_id: str) -> None:
        async with turns:
            await client.start_workflow("AgentExecutionWorkflow", {}, id=workflow_id, task_queue=queue_id)

    async def terminate(workflow_id: str) -> None:
        async with turns:
            await client.get_workflow_handle(workflow_id).terminate("test")

    try:
        await asyncio.gather(*(start(w) for w in newer))
        answers = [shown()]
        while answers[-1] != []:
            assert len(answers) < 120, answers[-5:]
            await asyncio.sleep(0.5)
            answers.append(shown())
        assert {a for answer in answers for a in answer} <= {(first, "running")}, answers
        await asyncio.gather(*(terminate(w) for w in newer))
        # Closed, the newer ones are read after the running ones: its first is in the listing again.
        wait_for(lambda: shown() == [(first, "running")], timeout=60, what="cut-w0's first again")
    finally:
        await asyncio.gather(*(terminate(w) for w in (first, second)), return_exceptions=True)


def test_a_token_secret_missing_mid_rotation_leaves_running_workers_be(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer):
    # The old token Secret deleted before it is unlisted (or the new one listed before it is made):
    # the queue starts no worker, but those running keep heartbeating and polling their executions
    # (503s there for 30 minutes make the worker give up and stop, its execution with it).
    queue_id = f"rot-{namespace}"
    kube.put_secret(namespace, "tok-old", token="old-token")
    kube.put_secret(namespace, "tok-new", token="new-token")
    refs = [{"name": "tok-old", "key": "token"}, {"name": "tok-new", "key": "token"}]
    kube.create_queue(namespace, "rot", **queue_spec(temporal, queue_id, auth={"tokenSecretRefs": refs}))
    mine = wait_for(lambda: kube.has_secret(namespace, "rot-w0-token") and kube.secret_value(
        namespace, "rot-w0-token", "token"), what="rot-w0's token")
    started = wait_for(lambda: (r := operator.start_worker(queue_id, mine)).status == 200 and r.json(),
                       what="rot-w0 started")
    path = f"/api/v1/worker-queues/{queue_id}/executions?limit=5&status=all"
    kube.core.delete_namespaced_secret("tok-old", namespace)
    kube.wait_condition(namespace, "rot", "False", "SecretNotFound")
    assert operator.call("GET", path, mine).status == 200
    beat = operator.call("POST", f"/api/v1/workers/{started['worker_id']}/heartbeat", "new-token",
                         {"status": "running", "tasks_processed": 0, "current_task_id": None, "worker_metadata": {}})
    assert beat.status == 200
    assert operator.start_worker(queue_id, "new-token").status == 503  # no new worker meanwhile


def test_a_secret_that_is_not_temporals_going_missing_leaves_running_workers_their_executions(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer):
    # The LiteLLM key's Secret deleted (renamed, rotated by hand): no new worker starts, but those
    # running must still see their executions, or none of them sees its own end and exits.
    queue_id = f"llm-{namespace}"
    kube.put_secret(namespace, "llm-key", key="sk-1")
    kube.create_queue(namespace, "llm", **queue_spec(temporal, queue_id,
                                                     litellm={"apiKeySecretRef": {"name": "llm-key", "key": "key"}}))
    mine = wait_for(lambda: kube.has_secret(namespace, "llm-w0-token") and kube.secret_value(
        namespace, "llm-w0-token", "token"), what="llm-w0's token")
    wait_for(lambda: operator.start_worker(queue_id, mine).status == 200, what="llm-w0 started")
    path = f"/api/v1/worker-queues/{queue_id}/executions?limit=5&status=all"
    kube.core.delete_namespaced_secret("llm-key", namespace)
    kube.wait_condition(namespace, "llm", "False", "SecretNotFound")
    listed = operator.call("GET", path, mine)
    assert (listed.status, listed.json()) == (200, [])
    assert operator.start_worker(queue_id, mine).status == 503  # no new worker meanwhile


def test_a_worker_turned_away_at_start_exits_and_its_pod_is_replaced_without_a_crash_loop(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer,
        kubelet: Callable[..., LocalKubelet]):
    """The protocol's worker exits 1 on a refused /start and never retries: its queue full here (the
    one slot held with the queue token), with backoffLimit 1 one such exit taken for a crash would
    stop the queue until its spec changed."""
    queue_id = f"full-{namespace}"
    kube.create_queue(namespace, "full", **queue_spec(temporal, queue_id, maxWorkers=1, worker={"backoffLimit": 1}))
    kube.wait_condition(namespace, "full", "True")
    assert operator.start_worker(queue_id, kube.queue_token(namespace, "full")).status == 200  # the slot
    start_kubelet(kubelet, operator, namespace)
    wait_for(lambda: "WorkerRefused" in [e.reason for e in kube.events(namespace, "full")], timeout=60,
             what="the pod's worker turned away, its pod failed and counted as refused")
    assert "WorkerFailed" not in [e.reason for e in kube.events(namespace, "full")]
    assert kube.workers(namespace, "full").get("consecutiveFailures", 0) == 0
    assert kube.condition(namespace, "full", "Ready")["status"] == "True"


async def test_a_kubernetes_identitys_worker_is_shown_only_its_own_execution(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer, kubeconfig: Path):
    # A single-execution worker signed in with a ServiceAccount token latches onto whatever the list
    # shows first: shown the whole queue, it took another worker's finished execution for its own and
    # exited without working. Its registration says which worker asks; the Role that lets it start
    # workers is all it needs. An identity that may only read the queue (a person, a tool) sees it all.
    queue_id = f"idq-{namespace}"
    kube.create_queue(namespace, "idq", **queue_spec(temporal, queue_id, singleExecution=False))
    kube.wait_condition(namespace, "idq", "True")
    kube.grant(namespace, "idq-start", resource="workerqueues/start", verb="create", queue="idq", account="runner")
    kube.grant(namespace, "idq-view", resource="workerqueues", verb="get", queue="idq", account="viewer")
    runner = service_account_token(kube, namespace, "runner")
    viewer = service_account_token(kube, namespace, "viewer")
    stranger = service_account_token(kube, namespace, "stranger")
    kube.grant(namespace, "idq-both-start", resource="workerqueues/start", verb="create", queue="idq", account="both")
    kube.grant(namespace, "idq-both-read", resource="workerqueues", verb="get", queue="idq", account="both")
    both = service_account_token(kube, namespace, "both")
    path = f"/api/v1/worker-queues/{queue_id}/executions?limit=5&status=all"

    async def run(host: str) -> str:
        return await run_as(temporal, queue_id, host, operator.url, runner)

    def listed(token: str) -> list[tuple[str, str]]:
        answer = operator.call("GET", path, token)
        assert answer.status == 200, answer.body
        return [(e["id"], e["status"]) for e in answer.json()]

    theirs = await run("elsewhere")
    wait_for(lambda: listed(viewer) == [(theirs, "completed")], what="the whole queue, to a viewer")
    # Not registered (yet, or no more: it heartbeats more slowly than expected), an identity that may
    # start workers may be a worker: shown the whole queue, it would exit on another's execution.
    assert listed(runner) == [] and listed(both) == []
    refused = operator.call("GET", path, stranger)
    assert refused.status == 403 and "may neither create workerqueues/start nor get" in refused.json()["detail"]
    started = operator.start_worker(queue_id, runner, {"system_info": {"hostname": "runner-host"}})
    assert started.status == 200, started.body
    # Another replica, whose watch has not brought the registration yet, finds it in the API server:
    # its Lease is written before /start answers.
    kube_client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    try:
        other = registry_.Registry(client=kube_client, events=EventPoster(kube_client), queue_of=lambda key: None)
        found = await other.registrations_of(queues.QueueObject.from_body(kube.get_queue(namespace, "idq")),
                                             f"system:serviceaccount:{namespace}:runner")
        assert [(w.worker_id, w.hostname) for w in found] == [(started.json()["worker_id"], "runner-host")]
    finally:
        await kube_client.close()
    assert listed(runner) == []  # not its own: it would exit on it
    mine = await run("runner-host")
    wait_for(lambda: listed(runner) == [(mine, "completed")], what="its own execution, to the runner")
    assert {entry[0] for entry in listed(viewer)} == {theirs, mine}
    # A second worker of the same identity: which one asks cannot be told, so neither is shown any.
    assert operator.start_worker(queue_id, runner, {"system_info": {"hostname": "other-host"}}).status == 200
    assert listed(runner) == []


async def test_two_identities_workers_on_one_host_each_see_their_own_execution(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer):
    # Two worker processes on one machine (outside pods), each with a ServiceAccount of its own: by the
    # host alone, the idle one was shown the other's execution, took it for its own, and exited at its end.
    queue_id = f"box-{namespace}"
    kube.create_queue(namespace, "box", **queue_spec(temporal, queue_id, singleExecution=False))
    kube.wait_condition(namespace, "box", "True")
    tokens = {}
    for account, pid in (("first", 1001), ("second", 1002)):
        kube.grant(namespace, f"box-start-{account}", resource="workerqueues/start", verb="create", queue="box",
                   account=account)
        tokens[pid] = service_account_token(kube, namespace, account)
        started = operator.start_worker(queue_id, tokens[pid], {"system_info": {"hostname": "box", "pid": pid}})
        assert started.status == 200, started.body
    path = f"/api/v1/worker-queues/{queue_id}/executions?limit=5&status=all"

    def listed(pid: int) -> list[tuple[str, str]]:
        answer = operator.call("GET", path, tokens[pid])
        assert answer.status == 200, answer.body
        return [(e["id"], e["status"]) for e in answer.json()]

    seconds = await run_as(temporal, queue_id, "box", operator.url, tokens[1002], pid=1002)
    wait_for(lambda: listed(1002) == [(seconds, "completed")], what="its own execution, to the second")
    assert listed(1001) == []


def pod_bound_token(kube: Kube, namespace: str, account: str, pod: str) -> str:
    """A ServiceAccount token bound to a pod (as a projected token is): TokenReview names the pod.
    The pod is only an object here (no kubelet runs it)."""
    created = kube.core.create_namespaced_pod(namespace, k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=pod),
        spec=k8s.V1PodSpec(service_account_name=account, containers=[k8s.V1Container(name="w", image="w")])))
    request = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(
        audiences=[], expiration_seconds=3600,
        bound_object_ref=k8s.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=created.metadata.uid)))
    return str(kube.core.create_namespaced_service_account_token(account, namespace, request).status.token)


async def test_workers_of_one_service_account_in_several_pods_each_see_their_own_execution(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer):
    # One ServiceAccount, a worker in each of two pods: as one identity with two registrations, neither
    # was shown its own execution (which one asks could not be told), and a replica knowing only one
    # registration showed it to both. A token bound to a pod says which pod asks. One with no
    # registration (expired in an API-server outage) waits, rather than see the whole queue.
    queue_id = f"podq-{namespace}"
    kube.create_queue(namespace, "podq", **queue_spec(temporal, queue_id, singleExecution=False))
    kube.wait_condition(namespace, "podq", "True")
    kube.grant(namespace, "podq-start", resource="workerqueues/start", verb="create", queue="podq", account="runner")
    service_account_token(kube, namespace, "runner")  # makes the account
    first, second, idle = (pod_bound_token(kube, namespace, "runner", pod) for pod in ("run-a", "run-b", "run-c"))
    path = f"/api/v1/worker-queues/{queue_id}/executions?limit=5&status=all"

    def listed(token: str) -> list[tuple[str, str]]:
        answer = operator.call("GET", path, token)
        assert answer.status == 200, answer.body
        return [(e["id"], e["status"]) for e in answer.json()]

    for token, host in ((first, "run-a"), (second, "run-b")):
        started = operator.start_worker(queue_id, token, {"system_info": {"hostname": host}})
        assert started.status == 200, started.body
    mine = await run_as(temporal, queue_id, "run-a", operator.url, first)
    wait_for(lambda: listed(first) == [(mine, "completed")], what="its own execution, to the first pod's worker")
    assert listed(second) == []
    assert listed(idle) == []  # no registration: a worker's token all the same, never the whole queue
