"""The worker supervisor's guards on the real API server, the supervisor in-process (inprocess.py) so
that the order of events is the test's: what it must leave alone as much as what it does. Each of
these was found to have no test at any level by taking its guard out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.integration.conftest import Kube
from tests.integration.inprocess import InProcess, eventually, running
from workerqueue_operator.core import workers
from workerqueue_operator.core.queues import QueueObject
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources

GROUP, VERSION, PLURAL = "agentcontrol.dev", "v1alpha1", "workerqueues"


def queue_of(here: InProcess) -> QueueObject:
    queue = here.store.queue(here.key)
    assert queue is not None
    return queue


async def test_a_replica_started_anew_looks_after_a_queue_that_had_pods_though_it_runs_none_now(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """singleExecution turned off while its pod waits to start, the operator restarted before it acted:
    only the queue's status tells the new replica that the queue had pods (it wrote none itself). Left
    untracked, the pod not started would wait for good (stuck pulling its image, say)."""
    here = in_process("was")
    await here.first_pod_on(shift=[0.0])
    kube.patch_queue(namespace, "was", {"singleExecution": False})
    restarted = in_process("was")
    restarted.store.upsert_queue(QueueObject.from_body(kube.get_queue(namespace, "was")))  # its first list
    restarted.store.fill_secret(restarted.secret, {"token": "t"})
    await restarted.tokens_watched()
    supervisor = restarted.supervisor_with()
    async with running(supervisor.run):
        supervisor.queue_changed(queue_of(restarted))
        await eventually(lambda: kube.pod_names(namespace, "was", alive=False) == [], what="the pod deleted")


async def test_a_queue_gets_its_workers_as_soon_as_it_can_serve_not_at_its_next_status_write(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Its token Secret comes: its status writer may be minutes behind (10,000 queues, a back-off), and
    the resync half a minute; the Store's news alone starts its workers."""
    here = in_process("able")
    here.spec.update(singleExecution=True)
    here.store.upsert_queue(QueueObject.from_body(kube.create_queue(namespace, "able", **here.spec)))
    here.store.fill_secret(here.secret, None)  # not there yet, as the Secret list told
    supervisor = here.supervisor_with(worker_resync_seconds=3600)
    async with running(supervisor.run):
        supervisor.queue_changed(queue_of(here))
        await asyncio.sleep(1)
        assert kube.pod_names(namespace, "able", alive=False) == []  # it cannot serve /start: no workers yet
        here.store.upsert_secret(here.secret, {"token": "t"})  # as the Secret watch tells
        await eventually(lambda: kube.pod_names(namespace, "able") == ["able-w0"], what="its first worker")


async def test_a_queue_being_deleted_gets_no_pass(in_process: Callable[[str], InProcess], kube: Kube,
                                                 namespace: str):
    """Deleted, and held by another's finalizer: its pods go with it (the garbage collector's work),
    and none is made, nor its status written, while it waits."""
    here = in_process("going")
    here.spec.update(singleExecution=True)
    await here.create_ready()
    with kube.held(namespace, "going"):
        kube.delete_queue(namespace, "going")
        here.watched()
        assert queue_of(here).deleting
        await here.supervisor.reconcile(here.key)
        assert kube.pod_names(namespace, "going", alive=False) == []
        assert "workers" not in (kube.get_queue(namespace, "going").get("status") or {})


async def test_a_pod_another_replica_may_be_creating_is_not_deleted_as_surplus(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The replica that stood down a moment ago wrote the next index and made w1's token, its pod's
    create under way: planned as a pod coming, it is the first surplus of a queue of one for the
    replica taking over. Its token deleted now, the pod made next would never start."""
    here = in_process("coming")
    await here.first_pod_on(shift=[0.0])
    kube.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "coming",
                                                      {"status": {"workers": {"nextIndex": 2}}})
    token = workers.credential_secret_body(queue_of(here), "coming-w1", workers.new_worker_token(), now=time.time())
    await here.client.create(resources.secrets_path(namespace), token)
    here.watched()
    await here.tokens_watched()
    await here.supervisor_with().reconcile(here.key)
    assert kube.has_secret(namespace, "coming-w1-token")
    assert kube.pod_names(namespace, "coming") == ["coming-w0"]


async def test_a_worker_whose_pod_could_not_be_deleted_keeps_its_registration(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Its token Secret deleted, its pod is replaced; the delete fails (a webhook on deletes that is
    down): its worker may run on, and holds its slot until its pod is gone."""
    here = in_process("kept")
    here.spec.update(singleExecution=True)
    registry, supervisor, queue = await here.first_pod_with_registry()
    assert await registry.claim(queue, "w-old", limit=1, pod="kept-w0") is not None
    kube.core.delete_namespaced_secret("kept-w0-token", namespace)
    await here.tokens_watched()
    kube.core.patch_namespaced_pod_status("kept-w0", namespace, {"status": {"phase": "Pending", "containerStatuses": [
        {"name": "worker", "image": "worker:1", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "CreateContainerConfigError",
                               "message": 'secret "kept-w0-token" not found'}}}]}})
    here.watched()
    with kube.unreachable_pod_webhook(namespace, "DELETE"):
        with pytest.raises(client_.ApiError) as failed:
            await supervisor._reconcile(here.key)
        assert failed.value.status == 500
        assert "kept-w0" in kube.pod_names(namespace, "kept")
        assert [worker.worker_id for worker in registry.live(here.key)] == ["w-old"]


async def test_a_pod_with_the_queues_label_that_the_queue_does_not_control_is_neither_counted_nor_deleted(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """A pod labelled as the queue's by hand (or a namesake's, left for the garbage collector): taken
    for one of its workers, the queue would run none of its own."""
    here = in_process("own")
    here.spec.update(singleExecution=True)
    await here.create_ready()
    here.watched()
    labels = {workers.QUEUE_LABEL: workers.queues_label(queue_of(here))}
    kube.core.create_namespaced_pod(namespace, k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="stray", labels=labels),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="c", image="i")])))
    await here.supervisor.reconcile(here.key)
    assert kube.pod_names(namespace, "own") == ["own-w0", "stray"]
    here.watched()
    await here.supervisor.reconcile(here.key)
    assert kube.pod_names(namespace, "own") == ["own-w0", "stray"]
    assert kube.workers(namespace, "own")["pending"] == 1


async def test_a_status_write_that_fails_otherwise_than_by_a_conflict_fails_the_pass(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Only a conflict means "planned again from the newer copy". Any other failure fails the pass,
    which the work queue tries again after its back-off (and counts): taken for a conflict, it was
    retried only once the watch brought a newer copy, which may never come."""
    here = in_process("unwritten")
    here.spec.update(singleExecution=True)
    await here.create_ready()
    here.watched()
    with kube.unreachable_status_webhook(namespace, "unwritten"):
        with pytest.raises(client_.ApiError) as failed:
            await here.supervisor.reconcile(here.key)
        assert failed.value.status == 500
    assert kube.pod_names(namespace, "unwritten", alive=False) == []  # none made before its index is written


async def test_a_finished_pod_deleted_by_someone_else_meanwhile_still_has_its_token_revoked(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """Listed, then deleted by someone else before the pass deletes it: the 404 is the pass's own
    goal reached, not a failure, and its token goes all the same."""
    here = in_process("raced")
    await here.first_pod_finished()
    here.watched()
    listed = here.supervisor._list_pods

    async def then_deleted(queue: QueueObject) -> list[dict[str, Any]]:
        pods = await listed(queue)
        kube.core.delete_namespaced_pod("raced-w0", namespace)
        return pods

    monkeypatch.setattr(here.supervisor, "_list_pods", then_deleted)
    await here.supervisor.reconcile(here.key)
    assert not kube.has_secret(namespace, "raced-w0-token")
    assert kube.pod_names(namespace, "raced", alive=False) == ["raced-w1"]


async def test_a_users_secret_that_took_a_finished_pods_token_name_is_left_when_the_pod_goes(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The operator's token of the pod deleted, and a Secret of the user's made under its name: the
    pod's deletion deletes only a token the operator made for this queue."""
    here = in_process("theirs")
    await here.first_pod_finished()
    kube.core.delete_namespaced_secret("theirs-w0-token", namespace)
    kube.put_secret(namespace, "theirs-w0-token", token="the user's")
    here.watched()
    await here.tokens_watched()
    await here.supervisor.reconcile(here.key)
    assert kube.pod_names(namespace, "theirs", alive=False) == ["theirs-w1"]
    assert kube.secret_value(namespace, "theirs-w0-token", "token") == "the user's"
