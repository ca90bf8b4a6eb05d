"""The operator's own configuration: one settings object, fed by a YAML file and/or env vars.

Precedence: built-in defaults < the file named by WQ_CONFIG_FILE < `WQ_<FIELD>` env vars.
A queue's own spec fields always win over the defaults given here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from workerqueue_operator.models import spec as spec_

ENV_PREFIX = "WQ_"

_HOUR, _DAY = 3600, 86_400
_MANY = 1_000_000_000
"""Upper bound of counts: far above any use, and below what a chart's `int` turns negative (2^63)."""
_NO_SPACE = r"^[^\t\n\f\r ]*$"  # Go's \s spelt out, as spec.LITELLM_URL_PATTERN says why
_HTTP_URL = spec_.LITELLM_URL_PATTERN
"""An http(s) URL with a host, no whitespace."""
_SECRET_TYPE = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,252}$"
"""A Secret type as the field selector can name it unescaped (kubernetes.io/tls, helm.sh/release.v1)."""
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class SettingsError(ValueError):
    """The settings file cannot be read; the message never quotes what is in it."""


class NamespacedSecretKeyRef(BaseModel):
    """A key of a Secret in a given namespace (operator-wide defaults live in the operator's namespace)."""

    model_config = ConfigDict(frozen=True)

    namespace: str = Field(pattern=spec_.OBJECT_NAME_PATTERN)
    name: str = Field(pattern=spec_.OBJECT_NAME_PATTERN)
    key: str = Field(min_length=1, max_length=253, pattern=spec_.SECRET_KEY_PATTERN)

    @classmethod
    def parse(cls, text: str) -> NamespacedSecretKeyRef:
        """`namespace/name:key`, the env-var spelling."""
        ref, sep, key = text.partition(":")
        namespace, slash, name = ref.partition("/")
        if not (sep and slash and namespace and name and key):
            # Not the text itself: a key pasted here in place of its reference would go into the log.
            raise ValueError("expected namespace/name:key")
        if not all(re.fullmatch(spec_.OBJECT_NAME_PATTERN, part) for part in (namespace, name)):
            raise ValueError("expected namespace/name:key, a namespace and a Secret name as Kubernetes spells them")
        return cls(namespace=namespace, name=name, key=key)


CSV_SETTINGS = ("namespaces", "token_review_audiences", "worker_command", "ignored_secret_types", "upstream_namespaces")
"""Lists that may also be given as one comma-separated string, as their WQ_* variables are."""


class Settings(BaseModel):
    """Operator-wide settings. Every duration is in seconds."""

    # A setting's value never goes into an error (a URL may carry a password).
    # Infinity and NaN are no durations: an infinite timeout disables what it bounds, or fails where it is used.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)

    # Queue defaults, used when a WorkerQueue leaves the field unset.
    organization_id: str = Field(default="default", min_length=1, max_length=256)
    """Organization id handed to workers of queues that set none."""
    temporal_host: str = Field(default="", max_length=1024, pattern=_NO_SPACE)
    """Default Temporal frontend host:port."""
    temporal_namespace: str = Field(default="", max_length=256, pattern=_NO_SPACE)
    """Default Temporal namespace."""
    temporal_api_key_secret: NamespacedSecretKeyRef | None = None
    """Default Temporal API key, as `namespace/name:key` in env."""
    litellm_url: str = Field(default="", max_length=2048, pattern=f"^$|{_HTTP_URL}",
                             json_schema_extra=spec_.PORT_IN_RANGE)
    """Default LiteLLM proxy URL (http:// or https://)."""
    litellm_api_key_secret: NamespacedSecretKeyRef | None = None
    """Default LiteLLM API key, as `namespace/name:key` in env."""
    public_url: str | None = Field(default=None, max_length=2048, pattern=f"^$|{_HTTP_URL}",
                                   json_schema_extra=spec_.PORT_IN_RANGE)
    """Control-plane URL handed to workers when their request names none; unset: derived per request."""
    control_plane_sdk_version: str = Field(default="0.6.0", min_length=1, max_length=64)
    """/start's `control_plane_sdk_version`: the worker SDK whose protocol this operator speaks (that of
    kubiya-control-plane-api 1.0.2). The worker compares it with its own version and warns at start
    when they differ; set it to a newer worker's version once that worker is known to work here."""

    # The upstream control plane, for queues that name none (see the README's pass-through section).
    upstream_url: str | None = Field(default=None, max_length=2048, pattern=spec_.UPSTREAM_URL_PATTERN,
                                     json_schema_extra=spec_.PORT_IN_RANGE)
    """Default upstream base URL that workers' other /api/v1/ calls are passed through to; unset: none."""
    upstream_api_key_secret: NamespacedSecretKeyRef | None = None
    """The organization's API key for upstream_url, as `namespace/name:key` in env; required with it."""
    upstream_namespaces: tuple[Annotated[str, Field(max_length=63, pattern=_DNS_LABEL)], ...] = ()
    """Namespaces whose queues naming no spec.upstream use upstream_url and its key; empty: every
    namespace served. Elsewhere such a queue has no upstream: whoever may write a queue there could
    otherwise call the upstream with the organization's key (its token opens its own queue)."""
    upstream_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=_HOUR)
    """Longest wait for a TCP (and TLS) connection to an upstream; then 504."""
    upstream_idle_timeout_seconds: float = Field(default=60.0, gt=0, le=_HOUR)
    """Longest silence while waiting for an upstream's answer or its next bytes; then 504 (or, once
    the answer has begun, the stream is cut). Server-sent events with keep-alives stay open. Each side
    of a proxied websocket is pinged after this much silence, and given up when it misses the pong."""
    upstream_max_connections: int = Field(default=100, ge=1, le=_MANY)
    """Connections to the upstream hosts in use at once, all hosts together; requests beyond wait for
    a free one. As many more may be kept idle for reuse (the longest idle closed beyond)."""
    upstream_max_websockets: int = Field(default=1000, ge=1, le=_MANY)
    """Proxied websockets open at once, all upstream hosts together, on connections of their own: each
    holds its connection for the worker's life, and in the request pool they would leave requests none."""
    upstream_max_connections_per_namespace: int = Field(default=75, ge=1, le=_MANY)
    """Of those, the most one namespace's requests may hold at once (waiting for an answer, sending a
    body, reading one): a team trickling bodies on every pooled connection left every other queue's
    calls 504. Beyond, a request waits for one of its namespace's to end (that wait and the pool's
    together within upstream_connect_timeout_seconds), then 503 with Retry-After. A share held by one
    namespace cannot be lent to another, so an install whose queues are all in one namespace may set
    it to upstream_max_connections."""
    upstream_max_websockets_per_namespace: int = Field(default=750, ge=1, le=_MANY)
    """The same for proxied websockets (each held for its worker's life); beyond, 503 at once."""

    # Worker pods (ephemeral and single-execution queues).
    worker_image: str = Field(default="ghcr.io/kubiyabot/agent-worker:latest", min_length=1, max_length=1024,
                              pattern=_NO_SPACE)
    """Image of worker pods whose queue has no pod template."""
    worker_command: tuple[Annotated[str, Field(min_length=1)], ...] = ("kubiya", "worker", "start",
                                                                         "--queue-id=$(QUEUE_ID)")
    """Command of worker pods whose queue has no pod template ($(VAR) is expanded by the kubelet);
    empty: the image's own entrypoint."""
    worker_pod_template: dict[str, Any] = Field(default_factory=dict)
    """A PodTemplateSpec (metadata, spec) for worker pods whose queue has no pod template, so that
    security contexts, resources, node selectors, tolerations or image pull secrets are set once for
    every queue. Its container named `worker` (added first when there is none) runs the worker:
    worker_image and worker_command unless it names its own. The API server validates the rest when
    a pod is created; a pod it refuses shows on its queue (Progressing=False, PodCreationFailed)."""
    worker_control_plane_url: str | None = Field(default=None, max_length=2048, pattern=f"^$|{_HTTP_URL}",
                                                 json_schema_extra=spec_.PORT_IN_RANGE)
    """CONTROL_PLANE_URL given to worker pods: this operator's in-cluster URL. Unset: public_url."""
    worker_backoff_seconds: float = Field(default=10.0, gt=0, le=_HOUR)
    """First delay before replacing a failed worker; doubles with each consecutive failure."""
    worker_backoff_max_seconds: float = Field(default=300.0, gt=0, le=_DAY)
    """Longest delay before replacing a failed worker."""
    worker_resync_seconds: float = Field(default=30.0, ge=1, le=_DAY)
    """How often every queue's pods are listed even without events (a safety net)."""
    scale_down_grace_seconds: float = Field(default=60.0, ge=0, le=_DAY)
    """Scaling queues: how long idle workers above minIdle stay before their pods are deleted."""
    backlog_poll_seconds: float = Field(default=1.0, ge=0.1, le=_HOUR)
    """Scaling queues: how often the task queue's backlog is read while there is work or workers."""
    backlog_idle_poll_seconds: float = Field(default=2.0, ge=0.1, le=_HOUR)
    """Scaling queues: the slowest backlog read once idle (the interval doubles up to it)."""
    temporal_check_seconds: float = Field(default=30.0, ge=1, le=_DAY)
    """How often the Temporal of a queue that does not scale is checked (TemporalReachable)."""
    temporal_checks_per_second: float = Field(default=20.0, ge=0.1, le=10_000)
    """Checks of queues that do not scale started per second at most, in all: past
    temporal_check_seconds x this many queues, each is checked less often, not Temporal asked more."""
    temporal_status_seconds: float = Field(default=5.0, ge=0, le=_HOUR)
    """Least time between two writes of a queue's status.temporal (the condition is written at once)."""

    peering_lifetime_seconds: int = Field(default=10, ge=2, le=3600)
    """With several replicas (kopf peering): how long a replica's keep-alive counts. A standby takes
    over at most this long after the active replica died without a word (SIGKILL, a lost node); kopf
    sends keep-alives every 1..lifetime-5 s. kopf's own default, 60, meant a minute without workers."""

    # The HTTP server.
    http_host: str = "*"
    """Address the HTTP API listens on; `*`, every address of IPv4 and of IPv6 (of the families the
    pod has), so that the Service reaches it on an IPv4-only, dual-stack or IPv6-only cluster."""
    http_port: int = Field(default=8080, ge=0, le=65535)
    """Port the HTTP API listens on (0: any free port, for tests)."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port /metrics is served on instead of http_port, on http_host (0: any free port, for tests).
    Its labels name every queue and namespace; on a port of its own, a NetworkPolicy can keep them
    from the workers that may reach /start. Unset: /metrics is served on http_port."""

    http_idle_timeout_seconds: float = Field(default=15.0, gt=0, le=_HOUR)
    """How long a connection may go without delivering a complete request head: from its opening, or
    from its previous answer (keep-alive). Covers clients that send nothing or trickle headers. Workers
    call at most every few seconds, so keeping idle connections longer saves them little."""
    http_max_connections: int = Field(default=4096, ge=1, le=_MANY)
    """The most client connections open at once; at the limit a new one closes the longest-idle one.
    Lowered automatically to RLIMIT_NOFILE less http_reserved_fds, temporal_max_clients and the
    upstream connections (2 x upstream_max_connections, in use and idle, + upstream_max_websockets; at
    most half of what is left) (the soft limit is raised first, up to the hard one). Each idle connection costs
    some 5 KiB of memory (4.4 KiB measured)."""
    http_reserved_fds: int = Field(default=256, ge=16, le=_MANY)
    """File descriptors kept out of the HTTP connection limit: the API-server clients (watches,
    up to 64 pooled requests, kopf's own), log files, TLS, Python itself."""
    http_body_timeout_seconds: float = Field(default=30.0, gt=0, le=_HOUR)
    """How long a request body may take to arrive; then 408 and the connection is closed. A /start
    body is at most 1 MiB, so only a client that trickles it on purpose or is stuck needs longer."""

    http_drain_seconds: float = Field(default=5.0, ge=0, le=300)
    """On SIGTERM, how long the HTTP API goes on serving once kopf has stopped: /readyz answers 503 and
    every answer closes its connection, while the Service's endpoints drop this pod; then the
    listener closes. A worker whose /start is refused exits for good (worker-protocol.md), so a
    listener closed at once fails the workers that start during a rollout. A second SIGTERM or
    SIGINT ends it early. Keep it, plus some 10 s, within the pod's termination grace period."""

    tls_cert_file: str | None = None
    """PEM certificate (chain) of the HTTP API; with tls_key_file, the API is served over HTTPS."""
    tls_key_file: str | None = None
    """PEM private key of tls_cert_file."""
    tls_reload_seconds: float = Field(default=10.0, ge=1, le=_DAY)
    """How often the two files are checked for a renewed certificate (cert-manager renews the
    Secret, the kubelet updates the mounted files within a minute or so), which new connections
    get from then on, without a restart."""

    # The worker registry.
    registry_max_pending: int = Field(default=25_000, ge=1, le=_MANY)
    """Registrations made by /start that may wait for their worker's first heartbeat at once, over
    all queues; past it /start answers 503 with Retry-After. Each is held in memory until its first
    heartbeat or its expiry (2.5 heartbeat intervals), some 1.2 KiB (up to 5 KiB with the largest
    system_info kept): the bound keeps a client that calls /start in a loop from growing the operator
    past its memory limit. A real worker heartbeats seconds after /start, so only a fleet that many
    strong starting within those seconds would meet it."""
    registry_max_pending_per_queue: int = Field(default=5_000, ge=1, le=_MANY)
    """The same bound per queue, so that one queue's token holder cannot refuse other queues' workers."""
    registry_max_workers: int = Field(default=50_000, ge=1, le=_MANY)
    """Registrations this replica holds in all, live or waiting (a loop that heartbeats once per
    /start would pass the pending bound); past it /start answers 503 with Retry-After. Size the
    operator's memory limit to it: some 1.2 KiB each."""
    registry_max_workers_per_queue: int = Field(default=10_000, ge=1, le=_MANY)
    """The same bound per queue."""
    registry_max_pending_per_namespace: int = Field(default=10_000, ge=1, le=_MANY)
    """registry_max_pending per namespace, over its queues: whoever holds the tokens of a few queues
    of one namespace cannot take every place and turn away the workers of every other team."""
    registry_max_workers_per_namespace: int = Field(default=20_000, ge=1, le=_MANY)
    """registry_max_workers per namespace, over its queues."""

    # Authentication of /start callers that are Kubernetes identities.
    token_review_audiences: tuple[str, ...] = ()
    """Audiences a ServiceAccount token must carry; empty: the API server's defaults."""
    auth_cache_seconds: float = Field(default=10.0, ge=0, le=_DAY)
    """How long TokenReview/SubjectAccessReview answers are reused. Short, so that a revoked
    RoleBinding stops working within seconds while a busy worker fleet does not flood the API server."""
    auth_negative_cache_seconds: float = Field(default=60.0, ge=0, le=_DAY)
    """How long a token the API server rejected is rejected again without asking it. Longer than
    auth_cache_seconds: a token nobody issued does not become valid, and each retry would cost a review."""
    auth_review_timeout_seconds: float = Field(default=4.0, gt=0, le=60)
    """How long a TokenReview/SubjectAccessReview may take, waiting for a free slot included; then
    /start answers 503. A healthy API server answers in milliseconds: this only bounds how long a
    caller waits while it is down or overloaded."""
    auth_max_concurrent_reviews: int = Field(default=16, ge=1, le=10_000)
    """Reviews in flight at once, so that made-up tokens cannot turn into an unbounded stream of
    reviews at the API server. A /start needing one more waits for a free slot within
    auth_review_timeout_seconds, else 503 with Retry-After: 1."""

    # Temporal, as the operator reaches it for /executions.
    temporal_timeout_seconds: float = Field(default=4.0, gt=0, le=60)
    """Longest a Temporal call may take before /executions answers 503: a worker polls every 2 s
    and must get an answer (any answer) well before its next poll piles up."""
    temporal_max_clients: int = Field(default=256, ge=1, le=10_000)
    """Temporal connections kept at most, one per endpoint (host, namespace, TLS, API key); the one used
    least recently is let go for a new one. Each costs a file descriptor (kept out of the HTTP
    connection limit) and ~150-180 KiB. Queues on more distinct endpoints than this still work, each
    connecting anew when its turn comes."""

    # Scope.
    namespaces: tuple[Annotated[str, Field(max_length=63, pattern=_DNS_LABEL)], ...] = ()
    """Namespaces to watch; empty: the whole cluster."""
    status_resync_seconds: float = Field(default=300.0, ge=1, le=_DAY)
    """How often every queue's status is re-checked even without events (a safety net)."""
    ignored_secret_types: tuple[Annotated[str, Field(pattern=_SECRET_TYPE)], ...] = (
        "helm.sh/release.v1",)
    """Secret types the Secret watch leaves out (a field selector), so that the API server never sends
    them: Helm keeps every release's manifest in one, up to 1 MiB each, and no queue's credential is
    one. A queue that refers to such a Secret all the same gets it read by GET, again every status
    resync. Empty: every Secret of the watched namespaces passes through the watch. Never `Opaque`:
    the workers' own token Secrets are of that type, and are known only from the watch."""
    watch_unready_seconds: float = Field(default=60.0, ge=1, le=_DAY)
    """/readyz answers 503 once a watch has been failing for this long: the replica's memory may
    then be stale, e.g. a rotated token not yet served. Shorter failures are retried quietly."""

    @field_validator("ignored_secret_types")
    @classmethod
    def _not_opaque(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "Opaque" in value:
            raise ValueError("Opaque may not be left out: the workers' own token Secrets are Opaque, and known "
                             "only from the Secret watch")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.upstream_url and self.upstream_api_key_secret is None:
            raise ValueError("upstream_url needs upstream_api_key_secret (the organization's key)")
        if self.metrics_port and self.metrics_port == self.http_port:
            raise ValueError("metrics_port must differ from http_port (unset it to serve /metrics there)")
        return self

    def doubts(self, *, in_cluster: bool) -> list[str]:
        """Settings the operator runs with, though they are likely not what was meant: warned of at
        start. (Not refused: each has a defined meaning, and a configuration that ran before still runs.)"""
        # (a setting, one it is meant to stay at or below, what it means when above)
        above = (
            ("worker_backoff_seconds", "worker_backoff_max_seconds", "every back-off is the longest"),
            ("backlog_poll_seconds", "backlog_idle_poll_seconds",
             "a busy queue's backlog is read every backlog_idle_poll_seconds"),
            ("registry_max_pending_per_queue", "registry_max_pending",
             "one queue's /start callers can take every pending place"),
            ("registry_max_workers_per_queue", "registry_max_workers", "one queue's workers can take every place"),
            ("registry_max_pending_per_queue", "registry_max_pending_per_namespace",
             "one queue's /start callers can take every pending place of its namespace"),
            ("registry_max_workers_per_queue", "registry_max_workers_per_namespace",
             "one queue's workers can take every place of its namespace"),
            ("registry_max_pending_per_namespace", "registry_max_pending",
             "one namespace's /start callers can take every pending place"),
            ("registry_max_workers_per_namespace", "registry_max_workers",
             "one namespace's workers can take every place"),
            ("upstream_max_connections_per_namespace", "upstream_max_connections",
             "one namespace's requests can hold every connection to an upstream host"),
            ("upstream_max_websockets_per_namespace", "upstream_max_websockets",
             "one namespace's websockets can take every place"),
            ("registry_max_pending", "registry_max_workers", "registrations waiting for a first heartbeat count "
             "in registry_max_workers too, which bounds them first"),
        )
        said = [f"{name} is above {bound}: {meaning}" for name, bound, meaning in above
                if getattr(self, name) > getattr(self, bound)]
        if in_cluster and not (self.worker_control_plane_url or self.public_url):
            said.append("neither worker_control_plane_url nor public_url is set: worker pods are told "
                        f"CONTROL_PLANE_URL=http://127.0.0.1:{self.http_port}, which is themselves in a cluster")
        if self.upstream_namespaces and not self.upstream_url:
            said.append("upstream_namespaces is set without upstream_url: it names who may use an upstream "
                        "there is none of")
        elif self.upstream_namespaces and self.namespaces and not set(self.upstream_namespaces) & set(self.namespaces):
            said.append("upstream_namespaces names none of the watched namespaces: no queue uses upstream_url")
        return said

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would take `true` for 1: WQ_HTTP_PORT=true is a mistake, not port 1.
        if isinstance(value, bool) and cls.model_fields[str(info.field_name)].annotation in (int, float):
            raise ValueError("expected a number, not a boolean")
        return value

    @field_validator("litellm_url", "public_url", "upstream_url", "worker_control_plane_url")
    @classmethod
    def _port_in_range(cls, value: str | None) -> str | None:
        if value and not spec_.port_in_range(value):
            raise ValueError("the URL's port is not a number from 0 to 65535")
        return value

    @field_validator("temporal_api_key_secret", "litellm_api_key_secret", "upstream_api_key_secret", mode="before")
    @classmethod
    def _secret_ref(cls, value: Any) -> Any:
        return NamespacedSecretKeyRef.parse(value) if isinstance(value, str) and value else value or None

    @field_validator("worker_pod_template")
    @classmethod
    def _pod_template(cls, value: dict[str, Any]) -> dict[str, Any]:
        if unknown := sorted(set(value) - {"metadata", "spec"}):
            raise ValueError(f"a pod template has metadata and spec only, not {', '.join(unknown)}")
        for part in ("metadata", "spec"):
            if not isinstance(value.get(part) or {}, dict):
                raise ValueError(f"the pod template's {part} must be a mapping")
        containers = (value.get("spec") or {}).get("containers") or []
        if not isinstance(containers, list) or not all(isinstance(c, dict) and c.get("name") for c in containers):
            raise ValueError("the pod template's spec.containers must be a list of containers, each with a name")
        spec_.PodTemplate.model_validate(value)  # the shape a queue's own template must have too
        return value

    @field_validator("upstream_url", "public_url", "worker_control_plane_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value or None

    @field_validator(*CSV_SETTINGS, mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("namespaces")
    @classmethod
    def _once_each(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A namespace named twice would be watched twice: the two watches' events, interleaved, would
        # each bring back what the other has seen change (a rotated-out token, a deleted queue).
        return tuple(dict.fromkeys(value))

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the WQ_CONFIG_FILE file, then WQ_* env vars, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_file = env.get(f"{ENV_PREFIX}CONFIG_FILE")
        if config_file:
            try:
                loaded = yaml.safe_load(Path(config_file).read_text()) or {}
            except OSError as exc:
                raise SettingsError(f"{ENV_PREFIX}CONFIG_FILE {config_file}: "
                                    f"{exc.strerror or type(exc).__name__}") from None
            except UnicodeDecodeError:
                raise SettingsError(f"{ENV_PREFIX}CONFIG_FILE {config_file}: not UTF-8 text") from None
            except yaml.YAMLError as exc:  # its text quotes the file, which may hold a secret
                mark = getattr(exc, "problem_mark", None)
                where = f" (line {mark.line + 1})" if mark is not None else ""
                raise SettingsError(f"{ENV_PREFIX}CONFIG_FILE {config_file}: not valid YAML{where}") from None
            if not isinstance(loaded, dict):
                raise SettingsError(f"{ENV_PREFIX}CONFIG_FILE {config_file}: expected a mapping of settings")
            values.update(loaded)
        for name, field in cls.model_fields.items():
            raw = env.get(f"{ENV_PREFIX}{name.upper()}")
            if raw is None:
                continue
            # Numbers and booleans arrive as strings; JSON gives them their type, pydantic checks it.
            # Text stays text: a namespace named `123` is no number (a list may come as JSON, `[...]`).
            if field.annotation in (str, str | None) or (name in CSV_SETTINGS and not raw.lstrip().startswith("[")):
                values[name] = raw
            elif name in CSV_SETTINGS:  # a JSON list: taken apart at its commas, a typo would make other names
                try:
                    values[name] = json.loads(raw)
                except json.JSONDecodeError:
                    raise SettingsError(f"invalid setting {name} ({ENV_PREFIX}{name.upper()}): "
                                        "starts with [ but is not a JSON list") from None
            else:
                values[name] = _maybe_json(raw)
        values.update(overrides)
        return cls.model_validate(values)

    @classmethod
    def unknown_env(cls, environ: Mapping[str, str] | None = None) -> list[str]:
        """Names of WQ_* env vars that are no setting (a typo would otherwise be ignored in silence)."""
        env = os.environ if environ is None else environ
        known = {f"{ENV_PREFIX}CONFIG_FILE", *(f"{ENV_PREFIX}{name.upper()}" for name in cls.model_fields)}
        return sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)


_PATTERNS_SAID = {
    f"^$|{_HTTP_URL}": "expected an http:// or https:// URL with a host, without spaces",
    spec_.UPSTREAM_URL_PATTERN: "expected an http:// or https:// URL with a host name or [IPv6] (a port, if any, "
                                "of 1 to 5 digits) and a path, without user:password@, query or fragment",
    _DNS_LABEL: "expected a namespace name (lowercase letters, digits and '-')",
    _SECRET_TYPE: "expected a Secret type (letters, digits, '.', '_', '/' and '-'), as a field selector names it",
    _NO_SPACE: "expected no spaces",
    spec_.OBJECT_NAME_PATTERN: "expected an object name (lowercase letters, digits, '-' and '.')",
    spec_.SECRET_KEY_PATTERN: "expected a Secret key (letters, digits, '-', '_' and '.')",
}
"""What a setting's pattern asks, in words: the regex itself says little to whoever set it."""


def problems(exc: ValidationError) -> list[str]:
    """One line per problem of settings that did not load, naming the setting, never its value (a URL
    may carry a password)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = error["loc"]
        said = error["msg"]
        if error["type"] == "string_pattern_mismatch":
            said = _PATTERNS_SAID.get(str((error.get("ctx") or {}).get("pattern")), said)
        if error["type"] == "extra_forbidden" and len(loc) == 1:  # a key of WQ_CONFIG_FILE (the env's are named apart)
            lines.append(f"no such setting: {loc[0]} (a key is a setting's {ENV_PREFIX}* name in lower case, without "
                         f"{ENV_PREFIX}: temporal_host for {ENV_PREFIX}TEMPORAL_HOST)")
        elif loc:  # a setting's own (from WQ_<NAME> or the WQ_CONFIG_FILE key of that name)
            name = ".".join(str(part) for part in loc)
            lines.append(f"invalid setting {name} ({ENV_PREFIX}{str(loc[0]).upper()}): {said}")
        else:  # settings that go together
            lines.append(f"invalid settings: {error['msg']}")
    return lines


def _maybe_json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
