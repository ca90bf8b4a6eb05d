"""The benchmark's objects on the control plane, through the assets' kubectl.

N WorkerQueues in one namespace, each with its own queueId and Temporal host/namespace, all opened
by the token in one shared Secret, so that set-up costs one Secret instead of N generated ones.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import Target
from workerqueue_operator.devcluster import controlplane
from workerqueue_operator.k8s import client, resources

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "agentcontrol.dev_workerqueues.yaml"
CRD_NAME = "workerqueues.agentcontrol.dev"
TOKEN_SECRET = "bench-worker-token"
TOKEN_KEY = "token"

Say = Callable[[str], None]


class ClusterError(RuntimeError):
    """kubectl failed, or the queues did not become Ready."""


@dataclass(frozen=True)
class Kubectl:
    binary: Path
    kubeconfig: Path

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 300) -> str:
        cache_dir = self.kubeconfig.parent / "kubectl-cache"  # keeps ~/.kube out of it
        done = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", f"--cache-dir={cache_dir}", *args],
            input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")
        return done.stdout


def install_crd(kubectl: Kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    controlplane.wait_established(kubectl, CRD_NAME)


def queue_manifests(namespace: str, count: int, token: str,
                    *, generated: bool = False) -> tuple[dict[str, Any], list[Target]]:
    """One `List` with the namespace, the token Secret and `count` WorkerQueues; and the load targets.
    `generated`: no shared Secret, the operator generates each queue's token Secret (no targets then)."""
    items: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    if not generated:
        items.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                      "metadata": {"name": TOKEN_SECRET, "namespace": namespace}, "stringData": {TOKEN_KEY: token}})
    targets: list[Target] = []
    for i in range(count):
        queue_id = str(uuid.uuid4())  # what the control plane's own queue ids look like
        spec: dict[str, Any] = {
            "queueId": queue_id,
            "temporal": {"host": f"tenant-{i:04d}.tmprl.bench.internal:7233", "namespace": f"tenant-{i:04d}"},
        }
        if not generated:
            spec["auth"] = {"tokenSecretRefs": [{"name": TOKEN_SECRET, "key": TOKEN_KEY}]}
            targets.append(Target(queue_id=queue_id, token=token))
        items.append({"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue",
                      "metadata": {"name": f"queue-{i:04d}", "namespace": namespace}, "spec": spec})
    return {"apiVersion": "v1", "kind": "List", "items": items}, targets


def create_upstream_queue(kubectl: Kubectl, namespace: str, upstream_url: str) -> list[Target]:
    """A namespace with one WorkerQueue whose upstream is `upstream_url`; its load target."""
    token, queue_id = secrets.token_urlsafe(32), str(uuid.uuid4())
    items: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {"name": TOKEN_SECRET, "namespace": namespace},
         "stringData": {TOKEN_KEY: token, "org-key": secrets.token_urlsafe(32)}},
        {"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue",
         "metadata": {"name": "upstream", "namespace": namespace},
         "spec": {"queueId": queue_id, "temporal": {"host": "temporal.bench.internal:7233", "namespace": "bench"},
                  "auth": {"tokenSecretRefs": [{"name": TOKEN_SECRET, "key": TOKEN_KEY}]},
                  "upstream": {"url": upstream_url, "apiKeySecretRef": {"name": TOKEN_SECRET, "key": "org-key"}}}},
    ]
    kubectl("create", "-f", "-", "-o", "name", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return [Target(queue_id=queue_id, token=token)]


def create_queues(kubectl: Kubectl, namespace: str, count: int, *, generated: bool = False) -> list[Target]:
    """Creates the namespace, the Secret and the queues in one kubectl call; returns the load targets."""
    manifest, targets = queue_manifests(namespace, count, secrets.token_urlsafe(32), generated=generated)
    kubectl("create", "-f", "-", "-o", "name", stdin=json.dumps(manifest), timeout=1800)
    return targets


def is_ready(item: dict[str, Any]) -> bool:
    conditions = (item.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def wait_ready(kubectl: Kubectl, namespace: str, count: int, *, say: Say, alive: Callable[[], None],
               timeout: float) -> None:
    """Waits until `count` queues report Ready=True, as a watch tells (to the event, not to a poll).

    One list, then a watch: listing 10,000 queues again and again (about 3 s of kubectl and API-server
    CPU each) would load the machine the operator is measured on. `alive()` raises when the operator
    has died, so that a crash is not waited out; `timeout` only guards against a hang.
    """
    asyncio.run(_wait_ready(kubectl, namespace, count, say=say, alive=alive, timeout=timeout))


async def _wait_ready(kubectl: Kubectl, namespace: str, count: int, *, say: Say, alive: Callable[[], None],
                      timeout: float) -> None:
    api = client.KubeClient(client.load_configuration(str(kubectl.kubeconfig)))
    ready: dict[str, bool] = {}
    path = resources.queues_path(namespace)

    async def follow() -> None:
        while True:
            listing = await api.get(path)
            ready.clear()
            ready.update({i["metadata"]["name"]: is_ready(i) for i in listing.get("items", [])})
            version: str | None = listing["metadata"]["resourceVersion"]
            try:
                while version is not None:
                    params = {"resourceVersion": version, "allowWatchBookmarks": "true", "timeoutSeconds": "60"}
                    async for event in api.watch(path, params, timeout=60):
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            version = None  # too old: list again
                            break
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if event.get("type") == "DELETED":
                            ready.pop(obj["metadata"]["name"], None)
                        elif event.get("type") != "BOOKMARK":
                            ready[obj["metadata"]["name"]] = is_ready(obj)
            except client.ApiError as exc:
                if exc.status != 410:
                    raise

    began = time.monotonic()
    last = -1
    watcher = asyncio.create_task(follow())
    try:
        while True:
            if watcher.done():
                watcher.result()  # raises what stopped it
            alive()
            done = sum(ready.values())
            if done >= count:
                return
            if ready and done // 2500 != last // 2500:  # not before the first list: "0/0"
                say(f"  {done}/{len(ready)} queues Ready ({time.monotonic() - began:.1f}s into the wait)")
                last = done
            if time.monotonic() - began > timeout:
                raise ClusterError(f"only {done} of {count} queues in {namespace} became Ready within {timeout:.0f}s")
            await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await api.close()


WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def request_totals(metrics: str) -> dict[str, int]:
    """kube-apiserver's `apiserver_request_total`, summed by "VERB resource[/subresource]"."""
    totals: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(_LABEL.findall(line))
            resource = "/".join(filter(None, (labels.get("resource"), labels.get("subresource"))))
            key = f"{labels.get('verb')} {resource}"
            totals[key] = totals.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return totals


def api_requests(kubectl: Kubectl) -> dict[str, int]:
    return request_totals(kubectl("get", "--raw", "/metrics"))


def writes_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The write requests made from `before` to `after`, most first: what the operator cost the API
    server beyond its watches (lists and watches are a handful)."""
    made = {key: n - before.get(key, 0) for key, n in after.items() if key.split(" ", 1)[0] in WRITE_VERBS}
    return dict(sorted(((k, n) for k, n in made.items() if n > 0), key=lambda item: -item[1]))


def delete_queues(kubectl: Kubectl, namespace: str) -> None:
    """Deletes the namespace's queues and waits until they are gone (they carry no finalizer)."""
    kubectl("delete", "workerqueues", "--all", "-n", namespace, "--wait=true", "--timeout=1200s", timeout=1800)
