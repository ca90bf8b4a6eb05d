"""The local kubelet with its API server away: it keeps its pods' processes, as a kubelet does."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s

from workerqueue_operator.devcluster.kubelet import LocalKubelet


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[LocalKubelet]:
    with socket.socket() as unused:  # bound, never listening: every call is refused at once
        unused.bind(("127.0.0.1", 0))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{unused.getsockname()[1]}"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        kubelet = LocalKubelet(kubeconfig, tmp_path / "state",
                               command=[sys.executable, "-c", "import time; time.sleep(60)"])
        kubelet.state_dir.mkdir()
        # Its run thread alone, without the watch (which would wait for a listing that never comes).
        runner = threading.Thread(target=kubelet._run_loop, name="kubelet-run", daemon=True)
        runner.start()
        kubelet._threads.append(runner)
        try:
            yield kubelet
        finally:
            kubelet.stop()


def pod(name: str, env: list[k8s.V1EnvVar] | None = None) -> k8s.V1Pod:
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, namespace="ns", uid=f"uid-{name}"),
                     spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="worker", image="i", env=env)]))


def test_a_status_not_written_leaves_the_process_running(kubelet: LocalKubelet):
    kubelet._to_run.put(pod("w0"))
    deadline = time.monotonic() + 20
    while not kubelet.pids():
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.05)
    time.sleep(0.5)
    # The thread that started it lives on: its end would have killed the process (PR_SET_PDEATHSIG).
    assert [t.is_alive() for t in kubelet._threads] == [True]
    assert len(kubelet.pids()) == 1


def test_a_secret_not_read_is_waited_for_not_the_end_of_the_kubelet(kubelet: LocalKubelet):
    from_secret = k8s.V1EnvVar(name="KEY", value_from=k8s.V1EnvVarSource(
        secret_key_ref=k8s.V1SecretKeySelector(name="creds", key="key")))
    kubelet._to_run.put(pod("w1", [from_secret]))
    kubelet._to_run.put(pod("w2"))  # the next pod still starts
    deadline = time.monotonic() + 20
    while not kubelet.pids():
        assert time.monotonic() < deadline, "the next pod never started"
        time.sleep(0.05)
    assert [p.name for p in kubelet.processes()] == ["w2"]
    assert [t.is_alive() for t in kubelet._threads] == [True]


def test_a_command_that_cannot_start_fails_its_pod_once_not_at_every_retry(tmp_path: Path):
    """As a kubelet reports a container whose command is missing (StartError): the pod fails, and
    is not tried again every 2 s with a line logged each time."""
    said: list[str] = []
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{unused.getsockname()[1]}"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        kubelet = LocalKubelet(kubeconfig, tmp_path / "state", command=[str(tmp_path / "no-such-command")],
                               log=said.append)
        kubelet.state_dir.mkdir()
        try:
            kubelet._run_or_wait(pod("w3"))
            kubelet._run_or_wait(pod("w3"))  # the watch brings it again while its status is not written
        finally:
            kubelet.stop()
    assert kubelet.processes() == [] and kubelet._waiting == {}
    missing = tmp_path / "no-such-command"
    assert [line for line in said if "failed to start" in line] == [
        f"kubelet: pod ns/w3 failed to start: [Errno 2] No such file or directory: '{missing}'"] * 2
