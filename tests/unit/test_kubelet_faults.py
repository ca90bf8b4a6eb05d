"""The local kubelet with its API server away: it keeps its pods' processes, as a kubelet does."""

from __future__ import annotations

import errno
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s

from workerqueue_operator.devcluster import kubelet as kubelet_
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


def test_a_command_that_cannot_start_fails_its_pod_said_once(tmp_path: Path):
    """As a kubelet reports a container whose command is missing (StartError): the pod fails. Its
    status not written (the API server away here), it is tried again for that, said once."""
    said: list[str] = []
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        kubelet = offline_kubelet(tmp_path, unused, said, command=[str(tmp_path / "no-such-command")])
        try:
            kubelet._run_or_wait(pod("w3"))
            kubelet._run_or_wait(kubelet._waiting["uid-w3"].pod)  # its retry, the status still not written
        finally:
            kubelet.stop()
    assert kubelet.processes() == [] and list(kubelet._waiting) == ["uid-w3"]
    missing = tmp_path / "no-such-command"
    assert [line for line in said if "failed to start" in line] == [
        f"kubelet: pod ns/w3 failed to start: [Errno 2] No such file or directory: '{missing}'"]


def offline_kubelet(tmp_path: Path, unused: socket.socket, said: list[str], **kwargs: object) -> LocalKubelet:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{unused.getsockname()[1]}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    made = LocalKubelet(kubeconfig, tmp_path / "state", log=said.append, **kwargs)  # type: ignore[arg-type]
    made.state_dir.mkdir()
    return made


def test_a_fork_that_fails_for_a_moment_is_tried_again_not_a_failed_pod(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    said: list[str] = []
    real = kubelet_.subprocess.Popen
    failures = [OSError(errno.EAGAIN, "Resource temporarily unavailable")]

    def popen(*args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(kubelet_.subprocess, "Popen", popen)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        kubelet = offline_kubelet(tmp_path, unused, said, command=[sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            kubelet._run_or_wait(pod("w4"))
            assert list(kubelet._waiting) == ["uid-w4"] and not any("failed to start" in line for line in said)
            kubelet._run_or_wait(kubelet._waiting["uid-w4"].pod)  # its retry
            assert len(kubelet.pids()) == 1 and kubelet._waiting == {}
        finally:
            kubelet.stop()


def test_a_pod_retried_for_the_same_reason_is_said_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The 2-s retries of a pod whose Secret cannot be read logged (and wrote its status) every time."""
    said: list[str] = []
    monkeypatch.setattr(kubelet_, "RETRY_SECONDS", 0.05)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        kubelet = offline_kubelet(tmp_path, unused, said)
        runner = threading.Thread(target=kubelet._run_loop, name="kubelet-run", daemon=True)
        runner.start()
        kubelet._threads.append(runner)
        try:
            from_secret = k8s.V1EnvVar(name="KEY", value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name="creds", key="key")))
            kubelet._to_run.put(pod("w5", [from_secret]))
            time.sleep(1.0)  # some 20 retries
        finally:
            kubelet.stop()
    assert len([line for line in said if 'secret "creds" not read' in line]) == 1, said
