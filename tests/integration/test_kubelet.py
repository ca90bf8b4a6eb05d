"""The local kubelet: the operator's pods run as local processes and move through their phases."""

from __future__ import annotations

import json
import secrets
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.integration.conftest import alive, free_port, wait_for
from workerqueue_operator.devcluster.kubelet import LocalKubelet

LABELS = {"app.kubernetes.io/managed-by": "workerqueue-operator"}
# Writes its environment to $OUT, then waits for $OUT.exit to hold its exit code.
SCRIPT = """
import json, os, pathlib, sys, time
out = pathlib.Path(os.environ["OUT"])
out.write_text(json.dumps(dict(os.environ)))
stop = out.with_suffix(".exit")
while not stop.exists():
    time.sleep(0.05)
sys.exit(int(stop.read_text()))
"""


def make_pod(core: client.CoreV1Api, namespace: str, name: str, env: list[dict[str, Any]],
             labels: dict[str, str] | None = None) -> None:
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or LABELS},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "worker", "image": "agent-worker:test", "env": env}]},
    })


def phase(core: client.CoreV1Api, namespace: str, name: str) -> str | None:
    return core.read_namespaced_pod(name, namespace).status.phase  # type: ignore[no-any-return]


def test_pods_run_as_processes_with_their_env_and_end_as_a_kubelet_reports(
        kubelet: Callable[..., LocalKubelet], api_client: client.ApiClient, namespace: str, tmp_path: Path):
    core = client.CoreV1Api(api_client)
    local = kubelet(namespaces=[namespace], command=[sys.executable, "-c", SCRIPT], grace=2.0)
    core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="creds"),
                                                             string_data={"token": "s3cret"}))
    out = tmp_path / "env.json"
    make_pod(core, namespace, "worker-a", [
        {"name": "OUT", "value": str(out)}, {"name": "QUEUE_ID", "value": "q-1"},
        {"name": "KUBIYA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ])
    make_pod(core, namespace, "not-ours", [], labels={"app": "other"})

    wait_for(lambda: phase(core, namespace, "worker-a") == "Running", what="worker-a Running")
    pod = core.read_namespaced_pod("worker-a", namespace)
    assert pod.status.pod_ip == "127.0.0.1"
    (status,) = pod.status.container_statuses
    assert status.name == "worker" and status.ready and status.state.running.started_at
    env = wait_for(lambda: out.exists() and json.loads(out.read_text()), what="the process's env")
    assert env["QUEUE_ID"] == "q-1" and env["KUBIYA_API_KEY"] == "s3cret" and env["HOSTNAME"] == "worker-a"
    assert env["POD_NAMESPACE"] == namespace
    proc = local.process(namespace, "worker-a")
    assert proc is not None and alive(proc.popen.pid)
    assert local.process(namespace, "not-ours") is None and phase(core, namespace, "not-ours") == "Pending"

    out.with_suffix(".exit").write_text("0")
    wait_for(lambda: phase(core, namespace, "worker-a") == "Succeeded", what="worker-a Succeeded")
    terminated = core.read_namespaced_pod("worker-a", namespace).status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0 and terminated.reason == "Completed"


def test_exit_codes_missing_secrets_and_deletion(kubelet: Callable[..., LocalKubelet], api_client: client.ApiClient,
                                                 namespace: str, tmp_path: Path):
    core = client.CoreV1Api(api_client)
    local = kubelet(command=[sys.executable, "-c", SCRIPT], grace=2.0)  # every namespace
    failing, deleted = tmp_path / "failing.json", tmp_path / "deleted.json"
    make_pod(core, namespace, "failing", [{"name": "OUT", "value": str(failing)}])
    make_pod(core, namespace, "deleted", [
        {"name": "OUT", "value": str(deleted)},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}},
    ])

    def waiting_reason() -> str | None:
        statuses = core.read_namespaced_pod("deleted", namespace).status.container_statuses or []
        return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None

    wait_for(lambda: waiting_reason() == "CreateContainerConfigError", what="a config error")
    assert local.process(namespace, "deleted") is None
    core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="later"),
                                                             string_data={"token": "t"}))
    wait_for(lambda: phase(core, namespace, "deleted") == "Running", what="started once the Secret exists")

    wait_for(failing.exists, what="failing started")
    failing.with_suffix(".exit").write_text("3")
    wait_for(lambda: phase(core, namespace, "failing") == "Failed", what="failing Failed")
    terminated = core.read_namespaced_pod("failing", namespace).status.container_statuses[0].state.terminated
    assert terminated.exit_code == 3 and terminated.reason == "Error"

    proc = local.process(namespace, "deleted")
    assert proc is not None and alive(proc.popen.pid)
    core.delete_namespaced_pod("deleted", namespace)
    wait_for(lambda: proc.popen.poll() is not None, timeout=10, what="the deleted pod's process gone")
    assert proc.popen.returncode == -15  # SIGTERM, as a container's runtime sends it


def test_the_default_command_is_the_test_worker(kubelet: Callable[..., LocalKubelet], api_client: client.ApiClient,
                                                namespace: str):
    core = client.CoreV1Api(api_client)
    kubelet(namespaces=[namespace])
    name = f"w-{secrets.token_hex(3)}"
    # Nothing answers its /start: the real worker exits 1 then, and so the pod fails.
    make_pod(core, namespace, name, [{"name": "KUBIYA_API_KEY", "value": "k"}, {"name": "QUEUE_ID", "value": "q"},
                                     {"name": "CONTROL_PLANE_URL", "value": f"http://127.0.0.1:{free_port()}"}])
    wait_for(lambda: phase(core, namespace, name) == "Failed", timeout=30, what="the worker's pod Failed")
    terminated = core.read_namespaced_pod(name, namespace).status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1


def test_stop_stops_every_child(kubelet: Callable[..., LocalKubelet], api_client: client.ApiClient, namespace: str,
                                tmp_path: Path):
    core = client.CoreV1Api(api_client)
    local = kubelet(namespaces=[namespace], command=[sys.executable, "-c", SCRIPT], grace=2.0)
    for i in range(2):
        make_pod(core, namespace, f"p{i}", [{"name": "OUT", "value": str(tmp_path / f"p{i}.json")}])
    wait_for(lambda: len(local.pids()) == 2, what="two processes")
    pids = local.pids()
    local.stop()
    assert not any(alive(pid) for pid in pids)


class StartsAsItStops(LocalKubelet):
    """Starts its first pod's process only once stop() began: the race of a stop amid a start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.starting = threading.Event()

    def _run(self, pod: Any) -> None:
        self.starting.set()
        self._stopping.wait(30)
        super()._run(pod)


def test_a_child_started_while_the_kubelet_stops_is_reaped(kubeconfig: Path, api_client: client.ApiClient,
                                                            namespace: str, tmp_path: Path):
    core = client.CoreV1Api(api_client)
    local = StartsAsItStops(kubeconfig, tmp_path / "kubelet", namespaces=[namespace],
                            command=[sys.executable, "-c", SCRIPT], grace=2.0, log=lambda m: None)
    local.start()
    try:
        make_pod(core, namespace, "late", [{"name": "OUT", "value": str(tmp_path / "late.json")}])
        assert local.starting.wait(30), "the kubelet never began to start the pod"
    finally:
        local.stop()
    (proc,) = local.processes()
    assert proc.popen.returncode is not None and not alive(proc.popen.pid)
