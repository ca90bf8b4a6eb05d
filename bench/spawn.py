"""Worker-pod spawn latency (issue 4): from a WorkerQueue's creation to its pod object existing.

Single-execution queues are created against a running operator while a watch on pods records when
each worker pod first appears. Measured once queue by queue (the latency alone) and once with many
queues created at the same moment (the operator's parallelism). The clock is the benchmark's own:
the time before the create call and the time the watch delivers the pod.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

QUEUE_LABEL = "agentcontrol.dev/queue"


class SpawnResult(TypedDict):
    scenario: str
    queues: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class PodWatch:
    """Records when each worker pod of a namespace is first seen, by its queue's name."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self._core = k8s.CoreV1Api(api)
        self._namespace = namespace
        self._seen: dict[str, float] = {}
        self._lock = threading.Condition()
        self._watch = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._stopping = False

    def __enter__(self) -> PodWatch:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self._watch.stop()  # type: ignore[no-untyped-call]
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._stream()
        except Exception as exc:  # the stream ends when the namespace goes; a waiter times out otherwise
            if not self._stopping:
                print(f"pod watch ended: {exc}", file=sys.stderr)
        finally:
            self._ready.set()

    def _stream(self) -> None:
        listing = self._core.list_namespaced_pod(self._namespace, label_selector=QUEUE_LABEL)
        self._ready.set()
        version = listing.metadata.resource_version if listing.metadata else None
        for event in self._watch.stream(  # type: ignore[no-untyped-call]
                self._core.list_namespaced_pod, self._namespace, label_selector=QUEUE_LABEL,
                timeout_seconds=600, resource_version=version):
            labels = event["object"].metadata.labels or {}
            with self._lock:
                self._seen.setdefault(labels.get(QUEUE_LABEL, ""), time.monotonic())
                self._lock.notify_all()

    def wait(self, queues: list[str], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not all(q in self._seen for q in queues):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [q for q in queues if q not in self._seen]
                    raise RuntimeError(f"no worker pod within {timeout:.0f}s for {len(missing)} queues")
                self._lock.wait(left)
            return {q: self._seen[q] for q in queues}


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
        with PodWatch(api, namespace) as pods:
            latencies = []
            for i in range(one_by_one):
                name = f"single-{i:03d}"
                began = create(name)
                latencies.append((pods.wait([name], timeout)[name] - began) * 1000)
            results.append(_result("one queue at a time", 1, latencies))
            say(f"  spawn, one queue at a time ({one_by_one} samples): p50 {results[-1]['p50_ms']:.0f} ms")

            names = [f"burst-{i:03d}" for i in range(at_once)]
            with ThreadPoolExecutor(16) as pool:
                created = dict(zip(names, pool.map(create, names), strict=True))
            seen = pods.wait(names, timeout + at_once)
            results.append(_result(f"{at_once} queues created at once", at_once,
                                   [(seen[n] - created[n]) * 1000 for n in names]))
            say(f"  spawn, {at_once} at once: p50 {results[-1]['p50_ms']:.0f} ms, p99 {results[-1]['p99_ms']:.0f} ms")
    finally:
        core.delete_namespace(namespace)
        api.close()
    return results


def _result(scenario: str, queues: int, latencies: list[float]) -> SpawnResult:
    return SpawnResult(scenario=scenario, queues=queues, p50_ms=statistics.median(latencies),
                       p99_ms=_percentile(latencies, 0.99), max_ms=max(latencies))


def lines(results: list[SpawnResult]) -> str:
    rows = [f"{'spawn latency (WorkerQueue created -> pod exists)':<52} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    rows += [f"{r['scenario']:<52} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['max_ms']:>8.0f}" for r in results]
    return "\n".join(rows)
