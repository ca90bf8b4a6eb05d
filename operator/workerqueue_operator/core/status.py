"""The status a WorkerQueue should show for a resolution: pure, so unit tests call it directly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pydantic

from workerqueue_operator.core import workers
from workerqueue_operator.core.queues import SHORT_TOKEN, Problem, Resolution

READY = "Ready"
PROGRESSING = "Progressing"
SECRETS_RESOLVED = "SecretsResolved"


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    *,
    type: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Conditions with one set; lastTransitionTime moves only when the status itself changes."""
    result = [dict(c) for c in conditions if c.get("type") != type]
    previous = next((c for c in conditions if c.get("type") == type), None)
    transition = previous.get("lastTransitionTime") if previous and previous.get("status") == status else None
    result.append({
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition or now,
        "observedGeneration": generation,
    })
    return sorted(result, key=lambda c: str(c["type"]))


def invalid_spec_status(current: Mapping[str, Any], *, generation: int, message: str, now: str) -> dict[str, Any]:
    """The status of a queue whose stored spec the operator cannot take (one stored under an older,
    looser CRD): not served, and Ready=False saying why, not the Ready=True an earlier run wrote."""
    conditions = set_condition(current.get("conditions") or [], type=READY, status="False", reason="SpecInvalid",
                               message=message, generation=generation, now=now)
    return {"observedGeneration": generation, "conditions": conditions}


def spec_errors(exc: Exception) -> str:
    """What is wrong with a spec, by field, without the values (bounded: it goes into a condition)."""
    if isinstance(exc, pydantic.ValidationError):
        parts = [f"spec.{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                 for error in exc.errors(include_input=False, include_url=False)]
        text = "; ".join(parts)
    else:
        text = f"malformed ({type(exc).__name__})"
    text = f"the stored spec is not valid under this operator's schema: {text}; correct it (kubectl edit)"
    return text if len(text) <= 1000 else text[:997] + "..."


def desired_status(resolution: Resolution, current: Mapping[str, Any], *, now: str) -> dict[str, Any]:
    """The status fields this operator owns, given what the queue resolved to."""
    queue = resolution.queue
    problem = resolution.problem
    conditions: list[dict[str, Any]] = list(current.get("conditions") or [])
    generation = queue.generation

    secrets = resolution.secrets_problem
    if secrets is not None:
        status = "Unknown" if secrets.reason == "SecretPending" else "False"
        conditions = set_condition(conditions, type=SECRETS_RESOLVED, status=status, reason=secrets.reason,
                                   message=secrets.message, generation=generation, now=now)
    else:
        conditions = set_condition(conditions, type=SECRETS_RESOLVED, status="True", reason="Resolved",
                                   message="every referenced Secret key was found", generation=generation, now=now)

    workers = current.get("workers") or {}
    manages = queue.spec.ephemeral or queue.spec.single_execution
    # A crash loop of an older spec is over: the supervisor resets it, maybe after this write.
    crash_looping = manages and workers.get("crashLoopGeneration") == generation
    if manages:
        progressing = _progressing(queue.spec.suspend, crash_looping, workers, finishing=queue.spec.single_execution,
                                   held=None if resolution.starts_workers else problem, generation=generation,
                                   retried=not queue.spec.ephemeral)
        conditions = set_condition(conditions, type=PROGRESSING, status=progressing[0], reason=progressing[1],
                                   message=progressing[2], generation=generation, now=now)
    else:
        conditions = [c for c in conditions if c.get("type") != PROGRESSING]

    planned = workers.get("observedGeneration")
    # The API server refuses its pods (of this spec, not an older one's): workers cannot start, as
    # in a crash loop, and a `kubectl wait --for=condition=Ready` must not take it for ready.
    refused = manages and workers.get("lastError") and (planned is None or planned == generation)
    # Nor when every worker of this spec is stuck before it runs (an image that cannot be pulled, a
    # pod no node takes): none can start, though the API server took the pods.
    stuck = (manages and workers.get("stuck") and not int(workers.get("running", 0))
             and (planned is None or planned == generation))
    if problem is None and crash_looping:
        then = "change the spec to start workers again" if queue.spec.ephemeral else \
            "one worker at a time is tried after the longest back-off until one succeeds or has run that long, " \
            "or change the spec"
        conditions = set_condition(conditions, type=READY, status="False", reason="CrashLooping",
                                   message=f"workers failed {workers.get('consecutiveFailures', 0)} times in a row; "
                                   f"{then}", generation=generation, now=now)
    elif problem is None and refused:
        conditions = set_condition(conditions, type=READY, status="False", reason="PodCreationFailed",
                                   message=f"worker pods cannot be created: {workers['lastError']}",
                                   generation=generation, now=now)
    elif problem is None and stuck:
        shown = [str(entry) for entry in workers["stuck"]]
        named = "; ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
        conditions = set_condition(conditions, type=READY, status="False", reason="WorkersNotStarting",
                                   message=f"no worker runs, and {len(shown)} cannot start: {named}",
                                   generation=generation, now=now)
    elif problem is None:
        conditions = set_condition(conditions, type=READY, status="True", reason="Ready",
                                   message=ready_message(resolution), generation=generation, now=now)
    else:
        status = "Unknown" if problem.reason == "SecretPending" else "False"
        conditions = set_condition(conditions, type=READY, status=status, reason=problem.reason,
                                   message=problem.message, generation=generation, now=now)

    return {
        "queueId": queue.queue_id,
        "taskQueue": queue.spec.task_queue_name or queue.queue_id,
        "observedGeneration": generation,
        "conditions": conditions,
    }


def ready_message(resolution: Resolution) -> str:
    """Ready's message: that workers can start, and what they will lack for their executions (the
    queue serves /start all the same; a queue author does not see the operator's logs)."""
    lacking = []
    if resolution.upstream is None and resolution.upstream_problem is None:
        lacking.append("an upstream control plane (spec.upstream or the operator's WQ_UPSTREAM_URL, chart value "
                       "upstream.url, for the namespaces WQ_UPSTREAM_NAMESPACES lists if set; without one, "
                       "the workers' calls about their executions answer 404 and each execution fails)")
    if resolution.config is not None and not resolution.config.fields.get("litellm_api_url"):
        lacking.append("a LiteLLM URL (spec.litellm.url or the operator's WQ_LITELLM_URL, chart value litellm.url)")
    message = "workers can start" + (f"; they lack {', and '.join(lacking)}" if lacking else "")
    if resolution.short_token is not None:
        message += (f"; the token in secret {resolution.short_token} is shorter than {SHORT_TOKEN} characters: "
                    "worker ids, which Events and Leases show, let whoever reads them test guesses of it offline "
                    "(use 32 random bytes, as the operator's own tokens are)")
    ignored = _pod_settings_ignored(resolution)
    if ignored:
        message += (f"; {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored: the operator runs "
                    "worker pods for ephemeral or singleExecution queues only")
    return message


def _pod_settings_ignored(resolution: Resolution) -> list[str]:
    """The pod settings a queue whose pods the operator does not run names all the same (accepted by
    the schema, which cannot tell them apart): said, not ignored in silence."""
    s = resolution.queue.spec
    if workers.manages_pods(s):
        return []
    named = {"spec.scaling": s.scaling is not None, "spec.worker.template": s.worker.template is not None,
             "spec.ttlSecondsAfterFinished": s.ttl_seconds_after_finished > 0,
             "spec.activeDeadlineSeconds": s.active_deadline_seconds is not None}
    return [name for name, set_ in named.items() if set_]


def _progressing(suspended: bool, crash_looping: bool, workers: Mapping[str, Any],
                 held: Problem | None = None, *, generation: int, retried: bool = False,
                 finishing: bool = True) -> tuple[str, str, str]:
    """`held`: why no worker is started now (the supervisor waits for the queue to be able to serve);
    `retried`: a crash loop is tried again now and then (a pool), not given up on (an ephemeral queue);
    `finishing`: its workers exit after their execution (single-execution), not stopped when suspended."""
    alive = int(workers.get("pending", 0)) + int(workers.get("running", 0))
    desired = int(workers.get("desired", 0))
    if crash_looping:
        if retried:
            return "False", "CrashLooping", (f"{alive} of {desired} workers alive; one at a time is tried after the "
                                             "longest back-off until one succeeds or has run that long")
        return "False", "CrashLooping", "no new workers until the spec changes"
    planned = workers.get("observedGeneration")
    if "desired" not in workers or (planned is not None and planned != generation):
        # The counts are of an older spec, or there are none yet (a queue that starts no workers has
        # only `live`, the registry's): quoting them under this generation would tell a client waiting
        # on `observedGeneration` that the change is done. Counts that do not say their generation
        # (written by an earlier version, or a CRD not upgraded) are taken as they are.
        return "True", "Planning", f"{alive} workers alive; planning the workers of generation {generation}"
    if suspended:
        if not finishing:
            return "False", "Suspended", (f"{alive} workers alive, being stopped; none are started while suspended"
                                          if alive else "workers stopped; none are started while suspended")
        return "False", "Suspended", f"{alive} workers left to finish; none are started while suspended"
    if held is not None and alive < desired:
        return "False", held.reason, (f"{alive} of {desired} workers alive; none are started until the queue is Ready "
                                       f"({held.message})")
    if workers.get("lastError"):
        return "False", "PodCreationFailed", str(workers["lastError"])
    stuck = [str(entry) for entry in workers.get("stuck") or []]
    if stuck:
        named = "; ".join(stuck[:3]) + (f" and {len(stuck) - 3} more" if len(stuck) > 3 else "")
        return "False", "WorkersNotStarting", f"{len(stuck)} of {alive} workers cannot start: {named}"
    if alive < desired:
        return "True", "ScalingUp", f"{alive} of {desired} workers alive"
    if alive > desired:  # the surplus finish their work first
        return "True", "ScalingDown", f"{alive} workers alive, {desired} wanted: the others go once their work is done"
    return "True", "WorkersAvailable", f"{alive} of {desired} workers alive"


def differs(desired: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether patching would change anything (so an unchanged queue costs no API call)."""
    return any(current.get(key) != value for key, value in desired.items())


def ready_condition(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return condition(status, READY)


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)
