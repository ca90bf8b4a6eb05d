"""Worker pods on the real control plane. No kubelet runs: the tests write pod status themselves."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client

from tests.integration.conftest import Kube, OperatorProcess, deletions_refused, frozen, wait_for
from workerqueue_operator.devcluster.controlplane import ControlPlane

pytestmark = pytest.mark.usefixtures("operator")

TEMPORAL = {"host": "temporal:7233", "namespace": "agents"}


def reasons(kube: Kube, namespace: str, queue: str) -> list[str]:
    return [e.reason for e in kube.events(namespace, queue)]


def wait_pods(kube: Kube, namespace: str, queue: str, names: list[str], timeout: float = 20) -> None:
    wait_for(lambda: kube.pod_names(namespace, queue) == names, timeout=timeout,
             what=f"alive pods {names} (have {kube.pod_names(namespace, queue)})")


def test_single_execution_keeps_replicas_alive_and_replaces_finished(kube: Kube, namespace: str):
    kube.create_queue(namespace, "se", queueId=f"se-{namespace}", singleExecution=True, replicas=2,
                      heartbeatIntervalSeconds=20, temporal=TEMPORAL)
    wait_pods(kube, namespace, "se", ["se-w0", "se-w1"])
    pod = kube.core.read_namespaced_pod("se-w0", namespace)
    (owner,) = pod.metadata.owner_references
    assert (owner.kind, owner.name, owner.controller, owner.block_owner_deletion) == ("WorkerQueue", "se", True, True)
    assert pod.spec.restart_policy == "Never"
    assert pod.metadata.labels["app.kubernetes.io/managed-by"] == "workerqueue-operator"
    assert pod.metadata.annotations["agentcontrol.dev/secrets-digest"].startswith("sha256:")
    # Deleting a queue (or its namespace) must never wait for the operator to be up.
    assert not kube.get_queue(namespace, "se")["metadata"].get("finalizers")
    env = {e.name: e for e in pod.spec.containers[0].env}
    assert env["QUEUE_ID"].value == f"se-{namespace}"
    assert env["CONTROL_PLANE_URL"].value == "http://workerqueue-operator.test:8080"
    assert env["HEARTBEAT_INTERVAL"].value == "20" and env["SINGLE_EXECUTION"].value == "true"
    assert env["KUBIYA_API_KEY"].value is None  # never inlined: a reference to the token Secret
    # Each pod its own token, so that the operator knows which worker asks.
    assert env["KUBIYA_API_KEY"].value_from.secret_key_ref.name == "se-w0-token"
    # Marked as the operator's, so that a replica that has not seen it yet awaits it (api/unseen.py).
    assert kube.secret_value(namespace, "se-w0-token", "token").startswith("wqw1_")

    kube.set_phase(namespace, "se-w0", "Running")
    wait_for(lambda: kube.workers(namespace, "se").get("running") == 1, what="running count")
    assert kube.workers(namespace, "se")["pending"] == 1
    kube.set_phase(namespace, "se-w0", "Succeeded", exit_code=0, reason="Completed")
    wait_pods(kube, namespace, "se", ["se-w1", "se-w2"])
    wait_for(lambda: "se-w0" not in kube.pod_names(namespace, "se", alive=False), what="finished pod deleted")
    assert kube.workers(namespace, "se")["succeeded"] == 1  # written before the pod is deleted
    kube.wait_events(namespace, "se", "WorkerSucceeded")  # posted in the background, maybe after the deletion
    assert "WorkerCreated" in reasons(kube, namespace, "se")
    c = kube.condition(namespace, "se", "Progressing")
    assert c is not None and c["status"] == "True"


def test_pods_started_after_a_secret_rotation_show_it_and_never_a_digest_of_its_value(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    queue_id = f"rot-{namespace}"
    kube.put_secret(namespace, "tok", token="hunter2")
    kube.create_queue(namespace, "rot", queueId=queue_id, singleExecution=True, temporal=TEMPORAL,
                      auth={"tokenSecretRefs": [{"name": "tok", "key": "token"}]})
    wait_pods(kube, namespace, "rot", ["rot-w0"])
    digest = kube.core.read_namespaced_pod("rot-w0", namespace).metadata.annotations["agentcontrol.dev/secrets-digest"]
    # Anyone who may read pods must not be able to test guesses of the token against it.
    versions = hashlib.sha256(f"{namespace}/tok\0token\0hunter2\0".encode()).hexdigest()[:32]
    assert digest.startswith("sha256:") and versions not in digest
    kube.put_secret(namespace, "tok", token="rotated")
    wait_for(lambda: operator.start_worker(queue_id, "rotated").status == 200, what="the rotation served")
    kube.set_phase(namespace, "rot-w0", "Succeeded", exit_code=0, reason="Completed")
    wait_pods(kube, namespace, "rot", ["rot-w1"])
    assert kube.core.read_namespaced_pod("rot-w1", namespace).metadata.annotations[
        "agentcontrol.dev/secrets-digest"] not in ("", digest)


def test_a_secret_named_as_a_worker_token_that_is_not_one_of_the_queue_is_left_and_its_index_skipped(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """A Secret of the user's, or a worker token orphaned by `kubectl delete wq --cascade=orphan`, that
    has a pod's token name: its pod signed in with it, was turned away (401) and counted a failure.
    It is left as it is, its index skipped, and only the tokens the operator made go with their pods."""
    kube.put_secret(namespace, "mine-w0-token", token="the user's")
    labels = {"app.kubernetes.io/component": "worker-credential", "agentcontrol.dev/queue": "mine"}
    orphan = k8s_client.V1Secret(string_data={"token": "an orphan's"}, metadata=k8s_client.V1ObjectMeta(
        name="mine-w1-token", labels=labels, annotations={"agentcontrol.dev/pod": "mine-w1"}))  # no owner: orphaned
    kube.core.create_namespaced_secret(namespace, orphan)
    queue_id = f"mine-{namespace}"
    kube.create_queue(namespace, "mine", queueId=queue_id, singleExecution=True, temporal=TEMPORAL)
    wait_pods(kube, namespace, "mine", ["mine-w2"])
    token = wait_for(lambda: kube.has_secret(namespace, "mine-w2-token")
                     and kube.secret_value(namespace, "mine-w2-token", "token"), what="mine-w2's token")
    wait_for(lambda: operator.start_worker(queue_id, token).status == 200, what="/start with the pod's token")
    assert kube.pod_names(namespace, "mine", alive=False) == ["mine-w2"]
    kube.set_phase(namespace, "mine-w2", "Succeeded", exit_code=0, reason="Completed")
    wait_pods(kube, namespace, "mine", ["mine-w3"])
    wait_for(lambda: not kube.has_secret(namespace, "mine-w2-token"), what="the operator's token deleted with its pod")
    assert kube.secret_value(namespace, "mine-w0-token", "token") == "the user's"
    assert kube.secret_value(namespace, "mine-w1-token", "token") == "an orphan's"
    assert kube.workers(namespace, "mine").get("failed", 0) == 0


def test_a_pod_token_whose_secret_no_longer_is_one_opens_nothing(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """A pod's token Secret that loses what made it one (its label, or its owner: `kubectl delete
    --cascade=orphan`) is no token any more, on this replica as on one started later."""
    queue_id = f"rev-{namespace}"
    kube.create_queue(namespace, "rev", queueId=queue_id, singleExecution=True, temporal=TEMPORAL)
    wait_pods(kube, namespace, "rev", ["rev-w0"])
    token = kube.secret_value(namespace, "rev-w0-token", "token")
    wait_for(lambda: operator.start_worker(queue_id, token).status == 200, what="/start with the pod's token")
    kube.core.patch_namespaced_secret("rev-w0-token", namespace,
                                      {"metadata": {"labels": {"app.kubernetes.io/component": None}}})
    wait_for(lambda: operator.start_worker(queue_id, token).status == 401, what="the pod token refused")


def test_a_pods_worker_is_expected_at_the_heartbeat_interval_its_pod_was_given(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """The queue's interval lowered while a pod made with the older one runs: its worker (its container
    restarted, say) beats at its environment's 60 s, and a registration made for 10 s expired 25 s in."""
    queue_id = f"paced-{namespace}"
    kube.create_queue(namespace, "paced", queueId=queue_id, singleExecution=True, temporal=TEMPORAL,
                      heartbeatIntervalSeconds=60)
    wait_pods(kube, namespace, "paced", ["paced-w0"])
    kube.set_phase(namespace, "paced-w0", "Running")  # running: a spec change leaves it be
    token = kube.secret_value(namespace, "paced-w0-token", "token")
    kube.patch_queue(namespace, "paced", {"heartbeatIntervalSeconds": 10})
    wait_for(lambda: (kube.condition(namespace, "paced") or {}).get("observedGeneration") == 2,
             what="the change seen")
    started = operator.start_worker(queue_id, token)
    assert started.status == 200
    lease = wait_for(lambda: kube.registrations(namespace).get(started.json()["worker_id"]), what="its Lease")
    assert lease.spec.lease_duration_seconds == 150  # 2.5 x its pod's 60 s
    assert kube.pod_names(namespace, "paced") == ["paced-w0"]


def test_a_worker_that_cannot_start_shows_on_its_queue_and_is_not_replaced(kube: Kube, namespace: str):
    kube.create_queue(namespace, "pull", queueId=f"pull-{namespace}", singleExecution=True, replicas=2,
                      temporal=TEMPORAL)
    wait_pods(kube, namespace, "pull", ["pull-w0", "pull-w1"])
    kube.set_phase(namespace, "pull-w1", "Running")
    # What the kubelet reports of an image it cannot pull.
    kube.core.patch_namespaced_pod_status("pull-w0", namespace, {"status": {"phase": "Pending", "containerStatuses": [
        {"name": "worker", "image": "registry.example/worker:nope", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "ErrImagePull",
                               "message": 'pull access denied for "registry.example/worker:nope"'}}}]}})
    progressing = wait_for(lambda: (c := kube.condition(namespace, "pull", "Progressing")) and c["status"] == "False"
                           and c, what="Progressing=False")
    assert progressing["reason"] == "WorkersNotStarting"
    assert progressing["message"] == "1 of 2 workers cannot start: pull-w0: ImagePullBackOff"
    told = wait_for(lambda: [e for e in kube.events(namespace, "pull") if e.reason == "WorkerNotStarting"],
                    what="a WorkerNotStarting Event")
    assert told[0].type == "Warning" and 'denied for "registry.example/worker:nope"' in told[0].message
    assert kube.pod_names(namespace, "pull") == ["pull-w0", "pull-w1"]  # a new pod would wait the same
    assert kube.condition(namespace, "pull")["status"] == "True"  # pull-w1's worker runs
    kube.set_phase(namespace, "pull-w1", "Failed", exit_code=1, reason="Error")  # its replacement not started
    ready = wait_for(lambda: (c := kube.condition(namespace, "pull")) and c["status"] == "False" and c,
                     what="Ready=False with no worker running")
    assert ready["reason"] == "WorkersNotStarting" and "pull-w0: ImagePullBackOff" in ready["message"]

    kube.set_phase(namespace, "pull-w0", "Running")  # the image fixed in the registry: it starts
    wait_for(lambda: (c := kube.condition(namespace, "pull", "Progressing")) and c["status"] == "True",
             what="Progressing=True again")
    assert kube.workers(namespace, "pull").get("stuck") in (None, [])


def test_a_pod_whose_token_secret_was_deleted_before_it_started_is_replaced(kube: Kube, namespace: str):
    """The kubelet waits for a missing Secret for good: the queue was a worker short until someone
    deleted the pod. Its worker never ran, so it is replaced, no failure counted."""
    kube.create_queue(namespace, "tk", queueId=f"tk-{namespace}", singleExecution=True, temporal=TEMPORAL)
    wait_pods(kube, namespace, "tk", ["tk-w0"])
    wait_for(lambda: kube.has_secret(namespace, "tk-w0-token"), what="tk-w0's token")
    kube.core.delete_namespaced_secret("tk-w0-token", namespace)
    kube.core.patch_namespaced_pod_status("tk-w0", namespace, {"status": {"phase": "Pending", "containerStatuses": [
        {"name": "worker", "image": "worker:1", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "CreateContainerConfigError",
                               "message": 'secret "tk-w0-token" not found'}}}]}})
    wait_pods(kube, namespace, "tk", ["tk-w1"])
    assert kube.has_secret(namespace, "tk-w1-token")
    assert kube.workers(namespace, "tk").get("failed", 0) == 0


def running_worker(kube: Kube, namespace: str, name: str, **spec: Any) -> tuple[str, str]:
    """A single-execution queue (`spec` added) whose one pod, `<name>-w0`, runs: (its queue id, the pod's token)."""
    queue_id = f"{name}-{namespace}"
    kube.create_queue(namespace, name, queueId=queue_id, singleExecution=True, temporal=TEMPORAL, **spec)
    wait_pods(kube, namespace, name, [f"{name}-w0"])
    kube.set_phase(namespace, f"{name}-w0", "Running")
    secret = f"{name}-w0-token"
    token = wait_for(lambda: kube.has_secret(namespace, secret) and kube.secret_value(namespace, secret, "token"),
                     what=f"{name}-w0's token")
    # Listed by the supervisor: a pod it never listed may still be coming, and a token of such a pod
    # that has left its queue (unlabelled, say) is kept for ORPHAN_GRACE_SECONDS, longer than tests wait.
    wait_for(lambda: kube.workers(namespace, name).get("running") == 1, what=f"{name}-w0 counted running")
    return queue_id, token


def test_a_pods_second_start_ends_its_first_registration_and_keeps_its_own(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """A pod runs one worker: the worker started again in it (its container restarted) replaces its
    registration, slot and all, in a maxWorkers queue too; the new one lives on (its heartbeats 200)."""
    queue_id, token = running_worker(kube, namespace, "again", maxWorkers=2)

    def heartbeat(worker_id: str) -> int:
        body = {"status": "active", "tasks_processed": 0, "current_task_id": None, "worker_metadata": {}}
        return operator.call("POST", f"/api/v1/workers/{worker_id}/heartbeat", token, body).status

    first = wait_for(lambda: (r := operator.start_worker(queue_id, token)).status == 200 and r.json()["worker_id"],
                     what="the pod's first /start")
    assert heartbeat(first) == 200
    second = operator.start_worker(queue_id, token)
    assert second.status == 200, second.body
    again = second.json()["worker_id"]
    assert heartbeat(again) == 200 and heartbeat(first) == 404
    held = wait_for(lambda: (leases := kube.registrations(namespace)) and first not in leases and leases,
                    what="the first registration's Lease gone")
    assert list(held) == [again]
    workers = operator.call("GET", f"/api/v1/worker-queues/{queue_id}/workers", token).json()
    assert [w["id"] for w in workers] == [again]


def test_a_running_worker_whose_token_secret_was_deleted_is_replaced(operator: OperatorProcess, kube: Kube,
                                                                      namespace: str):
    """Deleting a pod's token revokes it: its worker, turned away (401) at every call, ran on for good
    and the queue counted it running."""
    queue_id, token = running_worker(kube, namespace, "rv")
    assert wait_for(lambda: operator.start_worker(queue_id, token).status == 200, what="/start with its token")
    kube.core.delete_namespaced_secret("rv-w0-token", namespace)
    wait_for(lambda: operator.start_worker(queue_id, token).status == 401, what="its token refused")
    # Within the minute the token's watch may lag behind a pod just made, then replaced.
    wait_pods(kube, namespace, "rv", ["rv-w1"], timeout=90)
    gone = kube.wait_events(namespace, "rv", "WorkerTokenGone")
    assert gone[0].type == "Warning" and "rv-w0" in gone[0].message
    assert not kube.has_secret(namespace, "rv-w0-token")  # revoked: not made again
    assert kube.workers(namespace, "rv").get("failed", 0) == 0


def test_a_worker_that_exits_as_its_token_secret_was_deleted_is_replaced_no_failure_counted(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """Its container had the token already: its /start got 401, and it exited 1 before a minute had
    passed. Counted as a crash, such deletions led to a back-off and CrashLooping."""
    queue_id, token = running_worker(kube, namespace, "ex")
    kube.core.delete_namespaced_secret("ex-w0-token", namespace)
    # As the real worker: it is refused, and exits, only once the operator has seen the deletion.
    wait_for(lambda: operator.start_worker(queue_id, token).status == 401, what="its token refused")
    kube.set_phase(namespace, "ex-w0", "Failed", exit_code=1, reason="Error")
    wait_pods(kube, namespace, "ex", ["ex-w1"])
    gone = kube.wait_events(namespace, "ex", "WorkerTokenGone")
    assert gone[0].type == "Warning" and "ex-w0" in gone[0].message
    workers = kube.workers(namespace, "ex")
    assert workers.get("failed", 0) == 0 and workers.get("consecutiveFailures", 0) == 0, workers


def test_a_running_worker_whose_token_was_emptied_is_replaced_as_if_its_secret_were_deleted(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """An emptied token opens nothing (the Secret is still there, so only the API server's answer, read
    as the store reads it, tells the supervisor): its worker is as cut off as one whose Secret went."""
    queue_id, token = running_worker(kube, namespace, "em")
    assert wait_for(lambda: operator.start_worker(queue_id, token).status == 200, what="/start with its token")
    kube.core.patch_namespaced_secret("em-w0-token", namespace, {"data": {"token": ""}})
    wait_for(lambda: operator.start_worker(queue_id, token).status == 401, what="its emptied token refused")
    wait_pods(kube, namespace, "em", ["em-w1"], timeout=90)
    gone = kube.wait_events(namespace, "em", "WorkerTokenGone")
    assert gone[0].type == "Warning" and "em-w0" in gone[0].message
    assert kube.workers(namespace, "em").get("failed", 0) == 0


def test_a_pod_taken_out_of_its_queue_by_its_labels_keeps_its_token_until_it_is_gone(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """Its queue label removed (as one takes a pod out of a ReplicaSet to look into it), a running pod
    is replaced; its token was deleted as a gone pod's, and its worker turned away mid-run (401)."""
    queue_id, token = running_worker(kube, namespace, "lab")
    kube.core.patch_namespaced_pod("lab-w0", namespace, {"metadata": {"labels": {"agentcontrol.dev/queue": None}}})
    wait_pods(kube, namespace, "lab", ["lab-w1"])
    wait_for(lambda: kube.has_secret(namespace, "lab-w1-token"), what="lab-w1's token")
    time.sleep(3)  # a few passes of the queue: a sweep that takes lab-w0 for gone would have run
    assert kube.has_secret(namespace, "lab-w0-token")
    assert operator.start_worker(queue_id, token).status == 200
    kube.core.delete_namespaced_pod("lab-w0", namespace, grace_period_seconds=0)
    kube.patch_queue(namespace, "lab", {"heartbeatIntervalSeconds": 31})  # a pass, as the pod is not the queue's
    wait_for(lambda: not kube.has_secret(namespace, "lab-w0-token"), what="lab-w0's token deleted once it is gone")


def test_a_pod_gone_whose_name_another_owner_took_does_not_keep_its_token(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """A pod released from its queue keeps its token while it is there, known by its owner, the queue:
    a pod of the same name made since by something else is not it, and does not keep that token."""
    running_worker(kube, namespace, "nm")
    # Listed running first: a pod the supervisor never listed may still be coming, and its token is
    # kept for ORPHAN_GRACE_SECONDS (a minute), longer than this test waits.
    wait_for(lambda: kube.workers(namespace, "nm").get("running") == 1, what="nm-w0 counted running")
    kube.core.patch_namespaced_pod("nm-w0", namespace, {"metadata": {"labels": {"agentcontrol.dev/queue": None}}})
    wait_pods(kube, namespace, "nm", ["nm-w1"])
    kube.core.delete_namespaced_pod("nm-w0", namespace, grace_period_seconds=0)
    wait_for(lambda: "nm-w0" not in [p.metadata.name for p in kube.core.list_namespaced_pod(namespace).items],
             what="nm-w0 gone")
    owner = kube.core.create_namespaced_config_map(namespace, {"metadata": {"name": "someone-else"}})
    kube.core.create_namespaced_pod(namespace, {
        "metadata": {"name": "nm-w0", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "someone-else", "uid": owner.metadata.uid,
            "controller": True}]},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    kube.patch_queue(namespace, "nm", {"heartbeatIntervalSeconds": 31})  # a pass
    wait_for(lambda: not kube.has_secret(namespace, "nm-w0-token"), what="nm-w0's token deleted")


def test_plain_queue_runs_no_pods(kube: Kube, namespace: str):
    kube.create_queue(namespace, "plain", queueId=f"pl-{namespace}", replicas=3, temporal=TEMPORAL)
    kube.wait_condition(namespace, "plain", "True")
    time.sleep(1)  # a negative: give a wrong implementation the time to create something
    assert kube.pods(namespace) == []


def test_failures_back_off_then_crash_loop_until_a_worker_succeeds(kube: Kube, namespace: str):
    kube.create_queue(namespace, "cl", queueId=f"cl-{namespace}", singleExecution=True, temporal=TEMPORAL,
                      worker={"backoffLimit": 2})
    wait_pods(kube, namespace, "cl", ["cl-w0"])
    kube.set_phase(namespace, "cl-w0", "Failed", exit_code=3, reason="Error")
    wait_pods(kube, namespace, "cl", ["cl-w1"])  # after a back-off of 1 s (test settings)
    failed = kube.wait_events(namespace, "cl", "WorkerFailed")
    assert "exit code 3" in failed[0].message and "reason Error" in failed[0].message
    kube.wait_events(namespace, "cl", "BackOff")
    # The failed pod stays for `kubectl logs` while failures go on, without its token.
    assert kube.pod_names(namespace, "cl", alive=False) == ["cl-w0", "cl-w1"]
    wait_for(lambda: not kube.has_secret(namespace, "cl-w0-token"), what="the failed pod's token revoked")

    kube.set_phase(namespace, "cl-w1", "Failed", exit_code=1, reason="Error")
    c = kube.wait_condition(namespace, "cl", "False", "CrashLooping")
    assert "workers failed 2 times in a row" in c["message"] and "one worker at a time is tried" in c["message"]
    assert kube.condition(namespace, "cl", "Progressing")["reason"] == "CrashLooping"
    kube.wait_events(namespace, "cl", "CrashLooping")
    assert kube.pod_names(namespace, "cl") == []
    wait_for(lambda: kube.pod_names(namespace, "cl", alive=False) == ["cl-w1"], what="only the newest failure kept")
    # A pool is never given up on (what failed its workers may pass): one more after the longest
    # back-off (4 s here), and a worker that succeeds ends the crash loop, and the failed pod goes.
    wait_pods(kube, namespace, "cl", ["cl-w2"], timeout=30)
    kube.set_phase(namespace, "cl-w2", "Succeeded", exit_code=0, reason="Completed")
    wait_pods(kube, namespace, "cl", ["cl-w3"])
    kube.wait_condition(namespace, "cl", "True")
    wait_for(lambda: kube.pod_names(namespace, "cl", alive=False) == ["cl-w3"], what="the failed pod deleted")


def test_a_crash_looping_pools_try_that_runs_a_while_brings_the_pool_back(kube: Kube, namespace: str):
    """Its try may wait long for an execution (no success to end the loop): once it has run for the
    longest back-off (4 s here) the pool is whole again, not one worker for all that while."""
    kube.create_queue(namespace, "try", queueId=f"try-{namespace}", singleExecution=True, replicas=2,
                      temporal=TEMPORAL, worker={"backoffLimit": 1})
    wait_pods(kube, namespace, "try", ["try-w0", "try-w1"])
    kube.set_phase(namespace, "try-w0", "Failed", exit_code=1, reason="Error")
    kube.wait_condition(namespace, "try", "False", "CrashLooping")
    kube.set_phase(namespace, "try-w1", "Failed", exit_code=1, reason="Error")  # the same round: one failure
    wait_pods(kube, namespace, "try", ["try-w2"], timeout=30)  # the try, after the longest back-off
    body = kube.core.read_namespaced_pod("try-w2", namespace)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.core.patch_namespaced_pod_status("try-w2", namespace, {"status": {"phase": "Running", "containerStatuses": [
        {"name": c.name, "image": c.image, "imageID": "", "ready": True, "restartCount": 0,
         "state": {"running": {"startedAt": started}}} for c in body.spec.containers]}})
    patched = time.monotonic()
    time.sleep(1)  # of the 4 s (startedAt is in whole seconds: 3 at least)
    names = kube.pod_names(namespace, "try")
    if time.monotonic() - patched < 2.5:  # a machine that stalled longer has no "not yet" to show
        assert names == ["try-w2"]  # not run long enough yet
    wait_pods(kube, namespace, "try", ["try-w2", "try-w3"])
    kube.wait_condition(namespace, "try", "True")
    kube.wait_events(namespace, "try", "BackOffReset")


def test_ephemeral_queue_is_deleted_after_its_workers_finish(kube: Kube, namespace: str):
    kube.create_queue(namespace, "eph", queueId=f"eph-{namespace}", ephemeral=True, replicas=2,
                      ttlSecondsAfterFinished=1, temporal=TEMPORAL)
    wait_pods(kube, namespace, "eph", ["eph-w0", "eph-w1"])
    kube.set_phase(namespace, "eph-w0", "Succeeded", exit_code=0)
    time.sleep(1)
    assert kube.queue_exists(namespace, "eph") and kube.pod_names(namespace, "eph") == ["eph-w1"]  # not replaced
    kube.set_phase(namespace, "eph-w1", "Succeeded", exit_code=0)
    wait_for(lambda: not kube.queue_exists(namespace, "eph"), timeout=20, what="ephemeral queue deleted")
    kube.wait_events(namespace, "eph", "QueueFinished")


def test_ephemeral_single_execution_runs_one_worker_once(kube: Kube, namespace: str):
    kube.create_queue(namespace, "one", queueId=f"one-{namespace}", ephemeral=True, singleExecution=True,
                      replicas=3, temporal=TEMPORAL)
    wait_pods(kube, namespace, "one", ["one-w0"])
    time.sleep(1)
    assert kube.pod_names(namespace, "one") == ["one-w0"]
    kube.set_phase(namespace, "one-w0", "Succeeded", exit_code=0)
    wait_for(lambda: not kube.queue_exists(namespace, "one"), timeout=20, what="queue gone after its one task")


def test_active_deadline_bounds_an_ephemeral_queue(kube: Kube, namespace: str):
    kube.create_queue(namespace, "dl", queueId=f"dl-{namespace}", ephemeral=True, activeDeadlineSeconds=3,
                      temporal=TEMPORAL)
    wait_pods(kube, namespace, "dl", ["dl-w0"])
    kube.set_phase(namespace, "dl-w0", "Running")
    wait_for(lambda: not kube.queue_exists(namespace, "dl"), timeout=20, what="deadline deletion")
    # Events are posted in the background: the deletion may be seen before its Event.
    wait_for(lambda: "DeadlineExceeded" in reasons(kube, namespace, "dl"), timeout=10, what="DeadlineExceeded Event")


def test_a_worker_deleting_its_queue_takes_its_pods_along(kube: Kube, namespace: str):
    kube.create_queue(namespace, "gc", queueId=f"gc-{namespace}", ephemeral=True, replicas=2, temporal=TEMPORAL)
    wait_pods(kube, namespace, "gc", ["gc-w0", "gc-w1"])
    kube.delete_queue(namespace, "gc")  # the garbage collector of kube-controller-manager does the rest
    wait_for(lambda: kube.pods(namespace, "gc") == [], timeout=60, what="pods garbage-collected")


def test_suspend_lets_running_workers_finish_and_starts_none(kube: Kube, namespace: str):
    kube.create_queue(namespace, "sus", queueId=f"sus-{namespace}", singleExecution=True, replicas=2,
                      temporal=TEMPORAL)
    wait_pods(kube, namespace, "sus", ["sus-w0", "sus-w1"])
    kube.set_phase(namespace, "sus-w0", "Running")
    kube.patch_queue(namespace, "sus", {"suspend": True})
    wait_for(lambda: (kube.condition(namespace, "sus", "Progressing") or {}).get("reason") == "Suspended",
             what="Progressing=Suspended")
    # Not started yet, its worker would only be turned away: deleted. The running one is not killed.
    wait_pods(kube, namespace, "sus", ["sus-w0"])
    assert "WorkerDisplaced" not in reasons(kube, namespace, "sus")
    kube.patch_queue(namespace, "sus", {"replicas": 1})
    kube.set_phase(namespace, "sus-w0", "Succeeded", exit_code=0)
    wait_for(lambda: kube.pod_names(namespace, "sus", alive=False) == [], what="finished pod deleted")
    time.sleep(1)
    assert kube.pod_names(namespace, "sus") == []  # and not replaced while suspended
    kube.patch_queue(namespace, "sus", {"suspend": False})
    wait_pods(kube, namespace, "sus", ["sus-w2"])


def test_suspend_stops_a_pool_whose_workers_never_exit(kube: Kube, namespace: str):
    # Not single-execution, its workers never exit: let be, they ran on for good while suspended.
    kube.create_queue(namespace, "spool", queueId=f"spool-{namespace}", ephemeral=True, replicas=2, temporal=TEMPORAL)
    wait_pods(kube, namespace, "spool", ["spool-w0", "spool-w1"])
    kube.set_phase(namespace, "spool-w0", "Running")
    kube.set_phase(namespace, "spool-w1", "Running")
    kube.patch_queue(namespace, "spool", {"suspend": True})
    wait_for(lambda: kube.pod_names(namespace, "spool") == [], what="the pool's workers stopped")
    kube.wait_events(namespace, "spool", "Suspending")
    assert "WorkerDisplaced" not in reasons(kube, namespace, "spool")
    wait_for(lambda: (kube.condition(namespace, "spool", "Progressing") or {}).get("message")
             == "workers stopped; none are started while suspended", what="Progressing says so")
    time.sleep(1)
    assert kube.pod_names(namespace, "spool") == [] and kube.queue_exists(namespace, "spool")
    kube.patch_queue(namespace, "spool", {"suspend": False})
    wait_pods(kube, namespace, "spool", ["spool-w2", "spool-w3"])


def test_a_pool_made_single_execution_gets_single_execution_workers(kube: Kube, namespace: str):
    # Its pool worker, which never exits, counted as the one wanted: none was ever made.
    kube.create_queue(namespace, "mode", queueId=f"mode-{namespace}", ephemeral=True, replicas=1, temporal=TEMPORAL)
    wait_pods(kube, namespace, "mode", ["mode-w0"])
    kube.set_phase(namespace, "mode-w0", "Running")
    kube.patch_queue(namespace, "mode", {"singleExecution": True})
    wait_pods(kube, namespace, "mode", ["mode-w1"])
    env = {e.name: e.value for e in kube.core.read_namespaced_pod("mode-w1", namespace).spec.containers[0].env}
    assert env["SINGLE_EXECUTION"] == "true"


def test_spec_change_applies_to_new_pods_only(kube: Kube, namespace: str):
    kube.create_queue(namespace, "chg", queueId=f"chg-{namespace}", singleExecution=True, heartbeatIntervalSeconds=30,
                      temporal=TEMPORAL)
    wait_pods(kube, namespace, "chg", ["chg-w0"])
    kube.set_phase(namespace, "chg-w0", "Running")
    kube.patch_queue(namespace, "chg", {"heartbeatIntervalSeconds": 120})
    time.sleep(2)
    old = kube.core.read_namespaced_pod("chg-w0", namespace)
    assert old.metadata.deletion_timestamp is None  # a running worker is never killed for a spec change
    assert {e.name: e.value for e in old.spec.containers[0].env}["HEARTBEAT_INTERVAL"] == "30"
    kube.set_phase(namespace, "chg-w0", "Succeeded", exit_code=0)
    wait_pods(kube, namespace, "chg", ["chg-w1"])
    new = kube.core.read_namespaced_pod("chg-w1", namespace)
    assert {e.name: e.value for e in new.spec.containers[0].env}["HEARTBEAT_INTERVAL"] == "120"
    assert new.metadata.annotations["agentcontrol.dev/queue-generation"] == "2"


def test_a_pod_deleted_or_evicted_by_someone_else_is_replaced(kube: Kube, namespace: str):
    kube.create_queue(namespace, "ext", queueId=f"ext-{namespace}", singleExecution=True, temporal=TEMPORAL)
    wait_pods(kube, namespace, "ext", ["ext-w0"])
    kube.core.delete_namespaced_pod("ext-w0", namespace)
    wait_pods(kube, namespace, "ext", ["ext-w1"])
    kube.set_phase(namespace, "ext-w1", "Failed", reason="Evicted")
    wait_pods(kube, namespace, "ext", ["ext-w2"])
    assert kube.workers(namespace, "ext").get("consecutiveFailures", 0) == 0
    kube.wait_events(namespace, "ext", "WorkerDisplaced")


def test_pods_deleted_by_someone_else_again_and_again_are_replaced_after_a_back_off(kube: Kube, namespace: str):
    """A controller that deletes worker pods (a policy engine, a descheduler) met a new one each time,
    at once, and nothing was counted or told: only evictions were. The first is replaced at once,
    the next ones after the back-off (1 s, doubling, here), as README says."""
    kube.create_queue(namespace, "del", queueId=f"del-{namespace}", singleExecution=True, temporal=TEMPORAL)
    wait_pods(kube, namespace, "del", ["del-w0"])
    kube.core.delete_namespaced_pod("del-w0", namespace)
    wait_pods(kube, namespace, "del", ["del-w1"])
    assert kube.workers(namespace, "del").get("consecutiveDisplaced") == 1
    kube.core.delete_namespaced_pod("del-w1", namespace)
    wait_pods(kube, namespace, "del", ["del-w2"])
    assert kube.workers(namespace, "del").get("consecutiveDisplaced") == 2
    wait_for(lambda: len(kube.wait_events(namespace, "del", "WorkerDisplaced")) == 2, what="two WorkerDisplaced")
    messages = [e.message for e in kube.wait_events(namespace, "del", "WorkerDisplaced")]
    assert sorted(messages) == [f"worker del-w{i} was deleted by someone else" for i in (0, 1)]
    kube.wait_events(namespace, "del", "BackOff")
    assert kube.workers(namespace, "del").get("consecutiveFailures", 0) == 0


def test_a_pod_whose_worker_was_turned_away_at_start_is_replaced_not_counted_as_a_crash(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """The worker exits 1 on a refused /start and never retries: here its queue is full (another
    worker holds the one slot). With backoffLimit 1, one such exit taken for a crash would stop the
    queue until its spec changed."""
    queue_id = f"ref-{namespace}"
    kube.create_queue(namespace, "ref", queueId=queue_id, singleExecution=True, maxWorkers=1, temporal=TEMPORAL,
                      worker={"backoffLimit": 1})
    wait_pods(kube, namespace, "ref", ["ref-w0"])
    kube.wait_condition(namespace, "ref", "True")
    assert operator.start_worker(queue_id, kube.queue_token(namespace, "ref")).status == 200  # the slot
    # Its token presented by many at once: one record written (in a Lease, for every replica).
    pod_token = kube.secret_value(namespace, "ref-w0-token", "token")
    writes = operator.metric("workerqueue_registry_writes_total")
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: operator.start_worker(queue_id, pod_token).status, range(10)))
    assert answers == [409] * 10
    assert operator.metric("workerqueue_registry_writes_total") - writes <= 3  # the slot's own Lease may be written
    record = kube.coordination.read_namespaced_lease("ref-w0-refused", namespace)
    assert operator.start_worker(queue_id, pod_token).status == 409
    assert kube.coordination.read_namespaced_lease("ref-w0-refused", namespace).metadata.uid == record.metadata.uid
    kube.set_phase(namespace, "ref-w0", "Failed", exit_code=1, reason="Error")
    wait_pods(kube, namespace, "ref", ["ref-w1"])
    wait_for(lambda: "ref-w0-refused" not in [lease.metadata.name for lease in kube.coordination.list_namespaced_lease(
        namespace).items], what="the record deleted with its pod")
    kube.wait_events(namespace, "ref", "WorkerRefused")
    assert "WorkerFailed" not in reasons(kube, namespace, "ref")
    assert kube.workers(namespace, "ref").get("consecutiveFailures", 0) == 0
    assert kube.condition(namespace, "ref", "Ready")["status"] == "True"
    # Its own failure, after a /start that was not refused, is a crash as ever.
    kube.set_phase(namespace, "ref-w1", "Failed", exit_code=1, reason="Error")
    kube.wait_condition(namespace, "ref", "False", "CrashLooping")


def test_a_pod_whose_worker_ended_while_its_sidecar_runs_on_is_finished(kube: Kube, namespace: str):
    """A service mesh's proxy (or a log shipper) keeps the pod Running after its worker exits: the
    worker container's end is the pod's, so it is counted, deleted (the sidecar with it) and replaced."""
    kube.create_queue(namespace, "mesh", queueId=f"mesh-{namespace}", singleExecution=True, temporal=TEMPORAL,
                      worker={"template": {"spec": {"containers": [
                          {"name": "worker", "image": "registry.example/worker:1"},
                          {"name": "istio-proxy", "image": "registry.example/proxy:1"}]}}})
    wait_pods(kube, namespace, "mesh", ["mesh-w0"])

    def worker_exits(pod: str, exit_code: int) -> None:
        kube.core.patch_namespaced_pod_status(pod, namespace, {"status": {"phase": "Running", "containerStatuses": [
            {"name": "worker", "image": "registry.example/worker:1", "imageID": "", "ready": False,
             "restartCount": 0, "state": {"terminated": {"exitCode": exit_code,
                                                         "reason": "Completed" if exit_code == 0 else "Error"}}},
            {"name": "istio-proxy", "image": "registry.example/proxy:1", "imageID": "", "ready": True,
             "restartCount": 0, "state": {"running": {}}}]}})

    worker_exits("mesh-w0", 0)
    wait_pods(kube, namespace, "mesh", ["mesh-w1"])
    assert kube.workers(namespace, "mesh").get("succeeded") == 1
    kube.wait_events(namespace, "mesh", "WorkerSucceeded")
    worker_exits("mesh-w1", 1)
    wait_pods(kube, namespace, "mesh", ["mesh-w2"])
    assert kube.workers(namespace, "mesh").get("consecutiveFailures") == 1
    kube.wait_events(namespace, "mesh", "WorkerFailed")


def test_queue_that_cannot_serve_gets_no_workers_until_it_can(kube: Kube, namespace: str):
    kube.create_queue(namespace, "nr", queueId=f"nr-{namespace}", singleExecution=True,
                      temporal={**TEMPORAL, "apiKeySecretRef": {"name": "later", "key": "k"}})
    kube.wait_condition(namespace, "nr", "False", "SecretNotFound")
    time.sleep(1)
    assert kube.pods(namespace, "nr") == []
    kube.put_secret(namespace, "later", k="v")
    wait_pods(kube, namespace, "nr", ["nr-w0"])


def test_queue_whose_upstream_key_is_missing_gets_no_workers_until_it_is_there(kube: Kube, namespace: str):
    # /start answers such a queue 503: each worker started would exit 1, and the queue go CrashLooping.
    kube.create_queue(namespace, "nu", queueId=f"nu-{namespace}", singleExecution=True, temporal=TEMPORAL,
                      upstream={"url": "https://cp.example.com", "apiKeySecretRef": {"name": "org", "key": "api-key"}})
    kube.wait_condition(namespace, "nu", "False", "SecretNotFound")
    progressing = kube.wait_condition(namespace, "nu", "False", "SecretNotFound", type_="Progressing")
    assert "secret org not found" in progressing["message"]
    time.sleep(1)
    assert kube.pods(namespace, "nu") == []
    kube.put_secret(namespace, "org", **{"api-key": "k"})
    wait_pods(kube, namespace, "nu", ["nu-w0"])
    kube.wait_condition(namespace, "nu", "True")


def test_invalid_pod_template_is_reported(kube: Kube, namespace: str):
    kube.create_queue(namespace, "bad", queueId=f"bad-{namespace}", singleExecution=True, temporal=TEMPORAL,
                      worker={"template": {"spec": {"containers": [{"name": "no-image"}]}}})
    wait_for(lambda: (kube.condition(namespace, "bad", "Progressing") or {}).get("reason") == "PodCreationFailed",
             what="Progressing=PodCreationFailed")
    kube.wait_events(namespace, "bad", "PodCreationFailed")
    assert kube.pods(namespace, "bad") == []
    # Not ready either, as in a crash loop (`kubectl wait --for=condition=Ready` must not pass), and
    # said once, by the supervisor's Events only.
    ready = kube.wait_condition(namespace, "bad", "False", "PodCreationFailed")
    assert ready["message"].startswith("worker pods cannot be created: pod bad-w")
    assert all(e.message.startswith("pod bad-w") for e in kube.events(namespace, "bad")
               if e.reason == "PodCreationFailed")


def test_a_misspelt_field_of_a_pod_template_is_reported_not_dropped(kube: Kube, namespace: str):
    # The API server drops a field it does not know with a warning nobody read: pods were made without
    # their limits or node selector, in silence.
    kube.create_queue(namespace, "typo", queueId=f"typo-{namespace}", singleExecution=True, temporal=TEMPORAL,
                      worker={"template": {"spec": {"nodeselector": {"pool": "agents"}, "containers": [
                          {"name": "worker", "resource": {"limits": {"memory": "1Gi"}}}]}}})
    ready = kube.wait_condition(namespace, "typo", "False", "PodCreationFailed")
    assert 'unknown field "spec.nodeselector"' in ready["message"]
    assert 'unknown field "spec.containers[0].resource"' in ready["message"]
    assert kube.pods(namespace, "typo") == []
    kube.patch_queue(namespace, "typo", {"worker": {"template": {"spec": {
        "nodeselector": None, "nodeSelector": {"pool": "agents"},
        "containers": [{"name": "worker", "resources": {"limits": {"memory": "1Gi"}}}]}}}})
    wait_pods(kube, namespace, "typo", ["typo-w1"])
    pod = kube.pods(namespace, "typo")[0]
    assert pod.spec.node_selector == {"pool": "agents"}


def test_a_refused_worker_token_secret_is_reported_by_status_and_reason_only(kube: Kube, namespace: str):
    # Each pod's token Secret is made before the pod. Refused (here a quota; an admission webhook's
    # text may quote the Secret, its token with it), the queue and its Event say so, and no pod is made.
    kube.create_queue(namespace, "nq", queueId=f"nq-{namespace}", singleExecution=True, replicas=0, temporal=TEMPORAL)
    kube.wait_condition(namespace, "nq", "True")
    kube.forbid_new_secrets(namespace)
    kube.patch_queue(namespace, "nq", {"replicas": 1})
    progressing = wait_for(lambda: (c := kube.condition(namespace, "nq", "Progressing")) and
                           c["reason"] == "PodCreationFailed" and c, what="Progressing=PodCreationFailed")
    events = [e.message for e in kube.wait_events(namespace, "nq", "PodCreationFailed")]
    for message in [progressing["message"], kube.workers(namespace, "nq")["lastError"], *events]:
        assert re.search(r"pod (nq-w\d+) was not created: creating its token Secret \1-token failed "
                         r"\(403 Forbidden\)", message), message
        assert "exceeded quota" not in message, message
    assert events and kube.pods(namespace, "nq") == []
    kube.allow_new_secrets(namespace)
    wait_for(lambda: len(kube.pod_names(namespace, "nq")) == 1, timeout=60, what="the pod, after its back-off")


def test_pods_refused_alike_are_tried_one_first_not_all_at_once(kube: Kube, namespace: str):
    # A full quota refuses each of eight pods alike: each try made eight token Secret calls, eight pod
    # calls and eight Warnings. One is tried first, then two, four, ... while they are made.
    kube.create_queue(namespace, "many", queueId=f"many-{namespace}", singleExecution=True, replicas=0,
                      temporal=TEMPORAL)
    kube.wait_condition(namespace, "many", "True")
    kube.forbid_new_secrets(namespace)
    kube.patch_queue(namespace, "many", {"replicas": 8})
    wait_for(lambda: (kube.condition(namespace, "many", "Progressing") or {}).get("reason") == "PodCreationFailed",
             what="Progressing=PodCreationFailed")
    time.sleep(1)
    # Each try names the eight pods it wants (w0-w7, w8-w15, ...) and tries the first only.
    told = [e.message for e in kube.wait_events(namespace, "many", "PodCreationFailed")]
    tried = [int(m.group(1)) for message in told if (m := re.match(r"pod many-w(\d+) ", message))]
    assert tried and len(tried) == len(told) and all(index % 8 == 0 for index in tried), told
    kube.allow_new_secrets(namespace)
    wait_for(lambda: len(kube.pod_names(namespace, "many")) == 8, timeout=60, what="the 8 pods, after the back-off")


def most_tries(seconds: float, backoff: float = 1, most: float = 4) -> int:
    """The tries a back-off of `backoff` s doubling to `most` s allows within `seconds` of the first."""
    at, tries = 0.0, 0
    while at <= seconds:
        tries += 1
        at += backoff
        backoff = min(2 * backoff, most)
    return tries


def test_pods_the_api_server_fails_to_create_are_tried_again_after_a_back_off(kube: Kube, namespace: str):
    # A 500 (a webhook it cannot reach; as a 429 or a timeout would be): each try burns a pod name
    # and a token Secret, and its status write starts the next pass. Tried at once, that was ~100
    # tries a second for as long as the webhook was down.
    with kube.unreachable_pod_webhook(namespace):
        created = time.monotonic()
        kube.create_queue(namespace, "wh", queueId=f"wh-{namespace}", singleExecution=True, temporal=TEMPORAL)
        progressing = wait_for(lambda: (c := kube.condition(namespace, "wh", "Progressing")) and
                               c["reason"] == "PodCreationFailed" and c, what="Progressing=PodCreationFailed")
        assert re.match(r"pod wh-w\d+ was not created: 500 InternalError: .*failed calling webhook",
                        progressing["message"]), progressing
        kube.wait_condition(namespace, "wh", "False", "PodCreationFailed")
        wait_for(lambda: kube.workers(namespace, "wh")["nextIndex"] >= 2, what="a try after the back-off")
        time.sleep(5)
        # Back-off here 1 s doubling to 4 s: tries at 0, 1, 3, 7, 11... s at the earliest, counted
        # from the queue's creation (at most that many in the time taken, however slow the machine).
        tries = kube.workers(namespace, "wh")["nextIndex"]
        assert tries <= most_tries(time.monotonic() - created), (tries, time.monotonic() - created)
        assert sum(1 for e in kube.events(namespace, "wh") if e.reason == "PodCreationFailed") <= tries
    wait_for(lambda: len(kube.pod_names(namespace, "wh")) == 1, timeout=30, what="the pod, after its back-off")
    kube.wait_condition(namespace, "wh", "True")

def test_a_pod_the_api_server_fails_to_delete_keeps_no_new_worker_from_starting(kube: Kube, namespace: str):
    # A finished pod whose DELETE fails (a webhook on deletes that is down): the pass stopped there,
    # before the new worker's create, and its own status write started the next pass at once: a
    # single-execution pool drained for as long as the webhook was down, and a new pod name a pass.
    kube.create_queue(namespace, "dw", queueId=f"dw-{namespace}", singleExecution=True, temporal=TEMPORAL)
    wait_pods(kube, namespace, "dw", ["dw-w0"])
    with kube.unreachable_pod_webhook(namespace, "DELETE"):
        kube.set_phase(namespace, "dw-w0", "Succeeded", exit_code=0, reason="Completed")
        wait_pods(kube, namespace, "dw", ["dw-w1"])
        wait_for(lambda: "PodDeletionFailed" in reasons(kube, namespace, "dw"), what="Event PodDeletionFailed")
        for event in [e for e in kube.events(namespace, "dw") if e.reason == "PodDeletionFailed"]:
            assert event.type == "Warning" and re.match(
                r"deleting worker pod dw-w0 or its token failed: 500 InternalError: .*failed calling webhook",
                event.message), event
        time.sleep(3)
        assert kube.workers(namespace, "dw")["nextIndex"] == 2  # no pod name burnt a pass
        assert "dw-w0" in kube.pod_names(namespace, "dw", alive=False)
    wait_for(lambda: "dw-w0" not in kube.pod_names(namespace, "dw", alive=False), timeout=90,
             what="the finished pod deleted, after its back-off")
    assert kube.pod_names(namespace, "dw") == ["dw-w1"]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_a_refused_deletion_of_a_pods_token_says_nothing_of_the_token(
        kube: Kube, namespace: str, kubectl: Any, operator: OperatorProcess):
    # An admission policy on Secret deletes is given the Secret (oldObject) and may quote its data in
    # its refusal: the operator's Event and log quoted the refusal, the pod's token with it.
    kube.create_queue(namespace, "ds", queueId=f"ds-{namespace}", singleExecution=True, temporal=TEMPORAL)
    wait_pods(kube, namespace, "ds", ["ds-w0"])
    token = kube.secret_value(namespace, "ds-w0-token", "token")
    quoting = "'refused, its token being ' + string(oldObject.data.token)"
    with deletions_refused(kubectl, namespace, group="", resource="secrets", message_expression=quoting):
        kube.put_secret(namespace, "probe", token="probe-value")

        def quoted() -> bool:  # the policy in force, and quoting what it is given
            try:
                kube.core.delete_namespaced_secret("probe", namespace)
            except k8s_client.ApiException as exc:
                return f"refused, its token being {b64('probe-value')}" in str(exc.body)
            kube.put_secret(namespace, "probe", token="probe-value")
            return False

        wait_for(quoted, what="the policy in force")
        kube.set_phase(namespace, "ds-w0", "Succeeded", exit_code=0, reason="Completed")
        wait_for(lambda: "PodDeletionFailed" in reasons(kube, namespace, "ds"), what="Event PodDeletionFailed")
        time.sleep(5)  # passes retrying the deletion meanwhile
        failed = [e.message for e in kube.events(namespace, "ds") if e.reason == "PodDeletionFailed"]
        assert failed and all(m.endswith("token failed: 403 Forbidden: deleting the token Secret ds-w0-token failed "
                                         "(403 Forbidden); tried again") for m in failed), failed
        # Its token left, the pod gone was taken for one another replica was making: a worker too
        # many, and the queue's new one was deleted in its place.
        assert kube.pod_names(namespace, "ds") == ["ds-w1"] and kube.workers(namespace, "ds")["pending"] == 1
        for quoted_token in (token, b64(token)):  # the policy quotes the Secret's data as stored
            assert not any(quoted_token in (e.message or "") for e in kube.events(namespace)), failed
            assert quoted_token not in operator.logs()
    wait_for(lambda: not kube.has_secret(namespace, "ds-w0-token"), timeout=90, what="the token deleted, at last")


def documented_restricted_template() -> dict[str, Any]:
    """The `worker.podTemplate` of docs/helm.md's restricted Pod Security example, as written there."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "helm.md").read_text()
    section = text.split("### Worker pods under the restricted Pod Security Standard", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    template: dict[str, Any] = yaml.safe_load(example)["worker"]["podTemplate"]
    return template


def test_the_documented_operator_wide_template_passes_the_restricted_pod_security_standard(
    kube: Kube, namespace: str, operator: OperatorProcess, kubeconfig: Path, tmp_path: Path,
):
    kube.core.patch_namespace(namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
    kube.create_queue(namespace, "se", queueId=f"se-{namespace}", singleExecution=True, temporal=TEMPORAL)
    refused = wait_for(lambda: (c := kube.condition(namespace, "se", "Progressing")) and
                       c["reason"] == "PodCreationFailed" and c, what="the default pod refused")
    assert 'violates PodSecurity "restricted:latest"' in refused["message"]
    # The queue has no template of its own: the platform team's to fix, and the message says so.
    assert refused["message"].endswith("(made from the operator's pod template: WQ_WORKER_POD_TEMPLATE, "
                                       "Helm's worker.*)"), refused["message"]
    # Tried again after a back-off (1 s doubling to 4 s here), each try burning a pod name: not at once
    # (a status write per try would start the next: ~2 tries a second, a pod name and an Event each).
    time.sleep(5)
    assert kube.workers(namespace, "se")["nextIndex"] <= 4, kube.workers(namespace, "se")

    operator.stop()
    hardened = OperatorProcess(kubeconfig, tmp_path / "hardened.log", env={
        "WQ_WORKER_POD_TEMPLATE": json.dumps(documented_restricted_template())})
    try:
        hardened.start()
        (name,) = wait_for(lambda: kube.pod_names(namespace, "se"), what="the worker pod admitted")
        pod = kube.core.read_namespaced_pod(name, namespace)
        assert pod.spec.security_context.run_as_non_root is True
        assert pod.spec.automount_service_account_token is False
        (container,) = pod.spec.containers
        assert container.security_context.capabilities.drop == ["ALL"]
        assert container.resources.requests == {"cpu": "250m", "memory": "512Mi"}
        assert container.command == ["kubiya", "worker", "start", "--queue-id=$(QUEUE_ID)"]
        assert "KUBIYA_API_KEY" in {e.name for e in container.env}
        kube.wait_condition(namespace, "se", "True", type_="Progressing")
    finally:
        hardened.stop()
        operator.start()


def test_a_queue_made_again_before_the_garbage_collector_ran_gives_its_pods_tokens_of_their_own(
    kube: Kube, namespace: str, control_plane: ControlPlane, operator: OperatorProcess,
):
    """`kubectl replace --force`: the old queue's pods and token Secrets wait for the garbage collector
    (held off here by freezing kube-controller-manager), and the new queue names its first pod as the
    old one. Reusing the old pod's token Secret would lose it to the collector under the new worker."""
    spec = {"queueId": f"again-{namespace}", "singleExecution": True, "temporal": TEMPORAL}
    kube.create_queue(namespace, "again", **spec)
    wait_pods(kube, namespace, "again", ["again-w0"])
    old_token = kube.secret_value(namespace, "again-w0-token", "token")
    with frozen(control_plane.pid("kube-controller-manager")):
        kube.delete_queue(namespace, "again")
        kube.core.delete_namespaced_pod("again-w0", namespace, grace_period_seconds=0)  # collected first
        wait_for(lambda: not kube.pod_names(namespace, "again", alive=False), what="the old pod gone")
        uid = kube.create_queue(namespace, "again", **spec)["metadata"]["uid"]
        wait_pods(kube, namespace, "again", ["again-w0"])
        secret = wait_for(lambda: (s := kube.core.read_namespaced_secret("again-w0-token", namespace))
                          .metadata.owner_references[0].uid == uid and s, what="a token Secret of the new queue")
        new_token = kube.secret_value(namespace, "again-w0-token", "token")
        assert new_token != old_token
        # The new pod's worker gets through /start with its token; the old pod's token opens nothing.
        wait_for(lambda: operator.start_worker(spec["queueId"], new_token).status == 200,
                 what="/start with the new pod's token")
        assert operator.start_worker(spec["queueId"], old_token).status == 401
    time.sleep(2)  # the collector at work again: it must find nothing of the new queue's to delete
    assert kube.core.read_namespaced_secret("again-w0-token", namespace).metadata.uid == secret.metadata.uid


def test_kill_9_while_creating_pods_for_50_queues(
    kube: Kube, namespace: str, operator: OperatorProcess, kubeconfig: Path, tmp_path: Path,
):
    operator.stop()  # this test runs its own operator, the one it kills
    victim = OperatorProcess(kubeconfig, tmp_path / "victim.log")
    survivor = OperatorProcess(kubeconfig, tmp_path / "survivor.log")
    try:
        victim.start()

        def create(i: int) -> Any:
            return kube.create_queue(namespace, f"k{i}", queueId=f"k{i}-{namespace}", singleExecution=True,
                                     replicas=2, temporal=TEMPORAL)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(50)))
        wait_for(lambda: len(kube.pods(namespace)) >= 10, timeout=60, what="the first pods")
        assert victim.process is not None
        os.killpg(victim.process.pid, signal.SIGKILL)  # in the middle of creating
        victim.process.wait()
        created_before = len(kube.pods(namespace))
        survivor.start()
        wait_for(lambda: len(kube.pods(namespace)) == 100, timeout=120,
                 what=f"100 pods (had {created_before} at the kill)")
        time.sleep(3)  # let a duplicating implementation show itself
        pods = kube.pods(namespace)
        per_queue = Counter(p.metadata.labels["agentcontrol.dev/queue"] for p in pods)
        assert len(pods) == 100 and set(per_queue.values()) == {2}, per_queue
        queues = {q["metadata"]["uid"] for q in kube.custom.list_namespaced_custom_object(
            "agentcontrol.dev", "v1alpha1", namespace, "workerqueues")["items"]}
        assert all(p.metadata.owner_references[0].uid in queues for p in pods)  # no orphans
    finally:
        victim.stop(signal.SIGKILL)
        survivor.stop()
        operator.start()
