"""What a WorkerQueue resolves to: the worker configuration it serves, or why it cannot serve.

Pure functions over a queue object and the Secrets it refers to, so unit tests call them directly.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from yarl import URL

from workerqueue_operator.core.temporal import Endpoint
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models import spec as spec_
from workerqueue_operator.models import times

QueueKey = tuple[str, str]
"""(namespace, name) of a WorkerQueue."""
SecretName = tuple[str, str]
"""(namespace, name) of a Secret."""
SecretData = Mapping[str, str] | None
"""Decoded data of a Secret that exists, or None for one known to be absent."""

NOT_TEXT = "\0(not UTF-8 text)\0"
"""What decode_secret_data keeps for a value that is not UTF-8: the key is there, its value unusable
(a lookup says so, rather than that the key is missing). No credential or URL is this text."""

TOKEN_KEY = "token"
TOKEN_COMPONENT = "worker-token"
"""`app.kubernetes.io/component` of the queue-token Secrets the operator generates."""


def token_secret_name(queue_name: str) -> str:
    """The queue-token Secret the operator generates when a queue names none."""
    return f"{queue_name}-worker-token"


def queue_owner(body: Mapping[str, Any]) -> tuple[QueueKey, str] | None:
    """(queue, uid) of the WorkerQueue that owns an object; None for an object no queue owns."""
    meta = body.get("metadata") or {}
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("kind") == spec_.KIND), None)
    if owner is None:
        return None
    return (meta.get("namespace", ""), owner.get("name", "")), owner.get("uid", "")


def owned_by_namesake(body: Mapping[str, Any], queue: QueueObject) -> bool:
    """Whether an object was made for a deleted queue of this queue's name (not this one): after
    `kubectl replace --force` it waits for the garbage collector, maybe for long."""
    owner = queue_owner(body)
    return owner is not None and owner[0] == queue.key and owner[1] != queue.uid


def namesakes_token(body: Mapping[str, Any], queue: QueueObject) -> bool:
    """Whether a Secret is the generated queue token of a deleted queue of this queue's name."""
    labels = (body.get("metadata") or {}).get("labels") or {}
    return labels.get("app.kubernetes.io/component") == TOKEN_COMPONENT and owned_by_namesake(body, queue)


class _RandomBytes:
    """os.urandom read a block at a time. Read per worker id, its getrandom() call (a syscall that
    lets go of the GIL) cost more under /start load than the rest of minting the id."""

    BLOCK = 4096

    def __init__(self) -> None:
        self._block = b""
        self._at = 0
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)  # a child never hands out its parent's bytes

    def _forget(self) -> None:
        self._block, self._at, self._lock = b"", 0, threading.Lock()  # its lock may be held by a thread of the parent

    def take(self, n: int) -> bytes:
        with self._lock:  # no two callers are ever handed the same bytes
            if self._at + n > len(self._block):
                self._block, self._at = os.urandom(self.BLOCK), 0
            start = self._at
            self._at += n
            return self._block[start:self._at]


_random = _RandomBytes()


def new_worker_id(key: bytes | None = None, *, pod: str | None = None) -> str:
    """A version-4 UUID as text, as str(uuid.uuid4()) gives. With `key` (a digest of the queue's
    token) its second half is a MAC of its first (and of the pod it was issued to, if any): a worker
    whose registration was lost can then show, by its id alone, that its queue issued it to it
    (issued_worker_id). Without, it is all random."""
    raw = bytearray(_random.take(16 if key is None else 8))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    if key is not None:
        raw += _worker_id_mac(key, raw, pod)
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return _uuid_text(raw)


def issued_worker_id(worker_id: str, keys: Iterable[bytes], *, pod: str | None = None) -> bool:
    """Whether new_worker_id gave `worker_id` with one of `keys` (to `pod`), compared in constant time."""
    try:
        raw = bytes.fromhex(worker_id.replace("-", ""))
    except ValueError:
        return False
    if len(raw) != 16 or _uuid_text(raw) != worker_id:  # the canonical text form only
        return False
    matched = False
    for key in keys:
        expected = bytearray(_worker_id_mac(key, raw[:8], pod))
        expected[0] = (expected[0] & 0x3F) | 0x80
        matched |= hmac.compare_digest(expected, raw[8:])
    return matched


def _worker_id_mac(key: bytes, head: bytes | bytearray, pod: str | None) -> bytes:
    # BLAKE2's keyed mode is a MAC, and at a third of the cost of HMAC-SHA256 on every /start.
    mac = hashlib.blake2b(head, digest_size=8, key=key, person=b"worker-id")
    if pod is not None:  # so that a pod cannot pass for a sibling whose id it has seen
        mac.update(b"\0" + pod.encode())
    return mac.digest()


def _uuid_text(raw: bytes | bytearray) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def digest(token: str) -> bytes:
    """Tokens are compared and indexed by digest only, so the raw value is never kept around."""
    return hashlib.sha256(token.encode()).digest()


def decode_secret_data(body: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's `data`, base64-decoded; a value that is not UTF-8 text is NOT_TEXT."""
    decoded: dict[str, str] = {}
    for key, value in (body.get("data") or {}).items():
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue  # the API server stores base64 only: not met in practice
        try:
            decoded[key] = raw.decode()
        except UnicodeDecodeError:
            decoded[key] = NOT_TEXT
    return decoded


def default_upstream_key(namespace: str, settings: settings_.Settings) -> settings_.NamespacedSecretKeyRef | None:
    """The operator-wide upstream's key, for a queue of `namespace` that names no upstream of its own;
    None where there is none, or that namespace is not among `upstream_namespaces`."""
    if not settings.upstream_url or settings.upstream_api_key_secret is None:
        return None
    if settings.upstream_namespaces and namespace not in settings.upstream_namespaces:
        return None
    return settings.upstream_api_key_secret


@dataclass(frozen=True)
class QueueObject:
    """The parts of a WorkerQueue body the operator acts on."""

    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    spec: spec_.WorkerQueueSpec
    status: Mapping[str, Any] = field(default_factory=dict, compare=False)
    deleting: bool = False
    """metadata.deletionTimestamp is set."""
    resource_version: str = field(default="", compare=False)
    """metadata.resourceVersion of the body this was made from: the status writer's precondition."""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> QueueObject:
        meta = body.get("metadata", {})
        if len(meta["name"]) > spec_.MAX_NAME_LENGTH:  # the CRD refuses it; one made before could be there
            raise ValueError(f"name longer than {spec_.MAX_NAME_LENGTH} characters: objects named after it "
                             "would pass Kubernetes' limit")
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 0),
            created=meta.get("creationTimestamp") or "",
            spec=spec_.parse_spec(body.get("spec")),
            status=body.get("status") or {},
            deleting=bool(meta.get("deletionTimestamp")),
            resource_version=meta.get("resourceVersion") or "",
        )

    def same_spec(self, body: Mapping[str, Any]) -> bool:
        """Whether `body` is this very queue with the same spec (its generation moves with every spec
        change), so that a status-only update needs no parsing, validating or resolving again."""
        meta = body.get("metadata", {})
        return (meta.get("uid", "") == self.uid and meta.get("name") == self.name
                and meta.get("namespace") == self.namespace and int(meta.get("generation") or 0) == self.generation)

    def with_body(self, body: Mapping[str, Any]) -> QueueObject:
        """This queue with the status and deletion of a newer body of the same spec."""
        meta = body.get("metadata", {})
        return replace(self, status=body.get("status") or {}, deleting=bool(meta.get("deletionTimestamp")),
                       resource_version=meta.get("resourceVersion") or "")

    @functools.cached_property
    def created_at(self) -> float:
        """metadata.creationTimestamp in epoch seconds (0 if unknown)."""
        return times.parse_or_none(self.created) or 0.0

    @functools.cached_property
    def key(self) -> QueueKey:
        """One tuple per queue object: every registration of its workers holds it."""
        return (self.namespace, self.name)

    @property
    def queue_id(self) -> str:
        return self.spec.queue_id or self.uid

    @property
    def holds_queue_id(self) -> bool:
        """Whether the status the operator wrote says this queue holds its queue id (it is written on
        every queue, and a queue that lost it says QueueIdConflict). Not one whose spec could not be
        taken (SpecInvalid): another queue may have taken the id over meanwhile, and holds it now."""
        if self.status.get("queueId") != self.queue_id:
            return False
        ready = next((c for c in self.status.get("conditions") or [] if c.get("type") == "Ready"), None)
        return ready is not None and ready.get("reason") not in ("QueueIdConflict", "SpecInvalid")

    def token_refs(self) -> tuple[spec_.SecretKeyRef, ...]:
        refs = self.spec.auth.token_secret_refs
        if refs:
            return tuple(refs)
        return (spec_.SecretKeyRef(name=token_secret_name(self.name), key=TOKEN_KEY),)

    def secret_names(self, settings: settings_.Settings) -> frozenset[SecretName]:
        """Every Secret this queue's configuration depends on (including operator-wide defaults)."""
        names = {(self.namespace, ref.name) for ref in self.token_refs()}
        s = self.spec
        for ref in (s.temporal.api_key_secret_ref, s.litellm.api_key_secret_ref):
            if ref is not None:
                names.add((self.namespace, ref.name))
        if s.redis is not None:
            for ref in (s.redis.url_secret_ref, s.redis.password_secret_ref):
                if ref is not None:
                    names.add((self.namespace, ref.name))
        if s.nats is not None:
            names.add((self.namespace, s.nats.config_secret_ref.name))
        for default in (default_temporal_key(s, settings), default_litellm_key(s, settings)):
            if default is not None:
                names.add((default.namespace, default.name))
        if s.upstream is not None:
            names.add((self.namespace, s.upstream.api_key_secret_ref.name))
        elif (default_upstream := default_upstream_key(self.namespace, settings)) is not None:
            names.add((default_upstream.namespace, default_upstream.name))
        return frozenset(names)


def default_temporal_key(spec: spec_.WorkerQueueSpec,
                         settings: settings_.Settings) -> settings_.NamespacedSecretKeyRef | None:
    """The operator-wide Temporal API key, for a queue that names none of its own and uses the
    operator's Temporal host. A queue's own host never gets it: whoever may write a WorkerQueue could
    otherwise send that key anywhere (the operator's reachability check would, within seconds). Nor
    does a queue that turns TLS off: the key would cross the network in clear, sent before the server
    could refuse plaintext."""
    own = spec.temporal
    if own.api_key_secret_ref is not None or (own.host and own.host != settings.temporal_host) or own.tls is False:
        return None
    return settings.temporal_api_key_secret


def default_temporal_key_withheld(spec: spec_.WorkerQueueSpec, settings: settings_.Settings) -> bool:
    """Whether the operator has a default Temporal key that this queue does not get (its own host,
    or TLS off)."""
    return (settings.temporal_api_key_secret is not None and spec.temporal.api_key_secret_ref is None
            and default_temporal_key(spec, settings) is None)


def default_litellm_key(spec: spec_.WorkerQueueSpec,
                        settings: settings_.Settings) -> settings_.NamespacedSecretKeyRef | None:
    """The operator-wide LiteLLM API key, on the terms of default_temporal_key: for the operator's URL only."""
    own = spec.litellm
    if own.api_key_secret_ref is not None or (
            own.url and own.url.rstrip("/") != (settings.litellm_url or "").rstrip("/")):
        return None
    return settings.litellm_api_key_secret


def temporal_tls(queue: QueueObject, settings: settings_.Settings) -> bool:
    """Whether the queue's Temporal is reached over TLS: as set, else exactly when an API key is set."""
    own = queue.spec.temporal
    if own.tls is not None:
        return own.tls
    return own.api_key_secret_ref is not None or default_temporal_key(queue.spec, settings) is not None


@dataclass(frozen=True)
class Problem:
    """Why a queue is not Ready: a CamelCase reason and a sentence that never holds a secret value."""

    reason: str
    message: str


@dataclass(frozen=True)
class QueueConfig:
    """Everything /start serves for a queue, except what is made per request."""

    fields: Mapping[str, Any] = field(repr=False)
    """Response fields known ahead of the request: keys and passwords among them, so never in a repr."""
    websocket_enabled: bool
    websocket_url: str | None
    suspended: bool
    temporal_tls: bool = False
    fields_json: bytes = field(init=False, repr=False, compare=False)
    """`fields` serialized once per resolution, so /start only splices in the per-request parts. Made
    here, on the watch's path: made at a queue's first /start, it cost a tenth of /start's CPU with
    10,000 queues each started a few times, and /start's p50 was not flat in the number of queues."""

    without_websocket_json: bytes | None = field(init=False, default=None, repr=False, compare=False)
    """The same with the websocket off, for the callers no websocket URL is given to: made at the
    first such caller's /start (Kubernetes identities' are few), not for every queue."""

    def __post_init__(self) -> None:
        body = json.dumps({**self.fields, "websocket_enabled": self.websocket_enabled}, separators=(",", ":"))
        object.__setattr__(self, "fields_json", body.encode())

    def response_body(self, *, worker_id: str, control_plane_url: str, own_websocket: bool = True) -> bytes:
        """The 200 body: a JSON object with every field of the contract's WorkerStartResponse.
        `own_websocket`: whether a websocket URL may be given. The worker sends its bearer token to
        it: a queue's own URL is its author's choice, and a Kubernetes identity's token, which may open
        other namespaces' queues (and the API server), must not go there; the operator's own route
        passes through only queue and pod tokens (api/passthrough.py). Such a caller goes without."""
        websocket_url = "null"
        fields_json = self.fields_json
        if self.websocket_enabled and not own_websocket:
            if self.without_websocket_json is None:
                without = json.dumps({**self.fields, "websocket_enabled": False}, separators=(",", ":")).encode()
                object.__setattr__(self, "without_websocket_json", without)
            fields_json = self.without_websocket_json or fields_json
        elif self.websocket_enabled:
            websocket_url = _json_string(self.websocket_url or websocket_url_for(control_plane_url, worker_id))
        # Spliced by hand: a json.dumps per request costs more than the rest of the body together.
        head = (f'{{"worker_id":{_json_string(worker_id)},"control_plane_url":{_json_string(control_plane_url)},'
                f'"websocket_url":{websocket_url},')
        return head.encode() + fields_json[1:]


@dataclass(frozen=True)
class Upstream:
    """The control plane a queue's workers' other calls are passed through to, and the key it takes."""

    url: str
    """Base URL, without a trailing slash."""
    api_key: str = field(repr=False)
    """The organization's API key: never in a repr, a log line or an exception."""

    @property
    def origin(self) -> str:
        """scheme://host[:port]: what connections are pooled by and metrics are labelled with."""
        return origin_of(self.url)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class TemporalTarget:
    """The queue's task queue and the Temporal it is on."""

    endpoint: Endpoint
    task_queue: str


@dataclass(frozen=True)
class Resolution:
    queue: QueueObject
    config: QueueConfig | None
    problem: Problem | None
    token_digests: tuple[bytes, ...] = ()
    """Digests of the queue tokens; known even when something else keeps the queue from being Ready."""
    upstream: Upstream | None = None
    """Where workers' other calls go; resolved on its own, so that running workers keep reaching it
    while something else (a Temporal key, a suspension) keeps the queue from starting new ones."""
    upstream_problem: Problem | None = None
    """Why a configured upstream cannot be used (its key), whatever else the queue lacks."""
    awaiting_generated_token: bool = False
    """All that is missing is the token Secret the operator itself is creating."""
    temporal: TemporalTarget | None = None
    """The queue's task queue; resolved on its own, so that running workers keep seeing their
    executions while another Secret (a LiteLLM or Redis one) keeps the queue from being Ready."""
    temporal_problem: Problem | None = None
    """Why `temporal` is None: its own, not `problem`, which may be another Secret's (the token's)."""
    secrets_problem: Problem | None = None
    """The first referenced Secret key that cannot be used, whatever else keeps the queue from being
    Ready (a missing Temporal host, a queue id another queue holds): the SecretsResolved condition."""
    short_token: str | None = None
    """A token Secret of the queue's own whose token is shorter than SHORT_TOKEN (Ready says so)."""

    @property
    def ready(self) -> bool:
        return self.problem is None

    @property
    def starts_workers(self) -> bool:
        """Whether a worker started now would get through /start: the queue is Ready, or all it waits
        for is the token Secret the operator is making (its pods refer to it by name). Not while its
        upstream key is missing, though the queue resolves otherwise: /start answers 503 then."""
        return self.ready or (self.awaiting_generated_token and self.upstream_problem is None)

    @property
    def probe_target(self) -> TemporalTarget | None:
        """The task queue to ask Temporal about: none while all the queue waits for is the token Secret
        the operator is making (a new queue gets its status once that is there)."""
        return None if self.awaiting_generated_token else self.temporal


SUSPENDED = "Suspended"
"""Ready's reason for a queue its owner suspended, with nothing else wrong (resolve(); spelt out there,
where tests/unit/test_docs.py finds the reasons the code posts)."""

SHORT_TOKEN = 24
"""Fewer characters than this in a queue token of the user's own may be guessed offline: a worker
id's MAC is keyed by its queue token (new_worker_id), and ids show in Events, Leases and logs."""

SECRET_REASONS = frozenset({"SecretNotFound", "SecretKeyNotFound", "SecretKeyInvalid", "SecretPending",
                            "SecretUnreadable"})


def visible_ascii(text: str) -> bool:
    """Whether `text` can be a bearer token at all: RFC 6750's b64token, loosened to any visible ASCII."""
    # str methods, not a regex: every request's token is asked this.
    return text.isascii() and text.isprintable() and " " not in text


class _Unresolved(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _Lookup:
    """Reads Secret keys for one resolution; the first failure becomes the queue's Problem."""

    def __init__(self, secrets: Mapping[SecretName, SecretData]) -> None:
        self._secrets = secrets

    def value(self, namespace: str, name: str, key: str) -> str:
        data = self.whole(namespace, name)
        if key not in data:
            raise _Unresolved(Problem("SecretKeyNotFound", f"secret {name} has no key {key}"))
        # A single value is a credential or a URL, where surrounding whitespace (the newline
        # `kubectl create secret --from-file` keeps) is never meant, nor is an empty one.
        if data[key] == NOT_TEXT:
            raise _Unresolved(Problem("SecretKeyInvalid", f"secret {name} key {key} is not UTF-8 text"))
        value = data[key].strip()
        if not value:
            raise _Unresolved(Problem("SecretKeyInvalid", f"secret {name} key {key} is empty"))
        return value

    def whole(self, namespace: str, name: str) -> Mapping[str, str]:
        if (namespace, name) not in self._secrets:
            raise _Unresolved(Problem("SecretPending", f"secret {name} has not been read yet"))
        data = self._secrets[(namespace, name)]
        if data is None:
            raise _Unresolved(Problem("SecretNotFound", f"secret {name} not found in namespace {namespace}"))
        return data

    def texts(self, namespace: str, name: str) -> dict[str, str]:
        """Every key of a Secret, each of which must be text (a config passed on whole)."""
        data = self.whole(namespace, name)
        for key, value in sorted(data.items()):
            if value == NOT_TEXT:
                raise _Unresolved(Problem("SecretKeyInvalid", f"secret {name} key {key} is not UTF-8 text"))
        return dict(data)


_json_string = json.encoder.encode_basestring_ascii


def _usable_redis_url(url: str) -> bool:
    """What spec.redis.url must match too, and what a client can parse (a port in range; no host is
    localhost to redis-py)."""
    if not url.startswith(("redis://", "rediss://")) or not _printable_url(url):
        return False
    return spec_.port_in_range(url)


def redis_password_from_url(url: str) -> str | None:
    """The password in a redis:// URL's userinfo (`redis://:pw@host` or `redis://user:pw@host`)."""
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def resolve(
    queue: QueueObject,
    *,
    secrets: Mapping[SecretName, SecretData],
    settings: settings_.Settings,
) -> Resolution:
    """The configuration a queue serves, or the first reason it cannot."""
    lookup = _Lookup(secrets)
    # Each token on its own: one Secret missing mid-rotation (listed before it is made, deleted before
    # it is unlisted) starts no worker, but must not lock out the workers holding a token that resolves.
    digests: list[bytes] = []
    token_problem: Problem | None = None
    short: str | None = None
    for ref in queue.token_refs():
        try:
            token = lookup.value(queue.namespace, ref.name, ref.key)
            if not visible_ascii(token):  # no caller could ever present it: the queue is not Ready
                raise _Unresolved(Problem("SecretKeyInvalid", f"secret {ref.name} key {ref.key} is not a usable "
                                          "token (visible ASCII, no spaces)"))
            digests.append(digest(token))
            if len(token) < SHORT_TOKEN and short is None:
                short = ref.name
        except _Unresolved as exc:
            token_problem = token_problem or exc.problem
    tokens = tuple(digests)
    try:
        upstream = _upstream(queue, lookup, settings)
    except _Unresolved as exc:
        upstream_problem: Problem | None = exc.problem
        upstream = None
    else:
        upstream_problem = None
    temporal_problem: Problem | None = None
    try:
        target: TemporalTarget | None = _temporal_target(queue, lookup, settings)
    except _Unresolved as exc:
        target, temporal_problem = None, exc.problem
    try:
        config = _config(queue, lookup, settings=settings)
    except _Unresolved as exc:
        return Resolution(queue=queue, config=None, problem=token_problem or exc.problem, token_digests=tokens,
                          upstream=upstream, upstream_problem=upstream_problem,
                          secrets_problem=_of_secrets(token_problem, exc.problem, upstream_problem), temporal=target,
                          temporal_problem=temporal_problem)
    if config.websocket_enabled and not config.websocket_url and upstream is None and upstream_problem is None:
        # The operator's websocket route is passed through to the upstream: with none, each connect
        # would be a 404 that the worker retries all its life. Its workers go without, as if disabled.
        config = replace(config, websocket_enabled=False)
    secrets_problem = _of_secrets(token_problem, upstream_problem)
    if token_problem is not None:
        # Not Ready (no /start, no new pods), but what running workers use stays: their executions
        # are listed from the config, their other calls go upstream.
        # Its generated token being made (not there, or not read yet), not one there but unusable
        # (another key, a bad value): that is the user's to fix, and no reason to start pods.
        generated = not queue.spec.auth.token_secret_refs and token_problem.reason in ("SecretNotFound",
                                                                                       "SecretPending")
        return Resolution(queue=queue, config=config, problem=token_problem, token_digests=tokens, upstream=upstream,
                          upstream_problem=upstream_problem, awaiting_generated_token=generated,
                          secrets_problem=secrets_problem, temporal=target, temporal_problem=temporal_problem)
    # Workers started without their upstream's key would fail every execution: not Ready either.
    problem = upstream_problem or (Problem("Suspended", "the queue is suspended") if config.suspended else None)
    return Resolution(queue=queue, config=config, problem=problem, token_digests=tokens, upstream=upstream,
                      upstream_problem=upstream_problem, secrets_problem=secrets_problem, temporal=target,
                      temporal_problem=temporal_problem, short_token=short)


def _of_secrets(*problems: Problem | None) -> Problem | None:
    """The first of `problems` about a Secret."""
    return next((p for p in problems if p is not None and p.reason in SECRET_REASONS), None)


def _upstream(queue: QueueObject, lookup: _Lookup, settings: settings_.Settings) -> Upstream | None:
    own = queue.spec.upstream
    if own is not None:
        url, ref = own.url, own.api_key_secret_ref
        key = lookup.value(queue.namespace, ref.name, ref.key)
        where = ref.name, ref.key
    elif settings.upstream_url and (default := default_upstream_key(queue.namespace, settings)) is not None:
        url = settings.upstream_url
        key = _default_value(lookup, default, _UPSTREAM_KEY_SETTING)
        where = default.name, default.key
    else:
        return None
    if not key or not key.isprintable():
        # It goes into a header: an empty key or a line break would be refused (or worse) on the wire.
        whose = f" (the operator's default: {_UPSTREAM_KEY_SETTING})" if own is None else ""
        raise _Unresolved(Problem("SecretKeyInvalid", f"secret {where[0]} key {where[1]} is not a usable API "
                                  f"key{whose}"))
    if not _printable_url(url):
        raise _Unresolved(Problem("UpstreamInvalid", f"the upstream URL {url!r} holds a space or a character that "
                                  "cannot be printed"))
    try:
        # What every call would meet (a port out of range), and the metrics' label (an IPv6 host
        # such as [:], which urlsplit refuses).
        URL(url).port  # noqa: B018
        urlsplit(url).port  # noqa: B018
    except ValueError as exc:
        raise _Unresolved(Problem("UpstreamInvalid", f"the upstream URL {url} cannot be used: {exc}")) from None
    return Upstream(url=url.rstrip("/"), api_key=key)


def _printable_url(url: str) -> bool:
    return url.isprintable() and " " not in url


def _config(queue: QueueObject, lookup: _Lookup, *, settings: settings_.Settings) -> QueueConfig:
    s, ns = queue.spec, queue.namespace

    # Every Secret first: SecretsResolved must tell what is missing even while the queue lacks more.
    temporal_api_key = _secret_or_default(lookup, ns, s.temporal.api_key_secret_ref,
                                          default_temporal_key(s, settings), setting=_TEMPORAL_KEY_SETTING)
    litellm_api_key = _secret_or_default(lookup, ns, s.litellm.api_key_secret_ref, default_litellm_key(s, settings),
                                         setting=_LITELLM_KEY_SETTING)

    redis_url: str | None = None
    redis_password: str | None = None
    if s.redis is not None:
        if s.redis.url_secret_ref is not None:
            ref = s.redis.url_secret_ref
            redis_url = lookup.value(ns, ref.name, ref.key)
            if not _usable_redis_url(redis_url):
                raise _Unresolved(Problem("SecretKeyInvalid", f"secret {ref.name} key {ref.key} is not a "
                                          "redis:// or rediss:// URL"))
        else:
            redis_url = s.redis.url
            if redis_url is not None and not _usable_redis_url(redis_url):
                # The CRD checks its scheme only: held to what a URL from a Secret is held to.
                raise _Unresolved(Problem("RedisInvalid", "spec.redis.url is not a usable redis:// or rediss:// URL "
                                          "(a port out of range, or a character that cannot be printed)"))
        if s.redis.password_secret_ref is not None:
            redis_password = lookup.value(ns, s.redis.password_secret_ref.name, s.redis.password_secret_ref.key)
        elif redis_url:
            redis_password = redis_password_from_url(redis_url)

    nats_config = lookup.texts(ns, s.nats.config_secret_ref.name) if s.nats is not None else None

    target = _temporal_target(queue, lookup, settings)
    queue_id = queue.queue_id
    websocket_enabled = s.websocket.enabled if s.websocket.enabled is not None else bool(s.websocket.url)

    if s.litellm.url is not None and not re.fullmatch(spec_.LITELLM_URL_PATTERN, s.litellm.url):
        # Stored before the CRD said so (the API server keeps such a queue): reported, never served.
        raise _Unresolved(Problem("LiteLLMInvalid", "spec.litellm.url is not an http:// or https:// URL"))
    if s.litellm.url is not None and not spec_.port_in_range(s.litellm.url):
        raise _Unresolved(Problem("LiteLLMInvalid", "spec.litellm.url has a port out of range (0-65535)"))
    if s.websocket.url is not None and not (re.fullmatch(spec_.WEBSOCKET_URL_PATTERN, s.websocket.url)
                                            and spec_.port_in_range(s.websocket.url)):
        # Stored before the CRD said so: handed to the workers, it would fail each of them.
        raise _Unresolved(Problem("WebsocketInvalid", "spec.websocket.url is not a usable ws:// or wss:// URL "
                                  "(a port out of range, a space or a character that cannot be printed)"))

    fields: dict[str, Any] = {
        "task_queue_name": target.task_queue,
        "temporal_namespace": target.endpoint.namespace,
        "temporal_host": target.endpoint.host,
        "temporal_api_key": temporal_api_key,
        "organization_id": s.organization_id or settings.organization_id,
        "heartbeat_interval": s.heartbeat_interval_seconds,
        "litellm_api_url": s.litellm.url or settings.litellm_url,
        "litellm_api_key": litellm_api_key,
        "queue_name": queue.name,
        "environment_name": s.environment_name or queue.namespace,
        "queue_id": queue_id,
        "queue_ephemeral": s.ephemeral,
        "queue_single_execution": s.single_execution,
        "redis_url": redis_url,
        "redis_password": redis_password,
        "redis_enabled": bool(redis_url),
        "websocket_features": list(s.websocket.features),
        "nats_config": nats_config,
        "control_plane_sdk_version": settings.control_plane_sdk_version,
    }
    return QueueConfig(
        fields=fields,
        websocket_enabled=websocket_enabled,
        websocket_url=s.websocket.url,
        suspended=s.suspend,
        temporal_tls=target.endpoint.tls,
    )


def _temporal_target(queue: QueueObject, lookup: _Lookup, settings: settings_.Settings) -> TemporalTarget:
    s = queue.spec
    api_key = _secret_or_default(lookup, queue.namespace, s.temporal.api_key_secret_ref,
                                 default_temporal_key(s, settings), setting=_TEMPORAL_KEY_SETTING)
    host = s.temporal.host or settings.temporal_host
    namespace = s.temporal.namespace or settings.temporal_namespace
    if not host or not namespace:
        raise _Unresolved(Problem(
            "TemporalNotConfigured",
            "no Temporal host and namespace: set spec.temporal or the operator's defaults"))
    return TemporalTarget(Endpoint(host=host, namespace=namespace, api_key=api_key, tls=temporal_tls(queue, settings)),
                          s.task_queue_name or queue.queue_id)


_TEMPORAL_KEY_SETTING = "WQ_TEMPORAL_API_KEY_SECRET, Helm's temporal.apiKeySecret"
_LITELLM_KEY_SETTING = "WQ_LITELLM_API_KEY_SECRET, Helm's litellm.apiKeySecret"
_UPSTREAM_KEY_SETTING = "WQ_UPSTREAM_API_KEY_SECRET, Helm's upstream.apiKeySecret"


def _default_value(lookup: _Lookup, ref: settings_.NamespacedSecretKeyRef, setting: str) -> str:
    """An operator-wide default's key; its problem says whose it is: the queue's owner cannot fix it."""
    try:
        return lookup.value(ref.namespace, ref.name, ref.key)
    except _Unresolved as exc:
        problem = exc.problem
        raise _Unresolved(Problem(problem.reason, f"{problem.message} (the operator's default: {setting})")) from None


def _secret_or_default(
    lookup: _Lookup,
    namespace: str,
    own: spec_.SecretKeyRef | None,
    default: settings_.NamespacedSecretKeyRef | None,
    *,
    setting: str,
) -> str:
    """An API key (Temporal's, LiteLLM's), "" for none; the default's problem names its `setting`."""
    if own is not None:
        where = (namespace, own.name, own.key)
        key = lookup.value(*where)
    elif default is not None:
        where = (default.namespace, default.name, default.key)
        key = _default_value(lookup, default, setting)
    else:
        return ""
    if not key.isprintable():
        # It goes into a header (gRPC metadata, HTTP): a line break or a control character cannot work.
        whose = f" (the operator's default: {setting})" if own is None else ""
        raise _Unresolved(Problem("SecretKeyInvalid", f"secret {where[1]} key {where[2]} is not a usable API "
                                  f"key{whose}"))
    return key


def websocket_url_for(control_plane_url: str, worker_id: str) -> str:
    """The control plane's own websocket route for a worker, when a queue enables one without a URL."""
    if control_plane_url.startswith("https://"):
        base = "wss://" + control_plane_url[len("https://"):]
    elif control_plane_url.startswith("http://"):
        base = "ws://" + control_plane_url[len("http://"):]
    else:
        base = control_plane_url
    return f"{base}/api/v1/ws/workers/{worker_id}"
