"""Request and response bodies of `POST /api/v1/worker-queues/{queue_id}/start`.

Names and fields follow the Agent Control Plane API contract (shared/spec), which the real worker
client reads by key: every required response field must always be present.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


class WorkerSystemInfo(BaseModel):
    """Worker system information"""

    model_config = ConfigDict(title="WorkerSystemInfo")

    hostname: str | None = None
    platform: str | None = None
    os_name: str | None = None
    os_version: str | None = None
    python_version: str | None = None
    cli_version: str | None = None
    sdk_version: str | None = None
    pid: int | None = None
    cwd: str | None = None
    supported_runtimes: list[str] | None = None
    llm_gateway_url: str | None = None
    docker_available: bool | None = None
    docker_version: str | None = None
    cpu_count: int | None = None
    cpu_percent: float | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    memory_percent: float | None = None
    disk_total: int | None = None
    disk_used: int | None = None
    disk_percent: float | None = None
    uptime_seconds: float | None = None


class WorkerStartRequest(BaseModel):
    """Worker start request with SDK version and system info"""

    # Unknown fields are ignored, as FastAPI's default pydantic models do.
    model_config = ConfigDict(title="WorkerStartRequest", extra="ignore")

    worker_sdk_version: str | None = None
    system_info: WorkerSystemInfo | None = None
    control_plane_url: str | None = None


class WorkerStartResponse(BaseModel):
    """Worker start configuration"""

    model_config = ConfigDict(title="WorkerStartResponse")

    worker_id: str
    task_queue_name: str
    temporal_namespace: str
    temporal_host: str
    temporal_api_key: str
    organization_id: str
    control_plane_url: str
    heartbeat_interval: int
    litellm_api_url: str
    litellm_api_key: str
    queue_name: str
    environment_name: str
    queue_id: str
    queue_ephemeral: bool = False
    queue_single_execution: bool = False
    redis_url: str | None = None
    redis_password: str | None = None
    redis_enabled: bool = False
    websocket_enabled: bool = True
    websocket_url: str | None = None
    websocket_features: list[str] = []
    nats_config: dict[str, str] | None = None
    control_plane_sdk_version: str


def _cut(length: int) -> Callable[[Any], Any]:
    def cut(value: Any) -> Any:
        return value[:length] if isinstance(value, str) else value
    return cut


def _clamp(low: int, high: int) -> Callable[[int | None], int | None]:
    def clamp(value: int | None) -> int | None:
        return value if value is None else min(max(value, low), high)
    return clamp


# What a worker reports is kept in its Lease, bounded: cut or clamped there rather than refused, as
# the reference (which takes any string or integer) never refuses it. A heartbeat refused would not
# renew the registration, and the worker, which only logs the refusal, would expire while it runs.
Status = Annotated[str, BeforeValidator(_cut(64))]
TaskId = Annotated[str | None, BeforeValidator(_cut(256))]
Count = Annotated[int, AfterValidator(_clamp(0, 2**53))]
Reason = Annotated[str, BeforeValidator(_cut(256))]
ExitCode = Annotated[int | None, AfterValidator(_clamp(-(2**31), 2**31 - 1))]


class WorkerHeartbeatRequest(BaseModel):
    """What a worker sends every HEARTBEAT_INTERVAL seconds (worker-protocol.md). `status` is cut at
    64 characters, `current_task_id` at 256, `tasks_processed` clamped to 0..2^53."""

    model_config = ConfigDict(title="WorkerHeartbeatRequest", extra="ignore")

    status: Status = "active"
    tasks_processed: Count = 0
    current_task_id: TaskId = None
    worker_metadata: dict[str, Any] = Field(default_factory=dict)
    system_info: WorkerSystemInfo | None = None
    logs: list[Any] | None = None
    """Accepted and dropped: logs are never stored in the API server."""


class WorkerDisconnectRequest(BaseModel):
    """Sent once by a worker that ends on its own (never on SIGTERM). `reason` is cut at 256
    characters, `exit_code` clamped to a 32-bit integer's range."""

    model_config = ConfigDict(title="WorkerDisconnectRequest", extra="ignore")

    reason: Reason = "shutdown"
    exit_code: ExitCode = None
    error_message: str | None = None


class WorkerInfo(BaseModel):
    """One live worker of a queue, as `GET /api/v1/worker-queues/{queue_id}/workers` lists it."""

    model_config = ConfigDict(title="WorkerInfo")

    id: str
    status: str
    tasks_processed: int
    current_task_id: str | None = None
    last_heartbeat: str | None = None
    registered_at: str
    hostname: str | None = None
    pod: str | None = None


class ExecutionInfo(BaseModel):
    """One execution of a queue (a Temporal workflow of its task queue), in the worker's terms."""

    model_config = ConfigDict(title="ExecutionInfo", extra="allow")

    id: str
    status: str
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    temporal_workflow_id: str
    temporal_run_id: str | None = None


class ValidationError(BaseModel):
    """One entry of a 422 answer's `detail` (FastAPI's shape)."""

    model_config = ConfigDict(title="ValidationError")

    loc: list[str | int] = Field(title="Location")
    msg: str = Field(title="Message")
    type: str = Field(title="Error Type")


class HTTPValidationError(BaseModel):
    """The 422 answer's body."""

    model_config = ConfigDict(title="HTTPValidationError")

    detail: list[ValidationError] = []


# The reference API publishes the request model under its module-qualified name; so do we.
REQUEST_SCHEMA_NAME = "control_plane_api__app__routers__worker_queues__WorkerStartRequest"
START_OPERATION_ID = "start_worker_for_queue_api_v1_worker_queues__queue_id__start_post"
