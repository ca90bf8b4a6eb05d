"""The test worker's workflows: the real worker's workflow names, with a tiny body and no LLM.

Input (a JSON object, every key optional): `execution_id` (default: the workflow id),
`duration_seconds` (how long the activity runs, default 0.5), `fail: true` (the workflow fails),
`patch_execution: true` (the activity first calls `PATCH /api/v1/executions/{id}` on the control
plane, as the real worker's first activity does; a 404 there fails the workflow at once),
`local_activity: true` (the activity runs as a local activity, inside the workflow's one workflow
task on the worker that took it: what `WORKFLOWS_PER_WORKER` counts), `continue_as_new: N` (after
its activity the run continues as new N more times, each run with the same input otherwise: one
execution over N + 1 runs, each taken by whichever worker polls first).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    CustomSlotSupplier,
    FixedSizeSlotSupplier,
    SlotMarkUsedContext,
    SlotPermit,
    SlotReleaseContext,
    SlotReserveContext,
    WorkerTuner,
)

WORKFLOW_NAMES = (
    "AgentExecutionWorkflow", "TeamExecutionWorkflow", "ScheduledJobWrapperWorkflow", "DynamicAgentExecutionWorkflow",
)
DEFAULT_DURATION_SECONDS = 0.5


@dataclass
class Progress:
    """What the worker's heartbeats report: tasks done and the one running."""

    tasks_processed: int = 0
    current_task_id: str | None = None
    running: set[str] = field(default_factory=set)


class Activities:
    """The activity, bound to the worker's control plane and credential and its progress counters."""

    def __init__(self, *, control_plane_url: str, api_key: str, progress: Progress,
                 log: Callable[[str], None]) -> None:
        self._url = control_plane_url.rstrip("/")
        self._api_key = api_key
        self._progress = progress
        self._log = log

    @activity.defn(name="run_execution")
    async def run_execution(self, params: dict[str, Any]) -> str:
        execution_id = str(params.get("execution_id") or activity.info().workflow_id)
        self._progress.running.add(execution_id)
        self._progress.current_task_id = execution_id
        self._log(f"execution {execution_id} started")
        try:
            if params.get("patch_execution"):
                status = await asyncio.to_thread(self._patch_execution, execution_id)
                if status == 404:
                    raise ApplicationError(f"execution {execution_id} not found", non_retryable=True)
            await asyncio.sleep(float(params.get("duration_seconds", DEFAULT_DURATION_SECONDS)))
            if params.get("fail"):
                raise ApplicationError("the input asked to fail", non_retryable=True)
            return "done"
        finally:
            self._progress.running.discard(execution_id)
            self._progress.tasks_processed += 1
            if self._progress.current_task_id == execution_id:
                self._progress.current_task_id = next(iter(self._progress.running), None)
            self._log(f"execution {execution_id} ended")

    def _patch_execution(self, execution_id: str) -> int:
        body = json.dumps({"status": "running"}).encode()
        request = urllib.request.Request(  # noqa: S310 - the control plane's URL from /start
            f"{self._url}/api/v1/executions/{execution_id}", data=body, method="PATCH",
            headers={"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError as e:
            raise ApplicationError(f"PATCH execution {execution_id}: {e}") from None


async def _run(params: dict[str, Any] | None) -> str:
    params = dict(params or {})
    params.setdefault("execution_id", workflow.info().workflow_id)
    duration = float(params.get("duration_seconds", DEFAULT_DURATION_SECONDS))
    run = workflow.execute_local_activity if params.get("local_activity") else workflow.execute_activity
    result: str = await run(
        "run_execution", params,
        start_to_close_timeout=datetime.timedelta(seconds=duration + 60),
        retry_policy=RetryPolicy(maximum_attempts=3),
    )
    more = int(params.get("continue_as_new", 0))
    if more > 0:
        workflow.continue_as_new({**params, "continue_as_new": more - 1})
    return result


@workflow.defn(name="AgentExecutionWorkflow")
class AgentExecutionWorkflow:
    @workflow.run
    async def run(self, params: dict[str, Any] | None = None) -> str:
        return await _run(params)


@workflow.defn(name="TeamExecutionWorkflow")
class TeamExecutionWorkflow:
    @workflow.run
    async def run(self, params: dict[str, Any] | None = None) -> str:
        return await _run(params)


@workflow.defn(name="ScheduledJobWrapperWorkflow")
class ScheduledJobWrapperWorkflow:
    @workflow.run
    async def run(self, params: dict[str, Any] | None = None) -> str:
        return await _run(params)


@workflow.defn(name="DynamicAgentExecutionWorkflow")
class DynamicAgentExecutionWorkflow:
    @workflow.run
    async def run(self, params: dict[str, Any] | None = None) -> str:
        return await _run(params)


class WorkflowsTaken(CustomSlotSupplier):
    """Workflow-task slots for a worker that starts at most `limit` workflows in its life.

    One slot at a time, and none once `limit` tasks were handed out: with no sticky cache every
    workflow task comes from the task queue itself, so a workflow that runs in one task (its work in
    a local activity) is one task here. The SDK reserves on the event loop but marks and releases
    from its own threads: the counters are guarded by a lock and the waiter woken through the loop.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._held = False
        self._lock = threading.Lock()
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _try(self) -> bool:
        with self._lock:
            if self._held or self.taken >= self.limit:
                return False
            self._held = True
            return True

    async def reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit:
        if self._changed is None:
            self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        while True:
            self._changed.clear()  # before the check: a release after it sets the event again
            if self._try():
                return SlotPermit()
            await self._changed.wait()

    def try_reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit | None:
        return None  # eager tasks would be workflows taken without a poll

    def mark_slot_used(self, ctx: SlotMarkUsedContext) -> None:
        with self._lock:
            self.taken += 1

    def release_slot(self, ctx: SlotReleaseContext) -> None:
        with self._lock:
            self._held = False
        if self._loop is not None and self._changed is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._changed.set)


def tuner(workflows_per_worker: int | None) -> WorkerTuner | None:
    """A tuner that caps the workflows a worker takes; None (the SDK's defaults) without a cap."""
    if workflows_per_worker is None:
        return None
    return WorkerTuner.create_composite(
        workflow_supplier=WorkflowsTaken(workflows_per_worker),
        activity_supplier=FixedSizeSlotSupplier(100), local_activity_supplier=FixedSizeSlotSupplier(100),
        nexus_supplier=FixedSizeSlotSupplier(100))


WORKFLOWS = (AgentExecutionWorkflow, TeamExecutionWorkflow, ScheduledJobWrapperWorkflow, DynamicAgentExecutionWorkflow)
