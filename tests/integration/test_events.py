"""Events a queue gets: no Warning about the token Secret the operator is creating; no more than
its pace allows, however fast its workers come and go; and those still waiting when the operator
stops."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

from tests.integration.conftest import GROUP, PLURAL, VERSION, Kube, OperatorProcess, wait_for
from workerqueue_operator.core import events as events_
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.devcluster.temporal import TemporalServer
from workerqueue_operator.k8s import client as client_


def test_a_new_queue_gets_no_spurious_warning(operator: OperatorProcess, kube: Kube, namespace: str,
                                              temporal: TemporalServer):
    # A reachable Temporal: an unreachable one is a Warning worth having (TemporalUnavailable).
    for i in range(5):
        kube.create_queue(namespace, f"q{i}", queueId=f"q{i}-{namespace}",
                          temporal={"host": temporal.address, "namespace": temporal.namespace})
    for i in range(5):
        kube.wait_condition(namespace, f"q{i}", "True")
    wait_for(lambda: sum(e.reason == "TokenSecretCreated" for e in kube.events(namespace)) == 5,
             what="the TokenSecretCreated Events")
    time.sleep(1)  # a negative: give a late Warning the time to arrive
    warnings = [(e.involved_object.name, e.reason, e.message) for e in kube.events(namespace) if e.type == "Warning"]
    assert warnings == []
    for i in range(5):  # Ready from the first status written: never "not found" on the way
        assert kube.condition(namespace, f"q{i}", "SecretsResolved")["status"] == "True"
        assert kube.condition(namespace, f"q{i}")["lastTransitionTime"] is not None


def test_a_second_problem_of_the_same_kind_gets_its_own_event(operator: OperatorProcess, kube: Kube, namespace: str):
    # The first missing Secret made, the queue still lacks another: Ready=False SecretNotFound again, and
    # someone following `kubectl get events` must hear of the second one as well.
    def temporal(secret: str) -> dict[str, object]:
        return {"host": "t:1", "namespace": "n", "apiKeySecretRef": {"name": secret, "key": "k"}}

    def told(secret: str) -> bool:
        return any(e.reason == "SecretNotFound" and f"secret {secret} not found" in e.message
                   for e in kube.events(namespace, "lacking"))

    kube.create_queue(namespace, "lacking", queueId=f"lacking-{namespace}", temporal=temporal("first"))
    wait_for(lambda: told("first"), what="the Event about the first Secret")
    kube.patch_queue(namespace, "lacking", {"temporal": temporal("second")})
    wait_for(lambda: "secret second" in (kube.condition(namespace, "lacking") or {}).get("message", ""),
             what="the status naming the second Secret")
    wait_for(lambda: told("second"), what="the Event about the second Secret")


def test_routine_kopf_messages_stay_out_of_the_log(operator: OperatorProcess, kube: Kube, namespace: str):
    kube.create_queue(namespace, "quiet", queueId=f"quiet-{namespace}", singleExecution=True,
                      temporal={"host": "temporal:7233", "namespace": "agents"})
    wait_for(lambda: kube.pod_names(namespace, "quiet") == ["quiet-w0"], what="a worker pod")
    logs = operator.logs()
    assert "registry.<locals>" not in logs
    assert "succeeded." not in logs


def test_a_start_and_disconnect_loop_makes_a_bounded_number_of_events(
        operator: OperatorProcess, kube: Kube, namespace: str):
    # Each disconnect is an Event: a loop of them must not become a stream of API-server writes.
    kube.create_queue(namespace, "churn", queueId=f"churn-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "churn", "True")
    token = kube.queue_token(namespace, "churn")
    # The Events allowed are its burst (100), then RATE a second: the loop goes on until its
    # disconnects outnumber those by 40 however long it takes, so an unlimited stream would show.
    began = time.monotonic()
    disconnects = 0
    while disconnects < events_.BURST + (time.monotonic() - began) * events_.RATE + 40:
        assert disconnects < 1000, "a start and disconnect take about a second: no pace a limit shows in"
        worker_id = operator.start_worker(f"churn-{namespace}", token).json()["worker_id"]
        assert operator.call("POST", f"/api/v1/workers/{worker_id}/disconnect", token,
                             {"reason": "shutdown", "exit_code": 0}).status == 200
        disconnects += 1
    looped = time.monotonic() - began

    def events() -> int:  # the queue's own Events (its token Secret's, Temporal's) share its pace
        return len(kube.events(namespace, "churn"))

    wait_for(lambda: events() >= 100, what="the queue's first 100 Events")
    time.sleep(1)  # a negative: give late Events the time to arrive
    allowed = events_.BURST + looped * events_.RATE + 2  # its burst, then RATE a second
    assert events() <= allowed < disconnects, (events(), looped, disconnects)
    posted = kube.events(namespace, "churn")
    assert sum(e.reason == "WorkerDisconnected" for e in posted) >= 90
    # Which replica posted each: its identity in the peering (here no POD_ID, so host/pid/random).
    assert operator.process is not None
    instances = {e.reporting_instance.rsplit("/", 1)[0] for e in posted}
    assert instances == {f"{socket.gethostname()}/{operator.process.pid}"}
    assert operator.metric("workerqueue_events_limited_total") >= disconnects - allowed


def test_a_token_secret_the_api_server_refuses_shows_on_the_queue(
        operator: OperatorProcess, kube: Kube, namespace: str):
    # A Ready queue whose token Secret is deleted while a quota leaves no room for it: the queue must
    # not keep saying Ready=True, and someone must hear why; once the quota is lifted it recovers.
    kube.create_queue(namespace, "quota", queueId=f"quota-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "quota", "True")
    old_token = kube.queue_token(namespace, "quota")
    kube.forbid_new_secrets(namespace)
    kube.core.delete_namespaced_secret("quota-worker-token", namespace)
    condition = kube.wait_condition(namespace, "quota", "False", reason="TokenSecretNotCreated")
    assert "quota-worker-token" in condition["message"] and "(403 Forbidden)" in condition["message"]
    assert "exceeded quota" not in condition["message"]  # the server's text may quote the object
    assert kube.condition(namespace, "quota", "SecretsResolved")["reason"] == "TokenSecretNotCreated"
    wait_for(lambda: any(e.reason == "TokenSecretNotCreated" and e.type == "Warning"
                         for e in kube.events(namespace, "quota")), what="the Warning Event")
    kube.allow_new_secrets(namespace)
    kube.wait_condition(namespace, "quota", "True", timeout=60)  # its back-off is at most a minute
    assert kube.queue_token(namespace, "quota") != old_token


def test_a_queue_being_deleted_gets_no_token_secret_back(operator: OperatorProcess, kube: Kube, namespace: str):
    # Foreground deletion: the garbage collector deletes the token Secret, then the queue. Made again
    # in between, it would keep the queue from going (or outlive it, were it made without the owner).
    kube.create_queue(namespace, "going", queueId=f"going-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "going", "True")
    kube.queue_token(namespace, "going")
    kube.custom.patch_namespaced_custom_object(  # held in deletion, as a slow collector would
        GROUP, VERSION, namespace, PLURAL, "going", {"metadata": {"finalizers": ["test.agentcontrol.dev/hold"]}})
    try:
        kube.delete_queue(namespace, "going")
        kube.core.delete_namespaced_secret("going-worker-token", namespace)
        time.sleep(3)  # a negative: the operator answered a missing token Secret within a second before
        assert not kube.has_secret(namespace, "going-worker-token")
    finally:
        kube.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "going",
                                                   {"metadata": {"finalizers": None}})




def test_a_generated_token_secret_deleted_is_made_again_with_a_warning(operator: OperatorProcess, kube: Kube,
                                                                       namespace: str):
    """Its workers hold the old token and are refused from then on: that must not go by as a routine
    TokenSecretCreated (a `kubectl delete` by mistake drained every hand-started worker in silence)."""
    kube.create_queue(namespace, "revoked", queueId=f"revoked-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "revoked", "True")
    old = kube.queue_token(namespace, "revoked")
    worker_id = operator.start_worker(f"revoked-{namespace}", old).json()["worker_id"]
    kube.core.delete_namespaced_secret("revoked-worker-token", namespace)
    new = wait_for(lambda: kube.has_secret(namespace, "revoked-worker-token")
                   and kube.queue_token(namespace, "revoked"), what="the token Secret made again")
    assert new != old
    warned = wait_for(lambda: [e for e in kube.events(namespace, "revoked") if e.reason == "TokenSecretRecreated"],
                      what="the TokenSecretRecreated Event")
    assert warned[0].type == "Warning" and "revoked-worker-token" in warned[0].message
    assert old not in warned[0].message and new not in warned[0].message
    wait_for(lambda: operator.call("POST", f"/api/v1/workers/{worker_id}/heartbeat", old,
                                   {"status": "active"}).status == 401, what="the old token refused")
    assert [e.reason for e in kube.events(namespace, "revoked")].count("TokenSecretCreated") == 1


def test_a_generated_token_secret_deleted_while_the_operator_was_away_is_made_again_with_a_warning(
        operator: OperatorProcess, kube: Kube, namespace: str):
    # Whether it was there lived in memory alone: after a restart (or a handover) its deletion went by
    # as a routine TokenSecretCreated, and alerting never learnt that every hand-started worker lost it.
    kube.create_queue(namespace, "away", queueId=f"away-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "away", "True")
    old = kube.queue_token(namespace, "away")
    with operator.paused():
        kube.core.delete_namespaced_secret("away-worker-token", namespace)
    new = wait_for(lambda: kube.has_secret(namespace, "away-worker-token") and kube.queue_token(namespace, "away"),
                   what="the token Secret made again")
    assert new != old
    warned = kube.wait_events(namespace, "away", "TokenSecretRecreated")
    assert warned[0].type == "Warning"
    assert [e.reason for e in kube.events(namespace, "away")].count("TokenSecretCreated") == 1


def test_a_first_token_secret_made_late_is_no_recreation(operator: OperatorProcess, kube: Kube, namespace: str):
    """A new queue whose first token Secret was refused a while (a quota): when it is made at last,
    nobody held a token to lose, so no TokenSecretRecreated Warning."""
    kube.forbid_new_secrets(namespace)
    kube.create_queue(namespace, "late", queueId=f"late-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "late", "False", reason="TokenSecretNotCreated")
    kube.allow_new_secrets(namespace)
    kube.wait_condition(namespace, "late", "True", timeout=60)
    wait_for(lambda: any(e.reason == "TokenSecretCreated" for e in kube.events(namespace, "late")),
             what="the TokenSecretCreated Event")
    assert not any(e.reason == "TokenSecretRecreated" for e in kube.events(namespace, "late"))


async def test_a_stopping_operator_posts_the_events_still_waiting(kubeconfig: Path, kube: Kube, namespace: str):
    """Routine Events wait while the work they report on is behind (thousands of new queues): the
    operator stopped with them waiting cancelled its poster, and they were lost. Now it flushes them
    (runner.EVENTS_FLUSH_SECONDS), deferred or not."""
    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    poster = EventPoster(client)
    poster.defer_routine(lambda: True)  # behind all along
    posting = asyncio.create_task(poster.run())
    try:
        for i in range(30):
            poster.post(involved={"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"namespace": namespace, "name": f"cm-{i}"}},
                        reason="Routine", message=f"event {i}")
        await asyncio.sleep(0.5)
        assert poster.waiting == 30  # deferred
        assert await poster.flush(30) == 0
    finally:
        posting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await posting
        await client.close()
    assert sorted(e.message for e in kube.events(namespace) if e.reason == "Routine") == sorted(
        f"event {i}" for i in range(30))
