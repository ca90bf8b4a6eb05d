"""Backlog-driven scaling (issue 9): from a workflow's start to the worker pod created for it.

One single-execution queue with `scaling: {minIdle: 0, max: 1000}` on the real Temporal dev server,
against a running operator. There is no kubelet here: pods stay Pending, so every workflow started
stays in the backlog and asks for one more pod. A watch on the queue's pods records when each first
appears; the k-th pod answers the k-th workflow started. Measured one workflow at a time (the latency
alone, each waiting for its pod) and for a burst started at the same moment. The clock is the
benchmark's own: the time the start call returned (the server holds the workflow) and the time the
watch delivers the pod; how long the burst's start calls themselves took is printed apart. Baseline,
same run: one DescribeTaskQueue round trip to the same Temporal (the floor of any backlog reading).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from kubernetes import config as k8s_config
from temporalio.client import Client

from bench import cluster
from bench import pods as pods_
from workerqueue_operator.core import temporal as temporal_
from workerqueue_operator.devcluster.temporal import TemporalServer

NAMESPACE = "bench-scaling"
QUEUE = "scaling"


class ScalingResult(TypedDict):
    scenario: str
    workflows: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def _result(scenario: str, latencies: list[float]) -> ScalingResult:
    return ScalingResult(scenario=scenario, workflows=len(latencies), **pods_.latency(latencies))


def create_queue(kubectl: cluster.Kubectl, temporal: TemporalServer, task_queue: str) -> None:
    manifest = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue",
         "metadata": {"name": QUEUE, "namespace": NAMESPACE},
         "spec": {"queueId": task_queue, "singleExecution": True,
                  "temporal": {"host": temporal.address, "namespace": temporal.namespace},
                  "scaling": {"minIdle": 0, "max": 1000}}},
    ]}
    kubectl("create", "-f", "-", stdin=json.dumps(manifest))
    kubectl("wait", "--for=condition=TemporalReachable", "--timeout=60s", f"workerqueue/{QUEUE}",
            "-n", NAMESPACE)


async def _drive(kubeconfig: Path, temporal: TemporalServer, task_queue: str, *, one_by_one: int,
                 at_once: int, say: Callable[[str], None]) -> list[ScalingResult]:
    client = await Client.connect(temporal.address, namespace=temporal.namespace)
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    results: list[ScalingResult] = []

    async def start() -> float:
        # Measured from the moment the server has accepted the workflow (the start call returned):
        # a burst of start calls queues up in the dev server itself (seconds for 100, printed apart).
        await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 1},
                                    id=f"bench-{secrets.token_hex(6)}", task_queue=task_queue)
        return time.monotonic()

    try:
        # The baseline: what one reading of the backlog costs.
        probe = temporal_.Temporal()
        endpoint = temporal_.Endpoint(host=temporal.address, namespace=temporal.namespace)
        rounds = []
        for _ in range(20):
            began = time.monotonic()
            await probe.describe_task_queue(endpoint, task_queue)
            rounds.append((time.monotonic() - began) * 1000)
        await probe.close()
        results.append(_result("baseline: one DescribeTaskQueue round trip", rounds))

        with pods_.PodWatch(api, NAMESPACE) as pods:
            latencies = []
            for i in range(one_by_one):
                began = await start()
                seen = await asyncio.to_thread(pods.first, i + 1, 60)
                latencies.append((seen[i] - began) * 1000)
            results.append(_result("one workflow at a time", latencies))
            say(f"  workflow -> pod, one at a time ({one_by_one}): p50 {results[-1]['p50_ms']:.0f} ms, "
                f"p99 {results[-1]['p99_ms']:.0f} ms")
            burst_began = time.monotonic()
            started = sorted(await asyncio.gather(*(start() for _ in range(at_once))))
            say(f"  the {at_once} start calls took {(time.monotonic() - burst_began) * 1000:.0f} ms in all")
            seen = (await asyncio.to_thread(pods.first, one_by_one + at_once, 120 + at_once))[one_by_one:]
            results.append(_result(f"{at_once} workflows started at once",
                                   [(s - b) * 1000 for s, b in zip(seen, started, strict=True)]))
            say(f"  workflow -> pod, {at_once} at once: p50 {results[-1]['p50_ms']:.0f} ms, "
                f"p99 {results[-1]['p99_ms']:.0f} ms")
    finally:
        api.close()
    return results


def measure(kubeconfig: Path, temporal: TemporalServer, task_queue: str, *, one_by_one: int, at_once: int,
            say: Callable[[str], None]) -> list[ScalingResult]:
    return asyncio.run(_drive(kubeconfig, temporal, task_queue, one_by_one=one_by_one, at_once=at_once, say=say))


def lines(results: list[ScalingResult]) -> str:
    rows = [f"{'scale-up latency (workflow started -> pod exists)':<52} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    rows += [f"{r['scenario']:<52} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['max_ms']:>8.0f}" for r in results]
    p50 = next((r["p50_ms"] for r in results if r["scenario"] == "one workflow at a time"), None)
    if p50 is not None:
        rows.append(f"goal: p50 under 2000 ms: {'met' if p50 < 2000 else 'MISSED'}")
    return "\n".join(rows)
