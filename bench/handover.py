"""Handover between two replicas under kopf peering (issue 11): how long workers go unreplaced after the
active replica is SIGKILLed.

Two operators share a peering object; a single-execution queue has one worker pod. At a random
moment of the active replica's keep-alive cycle it is SIGKILLed and the worker pod deleted at once;
the figure is the time until the standby has created the replacement pod (so it includes kopf's
resumption and re-list, not only the peering verdict). Measured with the operator's peering lifetime
and, as the baseline in the same run, with kopf's default lifetime (60 s), which the operator used
before.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from bench.cluster import Kubectl
from workerqueue_operator.devcluster import controlplane

CHART_CRDS = "charts/workerqueue-operator/crds"
PEERING = "bench-peering"
NAMESPACE = "bench-handover"
KOPF_DEFAULT_LIFETIME = 60


class HandoverResult(TypedDict):
    lifetime_seconds: int | None
    """The peering lifetime the replicas ran with; None: the operator's default."""
    samples: list[float]
    p50_s: float
    max_s: float


@dataclass
class Replica:
    url: str
    pid: int
    alive: Callable[[], None]


StartReplica = Callable[[str, int, dict[str, str]], Replica]
"""(name, priority, extra env) -> a started replica."""
Kill = Callable[[Replica], None]


def _metric(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:  # loopback only
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else None


def _wait(predicate: Callable[[], bool], what: str, timeout: float, poll: float = 0.1) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
    return time.monotonic()


def _pods(kubectl: Kubectl) -> list[str]:
    """The queue's worker pods that are not being deleted."""
    listed = json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l", "agentcontrol.dev/queue=handover",
                                "-o", "json"))
    return sorted(p["metadata"]["name"] for p in listed["items"] if not p["metadata"].get("deletionTimestamp"))


def prepare(kubectl: Kubectl, root: str) -> None:
    kubectl("apply", "--server-side", "-f", f"{root}/{CHART_CRDS}")
    controlplane.wait_established(kubectl, "clusterkopfpeerings.kopf.dev")
    kubectl("create", "namespace", NAMESPACE)
    kubectl("apply", "-f", "-", stdin=f"""
apiVersion: kopf.dev/v1
kind: ClusterKopfPeering
metadata: {{name: {PEERING}}}
---
apiVersion: agentcontrol.dev/v1alpha1
kind: WorkerQueue
metadata: {{name: handover, namespace: {NAMESPACE}}}
spec:
  singleExecution: true
  temporal: {{host: "temporal.bench.internal:7233", namespace: bench}}
""")


def measure(kubectl: Kubectl, *, start: StartReplica, kill: Kill, samples: int, lifetime: int | None,
            say: Callable[[str], None]) -> HandoverResult:
    env = {"WQ_NAMESPACES": NAMESPACE}
    if lifetime is not None:
        env["WQ_PEERING_LIFETIME_SECONDS"] = str(lifetime)
    timeout = (lifetime or 30) + 90.0
    standby = start("standby", 1, env)
    times: list[float] = []
    try:
        for i in range(samples):
            leader = start(f"leader-{i}", 2, env)
            _wait(lambda r=leader: _metric(r.url, "workerqueue_active_replica") == 1  # type: ignore[misc]
                  and _metric(standby.url, "workerqueue_active_replica") == 0, "the leader leading", timeout)
            _wait(lambda: len(_pods(kubectl)) == 1, "one worker pod", timeout)
            (pod,) = _pods(kubectl)
            # Anywhere in the leader's keep-alive cycle, as a crash would be.
            time.sleep(random.uniform(0, max(1.0, (lifetime or KOPF_DEFAULT_LIFETIME) - 5)))
            leader.alive()
            kill(leader)
            killed = time.monotonic()
            kubectl("delete", "pod", "-n", NAMESPACE, pod, "--wait=false")
            done = _wait(lambda old=pod: any(p != old for p in _pods(kubectl)),  # type: ignore[misc]
                         "the standby's replacement pod", timeout, poll=0.2)
            times.append(done - killed)
            say(f"  handover {i + 1}/{samples} (lifetime {lifetime or 'default'}): {times[-1]:.1f}s")
            # The standby leads now; the next leader (priority 2) takes over from it.
    finally:
        kill(standby)
    return HandoverResult(lifetime_seconds=lifetime, samples=times, p50_s=statistics.median(times),
                          max_s=max(times))


def lines(results: list[HandoverResult]) -> str:
    rows = ["handover after SIGKILL of the active replica (killed -> replacement pod exists)"]
    for r in results:
        which = ("operator default" if r["lifetime_seconds"] is None
                 else f"lifetime {r['lifetime_seconds']} s (kopf's default, before)")
        rows.append(f"  {which}: p50 {r['p50_s']:.1f}s, max {r['max_s']:.1f}s over {len(r['samples'])} samples")
    return "\n".join(rows)
