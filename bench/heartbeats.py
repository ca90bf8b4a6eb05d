"""Heartbeat load (issue 8): N simulated workers heartbeating every I seconds against one operator.

Each simulated worker calls /start once, then heartbeats every I seconds (the first one at a random
moment of the first interval, as a fleet that did not start in the same second). Measured over whole
intervals after one of warm-up: heartbeats served a second, the operator's Lease writes a second (its
own `workerqueue_registry_writes_total`, sampled every second for the peak too), its CPU (fraction of
one core, from /proc/<pid>/stat). The baseline is the same operator idle for the same time, just
before the workers start. Then every worker heartbeats in the same second (a burst) and the peak of
Lease writes in any one second after it is printed: pacing keeps it near N / I.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections.abc import Callable
from typing import TypedDict

import aiohttp

from bench import cluster, procs

START = "/api/v1/worker-queues/{queue_id}/start"
HEARTBEAT = "/api/v1/workers/{worker_id}/heartbeat"
QUEUE_NAME = "heartbeats"


class HeartbeatResult(TypedDict):
    workers: int
    interval_s: float
    measured_s: float
    heartbeats_per_s: float
    writes_per_s: float
    writes_peak_per_s: float
    burst_writes_peak_per_s: float
    idle_cpu: float
    cpu: float
    failures: int


def _writes(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:  # loopback only
        for line in response.read().decode().splitlines():
            if line.startswith("workerqueue_registry_writes_total "):
                return float(line.split()[1])
    return 0.0


def create_queue(kubectl: cluster.Kubectl, namespace: str, interval: int) -> tuple[str, str]:
    """A namespace with one queue (its own token Secret); (queue id, token)."""
    token = f"hb-{random.getrandbits(128):032x}"
    queue_id = f"{namespace}-queue"
    manifest = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {"name": "hb-token", "namespace": namespace}, "stringData": {"token": token}},
        {"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue",
         "metadata": {"name": QUEUE_NAME, "namespace": namespace},
         "spec": {"queueId": queue_id, "heartbeatIntervalSeconds": interval,
                  "temporal": {"host": "temporal.bench.internal:7233", "namespace": "bench"},
                  "auth": {"tokenSecretRefs": [{"name": "hb-token", "key": "token"}]}}},
    ]}
    kubectl("create", "-f", "-", stdin=json.dumps(manifest))
    return queue_id, token


class _Fleet:
    def __init__(self, url: str, queue_id: str, token: str, workers: int, interval: float) -> None:
        self.url, self.queue_id, self.workers, self.interval = url, queue_id, workers, interval
        self.headers = {"Authorization": f"Bearer {token}"}
        self.heartbeats = 0
        self.failures = 0

    async def run(self, session: aiohttp.ClientSession, until: float) -> None:
        async with session.post(self.url + START.format(queue_id=self.queue_id), json={},
                                headers=self.headers) as answer:
            if answer.status != 200:
                self.failures += 1
                return
            worker_id = (await answer.json())["worker_id"]
        body = {"status": "active", "tasks_processed": 0, "current_task_id": None, "worker_metadata": {}}
        next_beat = time.monotonic() + random.uniform(0, self.interval)
        while time.monotonic() < until:
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            async with session.post(self.url + HEARTBEAT.format(worker_id=worker_id), json=body,
                                    headers=self.headers) as answer:
                await answer.read()
                if answer.status == 200:
                    self.heartbeats += 1
                else:
                    self.failures += 1
            next_beat = time.monotonic() + self.interval


async def _drive(url: str, queue_id: str, token: str, *, workers: int, interval: float, measure: float,
                 cpu: Callable[[], float | None], say: Callable[[str], None]) -> HeartbeatResult:
    idle_began, idle_cpu0 = time.monotonic(), cpu() or 0.0
    await asyncio.sleep(min(measure, 10.0))
    idle_cpu = ((cpu() or 0.0) - idle_cpu0) / (time.monotonic() - idle_began)

    fleet = _Fleet(url, queue_id, token, workers, interval)
    warmup = interval + 2.0
    began = time.monotonic()
    until = began + warmup + measure
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        runs = asyncio.gather(*(fleet.run(session, until) for _ in range(workers)))
        await asyncio.sleep(warmup)
        beats0, writes0, cpu0, t0 = fleet.heartbeats, _writes(url), cpu() or 0.0, time.monotonic()
        peak, last = 0.0, writes0
        while time.monotonic() < until - 0.5:
            await asyncio.sleep(1.0)
            now_writes = _writes(url)
            peak, last = max(peak, now_writes - last), now_writes
        elapsed = time.monotonic() - t0
        beats, writes, used = fleet.heartbeats - beats0, _writes(url) - writes0, (cpu() or 0.0) - cpu0
        await runs

        # The burst: every worker heartbeats in the same second (a restarted fleet, a network blip).
        burst_workers = await _burst(session, url, queue_id, fleet, workers)
        burst_peak, last = 0.0, _writes(url)
        for _ in range(int(interval) + 3):
            await asyncio.sleep(1.0)
            now_writes = _writes(url)
            burst_peak, last = max(burst_peak, now_writes - last), now_writes
    say(f"  {workers} workers every {interval:g}s: {beats / elapsed:.0f} heartbeats/s, "
        f"{writes / elapsed:.1f} Lease writes/s (peak {peak:.0f}/s), operator CPU {used / elapsed:.2f} core; "
        f"a burst of {burst_workers} heartbeats peaked at {burst_peak:.0f} writes/s")
    return HeartbeatResult(workers=workers, interval_s=interval, measured_s=elapsed,
                           heartbeats_per_s=beats / elapsed, writes_per_s=writes / elapsed, writes_peak_per_s=peak,
                           burst_writes_peak_per_s=burst_peak, idle_cpu=idle_cpu, cpu=used / elapsed,
                           failures=fleet.failures)


async def _burst(session: aiohttp.ClientSession, url: str, queue_id: str, fleet: _Fleet, workers: int) -> int:
    """Registers `workers` fresh workers, then all of them heartbeat at once; how many were sent."""
    ids: list[str] = []
    for _ in range(workers):
        async with session.post(url + START.format(queue_id=queue_id), json={}, headers=fleet.headers) as answer:
            if answer.status == 200:
                ids.append((await answer.json())["worker_id"])
    body = {"status": "active", "tasks_processed": 0, "current_task_id": None, "worker_metadata": {}}

    async def beat(worker_id: str) -> None:
        async with session.post(url + HEARTBEAT.format(worker_id=worker_id), json=body,
                                headers=fleet.headers) as answer:
            await answer.read()
    await asyncio.gather(*(beat(i) for i in ids))
    return len(ids)


def measure(url: str, pid: int, queue_id: str, token: str, *, workers: int, interval: float, measure: float,
            say: Callable[[str], None]) -> HeartbeatResult:
    return asyncio.run(_drive(url, queue_id, token, workers=workers, interval=interval, measure=measure,
                              cpu=lambda: procs.cpu_seconds(pid), say=say))


def lines(result: HeartbeatResult) -> str:
    r = result
    return "\n".join([
        f"{'worker heartbeats (issue 8)':<52} {'value':>12}",
        f"{'simulated workers, heartbeat interval':<52} {r['workers']:>6} x {r['interval_s']:>3.0f}s",
        f"{'heartbeats served per second':<52} {r['heartbeats_per_s']:>12.1f}",
        f"{'Lease writes per second (target ~ workers / interval)':<52} {r['writes_per_s']:>12.1f}",
        f"{'Lease writes, peak in one second':<52} {r['writes_peak_per_s']:>12.0f}",
        f"{'Lease writes, peak in one second after a burst':<52} {r['burst_writes_peak_per_s']:>12.0f}",
        f"{'operator CPU, idle baseline (cores)':<52} {r['idle_cpu']:>12.3f}",
        f"{'operator CPU, under the heartbeats (cores)':<52} {r['cpu']:>12.3f}",
        f"{'failed calls':<52} {r['failures']:>12}",
    ])
