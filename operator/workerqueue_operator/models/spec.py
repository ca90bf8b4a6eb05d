"""The WorkerQueue resource, defined once: the CRD schema is generated from these models.

Field docstrings become the schema's descriptions, so `kubectl explain workerqueue.spec` reads them.
CEL rules that the API server checks on `kubectl apply` are declared next to the fields they guard.
"""

from __future__ import annotations

import functools
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

LITELLM_URL_PATTERN = r"^https?://[^\t\n\f\r /?#]+[^\t\n\f\r ]*$"
"""Spelt out rather than with \\s: the API server's (Go's) \\s is these four and the space only, and
Python's any Unicode space; a URL the CRD let in was then refused as stored before the rule."""
UPSTREAM_URL_PATTERN = r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^?#\x00-\x20\x7f]*)?$"
"""An upstream base URL: http(s), a host name or [IPv6] and a port, a path without spaces or control
characters (aiohttp refuses them: each call was a 500); no credentials, query or fragment (the host
is what metrics are labelled with)."""
_UPSTREAM_URL_STORED = r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^?#]*)?$"
"""What the operator parses: the CRD's rule before the path's spaces and control characters were
refused, so that a queue stored then is reported (UpstreamInvalid), not dropped."""
TEMPORAL_HOST_PATTERN = (r"^$|^([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):"
                         r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})$")
"""A Temporal frontend address: a host name or [IPv6], and a port from 1 to 65535 (the SDK dials
nothing else; a queue naming anything else ran pods that crash-looped, Ready all the while); or
empty, the operator's host, as the operator reads it."""
WEBSOCKET_URL_PATTERN = r"^wss?://[^\x00-\x20\x7f /?#]+[^\x00-\x20\x7f]*$"
"""A ws(s) URL with a host and no whitespace or control characters (handed to the workers as it is)."""
REDIS_URL_PATTERN = r"^rediss?://[^\x00-\x20\x7f]*$"
"""A redis(s) URL without whitespace or control characters (no client can parse those)."""
URL_PORT_OUT_OF_RANGE = (r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#@]*@)?([^/?#@:\[]*|\[[^\]/?#]*\]):"
                         r"(0*([1-9][0-9]{5,}|6553[6-9]|655[4-9][0-9]|65[6-9][0-9]{2}|6[6-9][0-9]{3}|[7-9][0-9]{4})"
                         r"|[0-9]*[^0-9/?#@][^/?#@]*)([/?#]|$)")
"""A URL whose port is no number from 0 to 65535, which no client can dial (urlsplit refuses it too):
for schemas (`not`), as code checks it with port_in_range."""
PORT_IN_RANGE: dict[str, Any] = {"not": {"pattern": URL_PORT_OUT_OF_RANGE}}
"""A JSON Schema's rule that a URL's port is in range (see URL_PORT_OUT_OF_RANGE): the chart's values."""


def port_in_range(url: str) -> bool:
    """Whether a client can parse the URL's port (absent, or a number from 0 to 65535)."""
    try:
        urlsplit(url).port  # noqa: B018 - raises when out of range or not a number
    except ValueError:
        return False
    return True


GROUP = "agentcontrol.dev"
VERSION = "v1alpha1"
KIND = "WorkerQueue"
PLURAL = "workerqueues"
SINGULAR = "workerqueue"
SHORT_NAMES = ("wq",)
CATEGORIES = ("agentcontrol",)
MAX_NAME_LENGTH = 230
"""Longest WorkerQueue name: objects named after it must stay within Kubernetes' 253 characters
(`<name>-worker-token`, `<name>-w<index>-token` with an index of up to 15 digits)."""

DEFAULT_WEBSOCKET_FEATURES = ("events", "control", "heartbeat", "config_update")


def cel(rule: str, message: str) -> dict[str, Any]:
    """One `x-kubernetes-validations` entry; kept beside the model it guards."""
    return {"rule": rule, "message": message}


# The CRD's rules that a value must not match are CEL, not the schema's `not`: the API server words
# a `not` as `<nil>: Invalid value: "": "spec.redis.url" must not validate the schema (not)`.
CRD_PORT_IN_RANGE: dict[str, Any] = {"x-kubernetes-validations": [
    cel(f"!self.matches(r'{URL_PORT_OUT_OF_RANGE}')", "the URL's port must be a number from 0 to 65535")]}
"""The CRD's rule that a URL's port is in range (see URL_PORT_OUT_OF_RANGE)."""


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are the API server's business."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",
        frozen=True,
    )


SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
"""A key of a Secret's data, as the API server holds them, but for `.`, `..` and those that begin
with `..` (the CRD's rule on SecretKeyRef.key)."""
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""A Kubernetes object name (a DNS subdomain, RFC 1123), as the API server holds a Secret's to. Not
only for a clear error: a name such as `../../other/secrets/x` went into the URL of a GET, which
the HTTP client resolved to another namespace's Secret."""


class SecretKeyRef(_Model):
    """A key of a Secret in the WorkerQueue's own namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN)
    """Name of the Secret."""
    # In the CRD only: a key no Secret can hold, refused at apply; one stored before the rule is
    # reported as not found (SecretKeyNotFound), as it is, rather than the queue dropped.
    key: str = Field(min_length=1, max_length=253, json_schema_extra={
        "pattern": SECRET_KEY_PATTERN, "x-kubernetes-validations": [
            cel("self != '.' && !self.startsWith('..')", "a Secret's key cannot be '.' or begin with '..'")]})
    """Key inside the Secret's data."""


class SecretRef(_Model):
    """A whole Secret in the WorkerQueue's own namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN)
    """Name of the Secret."""


def immutable(message: str) -> dict[str, Any]:
    """A field's own rule against changing its value. Kept on the field rather than on the object
    holding it: the API server checks every rule on every write, status writes included, and a rule
    on an object with many fields costs it a copy of their schemas at each field it reads."""
    return {"x-kubernetes-validations": [cel("self == oldSelf", message)]}


QUEUE_ID_IMMUTABLE = "queueId is immutable"
TASK_QUEUE_IMMUTABLE = ("the Temporal task queue (temporal.host, temporal.namespace, taskQueueName) is immutable: "
                        "running workers cannot follow a change; make a new queue instead")


class TemporalSpec(_Model):
    """Where the workers' Temporal server is; unset fields fall back to the operator's defaults."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                # `namespace` is a CEL keyword: the field is `__namespace__` to a rule. Only whether the
                # fields are there is checked here; their values, by the fields' own rules (see immutable).
                cel("has(self.host) == has(oldSelf.host) && has(self.__namespace__) == has(oldSelf.__namespace__)",
                    TASK_QUEUE_IMMUTABLE),
            ]
        }
    )

    # The pattern in the CRD only: a queue stored before it is still served, as LiteLLMSpec.url's.
    host: str | None = Field(default=None, max_length=1024, json_schema_extra={
        **immutable(TASK_QUEUE_IMMUTABLE), "pattern": TEMPORAL_HOST_PATTERN})
    """Temporal frontend address, host:port (e.g. `my-ns.tmprl.cloud:7233`)."""
    namespace: str | None = Field(default=None, max_length=256, json_schema_extra=immutable(TASK_QUEUE_IMMUTABLE))
    """Temporal namespace the workers poll."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the Temporal API key; absent means the operator's default key on the
    operator's default host, and no key on a host of the queue's own (e.g. a self-hosted server)."""
    tls: bool | None = None
    """Connect to Temporal over TLS (the API key sent as a bearer token). Default: on exactly when an
    API key is set. Off: worker pods are told to use plaintext, as a self-hosted server needs."""


class LiteLLMSpec(_Model):
    """The LiteLLM proxy the workers call; unset fields fall back to the operator's defaults."""

    # In the CRD only: a queue stored before the rule (the API server keeps it) is still served, and
    # its URL reported on it (queues.resolve), not dropped by the operator's own parsing.
    url: str | None = Field(default=None, max_length=2048, json_schema_extra={
        "pattern": LITELLM_URL_PATTERN, **CRD_PORT_IN_RANGE})
    """Base URL of the LiteLLM proxy (http:// or https://)."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the LiteLLM API key; absent means the operator's default key with the
    operator's default URL, and no key with a URL of the queue's own."""


class RedisSpec(_Model):
    """Redis for worker event streaming. Redis is enabled exactly when a URL is configured."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!(has(self.url) && has(self.urlSecretRef))",
                    "set either redis.url or redis.urlSecretRef, not both"),
                # Redis off, its password's Secret would still be awaited: Ready=False for a Secret unused.
                cel("has(self.url) || has(self.urlSecretRef) || !has(self.passwordSecretRef)",
                    "redis.passwordSecretRef needs redis.url or redis.urlSecretRef"),
            ]
        }
    )

    # The scheme only in pydantic: a queue stored before the CRD's rules is reported (RedisInvalid).
    url: str | None = Field(default=None, max_length=2048, pattern=r"^rediss?://",
                            json_schema_extra={"pattern": REDIS_URL_PATTERN, **CRD_PORT_IN_RANGE})
    """Redis URL (redis:// or rediss://). Use urlSecretRef instead when the URL carries a password."""
    url_secret_ref: SecretKeyRef | None = None
    """Secret key holding the Redis URL."""
    password_secret_ref: SecretKeyRef | None = None
    """Secret key holding the Redis password; without it the password is taken from the URL's userinfo."""


class WebsocketSpec(_Model):
    """The control websocket the workers connect to. The operator passes its own URL's
    /api/v1/ws/workers/<worker_id> through to the queue's upstream; it serves no websocket itself."""

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
    Enabled without a url, workers are sent the operator's /api/v1/ws/workers/<worker_id>, passed
    through to the queue's upstream; a queue with no upstream gets no websocket."""
    url: str | None = Field(default=None, max_length=2048, json_schema_extra={
        "pattern": WEBSOCKET_URL_PATTERN, **CRD_PORT_IN_RANGE})
    """Websocket URL handed to the workers."""
    features: list[str] = Field(default=list(DEFAULT_WEBSOCKET_FEATURES), max_length=32)
    """Websocket features the workers may use."""


class NatsSpec(_Model):
    """NATS settings for the workers; every key of the Secret becomes one entry of `nats_config`."""

    config_secret_ref: SecretRef
    """Secret whose keys and values are passed to the workers as `nats_config`."""


class UpstreamSpec(_Model):
    """The control plane that requests the operator does not serve itself are passed through to."""

    url: str = Field(min_length=1, max_length=2048, pattern=_UPSTREAM_URL_STORED,
                     json_schema_extra={"pattern": UPSTREAM_URL_PATTERN, **CRD_PORT_IN_RANGE})
    """Base URL (http:// or https://, no credentials, query or fragment); a worker's
    `/api/v1/...` path is appended to it."""
    api_key_secret_ref: SecretKeyRef
    """Secret key holding the organization's API key, sent upstream in place of the worker's token.
    Required with a url, so that a queue's own upstream never receives the operator-wide key."""


class AuthSpec(_Model):
    """Who may call /start for this queue besides Kubernetes identities allowed by RBAC."""

    token_secret_refs: list[SecretKeyRef] = Field(default_factory=list, max_length=16)
    """Secret keys holding queue tokens. Several may be listed so that a token can be rotated without
    downtime. Empty: the operator creates `<queue-name>-worker-token` with a random token under `token`."""


class _Open(BaseModel):
    """Part of a Kubernetes object the operator reads or writes into: the fields it touches are
    typed, so that a malformed one is refused at `kubectl apply`; the rest is the API server's to
    check when the pod is created, kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True,
                              json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class TemplateEnvVar(_Open):
    """An environment variable (the operator's own replace same-named ones)."""

    name: str = Field(min_length=1)
    """The variable's name."""


class TemplateContainer(_Open):
    """A container of the worker pod."""

    name: str = Field(min_length=1)
    """The container's name."""
    env: list[TemplateEnvVar] | None = None
    """Environment variables; the worker's own (QUEUE_ID, CONTROL_PLANE_URL, CONTROL_PLANE_GATEWAY_URL,
    KUBIYA_CONTROL_PLANE_BASE_URL, KUBIYA_API_KEY, HEARTBEAT_INTERVAL, TEMPORAL_HOST, SINGLE_EXECUTION)
    are set by the operator and replace same-named ones."""


_NO_HOST_NETWORK = ("worker pods cannot use hostNetwork: the node's name would be their hostname, so their "
                    "workers' Temporal identity, and the operator would never tell them their executions")


class TemplatePodSpec(_Open):
    """A PodSpec."""

    model_config = ConfigDict(json_schema_extra={
        "x-kubernetes-preserve-unknown-fields": True,
        "x-kubernetes-validations": [cel("!has(self.hostNetwork) || self.hostNetwork != true", _NO_HOST_NETWORK)],
    })

    containers: list[TemplateContainer] | None = None
    """The pod's containers; the operator gives each the worker's environment."""
    host_network: bool | None = Field(default=None, alias="hostNetwork")
    """Must not be true: a worker is known by the hostname its pod is given."""

    @field_validator("host_network")
    @classmethod
    def _no_host_network(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(_NO_HOST_NETWORK)  # the operator-wide template is checked so too
        return value


class TemplateMetadata(_Open):
    """Labels and annotations for every worker pod (the operator's own are added)."""

    labels: dict[str, str] | None = None
    """Labels of every worker pod; the operator's own (app.kubernetes.io/*, its queue's) win over same-named ones."""
    annotations: dict[str, str] | None = None
    """Annotations of every worker pod; the operator's own win over same-named ones."""


class PodTemplate(_Open):
    """A PodTemplateSpec (metadata and spec). The API server validates the pod when it is created.
    Default: one container running the operator's configured worker image and command. A template
    without containers (labels, a node selector, tolerations only) gets that container; its container
    `worker` without an image runs the configured worker image (and command, unless it names one)."""

    metadata: TemplateMetadata | None = None
    spec: TemplatePodSpec | None = None

    def body(self) -> dict[str, Any]:
        """The template as it was written."""
        return self.model_dump(exclude_unset=True, by_alias=True)


class WorkerPodSpec(_Model):
    """How the operator runs worker pods (ephemeral and single-execution queues only)."""

    template: PodTemplate | None = None
    """A PodTemplateSpec (metadata and spec). The API server validates the pod when it is created.
    Default: one container running the operator's configured worker image and command. A template
    without containers (labels, a node selector, tolerations only) gets that container; its container
    `worker` without an image runs the configured worker image (and command, unless it names one)."""
    backoff_limit: int = Field(default=6, ge=0, le=100)
    """Consecutive failed workers after which the queue is CrashLooping: an ephemeral queue starts no
    more until the spec changes; any other tries one worker at a time after the longest back-off
    (the operator's worker_backoff_max_seconds, 5 min) until one succeeds or has run that long. 0 is
    as 1: the first failure (unlike a Job's, whose limit counts retries after it)."""


class ScalingSpec(_Model):
    """Workers sized by the work: the Temporal task queue's backlog and the workers running an execution."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [cel("self.minIdle <= self.max", "scaling.minIdle must not exceed scaling.max")]
        }
    )

    min_idle: int = Field(default=0, ge=0, le=1000)
    """Idle workers kept waiting for work, besides those running an execution."""
    max: int = Field(ge=0, le=1000)
    """Most worker pods at once (also capped by maxWorkers)."""


EPHEMERAL_MIN_IDLE = "an ephemeral queue's scaling.minIdle must be 0: idle workers kept would keep it from finishing"


class WorkerQueueSpec(_Model):
    """Desired configuration of a worker queue."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                # Whether the immutable fields are there; their values, by the fields' own rules.
                cel("has(self.queueId) == has(oldSelf.queueId)", QUEUE_ID_IMMUTABLE),
                # Idle workers kept for good would keep an ephemeral queue from ever finishing.
                cel("!has(self.ephemeral) || !self.ephemeral || !has(self.scaling) || self.scaling.minIdle == 0",
                    EPHEMERAL_MIN_IDLE),
                # Running workers poll the task queue /start gave them and cannot follow a change; the
                # operator, judging them by the new one, would take busy ones for idle and delete them.
                cel("has(self.taskQueueName) == has(oldSelf.taskQueueName)", TASK_QUEUE_IMMUTABLE),
            ]
        }
    )

    queue_id: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 json_schema_extra=immutable(QUEUE_ID_IMMUTABLE))
    """Queue id that workers pass to /start. Default: the object's metadata.uid. Immutable."""
    task_queue_name: str | None = Field(default=None, min_length=1, max_length=256,
                                        json_schema_extra=immutable(TASK_QUEUE_IMMUTABLE))
    """Temporal task queue the workers poll. Default: the queue id. Immutable, as are temporal.host
    and temporal.namespace."""
    environment_name: str | None = Field(default=None, min_length=1, max_length=253)
    """Environment reported to workers. Default: the WorkerQueue's namespace."""
    organization_id: str | None = Field(default=None, min_length=1, max_length=256)
    """Organization the workers belong to. Default: the operator's configured organization id."""
    display_name: str | None = Field(default=None, max_length=256)
    """Human-readable name, for people only."""
    heartbeat_interval_seconds: int = Field(default=60, ge=10, le=300)
    """How often workers are to send a heartbeat, in seconds: /start answers it and the operator's
    pods get it as HEARTBEAT_INTERVAL. A worker is expected at the pace its heartbeats show, never
    faster than this (the real worker ignores the answer: 60 s unless its environment says)."""
    max_workers: int | None = Field(default=None, ge=1, le=1000)
    """Upper bound on live workers: /start answers 409 once this many are registered, and the
    operator runs at most this many worker pods at once."""
    suspend: bool = False
    """A suspended queue answers /start with 400 and gets no new worker pods; its running pool workers
    (not single-execution: they never exit by themselves) are stopped."""
    # An ephemeral queue's life counts from its creation (its workers' successes, its deadline): made
    # ephemeral later, a queue that ran workers before was deleted at once. Defaulted, so always there.
    ephemeral: bool = Field(default=False,
                            json_schema_extra=immutable("ephemeral is immutable: make a new queue instead"))
    """The queue is deleted once its workers have finished. Immutable."""
    single_execution: bool = False
    """Each worker runs one task and exits."""
    # Defaulted in the schema too, so that there always is an old one: its transition rule (the task
    # queue is immutable) is skipped where one side has none, and adding or dropping the whole block
    # would move the queue's task queue.
    # Defaults made once and shared (functools.cache): the models are frozen, and 10,000 queues each
    # holding their own copies of empty blocks cost ~20 MiB.
    temporal: TemporalSpec = Field(default_factory=functools.cache(TemporalSpec), json_schema_extra={"default": {}})
    """Temporal connection."""
    litellm: LiteLLMSpec = Field(default_factory=functools.cache(LiteLLMSpec))
    """LiteLLM proxy."""
    redis: RedisSpec | None = None
    """Redis; absent means Redis is disabled for the workers."""
    websocket: WebsocketSpec = Field(default_factory=functools.cache(WebsocketSpec))
    """Control websocket."""
    nats: NatsSpec | None = None
    """NATS; absent means `nats_config` is null."""
    auth: AuthSpec = Field(default_factory=functools.cache(AuthSpec))
    """Queue tokens accepted by /start."""
    upstream: UpstreamSpec | None = None
    """Where workers' other control-plane calls are passed through to, with the organization's key.
    Absent: the operator's default upstream, if one is configured; else those calls get 404."""
    replicas: int = Field(default=1, ge=0, le=1000)
    """Worker pods to keep running (ephemeral or single-execution queues; capped by maxWorkers).
    Ignored when `scaling` is set."""
    scaling: ScalingSpec | None = None
    """Size the worker pods by the work instead of `replicas`: min(max, busy + minIdle + backlog), where
    busy is the workers running an execution and backlog the workflows waiting on the task queue."""
    worker: WorkerPodSpec = Field(default_factory=functools.cache(WorkerPodSpec))
    """The worker pods."""
    ttl_seconds_after_finished: int = Field(default=0, ge=0)
    """Ephemeral queues: seconds between the last worker finishing and the queue's deletion."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Ephemeral queues: the longest the queue may live, counted from its creation."""


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
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed from."""


class WorkersStatus(_Model):
    """Worker pods as last observed, and the little memory that pods cannot hold themselves."""

    model_config = ConfigDict(frozen=False)  # the planner works on a copy field by field

    observed_generation: int | None = None
    """The metadata.generation these counts were planned for: until it is the queue's, a change of
    spec is not acted upon yet, and `Progressing` says so rather than quote the older plan."""
    desired: int = 0
    """Workers that should be alive now."""
    pending: int = 0
    """Workers created and not running yet."""
    running: int = 0
    """Workers running."""
    succeeded: int = 0
    """Workers that exited successfully, in all (their pods are deleted)."""
    failed: int = 0
    """Workers that failed, in all (their pods are deleted, but for the newest while failures go on in a
    row: kept for its logs, its token revoked)."""
    consecutive_failures: int = 0
    """Rounds of failures since the last success or spec change; drives the back-off. Pods made
    before the last failure counted (below `failureIndex`) that fail too belong to the same round."""
    failure_index: int | None = None
    """`nextIndex` when the last failure in a row was counted."""
    failures_generation: int | None = None
    """The generation whose workers failed those times in a row; a newer one starts counting again."""
    last_failure_time: str | None = None
    """When the last failure was seen (RFC 3339)."""
    consecutive_displaced: int = 0
    """Times workers were stopped from outside (evicted, deleted, not admitted; several at once count
    once) since the last success or spec change, or in the last hour: the first are replaced at once,
    the next ones after the back-off failures get; never a crash loop."""
    last_displaced_time: str | None = None
    """When the last such worker was seen (RFC 3339)."""
    displaced_index: int | None = None
    """`nextIndex` when the last such time was counted: pods made before it that are stopped too
    belong to the same time."""
    displaced_generation: int | None = None
    """The generation whose workers were stopped those times; a newer one starts counting again."""
    next_index: int = 0
    """Index of the next worker pod's name; names are never reused, so a create is never doubled."""
    counted: list[str] = Field(default_factory=list)
    """Finished pods already counted whose deletion has not been seen yet."""
    crash_loop_generation: int | None = None
    """The generation that went CrashLooping; a newer one starts again."""
    finished_time: str | None = None
    """Ephemeral queues: when the last required worker finished."""
    last_error: str | None = None
    """Why the last pod creation was refused, if it was."""
    surplus_since: str | None = None
    """Scaling queues: since when more idle workers are alive than wanted (they go after a grace period)."""
    stuck: list[str] = Field(default_factory=list)
    """Pending workers that cannot start until something changes (`<pod>: <reason>`, e.g.
    ImagePullBackOff, Unschedulable); their Events say more."""
    live: int = 0
    """Workers registered and heartbeating, wherever they run (one Lease each)."""


class TemporalStatus(_Model):
    """The queue's Temporal task queue as last observed (written at a bounded rate, not on every poll)."""

    pollers: int | None = None
    """Workers polling the task queue for workflow tasks."""
    backlog: int | None = None
    """Approximate workflow tasks waiting for a worker."""
    busy: int | None = None
    """Worker pods running an execution."""


class WorkerQueueStatus(_Model):
    """Observed state, written by the operator only."""

    queue_id: str | None = None
    """The queue id in effect (spec.queueId or metadata.uid)."""
    task_queue: str | None = None
    """The Temporal task queue in effect (spec.taskQueueName or the queue id)."""
    observed_generation: int | None = None
    """The metadata.generation last acted upon."""
    # One of each type, merged by type under server-side apply, as metav1.Condition lists are.
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    """Ready: /start serves and nothing known stops the workers; TemporalReachable is apart (a queue
    may be Ready while its Temporal is out of reach)."""
    workers: WorkersStatus | None = None
    """Workers: `live` for every queue; the rest for queues whose worker pods the operator runs."""
    temporal: TemporalStatus | None = None
    """The Temporal task queue: pollers and backlog."""


def parse_spec(raw: Any) -> WorkerQueueSpec:
    """The spec of a WorkerQueue body (already schema-checked by the API server)."""
    return WorkerQueueSpec.model_validate(raw or {})
