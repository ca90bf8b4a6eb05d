"""A stopping operator drains: on SIGTERM its HTTP API goes on serving for `http_drain_seconds`,
unready and closing each connection after its answer, so that the workers a Service sends to it
meanwhile are started rather than refused (a worker whose /start is refused exits for good)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path

import pytest

from tests.integration.conftest import Kube, OperatorProcess, http, wait_for

START = "/api/v1/worker-queues/{}/start"


@pytest.fixture
def draining(kubeconfig: Path, crd_installed: None, kube: Kube, namespace: str, tmp_path: Path,
             operator: OperatorProcess) -> Iterator[tuple[OperatorProcess, str, str]]:
    """An operator of this namespace alone, with a queue it serves; the session's operator stopped meanwhile,
    so that the two do not both keep the queue's status."""
    queue_id = f"drain-{namespace}"
    own = OperatorProcess(kubeconfig, tmp_path / "operator.log",
                          env={"WQ_NAMESPACES": namespace, "WQ_HTTP_DRAIN_SECONDS": "4"})
    with operator.paused():
        try:
            own.start()
            kube.create_queue(namespace, "drained", queueId=queue_id,
                              temporal={"host": "127.0.0.1:1", "namespace": "default"})
            kube.wait_condition(namespace, "drained", "True")
            token = kube.queue_token(namespace, "drained")
            wait_for(lambda: own.start_worker(queue_id, token).status == 200, timeout=15, what="the token served")
            yield own, queue_id, token
        finally:
            own.stop()


def start_on(connection: HTTPConnection, queue_id: str, token: str) -> HTTPResponse:
    connection.request("POST", START.format(queue_id), body=b"{}",
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response


def test_on_sigterm_it_serves_unready_closing_connections_then_exits(
    draining: tuple[OperatorProcess, str, str],
):
    own, queue_id, token = draining
    assert own.process is not None
    # A worker's keep-alive connection.
    with contextlib.closing(HTTPConnection("127.0.0.1", own.port, timeout=10)) as kept:
        before = start_on(kept, queue_id, token)
        assert before.status == 200 and before.getheader("Connection", "").lower() != "close"

        os.killpg(own.process.pid, signal.SIGTERM)
        wait_for(lambda: http("GET", f"{own.url}/readyz", timeout=2).json() == {"status": "draining"},
                 timeout=10, interval=0.1, what="/readyz saying draining")
        # The kept connection is served once more, then closed: its client's next call goes through the Service.
        during = start_on(kept, queue_id, token)
        assert during.status == 200 and during.getheader("Connection") == "close"
    assert json.loads(own.start_worker(queue_id, token).body)["queue_id"] == queue_id  # new connections too
    assert own.process.poll() is None

    assert own.process.wait(timeout=30) == 0
    assert "serving 4s more while this replica leaves the Service's endpoints" in own.logs()
    with pytest.raises(OSError):
        http("GET", f"{own.url}/healthz", timeout=2)


def test_a_second_signal_ends_the_drain_at_once(
    kubeconfig: Path, crd_installed: None, namespace: str, tmp_path: Path, operator: OperatorProcess,
):
    own = OperatorProcess(kubeconfig, tmp_path / "operator.log",
                          env={"WQ_NAMESPACES": namespace, "WQ_HTTP_DRAIN_SECONDS": "300"})
    with operator.paused():
        try:
            own.start()
            assert own.process is not None
            os.killpg(own.process.pid, signal.SIGTERM)
            wait_for(lambda: http("GET", f"{own.url}/readyz", timeout=2).status == 503,
                     timeout=10, interval=0.1, what="the drain")
            signalled = time.monotonic()
            os.killpg(own.process.pid, signal.SIGINT)  # Ctrl-C, or the kubelet's patience ending
            assert own.process.wait(timeout=60) == 0, own.logs()[-3000:]
            print(f"stopped {time.monotonic() - signalled:.1f}s after the second signal")
        finally:
            own.stop()
