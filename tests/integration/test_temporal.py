"""core.temporal against a real Temporal dev server: listings, holders, order, limit, outages."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from workerqueue_operator.core import executions
from workerqueue_operator.core import temporal as temporal_
from workerqueue_operator.core.temporal import DOWN_SECONDS, Endpoint, Execution, Temporal, TemporalUnavailable
from workerqueue_operator.devcluster import workflows
from workerqueue_operator.devcluster.temporal import TemporalServer
from workerqueue_operator.models import times


@pytest.fixture
async def client(temporal: TemporalServer) -> Client:
    return await Client.connect(temporal.address, namespace=temporal.namespace)


@pytest.fixture
async def access() -> AsyncIterator[Temporal]:
    t = Temporal(timeout=2.0, coalesce=0.0)
    yield t
    await t.close()


def endpoint(temporal: TemporalServer) -> Endpoint:
    return Endpoint(host=temporal.address, namespace=temporal.namespace)


def worker(client: Client, task_queue: str, identity: str) -> Worker:
    activities = workflows.Activities(control_plane_url="http://127.0.0.1:1", api_key="unused",
                                      progress=workflows.Progress(), log=lambda _: None)
    return Worker(client, task_queue=task_queue, workflows=list(workflows.WORKFLOWS),
                  activities=[activities.run_execution], identity=identity)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_executions_newest_first_with_holders_and_limit(temporal: TemporalServer, client: Client,
                                                               access: Temporal):
    tq = f"tq-{secrets.token_hex(4)}"
    ids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("done", "failed", "waiting", "terminated")}
    async with worker(client, tq, "4242@pod-a"):
        await client.execute_workflow("AgentExecutionWorkflow", {"duration_seconds": 0.1}, id=ids["done"],
                                      task_queue=tq)
        with pytest.raises(WorkflowFailureError):
            await client.execute_workflow("TeamExecutionWorkflow", {"duration_seconds": 0.1, "fail": True},
                                          id=ids["failed"], task_queue=tq)
    # No worker polls any more: these two are never taken.
    await client.start_workflow("AgentExecutionWorkflow", {}, id=ids["waiting"], task_queue=tq)
    terminated = await client.start_workflow("AgentExecutionWorkflow", {}, id=ids["terminated"], task_queue=tq)
    await terminated.terminate("test")
    # Another task queue's workflow never shows.
    await client.start_workflow("AgentExecutionWorkflow", {}, id=f"other-{uuid.uuid4().hex[:8]}", task_queue=tq + "x")

    async def listed() -> list[Execution] | None:
        found = await access.executions(endpoint(temporal), tq)
        return found if [e.status for e in found] == ["cancelled", "running", "failed", "completed"] else None

    found = await eventually(listed)
    by_name = {name: next(e for e in found if e.id == wid) for name, wid in ids.items()}
    assert [e.id for e in found] == [ids["terminated"], ids["waiting"], ids["failed"], ids["done"]]
    assert by_name["done"].holder == by_name["failed"].holder == "4242@pod-a"
    assert by_name["waiting"].holder is None and by_name["terminated"].holder is None
    assert by_name["failed"].workflow_type == "TeamExecutionWorkflow"
    done = by_name["done"]
    assert done.created_at and done.started_at and done.completed_at
    assert done.created_at <= done.started_at <= done.completed_at and done.completed_at.endswith("Z")
    assert by_name["waiting"].started_at is None and by_name["waiting"].completed_at is None
    assert done.to_json() == {
        "id": ids["done"], "status": "completed", "created_at": done.created_at, "started_at": done.started_at,
        "completed_at": done.completed_at, "temporal_workflow_id": ids["done"], "temporal_run_id": done.run_id,
        "workflow_type": "AgentExecutionWorkflow", "worker_identity": "4242@pod-a",
    }
    limited = await access.executions(endpoint(temporal), tq, limit=2)
    assert [e.id for e in limited] == [ids["terminated"], ids["waiting"]]

    # The waiting one is taken by a worker: its holder shows up (it was not cached as None).
    async with worker(client, tq, "7@pod-b"):
        await client.get_workflow_handle(ids["waiting"]).result()

    async def taken() -> Execution | None:
        e = next(e for e in await access.executions(endpoint(temporal), tq) if e.id == ids["waiting"])
        return e if e.status == "completed" else None

    assert (await eventually(taken)).holder == "7@pod-b"


async def test_a_workers_second_execution_shows_however_many_older_ones_run(
    temporal: TemporalServer, client: Client, access: Temporal,
):
    """What workers are shown (taken_first, here with room for 2): pod-b ran one execution and runs a
    second, while more older ones than that room run on pod-a. Cut to the oldest running, pod-b's
    second was left out, and pod-b was told its execution had finished: it would exit mid-run."""
    tq = f"tq-{secrets.token_hex(4)}"
    slow = {"duration_seconds": 120}
    async with worker(client, tq, "1@pod-a"):
        for i in range(3):
            await client.start_workflow("AgentExecutionWorkflow", slow, id=f"a{i}-{uuid.uuid4().hex[:6]}",
                                        task_queue=tq)

        async def held_by_a() -> bool:
            found = await access.executions(endpoint(temporal), tq)
            return len(found) == 3 and all(e.holder == "1@pod-a" for e in found)

        await eventually(held_by_a)
    second = f"b2-{uuid.uuid4().hex[:6]}"
    async with worker(client, tq, "2@pod-b"):
        await client.execute_workflow("AgentExecutionWorkflow", {"duration_seconds": 0.1},
                                      id=f"b1-{uuid.uuid4().hex[:6]}", task_queue=tq)
        await client.start_workflow("AgentExecutionWorkflow", slow, id=second, task_queue=tq)

        async def view() -> list[dict[str, Any]] | None:
            found = await access.executions(endpoint(temporal), tq, limit=2, taken_first=True)
            held = [e for e in found if e.id == second and e.holder == "2@pod-b"]
            return executions.worker_view(found, hostname="pod-b") if held else None

        (entry,) = await eventually(view)
    assert entry["status"] == "running" and entry["held_executions"] == 2


async def test_a_workers_finished_execution_stays_in_its_view_however_many_close_after_it(
    temporal: TemporalServer, client: Client, access: Temporal, monkeypatch: pytest.MonkeyPatch,
):
    """A worker exits once its execution reads closed on two polls in a row. More than `limit`
    closing between them (here room for 2, then 3 more) took it out of the view: the worker saw
    nothing, waited out its 1,800-s give-up and took other work meanwhile."""
    tq = f"tq-{secrets.token_hex(4)}"
    quick = {"duration_seconds": 0.1}
    mine = f"b-{uuid.uuid4().hex[:6]}"
    async with worker(client, tq, "2@pod-b"):
        await client.execute_workflow("AgentExecutionWorkflow", quick, id=mine, task_queue=tq)

    async def own(expected: int) -> list[dict[str, Any]] | None:
        found = await access.executions(endpoint(temporal), tq, limit=2, taken_first=True)
        if len(found) < expected:
            return None
        view = executions.worker_view(found, hostname="pod-b")
        return view if view and view[0]["id"] == mine else None

    first = await eventually(lambda: own(1))  # the first poll: its holder is read, and known since
    assert first[0]["status"] == "completed"
    async with worker(client, tq, "1@pod-a"):
        for i in range(3):
            await client.execute_workflow("AgentExecutionWorkflow", quick, id=f"a{i}-{uuid.uuid4().hex[:6]}",
                                          task_queue=tq)
    # The second poll: the 2 closed last, and past them its own (the third closed after it, whose
    # holder was never read, is left out).
    second = await eventually(lambda: own(3))
    assert second[0]["status"] == "completed"
    # Only for a while: else a busy task queue's listing kept every run whose holder it had read.
    monkeypatch.setattr(temporal_, "CLOSED_SHOWN_SECONDS", 0.0)
    listed = await access.executions(endpoint(temporal), tq, limit=2, taken_first=True)
    assert len(listed) == 2 and mine not in {e.id for e in listed}


async def test_a_workers_first_execution_stays_its_view_while_a_later_one_runs_however_long_ago_it_closed(
    temporal: TemporalServer, client: Client, access: Temporal, monkeypatch: pytest.MonkeyPatch,
):
    """pod-b took a quick execution and a slow one. The quick one, its first, is the one it waits for;
    once more than `limit` others closed after it, a while ago, the slow one took its place in the
    view, and pod-b waited out its 1,800-s give-up for an execution it no longer saw."""
    tq = f"tq-{secrets.token_hex(4)}"
    quick, mine, later = {"duration_seconds": 0.1}, f"b1-{uuid.uuid4().hex[:6]}", f"b2-{uuid.uuid4().hex[:6]}"

    async def view(expected: int) -> list[dict[str, Any]] | None:
        found = await access.executions(endpoint(temporal), tq, limit=2, taken_first=True)
        if len(found) < expected or not any(e.id == later and e.holder == "2@pod-b" for e in found):
            return None
        return executions.worker_view(found, hostname="pod-b")

    async with worker(client, tq, "2@pod-b"):
        await client.execute_workflow("AgentExecutionWorkflow", quick, id=mine, task_queue=tq)
        await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 120}, id=later, task_queue=tq)
        (entry,) = await eventually(lambda: view(2))
        assert (entry["id"], entry["status"]) == (mine, "running")
    # Its worker gone, the slow one stays running in Temporal (nobody closes it).
    async with worker(client, tq, "1@pod-a"):
        for i in range(3):
            await client.execute_workflow("AgentExecutionWorkflow", quick, id=f"a{i}-{uuid.uuid4().hex[:6]}",
                                          task_queue=tq)
    monkeypatch.setattr(temporal_, "CLOSED_SHOWN_SECONDS", 0.0)  # they all closed long ago
    (entry,) = await eventually(lambda: view(4))
    assert (entry["id"], entry["status"], entry["held_executions"]) == (mine, "running", 2)
    await client.get_workflow_handle(later).terminate("test")


async def test_a_workers_first_execution_stays_cached_while_it_runs_a_later_one(
    temporal: TemporalServer, client: Client, monkeypatch: pytest.MonkeyPatch,
):
    """Shown without being used, it went first out of the holder cache once other workers' runs were
    read (an LRU, here of 4): not known any more, it left the view and the later one took its place."""
    monkeypatch.setattr(temporal_, "HOLDERS_PER_TASK_QUEUE", 4)
    access = Temporal(timeout=2.0, coalesce=0.0, holder_cache_size=1)
    tq = f"tq-{secrets.token_hex(4)}"
    quick, mine, later = {"duration_seconds": 0.1}, f"b1-{uuid.uuid4().hex[:6]}", f"b2-{uuid.uuid4().hex[:6]}"
    others: list[str] = []

    async def view(expected: int) -> list[dict[str, Any]] | None:
        found = await access.executions(endpoint(temporal), tq, limit=2, taken_first=True)
        if not {later, *others[-2:]} <= {e.id for e in found if e.holder} or len(found) < expected:
            return None
        return executions.worker_view(found, hostname="pod-b")

    async def others_run(count: int) -> None:
        async with worker(client, tq, "1@pod-a"):
            for _ in range(count):
                others.append(f"a{len(others)}-{uuid.uuid4().hex[:6]}")
                await client.execute_workflow("AgentExecutionWorkflow", quick, id=others[-1], task_queue=tq)

    try:
        async with worker(client, tq, "2@pod-b"):
            await client.execute_workflow("AgentExecutionWorkflow", quick, id=mine, task_queue=tq)
            await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 120}, id=later,
                                        task_queue=tq)
            assert [e["id"] for e in await eventually(lambda: view(2))] == [mine]
        monkeypatch.setattr(temporal_, "CLOSED_SHOWN_SECONDS", 0.0)  # only its worker's running keeps it
        for _ in range(2):  # each time two more runs read and cached, two older ones out
            await others_run(2)
            assert [e["id"] for e in await eventually(lambda: view(4))] == [mine]
        (entry,) = await eventually(lambda: view(4))
        assert (entry["id"], entry["status"]) == (mine, "running")
    finally:
        await access.close()
        await client.get_workflow_handle(later).terminate("test")


@workflow.defn(name="ChainedExecution")
class ChainedExecution:
    """Waits for `go`, then continues as new (`runs` more runs) or ends; with `runs` -1 its first
    attempt fails (a retry policy then starts it again)."""

    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def proceed(self) -> None:
        self.go = True

    @workflow.run
    async def run(self, runs: int) -> str:
        await workflow.wait_condition(lambda: self.go)
        if runs < 0 and workflow.info().attempt == 1:
            raise ApplicationError("the first attempt fails")
        if runs > 0:
            workflow.continue_as_new(runs - 1)
        return "done"


def chain_worker(client: Client, task_queue: str, identity: str) -> Worker:
    return Worker(client, task_queue=task_queue, workflows=[ChainedExecution], identity=identity,
                  workflow_runner=UnsandboxedWorkflowRunner())


async def test_a_worker_waits_for_its_execution_however_many_runs_it_goes_on_in(
    temporal: TemporalServer, client: Client, access: Temporal,
):
    """pod-b took an execution, which continued as new in a run pod-a took. Only the newest run of each
    workflow was listed: the execution left pod-b's view, and pod-b waited out its 1,800-s give-up.
    It waits for the execution to end, as pod-a does, also as told by a replica that never saw pod-b's
    run running, once more closed after it than a scan reads; another pod's view never shows it. The
    workflow id used again afterwards is another execution: pod-b's stays ended."""
    tq = f"tq-{secrets.token_hex(4)}"
    workflow_id = f"chain-{uuid.uuid4().hex[:6]}"

    async def views(newest_holder: str | None, replica: Temporal = access) -> tuple[list[dict[str, Any]], ...] | None:
        found = await replica.executions(endpoint(temporal), tq, limit=2, taken_first=True)
        if not any(e.id == workflow_id and e.holder == newest_holder and e.status == "running" for e in found):
            return None
        return tuple(executions.worker_view(found, hostname=pod) for pod in ("pod-b", "pod-a", "pod-c"))

    handle = await client.start_workflow("ChainedExecution", 1, id=workflow_id, task_queue=tq)
    async with chain_worker(client, tq, "2@pod-b"):
        b, a, c = await eventually(lambda: views("2@pod-b"))
        assert (b[0]["id"], b[0]["status"], a, c) == (workflow_id, "running", [], [])
    await handle.signal(ChainedExecution.proceed)  # its next run another worker's
    async with chain_worker(client, tq, "1@pod-a"):
        b, a, c = await eventually(lambda: views("1@pod-a"))
        assert [(e["id"], e["status"]) for e in b] == [(workflow_id, "running")]
        assert [(e["id"], e["status"]) for e in a] == [(workflow_id, "running")] and c == []
    async with worker(client, tq, "3@pod-c"):  # three more close: pod-b's run is out of a scan of 3
        for i in range(3):
            await client.execute_workflow("AgentExecutionWorkflow", {"duration_seconds": 0.1},
                                          id=f"c{i}-{uuid.uuid4().hex[:6]}", task_queue=tq)
    other = Temporal(timeout=2.0, coalesce=0.0, scan_limit=3)  # nothing read nor cached

    async def shown_to_b() -> tuple[list[dict[str, Any]], ...] | None:
        seen = await views("1@pod-a", other)
        return seen if seen and seen[0] else None

    async def ended(replica: Temporal) -> list[list[dict[str, Any]]] | None:
        found = await replica.executions(endpoint(temporal), tq, limit=2, taken_first=True)
        seen = [executions.worker_view(found, hostname=pod) for pod in ("pod-b", "pod-a")]
        return seen if all(view and view[0]["status"] == "completed" for view in seen) else None

    try:
        b, a, c = await eventually(shown_to_b)
        assert [(e["id"], e["status"]) for e in b] == [(workflow_id, "running")]
        async with chain_worker(client, tq, "1@pod-a"):
            await client.get_workflow_handle(workflow_id).signal(ChainedExecution.proceed)
            assert await client.get_workflow_handle(workflow_id).result() == "done"
        for replica in (access, other):
            b, a = await eventually(lambda: ended(replica))  # noqa: B023 (awaited at once)
            assert b[0]["id"] == a[0]["id"] == workflow_id and b[0]["completed_at"]
    finally:
        await other.close()
    await client.start_workflow("ChainedExecution", 0, id=workflow_id, task_queue=tq)  # nobody takes it
    try:
        b, _, _ = await eventually(lambda: views(None))
        assert [(e["id"], e["status"]) for e in b] == [(workflow_id, "completed")]
    finally:
        await client.get_workflow_handle(workflow_id).terminate("test")


async def test_a_worker_whose_run_failed_is_told_so_though_the_execution_is_retried_elsewhere(
    temporal: TemporalServer, client: Client, access: Temporal,
):
    """pod-b's run failed, and Temporal's retry ran the execution again on pod-a: only the newest run
    was listed, and pod-b, shown nothing, waited out its 1,800-s give-up. Its own run is over."""
    tq = f"tq-{secrets.token_hex(4)}"
    workflow_id = f"retried-{uuid.uuid4().hex[:6]}"
    handle = await client.start_workflow("ChainedExecution", -1, id=workflow_id, task_queue=tq,
                                         retry_policy=RetryPolicy(maximum_attempts=2))

    async def views(newest_holder: str) -> tuple[list[dict[str, Any]], ...] | None:
        found = await access.executions(endpoint(temporal), tq, limit=2, taken_first=True)
        if not any(e.id == workflow_id and e.holder == newest_holder for e in found):
            return None
        return tuple(executions.worker_view(found, hostname=pod) for pod in ("pod-b", "pod-a"))

    async with chain_worker(client, tq, "2@pod-b"):
        await eventually(lambda: views("2@pod-b"))
    await handle.signal(ChainedExecution.proceed)  # pod-a runs its failing task, then the retry
    async with chain_worker(client, tq, "1@pod-a"):
        # Its tasks wait out pod-b's sticky queue first (5 s each, Temporal's default), maybe twice.
        b, a = await eventually(lambda: views("1@pod-a"), timeout=30.0)
        assert [(e["id"], e["status"]) for e in b] == [(workflow_id, "failed")]
        assert [(e["id"], e["status"]) for e in a] == [(workflow_id, "running")]
        await client.get_workflow_handle(workflow_id).signal(ChainedExecution.proceed)
        assert await client.get_workflow_handle(workflow_id).result() == "done"
    # A retry's run is no chain: its earlier runs are not listed by workflow id.
    assert not any(key[2] == workflow_id for key in access._continuing)


async def test_a_holder_not_read_in_time_is_unknown_rather_than_untaken(
    temporal: TemporalServer, client: Client, access: Temporal, monkeypatch: pytest.MonkeyPatch,
):
    """A history not read within half the timeout (many new runs at once) leaves the holder unknown:
    told apart from a run nobody took, so that the pod holding it is not taken for idle."""
    tq = f"tq-{secrets.token_hex(4)}"
    await client.start_workflow("AgentExecutionWorkflow", {}, id=f"slow-{uuid.uuid4().hex[:8]}", task_queue=tq)
    await eventually(lambda: access.executions(endpoint(temporal), tq))  # listed by the visibility store
    read = Temporal._holder

    async def slow(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.5)  # past half the timeout (2 s)
        return await read(self, *args, **kwargs)

    fresh = Temporal(timeout=2.0, coalesce=0.0)  # nothing read before, nothing cached
    try:
        monkeypatch.setattr(Temporal, "_holder", slow)
        (late,) = await fresh.executions(endpoint(temporal), tq)
        assert late.status == "running" and late.holder is None and late.holder_unread
        monkeypatch.undo()
        (read_now,) = await fresh.executions(endpoint(temporal), tq)
        assert read_now.holder is None and not read_now.holder_unread  # nobody took it
        assert read_now.untaken_at is not None and abs(read_now.untaken_at - time.time()) < 10  # as of then
    finally:
        await fresh.close()


async def test_a_known_holder_is_told_however_slow_the_other_reads_and_a_refused_read_is_unread(
    temporal: TemporalServer, client: Client, access: Temporal, monkeypatch: pytest.MonkeyPatch,
):
    """A worker's finished execution, its holder cached, queued behind the reads of a backlog (each
    slow) was cut at half the timeout like them: the worker was never told it finished. A read the
    server refuses (rate-limited) failed the whole listing, and every worker of the queue got 503."""
    tq = f"tq-{secrets.token_hex(4)}"
    done = f"done-{uuid.uuid4().hex[:8]}"
    async with worker(client, tq, "7@pod-x"):
        await client.execute_workflow("AgentExecutionWorkflow", {"duration_seconds": 0.1}, id=done, task_queue=tq)

    async def read_done() -> bool:
        found = await access.executions(endpoint(temporal), tq)
        return any(e.id == done and e.holder == "7@pod-x" for e in found)
    await eventually(read_done)  # listed, and its holder known (cached)
    waiting = f"waiting-{uuid.uuid4().hex[:8]}"
    await client.start_workflow("AgentExecutionWorkflow", {}, id=waiting, task_queue=tq)  # nobody takes it
    await eventually(lambda: _lists(access, temporal, tq, waiting))
    read = Temporal._holder

    async def slow(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.5)  # past half the timeout (2 s)
        return await read(self, *args, **kwargs)

    monkeypatch.setattr(Temporal, "_holder", slow)
    found = {e.id: e for e in await access.executions(endpoint(temporal), tq)}
    assert found[done].holder == "7@pod-x" and not found[done].holder_unread
    assert found[waiting].holder_unread  # the slow one: unknown this time
    await eventually(lambda: _no_reads(access))  # it goes on for the next listings: let it end

    async def refused(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        raise RPCError("rate limited", RPCStatusCode.RESOURCE_EXHAUSTED, b"")

    monkeypatch.setattr(Temporal, "_holder", refused)
    found = {e.id: e for e in await access.executions(endpoint(temporal), tq)}
    assert found[waiting].holder_unread and found[done].holder == "7@pod-x"


async def _no_reads(access: Temporal) -> bool:
    return not access._reads


async def _lists(access: Temporal, temporal: TemporalServer, tq: str, workflow_id: str) -> bool:
    return any(e.id == workflow_id for e in await access.executions(endpoint(temporal), tq))


async def test_a_run_whose_first_task_is_not_due_yet_is_listed_as_delayed(temporal: TemporalServer, client: Client):
    """A cron run waiting for its time, a start delay, a retry's back-off: running, nobody's, and
    nothing any worker can take yet. Counted as waiting, it kept a scaling queue's worker idle for
    the whole delay, and an ephemeral queue from finishing."""
    import datetime

    tq = f"tq-{secrets.token_hex(4)}"
    later = await client.start_workflow("AgentExecutionWorkflow", {}, id=f"later-{uuid.uuid4().hex[:6]}",
                                        task_queue=tq, start_delay=datetime.timedelta(hours=1))
    now = await client.start_workflow("AgentExecutionWorkflow", {}, id=f"now-{uuid.uuid4().hex[:6]}", task_queue=tq)
    access = Temporal(timeout=2.0, coalesce=0.0)
    try:
        listed = await eventually(lambda: _listed_all(access, temporal, tq, 2))
        found = {e.id: e for e in listed}
        assert (found[later.id].status, found[later.id].holder, found[later.id].delayed) == ("running", None, True)
        assert (found[now.id].holder, found[now.id].delayed, found[now.id].due_at) == (None, False, None)
        # When it may be taken, by its history: before then it is no worker's earlier execution.
        due, made = found[later.id].due_at, times.parse(found[later.id].created_at or "")
        assert due is not None and abs(due - (made + 3600)) < 5
    finally:
        await access.close()
        for handle in (later, now):
            await handle.terminate("test")

async def test_a_reset_run_is_held_by_the_worker_that_takes_it_after_the_reset(temporal: TemporalServer,
                                                                               client: Client):
    """A reset copies the earlier run's history, its first WorkflowTaskStarted with it: the reset run
    was credited to the earlier run's worker (gone, in the review's case), and the worker running it
    was shown nothing, then waited for its give-up."""
    from temporalio.api.enums.v1 import EventType
    from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest

    tq = f"tq-{secrets.token_hex(4)}"
    handle = await client.start_workflow("AgentExecutionWorkflow", {"duration_seconds": 0},
                                         id=f"reset-{uuid.uuid4().hex[:6]}", task_queue=tq)
    async with worker(client, tq, "1@pod-a"):
        await handle.result()
    history = await handle.fetch_history()
    first_done = next(e.event_id for e in history.events
                      if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
    reset = await client.workflow_service.reset_workflow_execution(ResetWorkflowExecutionRequest(
        namespace=temporal.namespace, workflow_execution=temporal_.ProtoExecution(workflow_id=handle.id),
        reason="test", workflow_task_finish_event_id=first_done, request_id=uuid.uuid4().hex))
    async with worker(client, tq, "2@pod-c"):
        await client.get_workflow_handle(handle.id, run_id=reset.run_id).result()
    # Reset again, past the first reset: its history holds the first reset's, copied, and pod-c's task.
    reset_history = await client.get_workflow_handle(handle.id, run_id=reset.run_id).fetch_history()
    last_done = [e.event_id for e in reset_history.events
                 if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED][-1]
    again = await client.workflow_service.reset_workflow_execution(ResetWorkflowExecutionRequest(
        namespace=temporal.namespace, workflow_execution=temporal_.ProtoExecution(workflow_id=handle.id),
        reason="test", workflow_task_finish_event_id=last_done, request_id=uuid.uuid4().hex))
    async with worker(client, tq, "3@pod-d"):
        await client.get_workflow_handle(handle.id, run_id=again.run_id).result()
    access = Temporal(timeout=2.0, coalesce=0.0)
    try:
        async def all_three() -> list[Execution] | None:
            found = await access.executions(endpoint(temporal), tq, limit=10, taken_first=True)
            return found if len(found) == 3 else None

        holders = {e.run_id: e.holder for e in await eventually(all_three)}
        assert holders[again.run_id] == "3@pod-d"
        assert holders[reset.run_id] == "2@pod-c"
        assert holders[handle.result_run_id] == "1@pod-a"  # type: ignore[index]
    finally:
        await access.close()


async def test_a_listing_reads_at_most_the_scan_limit(temporal: TemporalServer, client: Client):
    tq = f"tq-{secrets.token_hex(4)}"
    started = [await client.start_workflow("AgentExecutionWorkflow", {}, id=f"s{i}-{uuid.uuid4().hex[:6]}",
                                           task_queue=tq) for i in range(5)]
    whole, scant = Temporal(timeout=2.0, coalesce=0.0), Temporal(timeout=2.0, coalesce=0.0, scan_limit=3)
    try:
        listed = await eventually(lambda: _listed_all(whole, temporal, tq, 5))
        assert {e.id for e in listed} == {handle.id for handle in started}
        assert all(e.status == "running" and e.workflow_type == "AgentExecutionWorkflow" and e.created_at
                   and e.completed_at is None for e in listed)
        assert len(await scant.executions(endpoint(temporal), tq)) == 3
        # Which workers run an activity: none here; past the scan's bound, unknown (not "none": a pod
        # running one of those left out would be taken for idle).
        assert await whole.activity_workers(endpoint(temporal), tq) == frozenset()
        assert await scant.activity_workers(endpoint(temporal), tq) is None
    finally:
        await whole.close()
        await scant.close()
        for handle in started:
            await handle.terminate("test")


async def test_a_worker_is_shown_nothing_while_the_scan_may_have_left_its_first_execution_out(
    temporal: TemporalServer, client: Client,
):
    """More run than a scan reads (here 2): the oldest, pod-b's first, was left out, and pod-b was shown
    its second as its execution. Latched onto that one, it would exit once it closed, the first
    still running on it."""
    tq = f"tq-{secrets.token_hex(4)}"
    slow = {"duration_seconds": 120}
    first, second, waiting = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("b1", "b2", "w"))
    whole, scant = Temporal(timeout=2.0, coalesce=0.0), Temporal(timeout=2.0, coalesce=0.0, scan_limit=2)

    async def held(access: Temporal, ids: set[str], listed: str | None = None) -> temporal_.Listing | None:
        found = await access.executions(endpoint(temporal), tq, limit=2, taken_first=True)
        if listed is not None and listed not in {e.id for e in found}:
            return None  # not in the visibility store yet
        return found if {e.id for e in found if e.holder == "2@pod-b"} == ids else None

    try:
        async with worker(client, tq, "2@pod-b"):
            await client.start_workflow("AgentExecutionWorkflow", slow, id=first, task_queue=tq)
            await eventually(lambda: held(whole, {first}))
            await client.start_workflow("AgentExecutionWorkflow", slow, id=second, task_queue=tq)
            await eventually(lambda: held(whole, {first, second}))
        await client.start_workflow("AgentExecutionWorkflow", {}, id=waiting, task_queue=tq)  # nobody takes it

        listed = await eventually(lambda: held(whole, {first, second}, listed=waiting))
        assert not listed.cut
        (entry,) = executions.worker_view(listed, hostname="pod-b", cut=listed.cut)
        assert (entry["id"], entry["status"], entry["held_executions"]) == (first, "running", 2)

        cut = await eventually(lambda: held(scant, {second}))
        assert cut.cut and {e.id for e in cut} == {second, waiting}
        assert executions.worker_view(cut, hostname="pod-b", cut=cut.cut) == []
        # The listing alone shows its second as its first: what it was shown before.
        assert [e["id"] for e in executions.worker_view(cut, hostname="pod-b")] == [second]
    finally:
        await whole.close()
        await scant.close()
        for workflow_id in (first, second, waiting):
            await client.get_workflow_handle(workflow_id).terminate("test")


async def _listed_all(access: Temporal, temporal: TemporalServer, tq: str, count: int) -> list[Execution] | None:
    found = await access.executions(endpoint(temporal), tq)
    return found if len(found) == count else None


async def test_concurrent_listings_are_coalesced(temporal: TemporalServer, monkeypatch: pytest.MonkeyPatch):
    access = Temporal(timeout=2.0)  # the default 1 s coalescing window
    calls = 0
    original = Temporal._scan  # one visibility scan per listing

    def counting(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Temporal, "_scan", counting)
    try:
        results = await asyncio.gather(*(access.executions(endpoint(temporal), "coalesced") for _ in range(20)))
        assert calls == 1 and all(r == results[0] for r in results)
        await access.executions(endpoint(temporal), "coalesced")  # within the window: the same listing
        assert calls == 1
        await asyncio.sleep(1.1)
        await access.executions(endpoint(temporal), "coalesced")
        assert calls == 2
    finally:
        await access.close()


async def test_temporal_down_is_unavailable_within_the_timeout_then_back(temporal: TemporalServer,
                                                                          access: Temporal):
    tq = f"tq-{secrets.token_hex(4)}"
    assert await access.executions(endpoint(temporal), tq) == []
    temporal.stop()
    try:
        for _ in range(2):  # the broken client is dropped; the next call fails at once (DOWN_SECONDS)
            began = time.monotonic()
            with pytest.raises(TemporalUnavailable) as caught:
                await access.executions(endpoint(temporal), tq)
            assert time.monotonic() - began < 2.0 + 3.0  # within the timeout, with room for a busy machine
            assert temporal.address in str(caught.value)
    finally:
        temporal.start()
    await asyncio.sleep(DOWN_SECONDS)  # until then, calls after the failed connection fail without trying
    assert await access.executions(endpoint(temporal), tq) == []


async def test_unknown_namespace_is_unavailable_with_a_clear_reason(temporal: TemporalServer, access: Temporal):
    with pytest.raises(TemporalUnavailable, match="no-such-namespace"):
        await access.executions(Endpoint(host=temporal.address, namespace="no-such-namespace", api_key="k"), "tq")


async def test_tls_to_a_server_without_it_is_unavailable_with_a_word_on_tls(temporal: TemporalServer,
                                                                             access: Temporal):
    """An API key turns TLS on by default; the SDK's words for a plaintext answer
    (`InvalidContentType`) say nothing of TLS."""
    with pytest.raises(TemporalUnavailable, match=r"set spec\.temporal\.tls to false"):
        await access.executions(Endpoint(host=temporal.address, namespace=temporal.namespace, api_key="k",
                                         tls=True), "tq")


async def test_a_refusal_keeps_the_connection_it_came_over(temporal: TemporalServer, access: Temporal,
                                                             monkeypatch: pytest.MonkeyPatch):
    # Every queue of a namespace Temporal does not know was probed over a new connection each time.
    dialled = 0
    connect = Client.connect

    async def counting(*args: Any, **kwargs: Any) -> Client:
        nonlocal dialled
        dialled += 1
        return await connect(*args, **kwargs)

    monkeypatch.setattr(Client, "connect", counting)
    unknown = Endpoint(host=temporal.address, namespace="no-such-namespace")
    for task_queue in ("tq-1", "tq-2", "tq-3"):
        with pytest.raises(TemporalUnavailable, match="no-such-namespace"):
            await access.executions(unknown, task_queue)
    assert dialled == 1


async def test_describe_task_queue_names_the_pollers(temporal: TemporalServer, client: Client, access: Temporal):
    tq = f"tq-{secrets.token_hex(4)}"
    async with worker(client, tq, "99@pod-c"):
        async def polled() -> Any:
            info = await access.describe_task_queue(endpoint(temporal), tq)
            return info if [p.identity for p in info.pollers] == ["99@pod-c"] else None

        info = await eventually(polled)
    assert info.backlog in (0, None)


def connections_to(port: int) -> int:
    """This process's TCP connections to `port` (from /proc: the sockets of its fds)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                    count += 1
    return count


async def test_connections_are_kept_to_the_most_and_the_least_recently_used_goes(temporal: TemporalServer,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    # Queues each on their own namespace and API key kept one connection (~170 KiB, one fd) each, for
    # up to 10 minutes: 10,000 of them checked in turn, 1.7 GiB.
    dialled: list[str] = []
    connect = Client.connect

    async def counting(*args: Any, **kwargs: Any) -> Client:
        dialled.append(kwargs["api_key"])
        return await connect(*args, **kwargs)

    monkeypatch.setattr(Client, "connect", counting)
    port = int(temporal.address.rsplit(":", 1)[1])
    access = Temporal(timeout=2.0, coalesce=0.0, max_clients=3)
    # A client and the SDK's service client refer to each other: dropped, one kept its connection
    # until a full collection, which on a large heap may be long. Closed when let go, none waits for it.
    gc.collect()  # clients other tests dropped (so kept, as said) hold no connection from here on
    before = connections_to(port)
    gc.disable()
    try:
        # The dev server checks no key: each key is another endpoint to the operator, on one server.
        endpoints = [Endpoint(host=temporal.address, namespace=temporal.namespace, api_key=f"key-{n}")
                     for n in range(8)]
        for e in endpoints:
            assert await access.executions(e, "tq") == []
            # The first, used again each time, is never the least recently used: its connection stays.
            assert await access.executions(endpoints[0], "tq") == []
        assert access.clients == 3

        async def three_open() -> bool:
            return connections_to(port) - before <= 3

        await eventually(three_open, timeout=5.0)
        assert dialled == [f"key-{n}" for n in range(8)]
        # Kept: key-6, key-7 and key-0. key-5 was let go for key-7, and connects anew.
        assert await access.executions(endpoints[7], "tq") == []
        assert len(dialled) == 8
        assert await access.executions(endpoints[5], "tq") == []
        assert dialled[8:] == ["key-5"]
    finally:
        gc.enable()
        await access.close()
