"""A watch on a namespace's pods that records when each pod first appears (the benchmarks' clock)."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import TypedDict

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

QUEUE_LABEL = "agentcontrol.dev/queue"


class Latency(TypedDict):
    p50_ms: float
    p99_ms: float
    max_ms: float


def latency(values_ms: list[float]) -> Latency:
    """p50 (median), nearest-rank p99 and max of a non-empty list of milliseconds."""
    ordered = sorted(values_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return Latency(p50_ms=statistics.median(ordered), p99_ms=p99, max_ms=ordered[-1])


class PodWatch:
    """When each pod of `namespace` (with the queue label) was first seen, in order of appearance."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self._core = k8s.CoreV1Api(api)
        self._namespace = namespace
        self._order: list[float] = []
        self._by_queue: dict[str, float] = {}
        self._names: set[str] = set()
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
            meta = event["object"].metadata
            with self._lock:
                if meta.name not in self._names:
                    now = time.monotonic()
                    self._names.add(meta.name)
                    self._order.append(now)
                    self._by_queue.setdefault((meta.labels or {}).get(QUEUE_LABEL, ""), now)
                    self._lock.notify_all()

    def _wait(self, done: Callable[[], bool], missing: Callable[[], str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{missing()} within {timeout:.0f}s")
            self._lock.wait(left)

    def first_of_queues(self, queues: list[str], timeout: float) -> dict[str, float]:
        """When the first pod of each queue appeared, waiting for all of them."""
        with self._lock:
            self._wait(lambda: all(q in self._by_queue for q in queues),
                       lambda: f"no worker pod for {sum(q not in self._by_queue for q in queues)} queues", timeout)
            return {q: self._by_queue[q] for q in queues}

    def first(self, count: int, timeout: float) -> list[float]:
        """When the first `count` pods appeared, waiting for them."""
        with self._lock:
            self._wait(lambda: len(self._order) >= count, lambda: f"{len(self._order)} pods of {count}", timeout)
            return list(self._order[:count])
