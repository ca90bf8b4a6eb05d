"""The WorkerQueue resource, defined once: the CRD schema is generated from these models.

Field docstrings become the schema's descriptions, so `kubectl explain workerqueue.spec` reads them.
CEL rules that the API server checks on `kubectl apply` are declared next to the fields they guard.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "agentcontrol.dev"
VERSION = "v1alpha1"
KIND = "WorkerQueue"
PLURAL = "workerqueues"
SINGULAR = "workerqueue"
SHORT_NAMES = ("wq",)
CATEGORIES = ("agentcontrol",)

DEFAULT_WEBSOCKET_FEATURES = ("events", "control", "heartbeat", "config_update")


def cel(rule: str, message: str) -> dict[str, Any]:
    """One `x-kubernetes-validations` entry; kept beside the model it guards."""
    return {"rule": rule, "message": message}


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are the API server's business."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",
        frozen=True,
    )


class SecretKeyRef(_Model):
    """A key of a Secret in the WorkerQueue's own namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside the Secret's data."""


class SecretRef(_Model):
    """A whole Secret in the WorkerQueue's own namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""


class TemporalSpec(_Model):
    """Where the workers' Temporal server is; unset fields fall back to the operator's defaults."""

    host: str | None = Field(default=None, max_length=1024)
    """Temporal frontend address, host:port (e.g. `my-ns.tmprl.cloud:7233`)."""
    namespace: str | None = Field(default=None, max_length=256)
    """Temporal namespace the workers poll."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the Temporal API key; absent means no key (e.g. a self-hosted server)."""


class LiteLLMSpec(_Model):
    """The LiteLLM proxy the workers call; unset fields fall back to the operator's defaults."""

    url: str | None = Field(default=None, max_length=2048)
    """Base URL of the LiteLLM proxy."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the LiteLLM API key."""


class RedisSpec(_Model):
    """Redis for worker event streaming. Redis is enabled exactly when a URL is configured."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!(has(self.url) && has(self.urlSecretRef))",
                    "set either redis.url or redis.urlSecretRef, not both"),
            ]
        }
    )

    url: str | None = Field(default=None, max_length=2048, pattern=r"^rediss?://")
    """Redis URL (redis:// or rediss://). Use urlSecretRef instead when the URL carries a password."""
    url_secret_ref: SecretKeyRef | None = None
    """Secret key holding the Redis URL."""
    password_secret_ref: SecretKeyRef | None = None
    """Secret key holding the Redis password; without it the password is taken from the URL's userinfo."""


class WebsocketSpec(_Model):
    """The control websocket the workers connect to. This operator serves none itself."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.url) || self.url.startsWith('ws://') || self.url.startsWith('wss://')",
                    "websocket.url must start with ws:// or wss://"),
            ]
        }
    )

    enabled: bool | None = None
    """Whether workers connect to a websocket. Default: enabled exactly when a url is given.
    Enabled without a url, workers are sent the control-plane URL's /api/v1/ws/workers/<worker_id>."""
    url: str | None = Field(default=None, max_length=2048)
    """Websocket URL handed to the workers."""
    features: list[str] = Field(default=list(DEFAULT_WEBSOCKET_FEATURES), max_length=32)
    """Websocket features the workers may use."""


class NatsSpec(_Model):
    """NATS settings for the workers; every key of the Secret becomes one entry of `nats_config`."""

    config_secret_ref: SecretRef
    """Secret whose keys and values are passed to the workers as `nats_config`."""


class AuthSpec(_Model):
    """Who may call /start for this queue besides Kubernetes identities allowed by RBAC."""

    token_secret_refs: list[SecretKeyRef] = Field(default_factory=list, max_length=16)
    """Secret keys holding queue tokens. Several may be listed so that a token can be rotated without
    downtime. Empty: the operator creates `<queue-name>-worker-token` with a random token under `token`."""


class WorkerQueueSpec(_Model):
    """Desired configuration of a worker queue."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.queueId) == has(oldSelf.queueId)"
                    " && (!has(self.queueId) || self.queueId == oldSelf.queueId)",
                    "queueId is immutable"),
            ]
        }
    )

    queue_id: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Queue id that workers pass to /start. Default: the object's metadata.uid. Immutable."""
    task_queue_name: str | None = Field(default=None, min_length=1, max_length=256)
    """Temporal task queue the workers poll. Default: the queue id."""
    environment_name: str | None = Field(default=None, min_length=1, max_length=253)
    """Environment reported to workers. Default: the WorkerQueue's namespace."""
    organization_id: str | None = Field(default=None, min_length=1, max_length=256)
    """Organization the workers belong to. Default: the operator's configured organization id."""
    display_name: str | None = Field(default=None, max_length=256)
    """Human-readable name, for people only."""
    heartbeat_interval_seconds: int = Field(default=60, ge=10, le=300)
    """How often workers send a heartbeat, in seconds."""
    max_workers: int | None = Field(default=None, ge=1)
    """Upper bound on workers the operator runs for this queue at once."""
    suspend: bool = False
    """A suspended queue answers /start with 400 and gets no new worker pods."""
    ephemeral: bool = False
    """The queue is deleted once its workers have finished."""
    single_execution: bool = False
    """Each worker runs one task and exits."""
    temporal: TemporalSpec = Field(default_factory=TemporalSpec)
    """Temporal connection."""
    litellm: LiteLLMSpec = Field(default_factory=LiteLLMSpec)
    """LiteLLM proxy."""
    redis: RedisSpec | None = None
    """Redis; absent means Redis is disabled for the workers."""
    websocket: WebsocketSpec = Field(default_factory=WebsocketSpec)
    """Control websocket."""
    nats: NatsSpec | None = None
    """NATS; absent means `nats_config` is null."""
    auth: AuthSpec = Field(default_factory=AuthSpec)
    """Queue tokens accepted by /start."""


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Model):
    """A Kubernetes-style condition."""

    type: str = Field(max_length=316)
    """Condition type, PascalCase (`Ready`, `SecretsResolved`)."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(max_length=1024)
    """One CamelCase word saying why."""
    message: str = Field(default="", max_length=32768)
    """A sentence for people."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed from."""


class WorkerQueueStatus(_Model):
    """Observed state, written by the operator only."""

    queue_id: str | None = None
    """The queue id in effect (spec.queueId or metadata.uid)."""
    observed_generation: int | None = None
    """The metadata.generation last acted upon."""
    token_secret_name: str | None = None
    """The Secret holding the queue token the operator generated, if any."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready summarizes the others."""


def parse_spec(raw: Any) -> WorkerQueueSpec:
    """The spec of a WorkerQueue body (already schema-checked by the API server)."""
    return WorkerQueueSpec.model_validate(raw or {})
