"""Worker-pod spawn latency (issue 4): from a WorkerQueue's creation to its pod object existing.

Single-execution queues are created against a running operator while a watch on pods records when
each worker pod first appears. Measured once queue by queue (the latency alone) and once with many
queues created at the same moment (the operator's parallelism). The clock is the benchmark's own:
the time before the create call and the time the watch delivers the pod.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from bench import pods as pods_


class SpawnResult(TypedDict):
    scenario: str
    queues: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def _queue(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"singleExecution": True, "replicas": 1,
                 "temporal": {"host": "temporal.bench.internal:7233", "namespace": "bench"}},
    }


def measure(kubeconfig: Path, *, one_by_one: int, at_once: int, say: Callable[[str], None],
            timeout: float = 120) -> list[SpawnResult]:
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)
    namespace = "bench-spawn"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    results: list[SpawnResult] = []

    def create(name: str) -> float:
        began = time.monotonic()
        custom.create_namespaced_custom_object("agentcontrol.dev", "v1alpha1", namespace, "workerqueues",
                                               _queue(namespace, name))
        return began

    try:
        with pods_.PodWatch(api, namespace) as pods:
            latencies = []
            for i in range(one_by_one):
                name = f"single-{i:03d}"
                began = create(name)
                latencies.append((pods.first_of_queues([name], timeout)[name] - began) * 1000)
            results.append(_result("one queue at a time", 1, latencies))
            say(f"  spawn, one queue at a time ({one_by_one} samples): p50 {results[-1]['p50_ms']:.0f} ms")

            names = [f"burst-{i:03d}" for i in range(at_once)]
            with ThreadPoolExecutor(16) as pool:
                created = dict(zip(names, pool.map(create, names), strict=True))
            seen = pods.first_of_queues(names, timeout + at_once)
            results.append(_result(f"{at_once} queues created at once", at_once,
                                   [(seen[n] - created[n]) * 1000 for n in names]))
            say(f"  spawn, {at_once} at once: p50 {results[-1]['p50_ms']:.0f} ms, p99 {results[-1]['p99_ms']:.0f} ms")
    finally:
        core.delete_namespace(namespace)
        api.close()
    return results


def _result(scenario: str, queues: int, latencies: list[float]) -> SpawnResult:
    return SpawnResult(scenario=scenario, queues=queues, **pods_.latency(latencies))


def lines(results: list[SpawnResult]) -> str:
    rows = [f"{'spawn latency (WorkerQueue created -> pod exists)':<52} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    rows += [f"{r['scenario']:<52} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['max_ms']:>8.0f}" for r in results]
    return "\n".join(rows)
