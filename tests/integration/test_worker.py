"""The test worker (devcluster/worker.py) against a recording control plane and the real Temporal.

The control plane here is a small recorder that answers as the protocol says (its /executions from
Temporal through core.temporal); the worker's life against the operator itself is tested with the
operator's routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from temporalio.client import Client

from tests.integration.conftest import free_port
from workerqueue_operator.core.temporal import Endpoint, Temporal
from workerqueue_operator.devcluster import procs
from workerqueue_operator.devcluster.temporal import TemporalServer

TOKEN = "queue-token-" + "x" * 8


@dataclass
class Call:
    at: float
    method: str
    path: str
    auth: str | None
    body: Any


@dataclass
class Recorder:
    """A control plane that records every call; /start's answer and status are the test's to set."""

    temporal: TemporalServer
    task_queue: str
    start_status: int = 200
    executions_status: int = 200
    temporal_host: str = ""
    calls: list[Call] = field(default_factory=list)
    url: str = ""
    access: Temporal = field(default_factory=lambda: Temporal(timeout=3.0, coalesce=0.0))

    def of(self, method: str, suffix: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path.endswith(suffix)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.calls.append(Call(time.monotonic(), request.method, request.path, request.headers.get("Authorization"),
                               body))
        if request.path.endswith("/start"):
            if self.start_status != 200:
                return web.json_response({"detail": "no"}, status=self.start_status)
            return web.json_response({
                "worker_id": "w-1", "task_queue_name": self.task_queue, "temporal_namespace": "default",
                "temporal_host": self.temporal_host or self.temporal.address, "temporal_api_key": "",
                "organization_id": "o", "control_plane_url": self.url, "heartbeat_interval": 30,
                "litellm_api_url": "", "litellm_api_key": "", "queue_name": "q", "environment_name": "e",
                "queue_id": "q-1",
            })
        if request.path.endswith("/executions"):
            if self.executions_status != 200:
                return web.json_response({"detail": "Not Found"}, status=self.executions_status)
            found = await self.access.executions(Endpoint(self.temporal.address, "default"), self.task_queue,
                                                 limit=int(request.query.get("limit", "5")))
            return web.json_response([e.to_json() for e in found])
        if request.path.endswith("/heartbeat"):
            return web.Response(status=204)
        return web.json_response({})


@pytest.fixture
async def recorder(temporal: TemporalServer) -> AsyncIterator[Recorder]:
    rec = Recorder(temporal, f"tq-{secrets.token_hex(4)}")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # bound at once: no port picked, then taken by another
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await rec.access.close()
    await runner.cleanup()


@contextlib.contextmanager
def worker_process(recorder: Recorder, tmp_path: Path, **env: str) -> Any:
    log = tmp_path / f"worker-{secrets.token_hex(3)}.log"
    full_env = {**os.environ, "KUBIYA_API_KEY": TOKEN, "CONTROL_PLANE_URL": recorder.url, "QUEUE_ID": "q-1",
                "HEARTBEAT_INTERVAL": "1", "TEMPORAL_HOST": "temporal:7233", "HOSTNAME": "pod-abc", **env}
    with log.open("wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", "workerqueue_operator.devcluster.worker"], env=full_env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=procs.die_with_parent(os.getpid()))  # also if pytest is SIGKILLed
    popen.log = log  # type: ignore[attr-defined]
    try:
        yield popen
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


async def exited(popen: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while popen.poll() is None:
        assert time.monotonic() < deadline, f"still running:\n{popen.log.read_text()}"  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
    return popen.returncode


async def until(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_single_execution_worker_lives_its_whole_life(recorder: Recorder, tmp_path: Path):
    client = await Client.connect(recorder.temporal.address)
    with worker_process(recorder, tmp_path, SINGLE_EXECUTION="yes") as worker:
        await until(lambda: recorder.of("POST", "/heartbeat"))
        execution_id = f"exec-{uuid.uuid4().hex[:8]}"
        await client.execute_workflow(
            "AgentExecutionWorkflow", {"execution_id": execution_id, "duration_seconds": 1.5, "patch_execution": True},
            id=execution_id, task_queue=recorder.task_queue)
        # Exits once its polls read the execution over: within a minute, not at the give-up (30 min).
        assert await exited(worker, timeout=60) == 0

    assert [c.auth for c in recorder.calls] == [f"Bearer {TOKEN}"] * len(recorder.calls)
    assert [c.path for c in recorder.of("POST", "/start")] == ["/api/v1/worker-queues/q-1/start"]
    heartbeats = recorder.of("POST", "/api/v1/workers/w-1/heartbeat")
    assert len(heartbeats) >= 3
    first, *rest = [h.body for h in heartbeats]
    assert {"status", "tasks_processed", "current_task_id", "worker_metadata", "system_info", "logs"} <= first.keys()
    assert all("system_info" not in b and "logs" not in b for b in rest)
    assert any(b["current_task_id"] == execution_id for b in rest)
    assert rest[-1]["tasks_processed"] == 1
    # Cadences, loose enough for a loaded machine, tight enough to tell them from other ones: a
    # heartbeat every HEARTBEAT_INTERVAL (1 s; not the 60-s default, not back to back), a poll every
    # 2 s (not at the heartbeat's 1 s). Each gap is the period plus the answer's time, never much less.
    gaps = [b.at - a.at for a, b in itertools.pairwise(heartbeats)]
    assert 0.8 <= statistics.median(gaps) <= 2.5 and min(gaps) >= 0.5, gaps
    polls = recorder.of("GET", "/api/v1/worker-queues/q-1/executions")
    assert len(polls) >= 2
    poll_gaps = [b.at - a.at for a, b in itertools.pairwise(polls)]
    assert 1.8 <= statistics.median(poll_gaps) <= 4.5 and min(poll_gaps) >= 1.0, poll_gaps
    assert [c.path for c in recorder.of("PATCH", "")] == [f"/api/v1/executions/{execution_id}"]
    disconnects = recorder.of("POST", "/disconnect")
    assert [(c.path, c.body) for c in disconnects] == [
        ("/api/v1/workers/w-1/disconnect", {"reason": "shutdown", "exit_code": 0, "error_message": None})]
    # Disconnect comes last, at least 2 s after the second poll that read the execution as done.
    assert disconnects[0].at - polls[-1].at >= 2.0
    # Its Temporal identity is <pid>@<HOSTNAME>.
    listed = await recorder.access.executions(Endpoint(recorder.temporal.address, "default"), recorder.task_queue)
    assert [e.holder for e in listed] == [f"{worker.pid}@pod-abc"]


async def test_a_finished_execution_listed_first_makes_a_fresh_worker_exit(recorder: Recorder, tmp_path: Path):
    # The rule, exactly: whatever the list shows first is what the worker waits for.
    client = await Client.connect(recorder.temporal.address)
    with worker_process(recorder, tmp_path, SINGLE_EXECUTION="true") as first:
        await client.execute_workflow("AgentExecutionWorkflow", {"duration_seconds": 0.1},
                                      id=f"exec-{uuid.uuid4().hex[:8]}", task_queue=recorder.task_queue)
        assert await exited(first, timeout=60) == 0
    with worker_process(recorder, tmp_path, SINGLE_EXECUTION="1") as fresh:
        assert await exited(fresh, timeout=60) == 0
    assert len(recorder.of("POST", "/disconnect")) == 2


async def test_failed_start_exits_1_without_anything_else(recorder: Recorder, tmp_path: Path):
    recorder.start_status = 403
    with worker_process(recorder, tmp_path) as worker:
        assert await exited(worker, timeout=60) == 1
    assert [c.method + " " + c.path for c in recorder.calls] == ["POST /api/v1/worker-queues/q-1/start"]


async def test_an_error_after_start_disconnects_with_exit_code_1(recorder: Recorder, tmp_path: Path):
    recorder.temporal_host = f"127.0.0.1:{free_port()}"  # nothing listens there
    with worker_process(recorder, tmp_path) as worker:
        assert await exited(worker, timeout=30) == 1
    (disconnect,) = recorder.of("POST", "/disconnect")
    assert disconnect.body["reason"] == "error" and disconnect.body["exit_code"] == 1
    assert disconnect.body["error_message"]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 0)])
async def test_signals_stop_it_without_a_disconnect(recorder: Recorder, tmp_path: Path, sig: signal.Signals,
                                                    code: int):
    with worker_process(recorder, tmp_path, SINGLE_EXECUTION="true") as worker:
        await until(lambda: recorder.of("POST", "/heartbeat") and recorder.of("GET", "/executions"))
        worker.send_signal(sig)
        assert await exited(worker, timeout=60) == code
    assert not recorder.of("POST", "/disconnect")


@pytest.mark.parametrize("status", [404, 200])
async def test_polls_give_up_after_the_give_up_time_whatever_they_answer(recorder: Recorder, tmp_path: Path,
                                                                        status: int):
    # The real worker's monitor runs 30 minutes at most, failing polls or not (200 with nothing held).
    recorder.executions_status = status
    with worker_process(recorder, tmp_path, SINGLE_EXECUTION="true", EXECUTIONS_GIVE_UP_SECONDS="3") as worker:
        assert await exited(worker, timeout=60) == 0
    assert len(recorder.of("GET", "/executions")) >= 2
    assert [c.body for c in recorder.of("POST", "/disconnect")] == [
        {"reason": "shutdown", "exit_code": 0, "error_message": None}]


async def test_workflows_per_worker_caps_what_its_temporal_worker_takes(recorder: Recorder, tmp_path: Path):
    client = await Client.connect(recorder.temporal.address)
    endpoint = Endpoint(recorder.temporal.address, "default")
    with worker_process(recorder, tmp_path, WORKFLOWS_PER_WORKER="1") as capped:
        await until(lambda: recorder.of("POST", "/heartbeat"))
        handles = [await client.start_workflow(
            "AgentExecutionWorkflow", {"duration_seconds": 1.0, "local_activity": True},
            id=f"cap-{i}-{uuid.uuid4().hex[:6]}", task_queue=recorder.task_queue) for i in range(3)]
        done, pending = await asyncio.wait([asyncio.ensure_future(h.result()) for h in handles], timeout=60,
                                           return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        await asyncio.sleep(3)  # long enough for an uncapped worker to have taken the other two
        listed = await recorder.access.executions(endpoint, recorder.task_queue, limit=10)
        assert sorted(str(e.holder) for e in listed) == sorted([f"{capped.pid}@pod-abc", "None", "None"])
        capped.send_signal(signal.SIGINT)
        assert await exited(capped, timeout=60) == 0
    # A worker without the cap takes the rest.
    with worker_process(recorder, tmp_path) as uncapped:
        await asyncio.wait_for(asyncio.gather(*pending), 30)
        uncapped.send_signal(signal.SIGINT)
        assert await exited(uncapped, timeout=60) == 0
