"""The status writer's guards on the real API server, the writer in-process (inprocess.py) so that the
order of events is the test's: what it leaves alone (a standby, a status that would not change, a
token Secret before the Secret list) as much as what it writes. Each of these was found to have no
test at any level by taking its guard out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.integration.conftest import GROUP, PLURAL, VERSION, Kube, frozen, wait_for
from tests.integration.inprocess import InProcess, eventually, running
from tests.proxy import Proxy
from workerqueue_operator.core import queues
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.queues import QueueObject
from workerqueue_operator.devcluster.controlplane import ControlPlane
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources

PEERING = ("", "workerqueue-operator")
"""A ClusterKopfPeering, as the replica's Activity knows it."""
INVALID = "spec.replicas: Input should be a valid integer"


def reason(kube: Kube, namespace: str, name: str, type_: str = "Ready") -> str | None:
    return (kube.condition(namespace, name, type_) or {}).get("reason")


def reasons(kube: Kube, namespace: str, name: str) -> list[tuple[str, int]]:
    """The Events of an object: (reason, count), sorted."""
    return sorted((e.reason, e.count or 1) for e in kube.events(namespace, name))


def without_own_token(here: InProcess) -> str:
    """The harness's queue names no token Secret: the operator generates it. Its name."""
    del here.spec["auth"]
    return queues.token_secret_name(here.name)


def listed_absent(here: InProcess, name: str) -> QueueObject:
    """The queue made and seen, and the Secret list saying `name` is not there: the queue."""
    queue = QueueObject.from_body(here.kube.create_queue(here.namespace, here.name, **here.spec))
    here.store.upsert_queue(queue)
    here.store.fill_secret((here.namespace, name), None)
    return queue


@contextlib.contextmanager
def status_writes_refused(kube: Kube, namespace: str, probe: str) -> Iterator[None]:
    """A ValidatingAdmissionPolicy refusing every status write of the namespace's queues (422), as a
    policy engine's rule would, until the block ends; `probe` is written to see it in force."""
    name = f"frozen-status-{namespace}"
    kube.admission.create_validating_admission_policy(k8s.V1ValidatingAdmissionPolicy(
        metadata=k8s.V1ObjectMeta(name=name),
        spec=k8s.V1ValidatingAdmissionPolicySpec(
            failure_policy="Fail",
            match_constraints=k8s.V1MatchResources(
                namespace_selector=k8s.V1LabelSelector(match_labels={"kubernetes.io/metadata.name": namespace}),
                resource_rules=[k8s.V1NamedRuleWithOperations(
                    api_groups=[GROUP], api_versions=[VERSION], operations=["UPDATE"],
                    resources=[f"{PLURAL}/status"])]),
            validations=[k8s.V1Validation(expression="false", message="status writes are frozen")])))
    kube.admission.create_validating_admission_policy_binding(k8s.V1ValidatingAdmissionPolicyBinding(
        metadata=k8s.V1ObjectMeta(name=name),
        spec=k8s.V1ValidatingAdmissionPolicyBindingSpec(policy_name=name, validation_actions=["Deny"])))

    def refused() -> bool:
        try:
            kube.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, probe,
                                                              {"status": {"workers": {"live": 0}}})
        except k8s.ApiException as exc:
            return exc.status == 422
        return False

    try:
        wait_for(refused, what="the policy in force")
        yield
    finally:
        kube.admission.delete_validating_admission_policy_binding(name)
        kube.admission.delete_validating_admission_policy(name)


def failed_writes(caplog: pytest.LogCaptureFixture, namespace: str, name: str) -> int:
    return sum(r.getMessage().startswith(f"writing the status of {namespace}/{name} failed") for r in caplog.records)


async def test_a_standby_writes_nothing_and_once_active_writes_what_it_saw_meanwhile(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Only the active replica writes: a standby's status writes and token Secrets would race the
    other's. Once active it goes over every queue it saw standing by, an invalid spec it was told of
    too (no Store holds such a queue, so no resync would ever show it)."""
    here = in_process("quiet")
    token = without_own_token(here)
    activity = Activity(identity="test", priority=0, peerings=[PEERING])  # the peering not seen yet
    writer = here.writer_with(activity=activity)
    listed_absent(here, token)
    invalid = kube.create_queue(namespace, "invalid", **{**here.spec, "queueId": "invalid-one"})
    async with running(writer.run):
        writer.spec_invalid(invalid, INVALID)
        await asyncio.sleep(1)  # the writer's passes, and the SpecInvalid write, run in the background
        assert not kube.has_secret(namespace, token)
        assert "status" not in kube.get_queue(namespace, "quiet")
        assert "status" not in kube.get_queue(namespace, "invalid")
        activity.observed(PEERING, {"status": {}})  # seen: no other replica in it
        assert activity.is_active()
        await eventually(lambda: reason(kube, namespace, "invalid") == "SpecInvalid", what="SpecInvalid")
        await eventually(lambda: reason(kube, namespace, "quiet") == "Ready", what="the queue Ready")
    assert kube.has_secret(namespace, token)


async def test_an_invalid_spec_already_shown_is_neither_written_nor_announced_again(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Every relist tells the writer of the same invalid spec again: a Warning each time would page
    someone for nothing new."""
    here = in_process("bad")
    events = EventPoster(here.client)
    writer = here.writer_with(events=events)
    body = kube.create_queue(namespace, "bad", **here.spec)
    async with running(events.run):
        writer.spec_invalid(body, INVALID)
        await eventually(lambda: reason(kube, namespace, "bad") == "SpecInvalid", what="SpecInvalid")
        await eventually(lambda: reasons(kube, namespace, "bad") != [], what="its Event")
        writer.spec_invalid(kube.get_queue(namespace, "bad"), INVALID)  # a relist's
        await asyncio.sleep(1)
        assert await events.flush(10) == 0
    assert reasons(kube, namespace, "bad") == [("SpecInvalid", 1)]


async def test_an_invalid_spec_whose_status_write_is_refused_is_tried_again_seldom_and_shown_once_let_in(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, caplog: pytest.LogCaptureFixture,
):
    """A refusal (a policy, RBAC) lasts until someone mends it: tried again every 2 s, each queue the
    operator cannot write is a warning and a refused write every few seconds. Never tried again, the
    queue showed the Ready=True of an earlier run for good once mended (no Store holds such a queue,
    so no resync writes it)."""
    here = in_process("refused")
    kube.create_queue(namespace, "refused", **here.spec)
    with status_writes_refused(kube, namespace, "refused"):
        here.writer.spec_invalid(kube.get_queue(namespace, "refused"), INVALID)  # as the watch brings it
        await asyncio.sleep(3.5)  # a write that failed otherwise would have been tried again after 2 s
        assert failed_writes(caplog, namespace, "refused") == 1
        assert reason(kube, namespace, "refused") is None
    await eventually(lambda: reason(kube, namespace, "refused") == "SpecInvalid", timeout=15, what="SpecInvalid")


async def test_an_invalid_spec_whose_status_write_did_not_get_through_is_written_again(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, caplog: pytest.LogCaptureFixture,
    proxied_kubeconfig: tuple[Path, Proxy],
):
    """The connection cut (an API server restarting, a proxy): no Store holds such a queue, so no
    resync would write it; it would go on showing the Ready=True of an earlier run."""
    path, proxy = proxied_kubeconfig
    here = in_process("cut")
    client = client_.KubeClient(client_.load_configuration(str(path)))
    writer = here.writer_with(client=client)
    body = kube.create_queue(namespace, "cut", **here.spec)
    try:
        proxy.cut()
        writer.spec_invalid(body, INVALID)
        await eventually(lambda: failed_writes(caplog, namespace, "cut") == 1, what="the write failed")
        proxy.heal()
        await eventually(lambda: reason(kube, namespace, "cut") == "SpecInvalid", what="SpecInvalid")
    finally:
        await client.close()


async def test_a_status_that_would_not_change_is_not_written(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Every resync and every Secret's news pass over queues whose status is as it should be: a PATCH
    each would be thousands of writes (and admission webhook calls) for nothing."""
    here = in_process("still")
    await here.create_ready()
    with kube.unreachable_status_webhook(namespace, "still"):
        here.watched()
        await here.writer.reconcile(here.key)  # a write would fail with the webhook's 500


async def test_a_status_write_goes_over_the_version_the_last_one_made_while_the_watch_is_behind(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The watch has not brought the writer's last write yet (seconds behind, under load): the next
    write goes over that write's version, not the older one the watch shows, which the API server
    would refuse as a conflict and the queue wait for the watch."""
    here = in_process("ahead")
    await here.create_ready()  # written; the Store still holds the queue as it was made
    here.store.upsert_secret(here.secret, None)  # its token Secret deleted
    await here.writer.reconcile(here.key)
    assert reason(kube, namespace, "ahead") == "SecretNotFound"


async def test_once_the_watch_shows_the_last_write_the_next_goes_over_what_the_watch_shows(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Its own write seen, the writer forgets it: the supervisor wrote after it (TemporalReachable),
    and a write over the writer's own older version would be refused as a conflict."""
    here = in_process("caught")
    await here.create_ready()
    reachable = {"type": "TemporalReachable", "status": "True", "reason": "Reachable", "message": "m",
                 "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
    await here.client.patch(f"{resources.queue_path(namespace, 'caught')}/status",
                            [{"op": "add", "path": "/status/conditions/-", "value": reachable}],
                            content_type=client_.JSON_PATCH)  # as the supervisor writes it
    here.watched()
    here.store.upsert_secret(here.secret, None)  # its token Secret deleted
    await here.writer.reconcile(here.key)
    assert reason(kube, namespace, "caught") == "SecretNotFound"
    assert kube.condition(namespace, "caught", "TemporalReachable") == reachable


async def test_no_token_secret_is_made_before_the_secret_list_tells_whether_there_is_one(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """At start-up the Secrets are listed while the queues are: a create for each queue seen first
    would be 10,000 creates (and reads) of Secrets that are there, and one made at the wrong moment."""
    here = in_process("early")
    token = without_own_token(here)
    here.store.upsert_queue(QueueObject.from_body(kube.create_queue(namespace, "early", **here.spec)))
    await here.writer.reconcile(here.key)
    assert not kube.has_secret(namespace, token) and reason(kube, namespace, "early") is None
    here.store.fill_secret((namespace, token), None)  # the list says there is none
    await here.writer.reconcile(here.key)
    assert kube.has_secret(namespace, token) and reason(kube, namespace, "early") == "Ready"


async def test_a_generated_token_secret_deleted_is_made_again_with_a_warning_though_no_status_said_it_was_there(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The status saying the queue's Secrets were all there is not in the watch yet (or its write
    failed): the writer saw the Secret itself, so its making again is a deletion undone, which turns
    away every worker holding the old token, not a routine creation."""
    here = in_process("again")
    token = without_own_token(here)
    events = EventPoster(here.client)
    writer = here.writer_with(events=events)
    listed_absent(here, token)
    async with running(events.run):
        await writer.reconcile(here.key)  # made
        await writer.reconcile(here.key)  # seen there (the pass its making calls for)
        kube.core.delete_namespaced_secret(token, namespace)
        here.store.upsert_secret((namespace, token), None)  # the watch tells it gone
        await writer.reconcile(here.key)
        assert kube.has_secret(namespace, token)
        assert await events.flush(10) == 0
    assert reasons(kube, namespace, "again") == [("TokenSecretCreated", 1), ("TokenSecretRecreated", 1)]


async def test_in_a_namespace_being_deleted_a_token_secret_refused_is_no_news(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, control_plane: ControlPlane,
    caplog: pytest.LogCaptureFixture,
):
    """`kubectl delete namespace`: the queue goes with it, and its token Secret cannot be made. That is
    no refusal to show on the queue and try again with a back-off, nor a failure to log."""
    here = in_process("doomed")
    token = without_own_token(here)
    listed_absent(here, token)
    # The namespace controller waits: the queue stays as it is, in a namespace that refuses new objects.
    with kube.held(namespace, "doomed"), frozen(control_plane.pid("kube-controller-manager")):
        here.watched()
        kube.core.delete_namespace(namespace)

        def refused() -> bool:
            try:
                kube.put_secret(namespace, "probe", key="v")
            except k8s.ApiException as exc:
                return exc.status == 403
            return False

        wait_for(refused, what="the namespace refusing new objects")
        caplog.set_level(logging.INFO)
        await here.writer.reconcile(here.key)
        assert not kube.has_secret(namespace, token) and reason(kube, namespace, "doomed") is None
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_at_a_resync_secrets_no_watch_covers_are_read_again_and_those_it_covers_are_not(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """A Secret outside the watched namespaces, or of a type the watch leaves out (a Helm release's),
    changes with no word from any watch: read again at each resync, its rotation is served. One the
    watch covers is not read (10,000 reads at each resync for nothing)."""
    here = in_process("resync")
    kube.core.create_namespaced_secret(namespace, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="typed"), type="example.com/big", string_data={"token": "one"}))
    typed = (namespace, "typed")
    here.spec["auth"]["tokenSecretRefs"].append({"name": "typed", "key": "token"})
    reads: list[str] = []
    get = here.client.get

    async def counted(path: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(path.rsplit("/", 1)[-1])
        return await get(path, *args, **kwargs)

    monkeypatch.setattr(here.client, "get", counted)
    writer = here.writer_with(ignored_secret_types=("example.com/big",), resync_seconds=0.2)
    unknown = here.store.upsert_queue(QueueObject.from_body(kube.create_queue(namespace, "resync", **here.spec)))
    assert unknown == {here.secret, typed}
    here.store.fill_secret(here.secret, {"token": "t"})  # the watch's
    writer.fetch_secrets({typed})  # read once used: the watch leaves it out
    async with running(writer.run):
        await eventually(lambda: (here.store.secret_state(typed)[1] or {}).get("token") == "one", what="read")
        kube.put_secret(namespace, "typed", token="two")
        await eventually(lambda: (here.store.secret_state(typed)[1] or {}).get("token") == "two",
                         what="read again")
    assert here.secret[1] not in reads  # cluster-wide, the watch covers it
    reads.clear()
    elsewhere = here.writer_with(watched_namespaces=("elsewhere",), resync_seconds=0.2)
    async with running(elsewhere.run):
        await eventually(lambda: reads.count(here.secret[1]) >= 2, what="read at each resync")


@pytest.mark.parametrize("workers, said", [
    ({"crashLoopGeneration": 1, "consecutiveFailures": 6}, "CrashLooping"),
    ({"lastError": "pods is forbidden: exceeded quota", "observedGeneration": 1}, "PodCreationFailed"),
])
async def test_what_the_supervisor_announced_is_not_announced_again_by_the_writer(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, workers: dict[str, Any], said: str,
):
    """The supervisor's Warning tells of a crash loop or refused pods with the details; the Ready=False
    the writer writes for it would be a second Warning of the same thing."""
    here = in_process("said")
    here.spec.update(singleExecution=True)
    events = EventPoster(here.client)
    writer = here.writer_with(events=events)
    await here.create_ready()
    kube.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "said",
                                                      {"status": {"workers": workers}})
    here.watched()
    async with running(events.run):
        await writer.reconcile(here.key)
        assert reason(kube, namespace, "said") == said
        assert await events.flush(10) == 0
    assert reasons(kube, namespace, "said") == []


async def test_a_missing_secret_behind_another_problem_is_announced_once(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Ready says the queue id is another queue's, SecretsResolved that a Secret is missing: the latter
    gets a Warning of its own (Ready's does not tell of it), once, not again at every status write."""
    here = in_process("first")
    await here.create_ready()
    events = EventPoster(here.client)
    writer = here.writer_with(events=events)
    second = (namespace, "second")
    spec = {**here.spec, "auth": {"tokenSecretRefs": [{"name": "missing", "key": "token"}]}}
    here.store.upsert_queue(QueueObject.from_body(kube.create_queue(namespace, "second", **spec)))
    here.store.fill_secret((namespace, "missing"), None)
    async with running(events.run):
        await writer.reconcile(second)
        assert reason(kube, namespace, "second") == "QueueIdConflict"
        assert reason(kube, namespace, "second", "SecretsResolved") == "SecretNotFound"
        await eventually(lambda: len(reasons(kube, namespace, "second")) == 2, what="its Events")
        kube.patch_queue(namespace, "second", {"displayName": "renamed"})  # a write for its generation
        here.store.upsert_queue(QueueObject.from_body(kube.get_queue(namespace, "second")))
        await writer.reconcile(second)
        assert (kube.condition(namespace, "second") or {}).get("observedGeneration") == 2
        assert await events.flush(10) == 0
    assert reasons(kube, namespace, "second") == [("QueueIdConflict", 1), ("SecretNotFound", 1)]
