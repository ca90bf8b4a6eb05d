"""The local kubelet with its API server away: it keeps its pods' processes, as a kubelet does."""

from __future__ import annotations

import errno
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s

from workerqueue_operator.devcluster import kubelet as kubelet_
from workerqueue_operator.devcluster.kubelet import LocalKubelet

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]

Make = Callable[..., LocalKubelet]


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[tuple[Make, list[str]]]:
    """Makes kubelets of an API server that refuses every connection at once (a port bound, never
    listening), and what they said; each stopped after the test."""
    said: list[str] = []
    made: list[LocalKubelet] = []
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{unused.getsockname()[1]}"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))

        def make(*, command: list[str] = SLEEPER, run_thread: bool = False) -> LocalKubelet:
            kubelet = LocalKubelet(kubeconfig, tmp_path / f"state-{len(made)}", command=command, log=said.append)
            kubelet.state_dir.mkdir()
            made.append(kubelet)
            if run_thread:  # its run thread alone, without the watch (which would wait for a listing)
                runner = threading.Thread(target=kubelet._run_loop, name="kubelet-run", daemon=True)
                runner.start()
                kubelet._threads.append(runner)
            return kubelet

        try:
            yield make, said
        finally:
            for kubelet in made:
                kubelet.stop()


def pod(name: str, env: list[k8s.V1EnvVar] | None = None) -> k8s.V1Pod:
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, namespace="ns", uid=f"uid-{name}"),
                     spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="worker", image="i", env=env)]))


FROM_SECRET = k8s.V1EnvVar(name="KEY", value_from=k8s.V1EnvVarSource(
    secret_key_ref=k8s.V1SecretKeySelector(name="creds", key="key")))


def wait_started(kubelet: LocalKubelet) -> None:
    deadline = time.monotonic() + 20
    while not kubelet.pids():
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.05)


def test_a_status_not_written_leaves_the_process_running(offline: tuple[Make, list[str]]):
    kubelet = offline[0](run_thread=True)
    kubelet._to_run.put(pod("w0"))
    wait_started(kubelet)
    time.sleep(0.5)
    # The thread that started it lives on: its end would have killed the process (PR_SET_PDEATHSIG).
    assert [t.is_alive() for t in kubelet._threads] == [True]
    assert len(kubelet.pids()) == 1


def test_a_secret_not_read_is_waited_for_not_the_end_of_the_kubelet(offline: tuple[Make, list[str]]):
    kubelet = offline[0](run_thread=True)
    kubelet._to_run.put(pod("w1", [FROM_SECRET]))
    kubelet._to_run.put(pod("w2"))  # the next pod still starts
    wait_started(kubelet)
    assert [p.name for p in kubelet.processes()] == ["w2"]
    assert [t.is_alive() for t in kubelet._threads] == [True]


def test_a_command_that_cannot_start_fails_its_pod_said_once(offline: tuple[Make, list[str]], tmp_path: Path):
    """As a kubelet reports a container whose command is missing (StartError): the pod fails. Its
    status not written (the API server away here), it is tried again for that, said once."""
    make, said = offline
    missing = tmp_path / "no-such-command"
    kubelet = make(command=[str(missing)])
    kubelet._run_or_wait(pod("w3"))
    kubelet._run_or_wait(kubelet._waiting["uid-w3"].pod)  # its retry, the status still not written
    assert kubelet.processes() == [] and list(kubelet._waiting) == ["uid-w3"]
    assert [line for line in said if "failed to start" in line] == [
        f"kubelet: pod ns/w3 failed to start: [Errno 2] No such file or directory: '{missing}'"]


def test_a_fork_that_fails_for_a_moment_is_tried_again_not_a_failed_pod(offline: tuple[Make, list[str]],
                                                                          monkeypatch: pytest.MonkeyPatch):
    make, said = offline
    real = kubelet_.subprocess.Popen
    failures = [OSError(errno.EAGAIN, "Resource temporarily unavailable")]

    def popen(*args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(kubelet_.subprocess, "Popen", popen)
    kubelet = make()
    kubelet._run_or_wait(pod("w4"))
    assert list(kubelet._waiting) == ["uid-w4"] and not any("failed to start" in line for line in said)
    kubelet._run_or_wait(kubelet._waiting["uid-w4"].pod)  # its retry
    assert len(kubelet.pids()) == 1 and kubelet._waiting == {}


def test_a_pod_retried_for_the_same_reason_is_said_once(offline: tuple[Make, list[str]],
                                                        monkeypatch: pytest.MonkeyPatch):
    """The 2-s retries of a pod whose Secret cannot be read logged (and wrote its status) every time."""
    make, said = offline
    monkeypatch.setattr(kubelet_, "RETRY_SECONDS", 0.05)
    kubelet = make(run_thread=True)
    kubelet._to_run.put(pod("w5", [FROM_SECRET]))
    time.sleep(1.0)  # some 20 retries
    kubelet.stop()
    assert len([line for line in said if 'secret "creds" not read' in line]) == 1, said
