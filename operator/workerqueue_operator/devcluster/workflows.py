"""The test worker's workflows: the real worker's workflow names, with a tiny body and no LLM.

Input (a JSON object, every key optional): `execution_id` (default: the workflow id),
`duration_seconds` (how long the activity runs, default 0.5), `fail: true` (the workflow fails),
`patch_execution: true` (the activity first calls `PATCH /api/v1/executions/{id}` on the control
plane, as the real worker's first activity does; a 404 there fails the workflow at once).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

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
    result: str = await workflow.execute_activity(
        "run_execution", params,
        start_to_close_timeout=datetime.timedelta(seconds=duration + 60),
        retry_policy=RetryPolicy(maximum_attempts=3),
    )
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


WORKFLOWS = (AgentExecutionWorkflow, TeamExecutionWorkflow, ScheduledJobWrapperWorkflow, DynamicAgentExecutionWorkflow)
