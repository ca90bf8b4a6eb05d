"""A worker's registration: the record a replica holds of it, and the Lease that stores it.

One `coordination.k8s.io/v1` Lease per worker, in its queue's namespace: its holder is the worker id,
its renew time the last heartbeat known, its duration 2.5 of the worker's heartbeat intervals; an
annotation holds what the worker told (status, tasks, system_info). Pure functions, no API-server
calls: the Registry (registry.py) decides when a Lease is written, read or deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workerqueue_operator.core import queues
from workerqueue_operator.core import workers as workers_
from workerqueue_operator.core.queues import QueueKey
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import times, wire

COMPONENT = "worker-registration"
LABELS = {**workers_.MANAGED_BY, "app.kubernetes.io/component": COMPONENT, "app.kubernetes.io/part-of": "agentcontrol"}
SELECTOR = ",".join(f"{k}={v}" for k, v in LABELS.items())
REFUSAL_COMPONENT = "start-refusal"
"""`app.kubernetes.io/component` of the Leases that record a worker pod turned away at /start."""
REFUSAL_ANNOTATION = "agentcontrol.dev/start-refused"
WATCHED = (f"app.kubernetes.io/managed-by={workers_.MANAGED_BY['app.kubernetes.io/managed-by']},"
           f"app.kubernetes.io/component in ({COMPONENT},{REFUSAL_COMPONENT}),app.kubernetes.io/part-of=agentcontrol")
"""The Lease informer's selector: registrations and refusals (SELECTOR alone: registrations)."""
STATE_ANNOTATION = "agentcontrol.dev/worker"
ENDED_ANNOTATION = "agentcontrol.dev/ended"
"""Written on a registration's Lease just before the operator deletes it because its worker's life
ended (a disconnect, its pod's end): the other replicas, which see only the deletion, must not let
a late heartbeat of that worker register it again. A Lease deleted without it (an expiry, the
garbage collector, `kubectl delete`) was not its worker's doing: the live worker is registered again
at its next heartbeat, never turned away for good."""
EXPIRY_INTERVALS = 2.5
"""A worker is gone once this many of its heartbeat intervals pass without one."""
WORKER_DEFAULT_INTERVAL = 60.0
"""The real worker's HEARTBEAT_INTERVAL when its environment sets none (it ignores the interval
/start answers): the pace expected of a worker the operator did not start until it shows its own."""
MAX_INTERVAL = 300.0
"""The longest interval a worker's heartbeats may teach (the longest a queue may set): the gap
after a worker was cut off for an hour must not keep a dead one registered for hours."""
SHRINK_BELOW = 0.8
"""A shorter interval is taken only below this share of the current one, so that the jitter of
a steady pace does not rewrite the Lease's duration at every heartbeat."""
SYSTEM_INFO_MAX_BYTES = 4096
"""system_info is kept to this size (as JSON) in the Lease; longer values are left out."""


def lease_duration(interval: float) -> float:
    """The lease duration of a worker expected to heartbeat every `interval` s: whole seconds, as
    the Lease keeps it, so that every replica reads the same end from it as the one that wrote it."""
    return float(math.ceil(EXPIRY_INTERVALS * interval))


def ended_on_purpose(body: Mapping[str, Any]) -> bool:
    """Whether the operator marked the Lease as its worker's end before deleting it (ENDED_ANNOTATION)."""
    return ENDED_ANNOTATION in ((body.get("metadata") or {}).get("annotations") or {})


def lease_name(queue_name: str, worker_id: str) -> str:
    # A cut ending in "." would make ".-", which no object name may hold: the name was refused (422).
    return f"{queue_name[:200].rstrip('.')}-{worker_id}"


def slot_lease_name(queue_name: str, slot: int) -> str:
    # A long name is shortened with a digest of it: two queues whose names begin alike must not
    # share slots (a worker id keeps lease_name's apart).
    if len(queue_name) > 200:
        queue_name = f"{queue_name[:189].rstrip('.')}-{hashlib.sha256(queue_name.encode()).hexdigest()[:10]}"
    return f"{queue_name}-slot-{slot}"


def queue_selector(queue_name: str) -> str:
    """The label selector of a queue's Leases (of namesakes' too, where a long name was shortened)."""
    return f"{SELECTOR},{workers_.QUEUE_LABEL}={workers_.label_value(queue_name)}"


TIME_RESOLUTION = 1e-6
"""A Lease's MicroTime keeps whole microseconds, rounded to the nearest: a time read back from a Lease
may be later than the one in memory it was written from."""


def later(moment: float, than: float) -> bool:
    """Whether `moment` is later than `than` by more than a Lease's MicroTime can tell apart."""
    return moment - than > TIME_RESOLUTION


HOSTNAME_MAX = 253
"""A DNS name's length limit (a Linux hostname is at most 64): anything longer is a client's mischief,
which must not cost a registration its bounded memory nor its Lease the API server's size limit."""


def bounded_hostname(hostname: str | None) -> str | None:
    return hostname[:HOSTNAME_MAX] if hostname is not None else None


def bounded_system_info(info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """system_info without long values, at most SYSTEM_INFO_MAX_BYTES of JSON."""
    if not info:
        return None
    kept: dict[str, Any] = {}
    size = 2
    for key, value in info.items():
        if value is None:
            continue
        length = _entry_length(key, value)
        if length > 512 or size + length > SYSTEM_INFO_MAX_BYTES:
            continue
        kept[key] = value
        size += length
    return kept or None


def system_info_json(info: wire.WorkerSystemInfo | None) -> bytes | None:
    """system_info as the compact JSON a worker holds until its Lease is written: at most
    SYSTEM_INFO_MAX_BYTES, so that a registration's memory stays bounded. Usually the whole of it:
    the per-entry bound of bounded_system_info is applied when the Lease is written (Worker.state),
    which is paced, rather than here on every /start. JSON bytes, not a dict: it is only ever
    written out, and the dict cost more memory and time than the rest of a worker."""
    if info is None:
        return None
    text: bytes = _SYSTEM_INFO_SERIALIZER.to_json(info, exclude_none=True)
    if len(text) <= SYSTEM_INFO_MAX_BYTES:
        return text if text != b"{}" else None
    kept = bounded_system_info(info.model_dump(exclude_none=True))
    return json.dumps(kept, separators=(",", ":")).encode() if kept else None


def stored_system_info(held: bytes | None) -> dict[str, Any] | None:
    """What a Lease keeps of the system_info a worker holds: bounded_system_info of it."""
    if not held:
        return None
    info = json.loads(held)
    return bounded_system_info(info) if isinstance(info, dict) else None


def system_pid(held: bytes | None) -> int | None:
    """The process id a worker's system_info gives: that of its Temporal identity, `<pid>@<hostname>`."""
    if not held:
        return None
    try:
        info = json.loads(held)
    except ValueError:
        return None
    pid = info.get("pid") if isinstance(info, dict) else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


_SYSTEM_INFO_SERIALIZER = wire.WorkerSystemInfo.__pydantic_serializer__
"""model_dump_json's serializer called directly: bytes, without its wrapper's work."""


_json_string = json.encoder.encode_basestring_ascii


def _entry_length(key: str, value: Any) -> int:
    """len(json.dumps({key: value}, separators=(",", ":"), default=str)), without the encoder for the
    common scalars: this runs for every field of every /start."""
    if isinstance(key, str):
        head = len(_json_string(key)) + 3  # {"key":...}
        if isinstance(value, str):
            return head + len(_json_string(value))
        if isinstance(value, bool):
            return head + (4 if value else 5)
        if type(value) is int:
            return head + len(str(value))
        if type(value) is float and math.isfinite(value):
            return head + len(repr(value))
    return len(json.dumps({key: value}, separators=(",", ":"), default=str))


@dataclass(slots=True)
class Worker:
    """A registered worker, as this replica knows it (slots: a /start flood holds many of them)."""

    worker_id: str
    queue: QueueKey
    queue_uid: str
    queue_id: str
    lease: str
    duration: float
    """Seconds a heartbeat keeps it registered."""
    registered_at: float
    renewed_at: float
    """Wall-clock time of the last heartbeat known (or of the registration)."""
    seen_at: float
    """When this replica first knew of it: time the operator was away does not count towards expiry."""
    slot: int | None = None
    status: str = "starting"
    tasks_processed: int = 0
    current_task_id: str | None = None
    hostname: str | None = None
    pod: str | None = None
    system_info: bytes | None = None
    """Compact JSON of system_info, at most SYSTEM_INFO_MAX_BYTES (see system_info_json)."""
    identity: str | None = None
    """The Kubernetes user that registered it (None: a queue or a pod's token): its executions poll
    names no worker, so its registration tells which worker asks."""
    since: float | None = None
    """For such a worker: when it first registered (wall clock), kept across a re-registration; what
    its host took in Temporal before then was an earlier worker's."""
    stored: bool = False
    """The Lease exists in the API server (written by us or seen by the watch)."""
    dirty: bool = True
    """Something newer than the Lease is known here."""
    written_at: float = 0.0
    """Monotonic time of this replica's last write of the Lease."""
    heartbeats_here: int = 0
    confirmed: bool = False
    """A heartbeat has reached the Lease: the first one is written at once, later ones paced."""
    pending: bool = False
    """Registered by /start here and not heard of since: counted against the pending bounds."""
    filed: int | None = None
    """The second it is filed under in the registry's expiries (its earliest), None while it is not."""
    version: str = ""
    """The resourceVersion of its Lease last known here ("": none yet): a renewal is written over it only."""
    token_refused: bool = False
    """A call in its name was refused here for its token (401) since its last heartbeat: its token was
    revoked (its Secret deleted, a rotation), the likely reason should it expire."""
    held_until: float = 0.0
    """No write of its Lease is queued before this (monotonic): one is under way (inf), or the last
    failed and its retry waits (see Registry._write)."""
    write_failures: int = 0
    """Writes of its Lease failed in a row: its retries back off."""

    @property
    def namespace(self) -> str:
        return self.queue[0]

    @property
    def interval(self) -> float:
        return self.duration / EXPIRY_INTERVALS

    def expires_at(self) -> float:
        return max(self.renewed_at, self.seen_at) + self.duration

    def expired(self, now: float) -> bool:
        return now >= self.expires_at()

    def heard(self) -> bool:
        """Whether a heartbeat renewed it since its registration, here or (its Lease tells) elsewhere."""
        return later(self.renewed_at, self.registered_at)

    def info(self) -> dict[str, Any]:
        """The wire shape of `GET .../workers`."""
        return {
            "id": self.worker_id,
            "status": self.status,
            "tasks_processed": self.tasks_processed,
            "current_task_id": self.current_task_id,
            "last_heartbeat": times.micro_rfc3339(self.renewed_at) if self.heartbeats_here or self.heard() else None,
            "registered_at": times.micro_rfc3339(self.registered_at),
            "hostname": self.hostname,
            "pod": self.pod,
        }

    def state(self) -> dict[str, Any]:
        """What the Lease's annotation holds besides its spec."""
        state = {"queueId": self.queue_id, "status": self.status, "tasksProcessed": self.tasks_processed,
                 "currentTaskId": self.current_task_id, "hostname": self.hostname, "pod": self.pod,
                 "slot": self.slot, "systemInfo": stored_system_info(self.system_info)}
        if self.identity is not None:
            state.update(identity=self.identity, since=self.since)
        return state


def lease_body(worker: Worker, *, queue_name: str) -> dict[str, Any]:
    labels = {**LABELS, workers_.QUEUE_LABEL: workers_.label_value(queue_name)}
    if worker.pod:
        labels[workers_.POD_LABEL] = workers_.label_value(worker.pod)
    owner = resources.owner_reference({"metadata": {"name": queue_name, "uid": worker.queue_uid}})
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": worker.lease,
            "namespace": worker.namespace,
            "labels": labels,
            "annotations": {STATE_ANNOTATION: json.dumps(worker.state(), separators=(",", ":"))},
            "ownerReferences": [owner],
        },
        "spec": {
            "holderIdentity": worker.worker_id,
            "leaseDurationSeconds": math.ceil(worker.duration),
            "acquireTime": times.micro_rfc3339(worker.registered_at),
            "renewTime": times.micro_rfc3339(worker.renewed_at),
        },
    }


def first_interval(queue_interval: float, *, pod: str | None) -> float:
    """The heartbeat interval to expect of a worker before its heartbeats show its own: the queue's
    for an operator-run pod (its environment says so), else at least the real worker's default."""
    return float(queue_interval) if pod is not None else max(float(queue_interval), WORKER_DEFAULT_INTERVAL)


def paced_interval(current: float, queue_interval: float, gap: float) -> float:
    """The interval to expect of a worker whose last two heartbeats came `gap` seconds apart: that
    gap (whole seconds up), never below the queue's interval nor above MAX_INTERVAL. A longer one is
    taken at once (a late heartbeat must not be an expiry), a shorter one only if clearly shorter."""
    shown = max(float(queue_interval), min(float(math.ceil(gap)), MAX_INTERVAL))
    return shown if shown > current or shown < SHRINK_BELOW * current else current


FUTURE_SLACK_SECONDS = 30.0
"""How far after this replica's clock a Lease's time may be and still be taken as written: the
replicas' clocks agree within seconds (a renewal by one a little ahead is no mistake)."""


def _not_to_come(at: float, now: float, instead: float) -> float:
    return instead if at > now + FUTURE_SLACK_SECONDS else at


def worker_from_lease(body: Mapping[str, Any], *, seen_at: float, now: float = math.inf,
                      far_ahead_as: float | None = None) -> Worker | None:
    """The worker a Lease of ours holds, or None for one that is not (or not yet) a registration.
    A time more than FUTURE_SLACK_SECONDS after `now` is taken as `far_ahead_as` (`seen_at` unless
    given), and the duration as at most MAX_INTERVAL's: written by hand, or by a replica whose clock
    ran far ahead, they would keep a dead worker (and its slot) registered until then, its heartbeats
    carrying that time on. A reader that has seen this very version of the Lease (and so judged its
    time when it came) reads it as no renewal told; one that has not, as a renewal made just now."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    worker_id = spec.get("holderIdentity")
    owner = queues.queue_owner(body)
    if not worker_id or owner is None:
        return None
    try:
        state = json.loads((meta.get("annotations") or {}).get(STATE_ANNOTATION) or "{}")
    except ValueError:
        state = {}
    if not isinstance(state, dict):
        state = {}
    info = state.get("systemInfo")
    # Written by the operator, but anyone who may write Leases there could write anything: what does
    # not have its type is left out rather than fail a heartbeat with a 500.
    told = state.get("tasksProcessed")
    texts = {key: value for key in ("currentTaskId", "hostname", "pod")
             if isinstance(value := state.get(key), str)}
    registered = _not_to_come(times.parse_or_none(spec.get("acquireTime"))
                              or times.parse_or_none(meta.get("creationTimestamp")) or seen_at, now,
                              seen_at if far_ahead_as is None else far_ahead_as)
    renewed = _not_to_come(times.parse_or_none(spec.get("renewTime")) or registered, now,
                           seen_at if far_ahead_as is None else far_ahead_as)
    return Worker(
        worker_id=str(worker_id),
        queue=owner[0],
        queue_uid=owner[1],
        queue_id=str(state.get("queueId") or ""),
        lease=meta["name"],
        duration=min(float(spec.get("leaseDurationSeconds") or 150), lease_duration(MAX_INTERVAL)),
        registered_at=registered,
        renewed_at=renewed,
        seen_at=seen_at,
        slot=state.get("slot") if isinstance(state.get("slot"), int) else None,
        status=str(state.get("status") or "unknown"),
        tasks_processed=told if isinstance(told, int) and not isinstance(told, bool) and told >= 0 else 0,
        current_task_id=texts.get("currentTaskId"),
        hostname=texts.get("hostname"),
        pod=texts.get("pod"),
        system_info=json.dumps(info, separators=(",", ":")).encode() if isinstance(info, dict) and info else None,
        identity=state["identity"] if isinstance(state.get("identity"), str) else None,
        since=float(state["since"]) if isinstance(state.get("since"), int | float) else None,
        stored=True,
        dirty=False,
        confirmed=later(renewed, registered),
        version=str(meta.get("resourceVersion") or ""),
    )


@dataclass(frozen=True)
class Refusal:
    """/start turned away the worker of a pod the operator made: kept in a Lease, so that the active
    replica knows it when that pod fails, whichever replica answered, across a restart too."""

    queue: QueueKey
    queue_uid: str
    pod: str
    at: float
    """When (epoch seconds)."""
    why: str


def refusal_lease_name(pod: str) -> str:
    name = f"{pod}-refused"
    if len(name) > 253:  # a pod name is a subdomain too: keep it unique when shortened
        name = f"{pod[:230]}-{hashlib.sha256(pod.encode()).hexdigest()[:10]}-refused"
    return name


def left_by_another_queue(current: Mapping[str, Any], body: Mapping[str, Any], *, created_at: float) -> bool:
    """Whether `current`, a Lease of the name `body` (a registration of the queue made at `created_at`)
    is to have, is a registration of a queue of that name that is gone: owned by none (deleted with
    `--cascade=orphan`), or by another queue and made before this one was (a namesake deleted, the
    garbage collector not through yet). Not one made after: that is a later queue's, which a replica
    whose watch is behind does not know yet."""
    meta = current.get("metadata") or {}
    labels = meta.get("labels") or {}
    if any(labels.get(key) != value for key, value in LABELS.items()):
        return False  # not a registration (a refusal, or no Lease of the operator's)
    if labels.get(workers_.QUEUE_LABEL) != ((body.get("metadata") or {}).get("labels") or {}).get(workers_.QUEUE_LABEL):
        return False
    owner, owning = queues.queue_owner(current), queues.queue_owner(body)
    if owning is None or owner == owning:
        return False
    if owner is None:
        return True
    made = times.parse_or_none((current.get("spec") or {}).get("acquireTime")) or times.parse_or_none(
        meta.get("creationTimestamp"))
    return made is not None and made < created_at


def is_refusal(body: Mapping[str, Any]) -> bool:
    labels = (body.get("metadata") or {}).get("labels") or {}
    return labels.get("app.kubernetes.io/component") == REFUSAL_COMPONENT


def refusal_lease_body(refusal: Refusal, *, queue_name: str) -> dict[str, Any]:
    """Owned by the queue, so that it goes with it; the worker supervisor deletes it with its pod."""
    labels = {**LABELS, "app.kubernetes.io/component": REFUSAL_COMPONENT,
              workers_.QUEUE_LABEL: workers_.label_value(queue_name),
              workers_.POD_LABEL: workers_.label_value(refusal.pod)}
    owner = resources.owner_reference({"metadata": {"name": queue_name, "uid": refusal.queue_uid}})
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": refusal_lease_name(refusal.pod),
            "namespace": refusal.queue[0],
            "labels": labels,
            "annotations": {REFUSAL_ANNOTATION: json.dumps({"pod": refusal.pod, "why": refusal.why},
                                                           separators=(",", ":"))},
            "ownerReferences": [owner],
        },
        "spec": {"renewTime": times.micro_rfc3339(refusal.at)},
    }


def refusal_from_lease(body: Mapping[str, Any]) -> Refusal | None:
    """The refusal a Lease of ours records; None for any other Lease, or one not readable."""
    if not is_refusal(body):
        return None
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    owner = queues.queue_owner(body)
    at = times.parse_or_none(spec.get("renewTime"))
    try:
        told = json.loads((meta.get("annotations") or {}).get(REFUSAL_ANNOTATION) or "{}")
    except ValueError:
        return None
    if owner is None or at is None or not isinstance(told, dict) or not isinstance(told.get("pod"), str):
        return None
    return Refusal(queue=owner[0], queue_uid=owner[1], pod=told["pod"], at=at, why=str(told.get("why") or ""))
