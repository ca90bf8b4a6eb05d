"""Worker pods of ephemeral and single-execution queues: what to create, delete and record.

`plan()` is pure: given a queue, the pods that exist and the time, it says what to do. The
supervisor carries the plan out. Pods are the source of truth; the queue's `status.workers` keeps
only what pods cannot tell once deleted (counts, the back-off, the next pod index).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from secrets import token_urlsafe
from typing import Any, NamedTuple

from workerqueue_operator.core import pace, queues
from workerqueue_operator.core.queues import QueueObject
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models import spec as spec_
from workerqueue_operator.models import times

QUEUE_LABEL = "agentcontrol.dev/queue"
POD_LABEL = "agentcontrol.dev/pod"
CREDENTIAL_COMPONENT = "worker-credential"
"""`app.kubernetes.io/component` of the per-worker token Secrets."""
DIGEST_ANNOTATION = "agentcontrol.dev/secrets-digest"
GENERATION_ANNOTATION = "agentcontrol.dev/queue-generation"
TEMPLATE_ANNOTATION = "agentcontrol.dev/worker-defaults"
"""A digest of the operator-wide worker settings a pod was made with (see worker_defaults_digest)."""
POD_ANNOTATION = "agentcontrol.dev/pod"
MADE_ANNOTATION = "agentcontrol.dev/made-at"
"""On a per-worker token: when it was made, to the microsecond (creationTimestamp has whole seconds)."""
HOSTNAME_ANNOTATION = "agentcontrol.dev/hostname"
"""On a per-worker token: the hostname its pod was given (see worker_hostname)."""
INTERVAL_ANNOTATION = "agentcontrol.dev/heartbeat-interval"
"""On a per-worker token: the HEARTBEAT_INTERVAL its pod was given (a pod keeps it through spec changes)."""
MANAGED_BY = {"app.kubernetes.io/managed-by": "workerqueue-operator"}
WORKER_CONTAINER = "worker"
"""The container of a default worker pod (one without its queue's own template) that runs the worker."""
ALIVE_PHASES = ("Pending", "Running", "Unknown", "")
DISPLACED_FORGOTTEN_SECONDS = 3600.0
"""Pods displaced this long after the last one start the count again (see plan)."""
FAILURES_FORGOTTEN_SECONDS = 3600.0
"""A non-ephemeral pool's failures in a row end once none has come for this long while no worker of it
was alive: nothing shows the fault is still there."""
MAY_RUN = ("Running", "Unknown")
"""Phases of a pod whose worker may be running, and hold an execution: Unknown is a node that stopped
reporting, not a pod that never started."""
# Pods that someone else took away (not the worker's fault): replaced at once, never a failure. So
# are pods the kubelet refused to admit (the scheduler's view of the node was behind): "OutOfcpu",
# "OutOfmemory", "OutOfpods" and the like, "NodeAffinity".
DISPLACED_REASONS = ("Evicted", "Preempting", "Terminated", "NodeShutdown", "NodeLost", "UnexpectedAdmissionError",
                     "NodeAffinity")


# Why a Pending pod does not start, for the reasons that last until someone changes something (the
# image, a Secret, the cluster): a new pod would wait the same, so it is reported, not replaced.
STUCK_REASONS = frozenset({"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
                           "CreateContainerError", "RunContainerError", "Unschedulable"})
# The kubelet alternates the two image-pull reasons: they are one.
_SAME_REASON = {"ErrImagePull": "ImagePullBackOff"}
STUCK_MESSAGE_MAX = 300
UNSCHEDULABLE_GRACE_SECONDS = 300.0
"""How long a pod may be Unschedulable before it is reported: a cluster autoscaler adds nodes for it."""
PENDING_DEADLINE_SECONDS = 600.0
"""How long a pod may stay not started, for any reason, before it is reported (Deployment's default
progressDeadlineSeconds)."""
HOSTNAME_MAX = 63


def displaced(reason: str) -> bool:
    return reason in DISPLACED_REASONS or reason.startswith("OutOf")


def label_value(text: str) -> str:
    """A label value (at most 63 characters) that stays unique for longer names."""
    if len(text) <= 63:
        return text
    return f"{text[:52]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def pod_name(queue_name: str, index: int) -> str:
    return f"{queue_name}-w{index}"


def pod_hostname(pod: str) -> str:
    """The hostname of a worker pod of a queue whose task queue is its own (see worker_hostname): the
    pod's name when that is a DNS label, else a label unique to it. Kubernetes would cut a longer name
    to 63 characters, giving every pod of a queue named with 60 or more the same hostname: each worker
    would see the others' executions and exit on them."""
    if len(pod) <= HOSTNAME_MAX and "." not in pod:
        return pod
    return _hashed_label(pod, pod)


def worker_hostname(queue: QueueObject, pod: str) -> str:
    """The hostname the operator gives a worker pod (`spec.hostname`), so the host part of its worker's
    Temporal identity `<pid>@<hostname>`, by which its executions are known.

    A queue's own task queue (named by its queue id, unique) only holds what its own pods took: the
    pod's name does (pod_hostname). A task queue the spec names may be another queue's too, and a
    namesake queue in another namespace has pods of the same names: each worker would take the
    other's executions for its own, and exit on them. Those pods' hostnames carry their queue's uid.
    """
    if queue.spec.task_queue_name is None:
        return pod_hostname(pod)
    return _hashed_label(pod, f"{queue.uid}/{pod}")


def own_host(queue: QueueObject, host: str, made: int) -> bool:
    """Whether `host` is the hostname of one of the first `made` pods of this queue. A task queue may
    be another queue's too, the one named after this queue's id included (another queue may name it
    as its taskQueueName): a worker of that other queue, busy on it, is none of this one's (counted
    as this queue's, each queue kept the other's pods from going, and wanted one more worker for each
    of the other's). Nor is a worker started by hand: it runs what it took itself."""
    head = host.rpartition("-")[0]
    for text in (host, head):  # a pod's name, or a hashed label: `<head of the name>-<hash>`
        index = pod_index(text)
        if index is not None and index < made and worker_hostname(queue, pod_name(queue.name, index)) == host:
            return True
    if len(pod_name(queue.name, max(made - 1, 0))) <= _CUT:
        return False  # the hostname holds the whole pod name, and it is no pod of this queue's
    # A long queue name: the hostname holds a cut of it, maybe without the index. One that begins as
    # this queue's pods' do is taken for one of them (a namesake's too): kept from going, never lost.
    return head.startswith(_label_head(queue.name[:_CUT - 12]))


_CUT = HOSTNAME_MAX - 11
"""How much of a pod's name a hashed hostname keeps."""


def _label_head(text: str) -> str:
    return text[:_CUT].replace(".", "-").rstrip("-")


def _hashed_label(pod: str, unique: str) -> str:
    return f"{_label_head(pod)}-{hashlib.sha256(unique.encode()).hexdigest()[:10]}"


def credential_secret_name(pod: str) -> str:
    """The Secret holding the per-worker token of an operator-run pod."""
    return f"{pod}-token"


WORKER_TOKEN_PREFIX = "wqw1_"
"""Marks the per-worker tokens the operator makes, so that /start can tell one it has not yet seen
(its Secret's watch event still on the way) from a token that is simply wrong."""


def new_worker_token() -> str:
    return WORKER_TOKEN_PREFIX + token_urlsafe(32)  # 256 random bits


def is_worker_token(token: str) -> bool:
    return token.startswith(WORKER_TOKEN_PREFIX)


def credential_secret_body(queue: QueueObject, pod: str, token: str, *, now: float) -> dict[str, Any]:
    """A per-worker token: the pod's worker presents it, so the operator knows which worker asks.

    Owned by the queue (the pod does not exist yet); the supervisor deletes it with its pod. Made at
    `now`, just before its pod: what its hostname took in Temporal before then was another pod's."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": credential_secret_name(pod),
            "namespace": queue.namespace,
            "labels": {**MANAGED_BY, "app.kubernetes.io/component": CREDENTIAL_COMPONENT,
                       "app.kubernetes.io/part-of": "agentcontrol", QUEUE_LABEL: queues_label(queue),
                       POD_LABEL: label_value(pod)},
            "annotations": {POD_ANNOTATION: pod, MADE_ANNOTATION: times.micro_rfc3339(now),
                            HOSTNAME_ANNOTATION: worker_hostname(queue, pod),
                            INTERVAL_ANNOTATION: str(queue.spec.heartbeat_interval_seconds)},
            "ownerReferences": [{"apiVersion": f"{spec_.GROUP}/{spec_.VERSION}", "kind": spec_.KIND,
                                 "name": queue.name, "uid": queue.uid, "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "data": {queues.TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


class Credential(NamedTuple):
    queue: queues.QueueKey
    queue_uid: str
    pod: str
    hostname: str
    """The hostname its pod was given (a token made before it was written down: see pod_hostname)."""
    token: str | None
    interval: float | None = None
    """The heartbeat interval its pod was given (None: made by an operator that did not write it)."""

    def __repr__(self) -> str:  # never the token: a log line or a traceback's locals may show it
        return f"Credential(queue={self.queue!r}, pod={self.pod!r}, token={'***' if self.token else None})"


def credential_from_secret(body: Mapping[str, Any]) -> Credential | None:
    """What a per-worker token Secret says; None for any other Secret."""
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get("app.kubernetes.io/component") != CREDENTIAL_COMPONENT:
        return None
    owner = queues.queue_owner(body)
    annotations = meta.get("annotations") or {}
    pod = annotations.get(POD_ANNOTATION)
    if owner is None or not pod:
        return None
    token = queues.decode_secret_data(body).get(queues.TOKEN_KEY)
    return Credential(owner[0], owner[1], pod, annotations.get(HOSTNAME_ANNOTATION) or pod_hostname(pod), token,
                      _interval(annotations.get(INTERVAL_ANNOTATION)))


def _interval(text: object) -> float | None:
    try:
        interval = float(str(text))
    except ValueError:
        return None
    return interval if 0 < interval < float("inf") else None


def credential_of(body: Mapping[str, Any], queue: QueueObject) -> bool:
    """Whether a Secret is a worker token this queue's supervisor made (not a user's of that name)."""
    owner = queues.queue_owner(body)
    return credential_from_secret(body) is not None and owner is not None and owner[1] == queue.uid


def namesakes_credential(body: Mapping[str, Any], queue: QueueObject) -> bool:
    """Whether a Secret is a worker token of a deleted queue of this queue's name (not this queue's)."""
    return credential_from_secret(body) is not None and queues.owned_by_namesake(body, queue)


def made_at(body: Mapping[str, Any]) -> float | None:
    """When a per-worker token was made (epoch seconds): its annotation, else its creationTimestamp;
    None without a readable one."""
    meta = body.get("metadata") or {}
    made = (meta.get("annotations") or {}).get(MADE_ANNOTATION)
    return times.parse_or_none(made or meta.get("creationTimestamp"))


_INDEX = re.compile(r"-w(0|[1-9]\d{0,8})$")
"""A pod index as pod_name writes it, below 10**9: a pod that someone made with the queue's label and
a name such as `-w99999999999999999999` made the next index too big for status (every pass failed)."""


def pod_index(name: str) -> int | None:
    match = _INDEX.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Pod:
    """What the plan needs to know of a worker pod."""

    name: str
    phase: str
    deleting: bool
    index: int | None
    reason: str = ""
    exit_code: int | None = None
    stuck: str = ""
    """Why it is Pending and will stay so (one of STUCK_REASONS), "" if it is not."""
    stuck_message: str = ""
    generation: int | None = None
    """The queue's generation it was made for (None: unknown)."""
    defaults: str = ""
    """worker_defaults_digest of the settings it was made with ("": unknown, an earlier version made it)."""
    single_execution: bool | None = None
    """Whether its worker runs one execution and exits (SINGLE_EXECUTION in its environment; None: not
    known, a pod the operator did not make so). Fixed at its creation, whatever the spec says since."""
    hostname: str = ""
    """Its `spec.hostname` ("": none, see host)."""
    refused: str = ""
    """Why /start turned its worker away, as the registry knows ("": it did not; see Refusals.start_refused)."""
    pending_reason: str = ""
    """What a Pending pod waits for, lasting or not ("ContainerCreating", "Unschedulable", ...)."""
    pending_message: str = ""
    created: float | None = None
    """Its creationTimestamp (epoch seconds), if known."""
    running_since: float | None = None
    """When its worker's container started running (epoch seconds), if it runs and that is known."""
    disrupted: bool = False
    """It failed as Kubernetes took it away (condition DisruptionTarget): an eviction, a preemption,
    its node gone (the pod garbage collector fails such pods before deleting them)."""
    ended: bool = False
    """The pod itself has ended (its phase, not only its worker's container): nothing runs in it."""
    coming: bool = False
    """Not listed, but maybe being created by the replica before this one (its token Secret is there)."""
    token_gone: bool = False
    """Its own token Secret, made by the operator, was deleted: the kubelet cannot start it
    (CreateContainerConfigError), or its worker is turned away (401) at every call."""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Pod:
        meta, status = body.get("metadata", {}), body.get("status") or {}
        match = _INDEX.search(meta.get("name", ""))
        reason, exit_code = status.get("reason") or "", None
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated and (exit_code is None or terminated.get("exitCode")):
                exit_code = terminated.get("exitCode")
                reason = reason or terminated.get("reason") or ""
        phase = status.get("phase") or ""
        worker = _worker_state(body)
        ended = worker.get("terminated")
        if isinstance(ended, Mapping) and (phase in ("Pending", "Running")
                                           or (phase == "Failed" and ended.get("exitCode") == 0)):
            # The worker's container's end is the pod's. The worker has ended though a sidecar runs on
            # (a service mesh's proxy, a log shipper): the pod would stay Running for good, never
            # replaced or counted. Or a sidecar failed after the worker succeeded: no crash.
            exit_code = ended.get("exitCode")
            phase = "Succeeded" if exit_code == 0 else "Failed"
            reason = ended.get("reason") or ""
        elif phase == "Pending" and worker.get("running") is not None:
            # The worker runs while a sidecar never started (its image not pulled): the kubelet keeps
            # the pod Pending, yet its worker may hold an execution, so it must not go as "not started".
            phase = "Running"
        cause, cause_message, lasting = _pending_cause(status) if phase == "Pending" else ("", "", False)
        disruption = _disruption(status) if phase == "Failed" else None
        if disruption is not None:
            reason = str(disruption.get("reason") or reason or "DisruptionTarget")
        annotations = meta.get("annotations") or {}
        generation = str(annotations.get(GENERATION_ANNOTATION, ""))
        running = worker.get("running")
        pod_phase = status.get("phase") or ""
        return cls(
            name=meta["name"],
            phase=phase,
            deleting=bool(meta.get("deletionTimestamp")),
            index=int(match.group(1)) if match else None,
            reason=reason,
            exit_code=exit_code,
            stuck=cause if lasting else "",
            stuck_message=cause_message if lasting else "",
            pending_reason=cause,
            pending_message=cause_message,
            created=times.parse_or_none(meta.get("creationTimestamp")),
            generation=int(generation) if generation.isdigit() else None,
            defaults=str(annotations.get(TEMPLATE_ANNOTATION, "")),
            single_execution=_single_execution(body),
            hostname=(body.get("spec") or {}).get("hostname") or "",
            disrupted=disruption is not None,
            ended=pod_phase in ("Succeeded", "Failed"),
            running_since=times.parse_or_none(running.get("startedAt"))
            if phase == "Running" and isinstance(running, Mapping) else None,
        )

    @property
    def host(self) -> str:
        """The host part of its worker's Temporal identity."""
        return self.hostname or pod_hostname(self.name)

    @property
    def alive(self) -> bool:
        return not self.deleting and self.phase in ALIVE_PHASES


DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"


def worker_container(pod: Mapping[str, Any]) -> str:
    """The name of the container that runs the worker: the one the pod's
    `kubectl.kubernetes.io/default-container` annotation names, else `worker`, else the first."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    names = [str(c.get("name", "")) for c in (pod.get("spec") or {}).get("containers") or []]
    named = annotations.get(DEFAULT_CONTAINER_ANNOTATION)
    if named in names:
        return str(named)
    return WORKER_CONTAINER if WORKER_CONTAINER in names or not names else names[0]


def _single_execution(pod: Mapping[str, Any]) -> bool | None:
    """Whether the pod's worker was made single-execution, by its environment as build_pod wrote it;
    None for a container without the operator's variables."""
    name = worker_container(pod)
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == name:
            env = {str(e.get("name")): e.get("value") for e in container.get("env") or [] if isinstance(e, Mapping)}
            if "QUEUE_ID" not in env:
                return None
            return str(env.get("SINGLE_EXECUTION") or "").lower() in ("true", "1", "yes")
    return None


def _worker_state(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state of the worker's container (`running`, `terminated`: with restartPolicy Never, for
    good, or `waiting`); empty before the kubelet reports it."""
    name = worker_container(pod)
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == name:
            state = container.get("state")
            return state if isinstance(state, Mapping) else {}
    return {}


def _disruption(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return condition  # type: ignore[no-any-return]
    return None


def _pending_cause(status: Mapping[str, Any]) -> tuple[str, str, bool]:
    """(reason, message, lasting) of a Pending pod: one of STUCK_REASONS if any (lasting: it will not
    start by itself), else the first reason it waits for ("ContainerCreating"), else ("", "", False)."""
    waiting = [(container.get("state") or {}).get("waiting") or {}
               for key in ("initContainerStatuses", "containerStatuses") for container in status.get(key) or []]
    scheduling = [c for c in status.get("conditions") or []
                  if c.get("type") == "PodScheduled" and c.get("status") == "False"]
    first: tuple[str, str, bool] = ("", "", False)
    for cause in (*waiting, *scheduling):
        reason = cause.get("reason") or ""
        reason = _SAME_REASON.get(reason, reason)
        message = str(cause.get("message") or "")[:STUCK_MESSAGE_MAX]
        if reason in STUCK_REASONS:
            return reason, message, True
        if reason and not first[0]:
            first = (reason, message, False)
    return first


def _outdated(pod: Pod, generation: int, defaults: str) -> bool:
    """Made for an older spec of its queue, or with other operator-wide worker settings (its image,
    command, pod template) than now: a pod of the current ones may start where it cannot."""
    # A pod that does not say (an earlier version made it) is taken as made with others: only stuck
    # pods are judged so, which never ran a worker, and the one replacing it says.
    return (pod.generation is not None and pod.generation < generation) or (
        bool(defaults) and pod.defaults != defaults)


def _judged(pod: Pod, now: float, generation: int, requeue: list[float], defaults: str = "") -> Pod:
    """The pod, stuck or not as its age says: Unschedulable only past a grace (a cluster autoscaler
    is adding a node), and any pod still not started past a deadline (a CNI out of addresses, a volume
    that never mounts), as a Deployment's progressDeadlineSeconds tells. One made for an older spec
    (or other worker settings) and Unschedulable is stuck at once: it is replaced by one made as
    the queue's would be now, which may fit."""
    if pod.phase not in ("Pending", "") or pod.created is None:
        return pod
    age = now - pod.created
    outdated = _outdated(pod, generation, defaults)
    if pod.stuck == "Unschedulable" and age < UNSCHEDULABLE_GRACE_SECONDS and not outdated:
        requeue.append(UNSCHEDULABLE_GRACE_SECONDS - age)
        return replace(pod, stuck="", stuck_message="")
    if pod.stuck:
        return pod
    if age < PENDING_DEADLINE_SECONDS:
        requeue.append(PENDING_DEADLINE_SECONDS - age)
        return pod
    detail = f": {pod.pending_message}" if pod.pending_message else ""
    return replace(pod, stuck=pod.pending_reason or "NotStarted",
                   stuck_message=f"not started {age:.0f}s after it was made{detail}"[:STUCK_MESSAGE_MAX])


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


DEMAND_STALE_SECONDS = 30.0
"""Scaling acts on a Temporal reading at most this old; the backlog is read every 1-2 s."""
UNSURE_RETRY_SECONDS = 5.0
"""A scale-down that found no pod idle for sure is tried again this much later."""
IDLE_STALE_SECONDS = 5.0
"""A running pod is taken for idle only on a reading this recent: one that took a workflow since
an older reading shows idle in it."""
FINISH_READ_SECONDS = 2.0
"""A finished ephemeral scaling queue is deleted only on a reading asked this long after its finish
time (whole seconds, so up to a second before its last worker was seen gone; the rest is room for
Temporal's visibility to show a workflow started as that worker ended)."""


@dataclass(frozen=True)
class Demand:
    """The work of a scaling queue, as Temporal last told it."""

    backlog: int | None
    """Workflow tasks waiting on the task queue; None: unknown (Temporal unreachable), so the desired
    count stays as it was."""
    busy: frozenset[str] = frozenset()
    """Hostnames (see worker_hostname) of the pods whose worker holds a running execution."""
    unread: int = 0
    """Running executions whose holder Temporal did not tell in time: any running pod may hold one."""
    active: frozenset[str] = frozenset()
    """Hostnames of pods running an activity of a running workflow (any worker takes any workflow's
    activities): never taken for idle. Not counted in the desired workers, which follow the workflows."""
    activities_unknown: bool = False
    """Temporal could not tell which pods run an activity: no running pod is idle for sure now."""
    delayed: int = 0
    """Workflows whose first task is not due yet (a retry's back-off, a start delay, a cron run): no
    worker waits for them, but an ephemeral queue has not finished while they are there."""
    read_at: float | None = field(default=None, compare=False)
    """When Temporal said so (epoch seconds; None: now). Not compared: the same reading again is no change."""

    def recent(self, now: float) -> bool:
        """Whether the reading is recent enough to act on what cannot be undone (a running pod, or an
        ephemeral queue, deleted): within IDLE_STALE_SECONDS. One made "later" than now was made before
        the clock stepped back: when, against a queue's finish say, is unknown."""
        return self.read_at is None or -1.0 <= now - self.read_at <= IDLE_STALE_SECONDS

    def read_after(self, moment: float) -> bool:
        """Whether Temporal was asked after `moment` (epoch seconds)."""
        return self.read_at is None or self.read_at > moment

    def fresh(self, now: float) -> bool:
        """Whether the reading may still be acted on: one older than DEMAND_STALE_SECONDS (Temporal not
        read since: a Secret of the queue went missing, the replica was a standby, scaling was off)
        could make a worker that has taken a workflow since look idle, and delete it."""
        return self.read_at is None or -1.0 <= now - self.read_at <= DEMAND_STALE_SECONDS  # (see recent)


@dataclass(frozen=True)
class Plan:
    workers: spec_.WorkersStatus
    create: tuple[int, ...] = ()
    delete: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    delete_queue: Event | None = None
    requeue_after: float | None = None
    kept: str | None = None
    """A failed pod kept for `kubectl logs` and `describe` (its worker's own failure, the newest, while
    failures go on in a row), as a Job keeps its failed pods; its token is revoked all the same."""


def _keepable_failure(pod: Pod) -> bool:
    """Whether a finished pod's worker failed by itself (not refused by /start, nor stopped from outside)
    and the pod has ended (not one whose sidecar runs on: kept, it would run for good)."""
    return (pod.phase == "Failed" and pod.ended and not pod.refused and not pod.token_gone
            and not (pod.disrupted or displaced(pod.reason)))


def manages_pods(queue_spec: spec_.WorkerQueueSpec) -> bool:
    return queue_spec.ephemeral or queue_spec.single_execution


def scales(queue_spec: spec_.WorkerQueueSpec) -> bool:
    """Whether the queue's pods are sized by its work (`scaling` on a queue whose pods the operator runs)."""
    return queue_spec.scaling is not None and manages_pods(queue_spec)


def reads_demand(queue_spec: spec_.WorkerQueueSpec) -> bool:
    """Whether the queue's pods follow Temporal's reading of its work (Demand): a scaling queue's, and a
    suspended single-execution queue's, whose idle workers would each take the next workflow."""
    return scales(queue_spec) or (queue_spec.suspend and queue_spec.single_execution)


_UNSET: tuple[object, ...] = (0, None, [])


def has_pod_history(workers_status: Mapping[str, Any] | None) -> bool:
    """Whether a queue's status.workers says it has had worker pods. `live` (the registry's count) says
    nothing about pods, and neither do the zeros the API server fills in from the CRD's defaults
    as soon as any of status.workers is written."""
    return any(key != "live" and value not in _UNSET for key, value in (workers_status or {}).items())


def backoff(consecutive_failures: int, settings: settings_.Settings) -> float:
    """10 s after the first failure, doubling, at most 5 min (with the default settings)."""
    return pace.doubling(consecutive_failures, settings.worker_backoff_seconds, settings.worker_backoff_max_seconds)


@dataclass
class _Pass:
    """What the steps of one plan() share: the inputs every step reads, the status being written (a
    copy of the previous one) and what the steps collect, in the order they collect it."""

    queue: QueueObject
    now: float
    settings: settings_.Settings
    w: spec_.WorkersStatus
    events: list[Event] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    requeue: list[float] = field(default_factory=list)

    @property
    def spec(self) -> spec_.WorkerQueueSpec:
        return self.queue.spec


def plan(
    queue: QueueObject,
    pods: Sequence[Pod],
    *,
    previous: spec_.WorkersStatus,
    now: float,
    created: float,
    settings: settings_.Settings,
    demand: Demand | None = None,
    deleted_outside: Collection[str] = (),
) -> Plan:
    """What to do about a queue's worker pods now. `created` is the queue's creation time; `demand`
    the work of a queue with `spec.scaling` (None: nothing known yet); `deleted_outside` the pods
    not finished that someone else deleted (being deleted, or gone since the last pass)."""
    p = _Pass(queue, now, settings, previous.model_copy(deep=True))
    _clamp_future_times(p)
    _reset_for_generation(p)
    finished, displaced_now = _count_finished(p, pods, deleted_outside)
    kept = _keep_newest_failure(p, finished)
    _count_displaced_round(p, pods, displaced_now)
    # Names are never reused, not even those of pods already deleted.
    p.w.next_index = _next_free_index(p.w.next_index, pods)
    alive = _judge_alive(p, pods)
    _record_alive(p, alive, previous)
    scaled_down = _desired(p, alive, previous, demand)
    delete_queue = _ephemeral_end(p, alive, created, demand)
    scale_down = _scale_down(p, alive, scaled_down, demand)
    missing = p.w.desired - len(alive)
    if missing <= 0:
        p.w.last_error = None  # nothing to create: a pod refused earlier is no longer wanted
    _reset_proven_backoff(p, alive)
    create = _creates(p, alive, missing, ending=delete_queue is not None)
    if kept is not None and p.w.consecutive_failures == 0:
        p.delete.append(kept.name)  # the row ended in this pass (a worker ran long enough)
        kept = None
    return Plan(
        workers=p.w,
        create=create,
        delete=tuple(p.delete + scale_down),
        events=tuple(p.events),
        delete_queue=delete_queue,
        requeue_after=min(p.requeue) if p.requeue else None,
        kept=kept.name if kept is not None else None,
    )


def _clamp_future_times(p: _Pass) -> None:
    """Takes a time to come in the status as now, and writes it so: written by a replica whose clock
    ran ahead (or before this one's stepped back), it would hold a back-off or a TTL by as much (an
    hour's step, a pool without pods for an hour). One that is no time at all (the schema takes any
    string: a hand edit, a restored backup) is taken as now too: every pass would fail on it."""
    for name in ("last_failure_time", "last_displaced_time", "finished_time", "surplus_since"):
        text = getattr(p.w, name)
        if text is None:
            continue
        written = times.parse_or_none(text)
        if written is None or written > p.now:
            setattr(p.w, name, times.rfc3339(p.now))


def _reset_for_generation(p: _Pass) -> None:
    """Forgets what the workers of an older spec went through (a refused create, failures, a crash loop,
    displacements): it says nothing of the current spec, which may be the fix."""
    w, generation = p.w, p.queue.generation
    if w.observed_generation != generation:
        w.last_error = None  # a pod the older spec could not create says nothing of this one's
    w.observed_generation = generation
    if w.crash_loop_generation is not None and w.crash_loop_generation != generation:
        w.consecutive_failures, w.crash_loop_generation = 0, None
        p.events.append(Event("BackOffReset", "the spec changed: starting workers again"))
    elif w.failures_generation is not None and w.failures_generation != generation:
        w.consecutive_failures = 0  # the failures of an older spec say nothing of this one: no back-off
    if w.consecutive_failures == 0:
        w.failures_generation, w.failure_index = None, None
    if w.displaced_generation is not None and w.displaced_generation != generation:
        # Stopped from outside under an older spec (refused as the queue was full, say): the change
        # may be the fix, and its first workers start at once.
        w.consecutive_displaced, w.last_displaced_time = 0, None
    if w.consecutive_displaced == 0:
        w.displaced_generation, w.displaced_index = None, None


def _count_finished(p: _Pass, pods: Sequence[Pod], deleted_outside: Collection[str]) -> tuple[list[Pod], list[Pod]]:
    """Counts each finished worker once, by what ended it (`counted` remembers it until its pod's deletion
    is seen), since pods are the only record; returns the finished pods, and those stopped from outside now."""
    names = {pod.name for pod in pods}
    p.w.counted = [name for name in p.w.counted if name in names]  # deletions seen are forgotten
    displaced_now: list[Pod] = []
    finished: list[Pod] = []
    for pod in pods:
        if pod.phase not in ("Succeeded", "Failed"):
            continue
        if pod.deleting:
            if pod.name not in deleted_outside:
                continue  # deleted here once counted, or as surplus: no news of the worker
        else:
            finished.append(pod)  # deleted, all but one failed pod kept while failures go on (_keep_newest_failure)
        if pod.name in p.w.counted:
            continue
        p.w.counted.append(pod.name)
        if _count_end(p, pod, pods):
            displaced_now.append(pod)
    displaced_now += _count_deleted_outside(p, pods, deleted_outside)
    return finished, displaced_now


def _count_end(p: _Pass, pod: Pod, pods: Sequence[Pod]) -> bool:
    """Counts how a finished worker ended, and tells it in an Event; returns whether it was stopped from
    outside, which is no failure of the worker's (replaced, and backed off apart from failures)."""
    w = p.w
    if pod.phase == "Failed" and pod.deleting:
        # Deleted by someone else before a pass counted it: its failure may be that deletion's doing.
        p.events.append(Event("WorkerDisplaced", f"worker {pod.name} was deleted by someone else", warning=True))
        return True
    if pod.phase == "Succeeded":
        w.succeeded += 1
        if _success_ends_failures(p, pod):
            _end_failure_row(w)
        w.consecutive_displaced, w.last_displaced_time = 0, None
        w.displaced_index, w.displaced_generation = None, None
        p.events.append(Event("WorkerSucceeded", f"worker {pod.name} finished; its pod is deleted"))
        return False
    if pod.token_gone and pod.phase == "Failed":
        # Turned away for it (401): its token was revoked, no crash of the worker's.
        p.events.append(Event("WorkerTokenGone", f"worker {pod.name} exited as its token Secret was deleted; "
                              "it is replaced", warning=True))
        return True
    if pod.refused:
        # Its worker exited on the operator's own refusal (a full or not ready queue, the API server
        # unavailable): no crash of the worker, no crash loop; replaced as a displaced pod is.
        p.events.append(Event("WorkerRefused", f"worker {pod.name} exited as /start turned it away "
                              f"({pod.refused}); it is replaced", warning=True))
        return True
    if pod.disrupted or displaced(pod.reason):
        # Not the worker's fault, but not always someone else's either: a pod evicted for its own
        # ephemeral storage is "Evicted" too. Replaced at once the first time, then backed off.
        p.events.append(Event("WorkerDisplaced", f"worker {pod.name} was stopped from outside "
                              f"(reason {pod.reason}); it is replaced", warning=True))
        return True
    _count_failure(p, pod, pods)
    return False


def _count_failure(p: _Pass, pod: Pod, pods: Sequence[Pod]) -> None:
    """Counts a worker's own failure, and a new round of failures in a row (the back-off, the crash loop)
    when it is one: not every failed pod is a retry that failed."""
    w = p.w
    w.failed += 1
    # A pod of an older spec failing says nothing of the current one: no back-off, no crash loop.
    # Nor does one made before the last failure counted: several failing at once (the operator
    # or Temporal out of reach as they started) are one round, not that many retries in a row.
    current = pod.generation is None or pod.generation >= p.queue.generation
    same_round = (w.consecutive_failures > 0 and w.failure_index is not None and pod.index is not None
                  and pod.index < w.failure_index)
    if current and not same_round:
        w.consecutive_failures += 1
        w.failures_generation = p.queue.generation
        w.last_failure_time = times.rfc3339(p.now)
        w.failure_index = _next_free_index(w.next_index, pods)
    p.events.append(Event("WorkerFailed", f"worker {pod.name} failed: exit code {pod.exit_code}, "
                          f"reason {pod.reason or 'unknown'}", warning=True))


def _count_deleted_outside(p: _Pass, pods: Sequence[Pod], deleted_outside: Collection[str]) -> list[Pod]:
    """The pods someone else deleted before they finished (`kubectl delete pod`, a drain, a preemption),
    counted as stopped from outside: a controller deleting worker pods again and again would otherwise
    meet a new one each time, at once."""
    listed = {pod.name: pod for pod in pods}
    gone: list[Pod] = []
    for name in sorted(deleted_outside):
        if name in p.w.counted:
            continue
        if name in listed:
            p.w.counted.append(name)  # counted once while it terminates
        gone.append(listed.get(name) or Pod(name=name, phase="", deleting=True, index=pod_index(name)))
        p.events.append(Event("WorkerDisplaced", f"worker {name} was deleted by someone else", warning=True))
    return gone


def _keep_newest_failure(p: _Pass, finished: Sequence[Pod]) -> Pod | None:
    """Deletes the finished pods but the newest of the workers' own failures while they go on in a row,
    which stays for `kubectl logs` (a crash loop whose pods were all gone could not be told apart)."""
    # It goes once a worker succeeds, runs long enough, or the spec changes (each ends the row), or
    # when a newer one fails.
    own = [pod for pod in finished if _keepable_failure(pod) and pod.index is not None]
    kept = max(own, key=lambda pod: pod.index or 0, default=None) if p.w.consecutive_failures else None
    p.delete.extend(pod.name for pod in finished if pod is not kept)
    return kept


def _count_displaced_round(p: _Pass, pods: Sequence[Pod], displaced_now: Sequence[Pod]) -> None:
    """Counts the pods stopped from outside in this pass as one more time, which the next worker's
    back-off grows with; one incident (a node under pressure evicting several, seconds apart) counts once."""
    w = p.w
    # Pods made before the last time counted belong to it. One long after the last is a new first.
    last = times.parse_or_none(w.last_displaced_time)
    forgotten = last is None or p.now - last > DISPLACED_FORGOTTEN_SECONDS
    same_round = not forgotten and w.displaced_index is not None and all(
        pod.index is not None and pod.index < w.displaced_index for pod in displaced_now)
    if displaced_now and not same_round:
        if forgotten:
            w.consecutive_displaced = 0
        w.consecutive_displaced += 1
        w.last_displaced_time = times.rfc3339(p.now)
        w.displaced_generation = p.queue.generation
        w.displaced_index = _next_free_index(w.next_index, pods)


def _next_free_index(next_index: int, pods: Sequence[Pod]) -> int:
    """The index after `next_index` - 1 and every pod's: names are never reused, so a create is never doubled."""
    return max([next_index, *((pod.index + 1) for pod in pods if pod.index is not None)])


def _judge_alive(p: _Pass, pods: Sequence[Pod]) -> list[Pod]:
    """The pods alive, each stuck or not as its age says. A pod that cannot start (its image, its
    config, scheduling) made for an older spec, or with other operator-wide worker settings (a wrong
    image tag or node selector fixed in the Helm values), is deleted: it never ran a worker, and the
    change may well be the fix, so one made as it would be now replaces it."""
    # Only pods not started yet can be stuck: the digest is not made for a queue whose pods all run.
    waiting = any(pod.alive and pod.phase in ("Pending", "") for pod in pods)
    defaults = worker_defaults_digest(p.settings) if waiting else ""
    alive = [_judged(pod, p.now, p.queue.generation, p.requeue, defaults) for pod in pods if pod.alive]
    outdated = {pod.name for pod in alive if pod.stuck and _outdated(pod, p.queue.generation, defaults)}
    # One whose own token was deleted never starts, or can make no call (401): replaced, with a token
    # of its own. Deleting the token revoked it; made again, it would not be.
    tokenless = sorted(pod.name for pod in alive if pod.token_gone and pod.name not in outdated)
    p.events.extend(Event("WorkerTokenGone", f"the token Secret of worker pod {name} was deleted: its worker "
                          "can no longer sign in; it is replaced", warning=True) for name in tokenless)
    outdated.update(tokenless)
    if p.spec.single_execution and manages_pods(p.spec):
        # Made for the pool the queue was before: its worker never exits by itself, so the queue would
        # never get the single-execution workers it now wants (nor, ephemeral, ever finish).
        pooled = sorted(pod.name for pod in alive if pod.single_execution is False and pod.name not in outdated)
        if pooled:
            p.events.append(Event("ScalingDown", "the queue is single-execution now: stopping the pool's workers "
                                  + ", ".join(pooled)))
        outdated.update(pooled)
    p.delete.extend(sorted(outdated))
    return [pod for pod in alive if pod.name not in outdated]


def _record_alive(p: _Pass, alive: Sequence[Pod], previous: spec_.WorkersStatus) -> None:
    """Writes how many workers are pending and running, and which cannot start: each of those is told
    in an Event once, so a person learns why the queue does not get its workers."""
    w = p.w
    w.pending = sum(1 for pod in alive if pod.phase != "Running")
    w.running = sum(1 for pod in alive if pod.phase == "Running")
    # Read back from the status, so that a restart posts no Event again: "<pod>: <reason>" (no ':' in a pod's name).
    was_stuck = {entry.partition(":")[0] for entry in previous.stuck}
    w.stuck = [f"{pod.name}: {pod.stuck}" for pod in alive if pod.stuck]
    p.events.extend(Event("WorkerNotStarting", f"worker {pod.name} cannot start: {pod.stuck}: {pod.stuck_message}",
                          warning=True) for pod in alive if pod.stuck and pod.name not in was_stuck)


def _desired(p: _Pass, alive: Sequence[Pod], previous: spec_.WorkersStatus, demand: Demand | None) -> list[str]:
    """Sets how many workers should be alive, as the queue's kind says; returns a scaling queue's idle
    workers that have been surplus past their grace, to delete now."""
    s, w = p.spec, p.w
    if s.scaling is None:
        w.surplus_since = None  # a grace begun before scaling was turned off is no grace when it is back
    if not manages_pods(s):
        w.desired = 0
        return []
    if s.scaling is not None:
        known = demand if demand is not None and demand.fresh(p.now) else Demand(None)
        return _scale(s, alive, previous, w, known, p.now, p.settings, p.events, p.requeue,
                      own=lambda host: own_host(p.queue, host, w.next_index))
    cap = s.max_workers if s.max_workers is not None else s.replicas
    if s.ephemeral:
        completions = 1 if s.single_execution else s.replicas
        w.desired = min(max(completions - w.succeeded, 0), 1 if s.single_execution else cap)
    else:
        w.desired = min(s.replicas, cap)
    return []


def _ephemeral_end(p: _Pass, alive: Sequence[Pod], created: float, demand: Demand | None) -> Event | None:
    """Why an ephemeral queue is deleted now (past its activeDeadlineSeconds, or its TTL after its
    workers finished), None while it lives on: it is made for a piece of work, and goes with it."""
    s, w = p.spec, p.w
    if not s.ephemeral:
        return None
    past_deadline = _past_deadline(p, created)
    # A scaling queue has finished once it ran workers (made for work: minIdle is 0) and none is
    # left; not before its first work came. Its workers need not have exited by themselves: ones
    # that take several workflows leave as idle once the work is done.
    done = (w.succeeded > 0 or w.next_index > 0) if s.scaling is not None else True
    # A workflow not due yet (a retry's back-off, say) is work to come, though it wants no worker now;
    # so is a backlog no worker is wanted for (scaling.max lowered to 0: paused, not finished).
    deferred = s.scaling is not None and demand is not None and demand.fresh(p.now) and (
        demand.delayed > 0 or bool(demand.backlog))
    if w.desired > 0 or alive or deferred:
        w.finished_time = None  # work again (a scaling queue): its TTL counts from its next finish
    elif done and past_deadline is None and not s.suspend:
        # Suspended, it is held, not finished: its workers stopped (a pool's) are no work done.
        return _finished_past_ttl(p, demand)
    return past_deadline


def _past_deadline(p: _Pass, created: float) -> Event | None:
    """DeadlineExceeded once the queue has outlived its activeDeadlineSeconds, as a Job's deadline
    bounds how long it runs; else a requeue for then."""
    s = p.spec
    if s.active_deadline_seconds is None:
        return None
    deadline = created + s.active_deadline_seconds
    if p.now >= deadline:
        message = f"the queue outlived activeDeadlineSeconds={s.active_deadline_seconds}; deleting it"
        return Event("DeadlineExceeded", message, warning=True)
    p.requeue.append(deadline - p.now)
    return None


def _finished_past_ttl(p: _Pass, demand: Demand | None) -> Event | None:
    """QueueFinished once every worker has finished for ttlSecondsAfterFinished (and, for a scaling
    queue, nothing is known to wait), so the finished queue stays a while to be looked at; else None."""
    w, now = p.w, p.now
    if w.finished_time is None:
        w.finished_time = times.rfc3339(now)
        p.events.append(Event("WorkersFinished", "every worker of this ephemeral queue has finished"))
    finished_at = times.parse(w.finished_time)
    expires = finished_at + p.spec.ttl_seconds_after_finished
    # A scaling queue's work may have come back meanwhile: deleted only once Temporal, asked
    # after the finish, says nothing waits (unreachable, or not read yet since a restart or a
    # handover: not yet). A reading from before may miss a workflow started as the last
    # worker ended, or handed to it as it went.
    read = demand if demand is not None and demand.backlog is not None else None
    nothing_known_waits = p.spec.scaling is None or (
        read is not None and read.recent(now) and read.read_after(finished_at + FINISH_READ_SECONDS))
    if now >= expires and nothing_known_waits:
        return Event("QueueFinished", "deleting the finished ephemeral queue")
    if now < expires:
        p.requeue.append(expires - now)
    elif read is not None and read.fresh(now):
        # The readings go on, alike maybe (the probe requeues a queue on a change only): the next
        # may do, looked at while it is recent.
        p.requeue.append(min(p.settings.backlog_idle_poll_seconds, IDLE_STALE_SECONDS))
    # Else planned again when a reading comes (the probe requeues the queue then).
    return None


def _scale_down(p: _Pass, alive: Sequence[Pod], scaled_down: list[str], demand: Demand | None) -> list[str]:
    """The alive pods to delete as surplus (`scaled_down`: a scaling queue's idle ones). Pods not
    started yet may always go; a running worker may hold an execution, and only goes when idle or
    from a pool that would otherwise never shrink."""
    s = p.spec
    if not manages_pods(s):
        # singleExecution turned off: its workers run elsewhere now. A pod not started yet goes (stuck
        # pulling its image, it would wait for good); a running one finishes its task, and exits.
        return _surplus_not_started(alive, 0)
    scale_down = scaled_down if s.scaling is not None else _scale_down_fixed(p, alive)
    if s.suspend:
        # A worker starting now would be turned away by /start (the queue is suspended): a pod not
        # started yet goes, as a suspended Job's. A running single-execution worker finishes its one
        # execution; a pool's never finishes by itself, so it is stopped, as a suspended Job's active
        # pods are (what it ran, Temporal hands on to a worker once the queue is resumed).
        stopping = _surplus_not_started(alive, 0) if s.single_execution else _surplus_running(alive, 0, leaving=())
        if s.single_execution and s.scaling is None:
            stopping += _idle_suspended(p, alive, demand)
        going = set(stopping) - set(scale_down)
        running = [pod.name for pod in alive if pod.name in going and pod.phase in MAY_RUN and not pod.coming]
        if running:
            p.events.append(Event("Suspending", f"the queue is suspended: stopping {', '.join(running)}"))
        scale_down = sorted({*scale_down, *stopping})
    return scale_down


def _idle_suspended(p: _Pass, alive: Sequence[Pod], demand: Demand | None) -> list[str]:
    """A suspended single-execution queue's running workers that hold no execution, as a recent reading
    of Temporal says for sure (as a scaling queue's idle ones), while no workflow waits: left, each would
    take the next workflow of a queue that says it is suspended. None while any running pod may hold
    one unseen, nor while workflows wait (one may be taking one this moment: each takes one and exits,
    rather than be cut off mid-run)."""
    running = [pod for pod in alive if pod.phase in MAY_RUN and not pod.coming]
    if not running or demand is None or demand.backlog != 0 or not demand.recent(p.now):
        return []
    orphaned = _orphaned(demand, alive, own=lambda host: own_host(p.queue, host, p.w.next_index))
    if demand.unread or demand.activities_unknown or orphaned:
        return []  # until the next reading (a pass before it would find this one too old to act on)
    held = demand.busy | demand.active
    return [pod.name for pod in running if pod.host not in held]


def _orphaned(demand: Demand, alive: Sequence[Pod], *, own: Callable[[str], bool]) -> int:
    """Running executions held by a worker of the queue's own pods (`own`) that is alive no more: Temporal
    hands each on to another worker, which then shows idle, since it did not take it first."""
    return sum(1 for host in demand.busy - {pod.host for pod in alive} if own(host))


def _scale_down_fixed(p: _Pass, alive: Sequence[Pod]) -> list[str]:
    """The surplus pods of a queue without scaling (replicas or maxWorkers lowered): those not started
    yet, and a pool's running ones too, since its workers never exit by themselves."""
    s, w = p.spec, p.w
    scale_down = _surplus_not_started(alive, w.desired)
    if not s.single_execution and not s.suspend and w.desired > 0:
        # A worker that is not single-execution never exits by itself: "once its work is done"
        # never comes. Deleted, newest first, as a Deployment's are; Temporal hands what one ran
        # on to another worker. Not all of them (replicas 0): the queue would then read as
        # finished, and be deleted with its work; suspend or delete it to stop them all.
        going = _surplus_running(alive, w.desired, leaving=scale_down)
        if going:
            p.events.append(Event("ScalingDown", f"{len(alive)} workers alive, {w.desired} wanted: deleting "
                                  f"{', '.join(going)}"))
        scale_down += going
    return scale_down


def _success_ends_failures(p: _Pass, pod: Pod) -> bool:
    """Whether a worker that succeeded shows the fault of the failures in a row gone: one of the current
    spec started after the last failure. One of an older spec, or running since before the failures,
    says nothing of why the later ones fail (a bad template rolled out while the old workers drain).
    Never an ephemeral queue's crash loop: it keeps a Job's rule, until the spec changes."""
    s, w = p.spec, p.w
    if w.consecutive_failures == 0:
        return True
    if s.ephemeral and w.consecutive_failures >= s.worker.backoff_limit:
        return False
    current = pod.generation is None or pod.generation >= p.queue.generation
    return current and (w.failure_index is None or pod.index is None or pod.index >= w.failure_index)


def _reset_proven_backoff(p: _Pass, alive: Sequence[Pod]) -> None:
    """Ends a pool's failures in a row once a worker started after the last one has run for the longest
    back-off, as the kubelet forgets a container's back-off once it has run a while: that shows the
    fault gone."""
    s, w, now = p.spec, p.w, p.now
    if w.consecutive_failures == 0 or s.ephemeral:
        return  # an ephemeral queue keeps a Job's rule: failures count until the spec changes
    failed_at = times.parse_or_none(w.last_failure_time)
    if not alive and failed_at is not None and now - failed_at >= FAILURES_FORGOTTEN_SECONDS:
        # A scaling pool with nothing to do for an hour tried no worker: its crash loop told of a
        # fault nobody has met since, and its next burst would get one worker at a time for it.
        _end_failure_row(w)
        p.events.append(Event("BackOffReset", f"no worker has failed for {FAILURES_FORGOTTEN_SECONDS:g}s, and "
                              "none is alive: starting workers again as needed"))
        return
    # Else only a success would end a crash loop, and a pool's one try may wait long for an execution
    # (up to 1,800 s): the pool would stay at one worker all that time. Only a worker started after
    # the last failure counts: one running since before it says nothing of why the later ones fail
    # (it reset every failure, and failing pods came back at once).
    proven = p.settings.worker_backoff_max_seconds
    ran = [pod for pod in alive if pod.phase == "Running" and pod.running_since is not None
           and (failed_at is None or pod.running_since > failed_at)
           and (pod.generation is None or pod.generation >= p.queue.generation)]
    longest = max(ran, key=lambda pod: now - (pod.running_since or now), default=None)
    if longest is not None and now - (longest.running_since or now) >= proven:
        _end_failure_row(w)
        p.events.append(Event("BackOffReset", f"worker {longest.name} has run for {proven:g}s: starting workers "
                              "again"))
    elif longest is not None:
        p.requeue.append((longest.running_since or now) + proven - now)


def _end_failure_row(w: spec_.WorkersStatus) -> None:
    """Forgets the failures in a row and the crash loop they made: a worker has shown the fault gone."""
    w.consecutive_failures, w.crash_loop_generation, w.failures_generation = 0, None, None
    w.failure_index = None


def _creates(p: _Pass, alive: Sequence[Pod], missing: int, *, ending: bool) -> tuple[int, ...]:
    """The indices of the pods to create for the `missing` workers, once the back-off has passed (none
    while the queue is suspended or `ending`); a crash loop stops an ephemeral queue, and slows a pool
    to one try at a time."""
    s, w = p.spec, p.w
    crash_looping = w.consecutive_failures > 0 and w.consecutive_failures >= s.worker.backoff_limit
    if crash_looping and manages_pods(s):
        _announce_crash_loop(p)
        # The try: a worker alive that was made after the last failure. One running since before the
        # failures is none, and would otherwise hold every try back until it leaves (up to 1,800 s).
        trying = any(w.failure_index is None or pod.index is None or pod.index >= w.failure_index for pod in alive)
        if s.ephemeral or missing <= 0 or s.suspend or trying:
            return ()
        # A pool is meant to stay: whatever failed its workers may pass (Temporal or the control
        # plane out of reach for a while). Given up on for good, it would stay drained until
        # someone changed its spec; it is tried, one worker at a time (none while one is alive:
        # that one is the try), at the longest back-off, and longer while tries are displaced.
        return _create_after(p, _backoff_wait(p, p.settings.worker_backoff_max_seconds), 1)
    if missing <= 0 or s.suspend or ending:
        return ()
    wait = _backoff_wait(p, backoff(w.consecutive_failures, p.settings))
    if wait > 0 and any(e.reason in ("WorkerFailed", "WorkerDisplaced", "WorkerRefused") for e in p.events):
        p.events.append(Event("BackOff", f"next worker in {wait:.0f}s", warning=True))
    return _create_after(p, wait, missing)


def _announce_crash_loop(p: _Pass) -> None:
    """Marks the generation that went CrashLooping and tells it, once, with what happens next: so the
    loop outlives a restart, and ends with a change of spec."""
    s, w = p.spec, p.w
    if w.crash_loop_generation is not None:
        return
    w.crash_loop_generation = p.queue.generation
    then = "no more start until the spec changes" if s.ephemeral else (
        f"one worker at a time is tried every {p.settings.worker_backoff_max_seconds:g}s until one succeeds "
        "or has run that long")
    p.events.append(Event("CrashLooping", f"workers failed {w.consecutive_failures} times in a row "
                          f"(backoffLimit {s.worker.backoff_limit}); {then}", warning=True))


def _backoff_wait(p: _Pass, after_failure: float) -> float:
    """Seconds the next worker must still wait: `after_failure` from the last failure in a row, and,
    while workers are stopped from outside again and again (the first is replaced at once), the
    back-off of those times, so that a controller deleting them is not met by a new one at once."""
    w, wait = p.w, 0.0
    if w.consecutive_failures > 0 and w.last_failure_time is not None:
        wait = times.parse(w.last_failure_time) + after_failure - p.now
    if w.consecutive_displaced > 1 and w.last_displaced_time is not None:
        wait = max(wait, times.parse(w.last_displaced_time) + backoff(w.consecutive_displaced - 1, p.settings) - p.now)
    return wait


def _create_after(p: _Pass, wait: float, count: int) -> tuple[int, ...]:
    """The indices of `count` new pods, or none and a requeue while `wait` seconds of back-off remain."""
    if wait > 0:
        p.requeue.append(wait)
        return ()
    create = tuple(range(p.w.next_index, p.w.next_index + count))
    p.w.next_index += count
    return create


def _surplus_not_started(alive: Sequence[Pod], desired: int) -> list[str]:
    """Pods over `desired` (replicas or maxWorkers lowered) that are not running yet, newest first;
    before them, pods only maybe coming, which the supervisor leaves be: a pod that is there is never
    deleted for one that may never come. A running worker may hold an execution, and nothing tells
    which do: those finish, and are not replaced while over."""
    surplus = len(alive) - desired
    if surplus <= 0:
        return []
    waiting = sorted((p for p in alive if p.phase not in MAY_RUN), key=lambda p: (p.coming, p.index or 0),
                     reverse=True)
    return [p.name for p in waiting[:surplus]]


def _surplus_running(alive: Sequence[Pod], desired: int, *, leaving: Collection[str]) -> list[str]:
    """Pods over `desired` besides those `leaving` already, newest first."""
    staying = sorted((p for p in alive if p.name not in leaving), key=lambda p: p.index or 0, reverse=True)
    return [p.name for p in staying[:max(len(staying) - desired, 0)]]


def _scale(s: spec_.WorkerQueueSpec, alive: Sequence[Pod], previous: spec_.WorkersStatus, w: spec_.WorkersStatus,
           demand: Demand, now: float, settings: settings_.Settings, events: list[Event],
           requeue: list[float], *, own: Callable[[str], bool] = lambda _: True) -> list[str]:
    """Sets `w.desired` of a scaling queue; returns the idle pods to delete now (never a busy one)."""
    assert s.scaling is not None
    top = min(s.scaling.max, s.max_workers) if s.max_workers is not None else s.scaling.max
    busy = [p for p in alive if p.host in demand.busy]
    # Running executions whose first worker is no pod alive (it was killed mid-run, or runs elsewhere):
    # Temporal hands them on to another worker, which shows as idle since it did not take them first.
    # Each needs a worker, and while one runs no running pod can be told idle for sure.
    orphaned = _orphaned(demand, alive, own=own)
    if demand.backlog is None:
        # Temporal cannot say what waits: no scaling change either way until it can.
        w.desired = min(previous.desired, top)
        w.surplus_since = None
        return []
    # Suspended: only the executions running keep workers; the idle ones go after the grace, or they
    # would go on taking workflows from the task queue of a queue that says it is suspended.
    wanted = 0 if s.suspend else s.scaling.min_idle + demand.backlog
    w.desired = min(top, len(busy) + orphaned + wanted)
    if w.desired != previous.desired:
        # Workers that are still starting (Pending) count as capacity that is coming.
        events.append(Event(
            "ScaledUp" if w.desired > previous.desired else "ScaledDown",
            f"desired workers {previous.desired} -> {w.desired}: backlog {demand.backlog}, "
            f"busy {len(busy) + orphaned}, "
            f"minIdle {s.scaling.min_idle} (max {top}; {len(alive)} alive)"))
    surplus = len(alive) - w.desired
    # While some running execution's holder is unknown (orphaned, or not read in time), or the reading
    # is seconds old (the probe was held up, or the activity check took long), no running pod is idle
    # for sure: only pods that have not started yet may go.
    pending_news = demand.activities_unknown or not demand.recent(now)
    unsure = bool(orphaned or demand.unread) or pending_news
    idle = [p for p in alive if p.host not in demand.busy | demand.active
            and not (unsure and p.phase in MAY_RUN)]
    if surplus > 0 and not idle and pending_news and w.surplus_since is not None:
        # The check made as the grace ended went unanswered, or took so long that the reading aged: none
        # goes this time, and the grace that has passed still holds (begun again, each such check would
        # cost a whole grace more). Tried again soon, then less often the longer it lasts: the activity
        # check is a call per running workflow, and it fails when Temporal is slow.
        due = times.parse(w.surplus_since) + settings.scale_down_grace_seconds
        requeue.append(min(max(UNSURE_RETRY_SECONDS, now - due), max(settings.scale_down_grace_seconds,
                                                                     UNSURE_RETRY_SECONDS)))
        return []
    if surplus <= 0 or not idle:
        w.surplus_since = None
        return []
    if w.surplus_since is None:
        w.surplus_since = times.rfc3339(now)
    due = times.parse(w.surplus_since) + settings.scale_down_grace_seconds
    if now < due:
        requeue.append(due - now)
        return []
    # Workers not running yet first, then the newest: the oldest idle ones have warmed up.
    idle.sort(key=lambda p: (p.phase in MAY_RUN, -(p.index or 0)))
    gone = [p.name for p in idle[:surplus]]
    w.surplus_since = None
    events.append(Event("ScaledDown", f"deleting {len(gone)} idle worker(s) above minIdle {s.scaling.min_idle} "
                        f"after {settings.scale_down_grace_seconds:g}s: {', '.join(gone)}"))
    return gone


@dataclass(frozen=True)
class PodInputs:
    """What a worker pod is made of besides the queue itself."""

    control_plane_url: str
    secrets_digest: str
    owner: Mapping[str, Any]


CLI_URL_VARIABLES = ("CONTROL_PLANE_GATEWAY_URL", "KUBIYA_CONTROL_PLANE_BASE_URL")
"""Where the Kubiya CLI looks for the control plane's URL; it hands the worker it runs CONTROL_PLANE_URL from them."""


def build_pod(queue: QueueObject, index: int, *, inputs: PodInputs, settings: settings_.Settings) -> dict[str, Any]:
    """A worker pod for a queue: the queue's template (or the default worker), plus what the operator owns."""
    s = queue.spec
    template = s.worker.template.body() if s.worker.template else copy.deepcopy(settings.worker_pod_template)
    meta = template.get("metadata") or {}
    pod_spec = template.get("spec") or {}
    if not s.worker.template or not pod_spec.get("containers"):
        # Without containers (a template for labels or a node selector only), no pod could be made.
        _default_worker(pod_spec, settings)
    else:
        worker = next((c for c in pod_spec["containers"] if c.get("name") == WORKER_CONTAINER), None)
        if worker is not None and not worker.get("image"):  # refused by the API server otherwise
            worker["image"] = settings.worker_image
            if worker.get("command") is None:  # unset or null: [] is the image's own entrypoint
                worker["command"] = list(settings.worker_command)
    name = pod_name(queue.name, index)
    containers: list[dict[str, Any]] = pod_spec.get("containers") or []
    credential = {"name": credential_secret_name(name), "key": queues.TOKEN_KEY}
    env: list[dict[str, Any]] = [
        {"name": "QUEUE_ID", "value": queue.queue_id},
        {"name": "CONTROL_PLANE_URL", "value": inputs.control_plane_url},
        # `kubiya worker start` (the default command) reads the URL from these, not CONTROL_PLANE_URL,
        # and without them calls Kubiya's public control plane with the worker's token.
        *({"name": name, "value": inputs.control_plane_url} for name in CLI_URL_VARIABLES),
        {"name": "HEARTBEAT_INTERVAL", "value": str(s.heartbeat_interval_seconds)},
        {"name": "TEMPORAL_HOST", "value": worker_temporal_host(queue, settings)},
        # Written "false" too: an `envFrom` of the template (a ConfigMap) saying true would make the
        # workers of a pool exit after one task, which its planning never expects (an `env` entry wins).
        {"name": "SINGLE_EXECUTION", "value": "true" if s.single_execution else "false"},
    ]
    token = {"name": "KUBIYA_API_KEY", "valueFrom": {"secretKeyRef": credential}}
    runs_worker = worker_container({"metadata": meta, "spec": pod_spec})
    for container in containers:
        # The operator's values win over same-named ones of the template: they are the contract. The
        # token is the worker's alone: a sidecar (a log shipper, a mesh proxy) has no call to make
        # with it, and with it could do whatever the worker may.
        given = [*env, token] if container.get("name") == runs_worker else env
        ours = {e["name"] for e in given}
        container["env"] = [e for e in container.get("env") or [] if e.get("name") not in ours] + given
    pod_spec["restartPolicy"] = "Never"
    if not pod_spec.get("serviceAccountName") and not pod_spec.get("serviceAccount"):
        # The worker signs in with KUBIYA_API_KEY; the namespace's default ServiceAccount token would
        # only give its code the API access of whatever that account may do. A template that names
        # an account (or says so itself) decides.
        pod_spec.setdefault("automountServiceAccountToken", False)
    # The operator owns the hostname: it tells whose executions are whose (see worker_hostname).
    pod_spec["hostname"] = worker_hostname(queue, name)
    pod_spec.pop("setHostnameAsFQDN", None)
    pod_spec.pop("hostnameOverride", None)  # the kubelet's hostname over ours: every worker's would be one

    labels = {
        **(meta.get("labels") or {}),
        QUEUE_LABEL: queues_label(queue),
        "app.kubernetes.io/name": "agent-worker",
        "app.kubernetes.io/instance": queues_label(queue),
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "agentcontrol",
        **MANAGED_BY,
    }
    annotations = {
        **(meta.get("annotations") or {}),
        DIGEST_ANNOTATION: inputs.secrets_digest,
        GENERATION_ANNOTATION: str(queue.generation),
        TEMPLATE_ANNOTATION: worker_defaults_digest(settings),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": queue.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [dict(inputs.owner)],
        },
        "spec": pod_spec,
    }


def worker_defaults_digest(settings: settings_.Settings) -> str:
    """A digest of the operator-wide settings that shape a worker pod beyond its queue's spec: whether
    a queue's pods were made with the current ones (its generation says whether with its current spec)."""
    made = json.dumps([settings.worker_image, list(settings.worker_command), settings.worker_pod_template],
                      sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(made.encode()).hexdigest()[:16]


def _default_worker(pod_spec: dict[str, Any], settings: settings_.Settings) -> None:
    """The operator-wide template's container `worker` (first, when it has none) runs the configured
    worker unless it names its own image or command."""
    containers: list[dict[str, Any]] = pod_spec.get("containers") or []  # `containers: null` stored as written
    pod_spec["containers"] = containers
    worker = next((c for c in containers if c.get("name") == WORKER_CONTAINER), None)
    if worker is None:
        worker = {"name": WORKER_CONTAINER}
        containers.insert(0, worker)
    if not worker.get("image"):
        worker["image"] = settings.worker_image
    if worker.get("command") is None:  # unset or null: [] is the image's own entrypoint
        worker["command"] = list(settings.worker_command)


_PLAINTEXT_HOSTS = ("temporal:", "host.docker.internal")
"""The worker connects to Temporal in plaintext, without a key, when TEMPORAL_HOST starts so."""


def worker_temporal_host(queue: QueueObject, settings: settings_.Settings) -> str:
    """The worker's TEMPORAL_HOST. It only picks the mode (the address comes from /start): plaintext
    when it starts with one of _PLAINTEXT_HOSTS, TLS with the API key otherwise."""
    host = queue.spec.temporal.host or settings.temporal_host
    if queues.temporal_tls(queue, settings):
        return f"tls:{host}" if host.startswith(_PLAINTEXT_HOSTS) else host
    return host if host.startswith(_PLAINTEXT_HOSTS) else f"temporal:{host}"


def queues_label(queue: QueueObject) -> str:
    return label_value(queue.name)


def secrets_digest(queue: QueueObject, version: Callable[[queues.SecretName], str],
                   settings: settings_.Settings) -> str:
    """A digest of the versions (resourceVersion) of every Secret the queue depends on, so a rotation
    shows on the pods started after it. Never of their values: more may read pods than Secrets, and
    a digest of a short password is as good as the password to a dictionary."""
    h = hashlib.sha256()
    for name in sorted(queue.secret_names(settings)):
        h.update(f"{name[0]}/{name[1]}\0{version(name)}\0".encode())
    return "sha256:" + h.hexdigest()[:32]
