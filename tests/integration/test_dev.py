"""`workerqueue-operator dev` end to end: its own control plane and Temporal, the examples, /start, the pool's
worker processes, a clean stop when its terminal closes (SIGHUP, handled as SIGTERM)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import alive, http, wait_for
from workerqueue_operator.core.temporal import Endpoint, Temporal
from workerqueue_operator.devcluster import procs


def test_dev_serves_the_examples_and_stops_everything(k8s_assets: Path, tmp_path: Path):
    state = tmp_path / "dev"
    log = (tmp_path / "dev.log").open("w+b")
    env = {**os.environ, "KUBEBUILDER_ASSETS": str(k8s_assets)}
    # No --port: one picked here is bound a minute later, once the control plane and Temporal run,
    # and another process may have taken it meanwhile. `dev` picks it then, and says which.
    dev = subprocess.Popen([sys.executable, "-m", "workerqueue_operator.cli", "dev", "--state-dir", str(state)],
                           stdout=log, stderr=subprocess.STDOUT, env=env,
                           start_new_session=True,
                           preexec_fn=procs.die_with_parent(os.getpid()))  # also if pytest is SIGKILLed
    pids: list[int] = []
    worker_pids: list[int] = []
    try:
        def said() -> str | None:
            assert dev.poll() is None, (tmp_path / "dev.log").read_text()
            found = re.search(r"curl -f http://127\.0\.0\.1:(\d+)/readyz", (tmp_path / "dev.log").read_text())
            return found.group(1) if found else None

        port = int(wait_for(said, timeout=120, what="dev's usage, naming its port"))

        def ready() -> bool:
            assert dev.poll() is None, (tmp_path / "dev.log").read_text()
            try:
                return http("GET", f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
            except OSError:
                return False

        wait_for(ready, timeout=120, what="dev readiness")
        pids = [int(line) for line in (state / "pids").read_text().split()]
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
        temporal_pid = int((state / "temporal" / "pid").read_text())
        assert alive(temporal_pid)
        pids.append(temporal_pid)
        temporal_address = re.findall(r"Temporal ready at (127\.0\.0\.1:\d+)", (tmp_path / "dev.log").read_text())[0]

        def kubectl(*args: str) -> str:
            return subprocess.run([str(k8s_assets / "kubectl"), "--kubeconfig", str(state / "kubeconfig"),
                                   f"--cache-dir={state / 'kubectl-cache'}", *args],
                                  capture_output=True, text=True, check=True).stdout

        client = json.loads(kubectl("version", "--client", "-o", "json"))["clientVersion"]
        assert json.loads(kubectl("get", "--raw", "/version"))["minor"] == client["minor"]  # its own control plane

        def queues_ready() -> bool:
            items = json.loads(kubectl("get", "workerqueues", "-n", "default", "-o", "json"))["items"]
            ready = {q["metadata"]["name"]: [c["status"] for c in q.get("status", {}).get("conditions", [])
                                             if c["type"] == "Ready"] for q in items}
            return ready == {"minimal": ["True"], "with-secrets": ["True"], "single-execution": ["True"],
                             "with-upstream": ["True"], "scaling": ["True"]}

        wait_for(queues_ready, timeout=30, what="example queues Ready")
        token = kubectl("get", "secret", "minimal-worker-token", "-n", "default", "-o", "jsonpath={.data.token}")
        r = http("POST", f"http://127.0.0.1:{port}/api/v1/worker-queues/minimal-queue/start",
                 body=b'{"worker_sdk_version": "dev"}', token=base64.b64decode(token).decode())
        assert r.status == 200 and r.json()["queue_name"] == "minimal"
        assert r.json()["temporal_host"] == temporal_address and r.json()["temporal_namespace"] == "default"
        printed = (tmp_path / "dev.log").read_text()
        assert f"http://127.0.0.1:{port}/api/v1/worker-queues/minimal-queue/start" in printed
        assert f"export KUBECONFIG={state / 'kubeconfig'}" in printed
        assert f"workflow start --address {temporal_address}" in printed

        # The single-execution example's pods run as worker processes that poll its task queue on
        # the local Temporal, each as <pid>@<pod name>.
        def pollers() -> set[str]:
            async def describe() -> set[str]:
                temporal = Temporal(timeout=5)
                try:
                    info = await temporal.describe_task_queue(Endpoint(temporal_address, "default"),
                                                              "single-execution-queue")
                finally:
                    await temporal.close()
                return {p.identity for p in info.pollers}
            loop = asyncio.new_event_loop()  # not asyncio.run: it leaves pytest-asyncio a loop to leak
            try:
                return loop.run_until_complete(describe())
            finally:
                loop.close()

        identities = wait_for(lambda: len(pollers()) == 2 and pollers(), timeout=60, what="two workers polling")
        started = dict(re.findall(r"kubelet: pod default/(\S+): started pid (\d+)", (tmp_path / "dev.log").read_text()))
        assert identities == {f"{pid}@{pod}" for pod, pid in started.items()}
        worker_pids = [int(pid) for pid in started.values()]
        assert all(alive(pid) for pid in worker_pids)
        # Logs for a person: text lines with a level, not JSON objects; no routine handler chatter.
        listening = next(line for line in printed.splitlines() if "HTTP API listening" in line)
        assert "[INFO" in listening and not listening.lstrip().startswith("{")
        assert "succeeded." not in printed and "registry.<locals>" not in printed
    finally:
        os.kill(dev.pid, signal.SIGHUP)  # its terminal closed: stopped as by Ctrl-C or SIGTERM
        try:
            code = dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
            raise
        finally:
            log.close()
    assert code == 0
    assert len(pids) == 4 and not any(alive(pid) for pid in pids)
    assert len(worker_pids) == 2 and not any(alive(pid) for pid in worker_pids)
