"""The real worker against the operator, unchanged: `kubiya-control-plane-worker` of
kubiya-control-plane-api 1.0.2 from PyPI (installed by hack/real-worker.sh), the real Temporal dev
server, and a stand-in upstream control plane (tests/standin.py) for its activities' calls, which
the operator passes through. What worker-protocol.md describes is here done by the worker itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from tests import standin
from tests.integration.conftest import Kube, OperatorProcess, wait_for
from tests.integration.test_start import service_account_token
from workerqueue_operator.core.temporal import Endpoint, Temporal
from workerqueue_operator.core.workers import label_value
from workerqueue_operator.devcluster import procs
from workerqueue_operator.devcluster.kubelet import LocalKubelet
from workerqueue_operator.devcluster.temporal import TemporalServer

pytestmark = pytest.mark.usefixtures("operator")

# The worker's own words for a call the control plane did not answer as it expects.
COMPLAINTS = ("heartbeat_failed", "heartbeat_error", "sdk_version_mismatch", "disconnect_notification_failed",
              "control_plane_connection_failed", "worker_failed", "websocket_connect_failed")
# No internet here: LiteLLM reads its model prices from the copy it ships instead of GitHub.
OFFLINE = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
STARTUP_TIMEOUT = 120  # its imports take ~10 s of CPU; more on a loaded 2-core machine


@pytest.fixture(scope="module")
def upstream() -> Iterator[standin.StandIn]:
    with standin.StandIn() as server:
        yield server


def create_queue(kube: Kube, namespace: str, name: str, temporal: TemporalServer, upstream: standin.StandIn,
                 **spec: object) -> tuple[str, str]:
    """A Ready queue on the session's Temporal whose upstream is the stand-in; (queue id, org key)."""
    org_key = f"org-{secrets.token_hex(8)}"
    kube.put_secret(namespace, "org", key=org_key)
    queue_id = f"{name}-{namespace}"
    kube.create_queue(namespace, name, queueId=queue_id, heartbeatIntervalSeconds=10,
                      temporal={"host": temporal.address, "namespace": temporal.namespace},
                      upstream={"url": upstream.url, "apiKeySecretRef": {"name": "org", "key": "key"}}, **spec)
    kube.wait_condition(namespace, name, "True")
    return queue_id, org_key


async def start_agent_workflow(temporal: TemporalServer, task_queue: str) -> WorkflowHandle[Any, Any]:
    """An AgentExecutionWorkflow with the input worker-protocol.md gives; its id is its execution's."""
    workflow_id = f"exec-{secrets.token_hex(4)}"
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    return await client.start_workflow(
        "AgentExecutionWorkflow",
        {"agent_id": "agent-1", "organization_id": "org-test", "prompt": "hi", "execution_id": workflow_id},
        id=workflow_id, task_queue=task_queue)


async def run_agent_workflow(temporal: TemporalServer, task_queue: str) -> str:
    """The same, once it completed; returns its id."""
    handle = await start_agent_workflow(temporal, task_queue)
    await asyncio.wait_for(handle.result(), 120)
    return handle.id


async def poller_identities(temporal: TemporalServer, task_queue: str) -> set[str]:
    access = Temporal(timeout=5.0)
    try:
        info = await access.describe_task_queue(Endpoint(temporal.address, temporal.namespace), task_queue)
    finally:
        await access.close()
    return {poller.identity for poller in info.pollers}


def real_worker_pods(kubelet: Callable[..., LocalKubelet], operator: OperatorProcess, namespace: str,
                     real_worker: Path) -> LocalKubelet:
    """The local kubelet running the operator's pods as the real worker, with the pod's own environment
    (its per-worker token, SINGLE_EXECUTION, HEARTBEAT_INTERVAL, TEMPORAL_HOST) and hostname; only the
    URL of the operator's Service is replaced by its loopback address. Skips where hostnames cannot be set."""
    runner = kubelet(namespaces=[namespace], command=[str(real_worker)], env=OFFLINE,
                     overrides={"CONTROL_PLANE_URL": operator.url})
    if not runner.sets_hostname:
        pytest.skip("the local kubelet cannot give a process its pod's hostname here (needs CAP_SYS_ADMIN, as "
                    "root): the real worker's Temporal identity would carry this machine's name")
    return runner


def worker_ready(runner: LocalKubelet, namespace: str, pod: str) -> bool:
    proc = runner.process(namespace, pod)
    return proc is not None and "worker_ready" in proc.log_path.read_text(errors="replace")


def plain(text: str) -> str:
    """The worker's log without its terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def heartbeats(kube: Kube, namespace: str, worker_id: str) -> bool:
    """Whether the worker's registration was renewed by a heartbeat since /start."""
    lease = kube.registrations(namespace).get(worker_id)
    return lease is not None and lease.spec.renew_time > lease.spec.acquire_time


def complaints(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(word in line for word in COMPLAINTS)]


def forwarded(upstream: standin.StandIn, method: str, path: str) -> list[str | None]:
    """The Authorization headers the stand-in received for `method path`."""
    return [auth for m, p, auth in upstream.received if m == method and p == path]


@contextlib.contextmanager
def worker_process(command: Path, log_path: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """The real worker run as `kubiya worker start` runs it, in a process group of its own."""
    base = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    with log_path.open("ab") as log:
        popen = subprocess.Popen([str(command)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env={**base, "HOME": str(log_path.parent), **OFFLINE, **env},
                                 cwd=log_path.parent, start_new_session=True,
                                 preexec_fn=procs.die_with_parent(os.getpid()))
    try:
        yield popen
    finally:
        procs.terminate(popen)


async def test_the_real_worker_registers_heartbeats_and_runs_a_workflow_through_the_operator(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer, upstream: standin.StandIn,
        real_worker: Path, tmp_path: Path):
    queue_id, org_key = create_queue(kube, namespace, "real", temporal, upstream, websocket={"enabled": True})
    token = kube.queue_token(namespace, "real")
    log_path = tmp_path / "worker.log"
    # As a user runs it outside the cluster, against a plaintext Temporal ("temporal:" picks the mode;
    # the address is the answer's temporal_host).
    with worker_process(real_worker, log_path, KUBIYA_API_KEY=token, CONTROL_PLANE_URL=operator.url,
                        QUEUE_ID=queue_id, HEARTBEAT_INTERVAL="5", TEMPORAL_HOST="temporal:local") as worker:
        def log() -> str:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{procs.tail(log_path)}"
            return log_path.read_text(errors="replace")

        wait_for(lambda: "worker_ready" in log(), timeout=STARTUP_TIMEOUT, interval=1, what="the worker ready")
        [worker_id] = wait_for(lambda: list(kube.registrations(namespace)), what="its registration")
        assert re.search(rf"worker_registered .*worker_id=\S*{worker_id[:8]}", plain(log()))
        wait_for(lambda: heartbeats(kube, namespace, worker_id), timeout=30, what="a heartbeat renewing it")
        # Its websocket, opened at the operator, reaches the upstream with the organization's key.
        wait_for(lambda: forwarded(upstream, "GET", f"/api/v1/ws/workers/{worker_id}"), what="its websocket upstream")
        assert set(forwarded(upstream, "GET", f"/api/v1/ws/workers/{worker_id}")) == {f"Bearer {org_key}"}
        assert "websocket_connected" in log()
        assert f"{worker.pid}@{socket.gethostname()}" in await poller_identities(temporal, queue_id)

        # Its activities' calls reach the upstream through the operator, with the organization's
        # key in place of the worker's token; the workflow completes (reporting the execution failed
        # for lack of an LLM, as worker-protocol.md says).
        workflow_id = await run_agent_workflow(temporal, queue_id)
        auth = forwarded(upstream, "PATCH", f"/api/v1/executions/{workflow_id}")
        assert auth and set(auth) == {f"Bearer {org_key}"}
        assert token not in str(upstream.received)

        # Still registered and heartbeating a few intervals on, and it never complained.
        renewed = kube.registrations(namespace)[worker_id].spec.renew_time
        wait_for(lambda: kube.registrations(namespace)[worker_id].spec.renew_time > renewed, timeout=30,
                 what="another heartbeat")
        assert complaints(log()) == []
        assert [e for e in kube.events(namespace, "real") if e.reason in ("WorkerExpired", "WorkerRejoined")] == []

        # An upgrade restarts the operator: the worker lives on. The heartbeats it sends meanwhile fail
        # (it logs them and goes on); the next one renews the same registration, its websocket is
        # opened again, and work still reaches it.
        operator.stop()
        operator.start()
        renewed = kube.registrations(namespace)[worker_id].spec.renew_time
        wait_for(lambda: kube.registrations(namespace)[worker_id].spec.renew_time > renewed, timeout=30,
                 what="a heartbeat after the restart")
        listed = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
        assert [w["id"] for w in listed] == [worker_id]
        second = await run_agent_workflow(temporal, queue_id)
        assert forwarded(upstream, "PATCH", f"/api/v1/executions/{second}")
        wait_for(lambda: len(forwarded(upstream, "GET", f"/api/v1/ws/workers/{worker_id}")) >= 2, timeout=60,
                 what="its websocket opened again")
        assert [e for e in kube.events(namespace, "real") if e.reason in ("WorkerExpired", "WorkerRejoined")] == []


async def test_a_real_single_execution_worker_signed_in_as_a_service_account_runs_its_workflow_and_exits(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer, upstream: standin.StandIn,
        real_worker: Path, tmp_path: Path):
    # Run with a ServiceAccount's token and the one Role its /start needs: its heartbeats, its polls
    # of /executions and its activities' calls (passed through to the queue's upstream) all take it.
    queue_id, org_key = create_queue(kube, namespace, "sa", temporal, upstream, websocket={"enabled": True})
    kube.grant(namespace, "sa-start", resource="workerqueues/start", verb="create", queue="sa", account="runner")
    token = service_account_token(kube, namespace, "runner")
    log_path = tmp_path / "worker.log"
    with worker_process(real_worker, log_path, KUBIYA_API_KEY=token, CONTROL_PLANE_URL=operator.url,
                        QUEUE_ID=queue_id, HEARTBEAT_INTERVAL="5", TEMPORAL_HOST="temporal:local",
                        SINGLE_EXECUTION="true") as worker:
        def log() -> str:
            return log_path.read_text(errors="replace")

        wait_for(lambda: worker.poll() is None and "worker_ready" in log(), timeout=STARTUP_TIMEOUT, interval=1,
                 what="the worker ready")
        [worker_id] = wait_for(lambda: list(kube.registrations(namespace)), what="its registration")
        wait_for(lambda: heartbeats(kube, namespace, worker_id), timeout=30, what="a heartbeat renewing it")
        workflow_id = await run_agent_workflow(temporal, queue_id)
        auth = forwarded(upstream, "PATCH", f"/api/v1/executions/{workflow_id}")
        assert auth and set(auth) == {f"Bearer {org_key}"}
        assert token not in str(upstream.received)
        # It saw its own execution end (twice, 2 s apart), said goodbye and exited 0.
        wait_for(lambda: worker.poll() is not None, timeout=60, interval=1, what="the worker's exit")
        assert worker.returncode == 0, procs.tail(log_path)
        assert complaints(log()) == [], complaints(log())
    # Its disconnect ended its registration, and is told (an Event posted in the background).
    wait_for(lambda: worker_id not in kube.registrations(namespace), what="its registration ended")
    wait_for(lambda: [e for e in kube.events(namespace, "sa") if e.reason == "WorkerDisconnected"],
             what="a WorkerDisconnected Event")


# A pool of two; and one whose pods' names are longer than a hostname (63 characters), which
# Kubernetes would cut to one and the same for both pods.
@pytest.mark.parametrize("name", ["pool", "long-" + "q" * 57])
async def test_a_pool_of_real_single_execution_worker_pods_turns_over_one_worker_per_workflow(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer, upstream: standin.StandIn,
        real_worker: Path, kubelet: Callable[..., LocalKubelet], name: str):
    queue_id, _ = create_queue(kube, namespace, name, temporal, upstream, singleExecution=True, replicas=2)
    runner = real_worker_pods(kubelet, operator, namespace, real_worker)
    pods = [f"{name}-w0", f"{name}-w1"]

    def registered_pods() -> set[str]:
        return {lease.metadata.labels.get("agentcontrol.dev/pod") for lease in kube.registrations(namespace).values()}

    wait_for(lambda: registered_pods() == {label_value(p) for p in pods}
             and all(worker_ready(runner, namespace, p) for p in pods),
             timeout=STARTUP_TIMEOUT, interval=1, what="two workers registered and ready")
    procs_ = {pod: runner.process(namespace, pod) for pod in pods}

    workflow_id = await run_agent_workflow(temporal, queue_id)
    assert forwarded(upstream, "PATCH", f"/api/v1/executions/{workflow_id}")
    # The worker that ran it reads it finished on two polls (2 s apart), waits 2 s, disconnects and
    # exits 0: its pod Succeeded and is gone, its registration ended, a fresh worker takes its place.
    # The other one never sees that execution, so it stays.
    def exited() -> list[str]:
        return [pod for pod, proc in procs_.items() if proc is not None and proc.popen.poll() is not None]

    wait_for(exited, timeout=30, interval=0.5, what="the worker that ran it exits")
    await asyncio.sleep(6)  # three more polls: a worker shown another's execution would exit by now
    [finished] = exited()
    [staying] = [pod for pod in pods if pod != finished]
    first = procs_[finished]
    assert first is not None and first.popen.returncode == 0, procs.tail(first.log_path)
    assert procs_[staying] is not None and procs_[staying].popen.poll() is None
    wait_for(lambda: finished not in kube.pod_names(namespace, name, alive=False), timeout=15, what=f"{finished} gone")
    disconnects = kube.wait_events(namespace, name, "WorkerDisconnected")
    assert len(disconnects) == 1 and "exit code 0" in disconnects[0].message, disconnects
    assert kube.workers(namespace, name)["succeeded"] == 1
    log = first.log_path.read_text(errors="replace")
    assert complaints(log) == [] and "worker_disconnected" in log
    wait_for(lambda: registered_pods() == {label_value(staying), label_value(f"{name}-w2")}, timeout=STARTUP_TIMEOUT,
             interval=1, what="the next worker")


async def test_a_real_worker_of_an_ephemeral_single_execution_queue_runs_once_and_the_queue_goes(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer, upstream: standin.StandIn,
        real_worker: Path, kubelet: Callable[..., LocalKubelet]):
    queue_id, _ = create_queue(kube, namespace, "once", temporal, upstream, ephemeral=True, singleExecution=True)
    runner = real_worker_pods(kubelet, operator, namespace, real_worker)
    wait_for(lambda: worker_ready(runner, namespace, "once-w0"), timeout=STARTUP_TIMEOUT, interval=1,
             what="once-w0's worker ready")
    proc = runner.process(namespace, "once-w0")
    assert proc is not None
    await run_agent_workflow(temporal, queue_id)
    assert proc.popen.wait(30) == 0, procs.tail(proc.log_path)
    # Its one worker succeeded: the queue is deleted, and with it (garbage collection) its token Secrets.
    wait_for(lambda: not kube.queue_exists(namespace, "once"), timeout=30, what="the ephemeral queue deleted")
    wait_for(lambda: not kube.has_secret(namespace, "once-worker-token"), timeout=30, what="its token Secret gone")
    assert runner.process(namespace, "once-w1") is None  # one worker, once
    assert complaints(proc.log_path.read_text(errors="replace")) == []


def test_a_real_worker_told_its_queue_is_full_says_why_and_exits_1(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer, upstream: standin.StandIn,
        real_worker: Path, tmp_path: Path):
    queue_id, _ = create_queue(kube, namespace, "full", temporal, upstream, maxWorkers=1)
    token = kube.queue_token(namespace, "full")
    assert operator.start_worker(queue_id, token).status == 200  # the one slot, taken
    log_path = tmp_path / "worker.log"
    with worker_process(real_worker, log_path, KUBIYA_API_KEY=token, CONTROL_PLANE_URL=operator.url,
                        QUEUE_ID=queue_id, TEMPORAL_HOST="temporal:local") as worker:
        assert worker.wait(STARTUP_TIMEOUT) == 1  # worker-protocol.md: anything but 200 is exit 1, no retry
    log = plain(log_path.read_text(errors="replace"))
    assert "Worker queue 'full' is full (maxWorkers=1)" in log  # the contract's `detail`, as it prints it
    assert "status_code=409" in log


async def test_a_busy_real_worker_of_a_scaling_queue_is_never_scaled_down_whatever_the_queue_name(
        operator: OperatorProcess, kube: Kube, namespace: str, temporal: TemporalServer, upstream: standin.StandIn,
        real_worker: Path, kubelet: Callable[..., LocalKubelet]):
    # Its pods' names are longer than a hostname: the operator knows a busy worker by its pod's
    # hostname in its Temporal identity, not by the pod's name.
    name = "busy-" + "q" * 57
    kube.put_secret(namespace, "llm", key="llm-key")
    # An LLM proxy that never answers keeps the workflow running; the operator lets idle workers go
    # after 3 s here (WQ_SCALE_DOWN_GRACE_SECONDS).
    llm = {"url": f"{upstream.url}/hang", "apiKeySecretRef": {"name": "llm", "key": "key"}}
    queue_id, _ = create_queue(kube, namespace, name, temporal, upstream, singleExecution=True,
                               scaling={"minIdle": 0, "max": 2}, litellm=llm)
    runner = real_worker_pods(kubelet, operator, namespace, real_worker)
    handle = await start_agent_workflow(temporal, queue_id)
    try:
        pod = f"{name}-w0"
        wait_for(lambda: any(p.endswith("/hang/chat/completions") for _, p, _ in upstream.received),
                 timeout=STARTUP_TIMEOUT, interval=1, what="the workflow running, its LLM call waiting")
        assert kube.pod_names(namespace, name) == [pod]
        wait_for(lambda: (kube.get_queue(namespace, name).get("status") or {}).get("temporal", {}).get("busy") == 1,
                 timeout=30, what="the operator seeing it busy")
        await asyncio.sleep(10)  # three times the grace and a few probes: an idle worker would be gone
        assert kube.pod_names(namespace, name) == [pod]
        assert not [e for e in kube.events(namespace, name) if e.reason == "ScaledDown"]
        proc = runner.process(namespace, pod)
        assert proc is not None and proc.popen.poll() is None
    finally:
        await handle.terminate("the test is over")
