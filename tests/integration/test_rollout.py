"""A rollout of the operator under live workers, as a Deployment makes it with the chart's defaults
(one replica, a surge of one): the new replica starts, the old one is sent SIGTERM while the
Service still sends it connections, then the Service's endpoints move. The workers are the
protocol-faithful test worker, run by the local kubelet, calling the operator through a TCP proxy
that stands for the Service: nothing they do may be refused or lost on the way."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from tests.integration.conftest import Kube, OperatorProcess, http, wait_for
from tests.integration.test_worker_life import queue_spec, registered_pods, run_workflow
from tests.proxy import Proxy
from workerqueue_operator.devcluster.kubelet import LocalKubelet
from workerqueue_operator.devcluster.temporal import TemporalServer

DRAIN_SECONDS = 25


def served(op: OperatorProcess) -> dict[tuple[str, str], int]:
    """(route, status code) -> requests this operator answered."""
    counts: dict[tuple[str, str], int] = {}
    for labels, count in op.samples("workerqueue_http_requests_total"):
        key = (labels["route"], labels["code"])
        counts[key] = counts.get(key, 0) + int(count)
    return counts


def last_served(op: OperatorProcess, within: float) -> dict[tuple[str, str], int]:
    """What `served` reads last before the operator stops listening, which it must within `within`
    seconds (the Service sends it nothing new by then: just its kept connections' last requests)."""
    last: dict[tuple[str, str], int] = {}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            last = served(op)
        except OSError:
            return last
        time.sleep(0.1)
    raise AssertionError(f"still listening {within:.0f}s later")


def answered(op: OperatorProcess, route: str) -> int:
    return sum(n for (r, code), n in served(op).items() if r == route and code.startswith("2"))


def failures(counts: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """The answers other than 2xx, but for /readyz (503 while draining, as it should)."""
    return {(route, code): n for (route, code), n in counts.items() if code[0] != "2" and route != "/readyz"}


START = "/api/v1/worker-queues/{queue_id}/start"
HEARTBEAT = "/api/v1/workers/{worker_id}/heartbeat"
EXECUTIONS = "/api/v1/worker-queues/{queue_id}/executions"


@pytest.fixture
def service() -> Iterator[Proxy]:
    proxy = Proxy(("127.0.0.1", 1))  # its endpoint is set once the old replica listens
    try:
        yield proxy
    finally:
        proxy.close()


async def test_workers_live_on_through_a_rollout_of_the_operator(
    kubeconfig: Path, crd_installed: None, kube: Kube, namespace: str, tmp_path: Path, operator: OperatorProcess,
    temporal: TemporalServer, kubelet: Callable[..., LocalKubelet], service: Proxy,
):
    queue_id = f"roll-{namespace}"
    env = {"WQ_NAMESPACES": namespace, "WQ_HTTP_DRAIN_SECONDS": str(DRAIN_SECONDS)}
    old = OperatorProcess(kubeconfig, tmp_path / "old.log", env=env)
    new = OperatorProcess(kubeconfig, tmp_path / "new.log", env=env)
    with operator.paused():  # the session's operator would keep these pods and statuses too
        try:
            old.start()
            service.retarget(("127.0.0.1", old.port))
            kube.create_queue(namespace, "roll", **queue_spec(temporal, queue_id))
            pods = kubelet(namespaces=[namespace], overrides={"CONTROL_PLANE_URL": f"http://127.0.0.1:{service.port}"})
            wait_for(lambda: registered_pods(kube, namespace) == {"roll-w0"}, timeout=60, what="roll-w0 registered")
            # An execution that runs through the whole rollout.
            client = await Client.connect(temporal.address, namespace=temporal.namespace)
            through = await client.start_workflow(
                "AgentExecutionWorkflow", {"duration_seconds": DRAIN_SECONDS + 10},
                id=f"through-{secrets.token_hex(4)}", task_queue=queue_id)

            new.start()
            assert old.process is not None
            os.killpg(old.process.pid, signal.SIGTERM)
            wait_for(lambda: http("GET", f"{old.url}/readyz", timeout=2).status == 503, timeout=30, interval=0.1,
                     what="the old replica draining")
            # Endpoints lag: a worker that starts now reaches the old replica, and is started there.
            kube.patch_queue(namespace, "roll", {"replicas": 2})
            wait_for(lambda: registered_pods(kube, namespace) == {"roll-w0", "roll-w1"}, timeout=DRAIN_SECONDS - 5,
                     what="roll-w1 registered")
            assert answered(old, START) == 2 and answered(new, START) == 0
            assert old.process.poll() is None

            service.retarget(("127.0.0.1", new.port))
            # The old replica closed each connection after its answer: the workers' next polls come
            # through the Service to the new one, long before the old one stops listening.
            wait_for(lambda: answered(new, EXECUTIONS) >= 2, timeout=30, what="polls reaching the new replica")
            assert old.process.poll() is None  # before the old one stopped listening: still draining
            last = await asyncio.to_thread(last_served, old, DRAIN_SECONDS)  # what it answered, until it closed
            assert await asyncio.to_thread(old.process.wait, 20) == 0
            assert failures(last) == {}
            # Both workers carry on with the new replica: their heartbeats are taken, no registration
            # expires, and each runs one execution to its end.
            await asyncio.wait_for(through.result(), 60)
            # (Once roll-w0 is gone: its Temporal worker, still polling, would take the next one too.)
            wait_for(lambda: kube.workers(namespace, "roll").get("succeeded") == 1, timeout=30, what="roll-w0 done")
            await run_workflow(temporal, queue_id, f"after-{secrets.token_hex(4)}")
            wait_for(lambda: kube.workers(namespace, "roll").get("succeeded") == 2, timeout=30,
                     what="both workers done, each after its execution")
            assert answered(new, HEARTBEAT) > 0
            assert failures(served(new)) == {}
            assert not {e.reason for e in kube.events(namespace) if e.type == "Warning"}
            # Nor did any worker find a call unanswered (it would log a WARNING and go on).
            complaints = [line for log in pods.state_dir.glob("*.log") for line in log.read_text().splitlines()
                          if " WARNING " in line or " ERROR " in line]
            assert complaints == []
            assert kube.workers(namespace, "roll")["failed"] == 0
            # And the workers that replace them start on the new replica.
            wait_for(lambda: answered(new, START) == 2 and len(registered_pods(kube, namespace)) == 2, timeout=60,
                     what="the next two workers registered")
        finally:
            new.stop()
            old.stop()
