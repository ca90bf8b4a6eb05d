"""A queue at rest is not written: whatever state it settles in, the operator's writes stop.

A status field that changes on every pass (a time, a pod's name) would make each status write's watch
event start the next pass: a hot loop against the API server, unseen while every answer looks right.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.conftest import Kube, wait_for

pytestmark = pytest.mark.usefixtures("operator")

UNREACHABLE = {"host": "127.0.0.1:9", "namespace": "agents"}  # nothing listens on the discard port
SETTLE = 3.0
"""Seconds a queue is left after it shows its state, before its writes are counted."""
WINDOW = 12.0
"""Longer than the tests' pod resync (5 s) and back-off (at most 4 s), twice."""


def set_image_pull_backoff(kube: Kube, namespace: str, pod: str) -> None:
    kube.core.patch_namespaced_pod_status(pod, namespace, {"status": {"phase": "Pending", "containerStatuses": [
        {"name": "worker", "image": "registry.example/worker:nope", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "ErrImagePull", "message": "pull access denied"}}}]}})


STATES: dict[str, tuple[dict[str, Any], str, str]] = {
    # queue name: (spec, condition type, the reason it settles with)
    "ready": ({}, "Ready", "Ready"),
    # Ready=False SecretNotFound first, then TemporalReachable=Unknown (nothing to check it with).
    "missing-secret": ({"temporal": {**UNREACHABLE, "apiKeySecretRef": {"name": "nope", "key": "k"}}},
                       "TemporalReachable", "TemporalNotResolved"),
    "suspended": ({"suspend": True}, "Ready", "Suspended"),
    "temporal-unreachable": ({"temporal": UNREACHABLE}, "TemporalReachable", "TemporalUnavailable"),
    "pods-pending": ({"singleExecution": True, "replicas": 2}, "Progressing", "WorkersAvailable"),
    "pod-stuck": ({"singleExecution": True}, "Progressing", "WorkersNotStarting"),
    # Ephemeral: a pool that crash-loops tries a worker now and then, and is no queue at rest.
    "crash-looping": ({"ephemeral": True, "singleExecution": True, "worker": {"backoffLimit": 1}}, "Progressing",
                      "CrashLooping"),
    "scaling-idle": ({"singleExecution": True, "scaling": {"minIdle": 0, "max": 2}}, "Progressing",
                     "WorkersAvailable"),
    "scaling-min-idle": ({"singleExecution": True, "scaling": {"minIdle": 1, "max": 2}}, "Progressing",
                         "WorkersAvailable"),
}


def settled(kube: Kube, namespace: str, name: str) -> bool:
    _, condition, reason = STATES[name]
    c = kube.condition(namespace, name, condition)
    return c is not None and c["reason"] == reason


def test_a_queue_at_rest_is_not_written_whatever_its_state(kube: Kube, namespace: str):
    for name, (spec, _, _) in STATES.items():
        kube.create_queue(namespace, name, queueId=f"{name}-{namespace}", **spec)
    wait_for(lambda: {"pod-stuck-w0", "crash-looping-w0"} <= set(kube.pod_names(namespace)), what="worker pods")
    set_image_pull_backoff(kube, namespace, "pod-stuck-w0")
    kube.set_phase(namespace, "crash-looping-w0", "Failed", exit_code=1, reason="Error")
    try:
        wait_for(lambda: all(settled(kube, namespace, name) for name in STATES), timeout=60, what="every state")
    except AssertionError:
        unsettled = {name: (kube.get_queue(namespace, name).get("status") or {}).get("conditions")
                     for name in STATES if not settled(kube, namespace, name)}
        raise AssertionError(f"not settled: {unsettled}") from None
    time.sleep(SETTLE)

    def snapshot() -> dict[str, tuple[str, set[tuple[str, int]]]]:
        return {name: (kube.get_queue(namespace, name)["metadata"]["resourceVersion"],
                       {(e.reason, e.count) for e in kube.events(namespace, name)}) for name in STATES}

    before = snapshot()
    time.sleep(WINDOW)
    after = snapshot()
    assert not [name for name in STATES if after[name] != before[name]], {
        name: (before[name], after[name]) for name in STATES if after[name] != before[name]}


def test_temporal_reachable_turns_unknown_while_the_queues_temporal_cannot_be_resolved(kube: Kube, namespace: str):
    """Its Temporal key's Secret deleted: nothing is probed then, and what the last probe found, of a
    Temporal the queue can no longer be said to reach, stayed for as long."""
    kube.put_secret(namespace, "unres-key", k="s3cr3t-temporal-key")
    kube.create_queue(namespace, "unres", queueId=f"unres-{namespace}",
                      temporal={**UNREACHABLE, "apiKeySecretRef": {"name": "unres-key", "key": "k"}})
    kube.wait_condition(namespace, "unres", "False", "TemporalUnavailable", type_="TemporalReachable", timeout=60)
    kube.core.delete_namespaced_secret("unres-key", namespace)
    unknown = kube.wait_condition(namespace, "unres", "Unknown", "TemporalNotResolved", type_="TemporalReachable",
                                  timeout=30)
    assert "unres-key" in unknown["message"] and "s3cr3t" not in unknown["message"]
    kube.wait_condition(namespace, "unres", "False", "SecretNotFound")


def test_a_new_queue_whose_temporal_never_resolved_shows_temporal_reachable_unknown(kube: Kube, namespace: str):
    """Its Temporal key's Secret missing from the start: TemporalReachable was not shown at all (the
    Temporal column empty), where the README says Unknown TemporalNotResolved. Why is its Temporal's
    own reason, not the queue's first (its token's Secret, missing too)."""
    kube.create_queue(namespace, "never", queueId=f"never-{namespace}",
                      auth={"tokenSecretRefs": [{"name": "never-token", "key": "t"}]},
                      temporal={**UNREACHABLE, "apiKeySecretRef": {"name": "never-key", "key": "k"}})
    kube.wait_condition(namespace, "never", "False", "SecretNotFound")
    unknown = kube.wait_condition(namespace, "never", "Unknown", "TemporalNotResolved", type_="TemporalReachable",
                                  timeout=30)
    assert "never-key" in unknown["message"] and "never-token" not in unknown["message"]
    conditions = kube.get_queue(namespace, "never")["status"]["conditions"]
    assert [c["type"] for c in conditions].count("TemporalReachable") == 1
    kube.put_secret(namespace, "never-token", t="a-long-enough-queue-token-0123456789")
    kube.put_secret(namespace, "never-key", k="a-key")  # resolved: checked, and found unreachable
    kube.wait_condition(namespace, "never", "False", "TemporalUnavailable", type_="TemporalReachable", timeout=60)
