"""`POST /api/v1/worker-queues/{queue_id}/start` against the real API server and the operator process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes import client as k8s

from tests.integration.conftest import CRD_FILE, Kube, OperatorProcess, frozen, http, wait_for
from tests.integration.inprocess import InProcess
from workerqueue_operator.core import probes, queues, refusals, workers
from workerqueue_operator.core import supervisor as supervisor_
from workerqueue_operator.core import temporal as temporal_
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.feed import Feed
from workerqueue_operator.core.reconciler import queue_ref_body, token_secret_body
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import WorkerCredential
from workerqueue_operator.core.supervisor import Supervisor
from workerqueue_operator.devcluster.controlplane import ControlPlane
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import spec as spec_
from workerqueue_operator.models.settings import Settings

pytestmark = pytest.mark.usefixtures("operator")

SECRET_VALUES = {
    "temporal-api-key": "tk-" + uuid.uuid4().hex,
    "litellm-api-key": "lk-" + uuid.uuid4().hex,
    "redis-url": f"redis://:rp-{uuid.uuid4().hex}@redis.internal:6379/0",
    "org-key": "ok-" + uuid.uuid4().hex,
}
NATS = {"url": "nats://nats.internal:4222", "subject_prefix": "agents"}


def schema_of(contract: dict[str, Any], name: str) -> dict[str, Any]:
    """A contract schema with its #/components refs resolvable by a standalone validator."""
    return {**contract["components"]["schemas"][name], "components": contract["components"]}


def full_queue(kube: Kube, namespace: str, name: str = "full") -> str:
    kube.put_secret(namespace, "creds", **SECRET_VALUES)
    kube.put_secret(namespace, "nats", **NATS)
    queue_id = f"q-{uuid.uuid4().hex[:8]}"
    kube.create_queue(
        namespace, name, queueId=queue_id, heartbeatIntervalSeconds=45, ephemeral=True, singleExecution=True,
        environmentName="prod", organizationId="org-7", taskQueueName="tq-7",
        temporal={"host": "temporal.internal:7233", "namespace": "agents",
                  "apiKeySecretRef": {"name": "creds", "key": "temporal-api-key"}},
        litellm={"url": "http://litellm.internal", "apiKeySecretRef": {"name": "creds", "key": "litellm-api-key"}},
        redis={"urlSecretRef": {"name": "creds", "key": "redis-url"}},
        websocket={"enabled": True, "features": ["events", "control"]},  # to the upstream, through the operator
        nats={"configSecretRef": {"name": "nats"}},
        upstream={"url": "https://upstream.internal", "apiKeySecretRef": {"name": "creds", "key": "org-key"}},
    )
    kube.wait_condition(namespace, name, "True")
    return queue_id


def test_every_response_field(operator: OperatorProcess, kube: Kube, namespace: str, contract: dict[str, Any]):
    queue_id = full_queue(kube, namespace)
    token = kube.queue_token(namespace, "full")
    r = operator.start_worker(queue_id, token, {"worker_sdk_version": "0.9.1", "system_info": {"hostname": "w1"},
                                                "control_plane_url": "https://cp.example.com/"})
    assert r.status == 200, r.body
    body = r.json()
    jsonschema.validate(body, schema_of(contract, "WorkerStartResponse"))
    worker_id = body.pop("worker_id")
    assert uuid.UUID(worker_id).version == 4
    assert body.pop("control_plane_sdk_version")
    assert body == {
        "task_queue_name": "tq-7",
        "temporal_namespace": "agents",
        "temporal_host": "temporal.internal:7233",
        "temporal_api_key": SECRET_VALUES["temporal-api-key"],
        "organization_id": "org-7",
        "control_plane_url": "https://cp.example.com",
        "heartbeat_interval": 45,
        "litellm_api_url": "http://litellm.internal",
        "litellm_api_key": SECRET_VALUES["litellm-api-key"],
        "queue_name": "full",
        "environment_name": "prod",
        "queue_id": queue_id,
        "queue_ephemeral": True,
        "queue_single_execution": True,
        "redis_url": SECRET_VALUES["redis-url"],
        "redis_password": SECRET_VALUES["redis-url"].split(":")[2].split("@")[0],
        "redis_enabled": True,
        "websocket_enabled": True,
        "websocket_url": f"wss://cp.example.com/api/v1/ws/workers/{worker_id}",
        "websocket_features": ["events", "control"],
        "nats_config": NATS,
    }
    # The required fields of the contract are all there, even for a queue with nothing optional.
    assert set(contract["components"]["schemas"]["WorkerStartResponse"]["required"]) <= set(r.json())


def test_defaults_of_a_minimal_queue(operator: OperatorProcess, kube: Kube, namespace: str, contract: dict[str, Any]):
    created = kube.create_queue(namespace, "mini", temporal={"host": "t:7233", "namespace": "n"})
    kube.wait_condition(namespace, "mini", "True")
    uid = created["metadata"]["uid"]
    assert kube.get_queue(namespace, "mini")["status"]["queueId"] == uid
    r = operator.start_worker(uid, kube.queue_token(namespace, "mini"))  # no body at all: {}
    assert r.status == 200, r.body
    body = r.json()
    jsonschema.validate(body, schema_of(contract, "WorkerStartResponse"))
    assert (body["queue_id"], body["task_queue_name"], body["environment_name"]) == (uid, uid, namespace)
    assert body["organization_id"] == "org-test"  # the operator's configured default
    assert body["control_plane_url"] == operator.url  # derived from the request
    assert (body["temporal_api_key"], body["litellm_api_key"], body["litellm_api_url"]) == ("", "", "")
    assert (body["redis_enabled"], body["redis_url"], body["redis_password"]) == (False, None, None)
    assert (body["websocket_enabled"], body["websocket_url"], body["nats_config"]) == (False, None, None)
    assert body["heartbeat_interval"] == 60


def test_generated_token_secret_is_owned_by_the_queue(kube: Kube, namespace: str):
    created = kube.create_queue(namespace, "owned", temporal={"host": "t:7233", "namespace": "n"})
    kube.queue_token(namespace, "owned")
    secret = kube.core.read_namespaced_secret("owned-worker-token", namespace)
    (owner,) = secret.metadata.owner_references
    assert (owner.kind, owner.uid, owner.controller) == ("WorkerQueue", created["metadata"]["uid"], True)
    assert len(kube.secret_value(namespace, "owned-worker-token", "token")) >= 43  # 256 bits, base64url


def test_error_answers(operator: OperatorProcess, kube: Kube, namespace: str, contract: dict[str, Any]):
    kube.create_queue(namespace, "a", queueId=f"a-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.create_queue(namespace, "b", queueId=f"b-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.create_queue(namespace, "paused", queueId=f"p-{namespace}", suspend=True,
                      temporal={"host": "t:1", "namespace": "n"})
    kube.create_queue(namespace, "broken", queueId=f"x-{namespace}",
                      temporal={"host": "t:1", "namespace": "n",
                                "apiKeySecretRef": {"name": "temporal-creds", "key": "api-key"}})
    for name in ("a", "b"):
        kube.wait_condition(namespace, name, "True")
    token_a, token_b = kube.queue_token(namespace, "a"), kube.queue_token(namespace, "b")

    r = operator.start_worker(f"a-{namespace}", None)
    assert (r.status, r.json(), r.headers.get("WWW-Authenticate")) == (401, {"detail": "Not authenticated"}, "Bearer")
    r = operator.start_worker(f"a-{namespace}", "not-a-token-anyone-issued")
    assert r.status == 401 and r.headers.get("WWW-Authenticate") == "Bearer"
    assert operator.start_worker(f"a-{namespace}", token_b).status == 403
    assert operator.start_worker("no-such-queue", token_a).json() == {"detail": "Worker queue not found"}

    kube.wait_condition(namespace, "paused", "False", "Suspended")
    # What its user asked for: a Normal Event, not a Warning for alerting to page on.
    suspended = wait_for(lambda: [e.type for e in kube.events(namespace, "paused") if e.reason == "Suspended"],
                         what="the Suspended Event")
    assert suspended == ["Normal"]
    r = operator.start_worker(f"p-{namespace}", kube.queue_token(namespace, "paused"))
    assert (r.status, r.json()) == (400, {"detail": "Worker queue is not active (status: suspended)"})

    kube.wait_condition(namespace, "broken", "False", "SecretNotFound")
    r = operator.start_worker(f"x-{namespace}", kube.queue_token(namespace, "broken"))
    assert r.status == 503 and "temporal-creds" in r.json()["detail"]
    kube.put_secret(namespace, "temporal-creds", other="x")
    kube.wait_condition(namespace, "broken", "False", "SecretKeyNotFound")
    r = operator.start_worker(f"x-{namespace}", kube.queue_token(namespace, "broken"))
    assert (r.status, r.json()["detail"]) == (
        503, "Worker queue is not ready: secret temporal-creds has no key api-key")

    url = f"{operator.url}/api/v1/worker-queues/a-{namespace}/start"
    for payload, kind in ((b"{not json", "json_invalid"), (b'{"system_info": {"pid": "many"}}', "int_parsing"),
                          (b"[1]", "model_attributes_type")):  # validated from attributes, as FastAPI does
        r = http("POST", url, body=payload, token=token_a)
        assert r.status == 422, payload
        jsonschema.validate(r.json(), schema_of(contract, "HTTPValidationError"))
        assert r.json()["detail"][0]["type"] == kind and r.json()["detail"][0]["loc"][0] == "body"
    r = http("POST", url, body=json.dumps({"worker_sdk_version": "x" * (1024 * 1024 + 10)}).encode(), token=token_a)
    assert r.status == 413 and "detail" in r.json()


def test_queue_created_before_its_secret(operator: OperatorProcess, kube: Kube, namespace: str):
    kube.create_queue(namespace, "early", queueId=f"e-{namespace}",
                      temporal={"host": "t:1", "namespace": "n",
                                "apiKeySecretRef": {"name": "late", "key": "api-key"}})
    ready = kube.wait_condition(namespace, "early", "False", "SecretNotFound")
    assert ready["message"] == f"secret late not found in namespace {namespace}"
    assert ready["observedGeneration"] == 1
    wait_for(lambda: any(e.reason == "SecretNotFound" and e.type == "Warning" for e in kube.events(namespace, "early")),
             what="SecretNotFound Event")
    kube.put_secret(namespace, "late", **{"api-key": "late-value"})
    kube.wait_condition(namespace, "early", "True", timeout=15)
    r = operator.start_worker(f"e-{namespace}", kube.queue_token(namespace, "early"))
    assert r.status == 200 and r.json()["temporal_api_key"] == "late-value"


def test_rotation_is_served_within_seconds(operator: OperatorProcess, kube: Kube, namespace: str):
    kube.put_secret(namespace, "rot", **{"api-key": "before"})
    kube.create_queue(namespace, "rot", queueId=f"r-{namespace}",
                      temporal={"host": "t:1", "namespace": "n", "apiKeySecretRef": {"name": "rot", "key": "api-key"}})
    kube.wait_condition(namespace, "rot", "True")
    token = kube.queue_token(namespace, "rot")
    assert operator.start_worker(f"r-{namespace}", token).json()["temporal_api_key"] == "before"
    kube.put_secret(namespace, "rot", **{"api-key": "after"})
    wait_for(lambda: operator.start_worker(f"r-{namespace}", token).json()["temporal_api_key"] == "after",
             timeout=10, what="rotated key served")
    # Rotating the queue token itself: the old token stops working, the new one works.
    kube.put_secret(namespace, "rot-worker-token", token="fresh-token-value-for-rotation-test")
    wait_for(lambda: operator.start_worker(f"r-{namespace}", "fresh-token-value-for-rotation-test").status == 200,
             timeout=10, what="rotated queue token accepted")
    assert operator.start_worker(f"r-{namespace}", token).status == 401


def test_own_token_secrets_allow_rotation_without_downtime(operator: OperatorProcess, kube: Kube, namespace: str):
    kube.put_secret(namespace, "tokens", current="token-one", next="token-two")
    kube.create_queue(namespace, "own", queueId=f"o-{namespace}", temporal={"host": "t:1", "namespace": "n"},
                      auth={"tokenSecretRefs": [{"name": "tokens", "key": "current"},
                                                {"name": "tokens", "key": "next"}]})
    kube.wait_condition(namespace, "own", "True")
    assert operator.start_worker(f"o-{namespace}", "token-one").status == 200
    assert operator.start_worker(f"o-{namespace}", "token-two").status == 200
    with pytest.raises(k8s.ApiException) as info:
        kube.core.read_namespaced_secret("own-worker-token", namespace)
    assert info.value.status == 404  # nothing generated when the queue brings its own tokens


def service_account_token(kube: Kube, namespace: str, name: str) -> str:
    kube.core.create_namespaced_service_account(namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name)))
    request = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
    return str(kube.core.create_namespaced_service_account_token(name, namespace, request).status.token)


def test_kubernetes_identities_are_authorized_by_rbac(operator: OperatorProcess, kube: Kube, namespace: str):
    kube.create_queue(namespace, "rbac", queueId=f"k-{namespace}", temporal={"host": "t:1", "namespace": "n"},
                      websocket={"url": "wss://ws.example.com/workers"})
    kube.wait_condition(namespace, "rbac", "True")
    kube.grant(namespace, "start-workers", resource="workerqueues/start", verb="create", queue="rbac",
               account="allowed")
    allowed = service_account_token(kube, namespace, "allowed")
    denied = service_account_token(kube, namespace, "denied")

    r = operator.start_worker(f"k-{namespace}", allowed)
    assert r.status == 200, r.body
    # The worker sends its token to the websocket URL, which the queue's author chose: a Kubernetes
    # identity's token (it may open other queues, and the API server) is not sent there.
    assert (r.json()["websocket_enabled"], r.json()["websocket_url"]) == (False, None)
    r = operator.start_worker(f"k-{namespace}", kube.queue_token(namespace, "rbac"))
    assert (r.json()["websocket_enabled"], r.json()["websocket_url"]) == (True, "wss://ws.example.com/workers")
    r = operator.start_worker(f"k-{namespace}", denied)
    assert r.status == 403
    assert f"system:serviceaccount:{namespace}:denied" in r.json()["detail"]
    # The grant names one queue: another of the namespace is not opened by it (nor by its cached answer).
    # (Named apart: test_rbac.py runs these scenarios one after another in one namespace.)
    kube.create_queue(namespace, "rbac-other", queueId=f"o-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "rbac-other", "True")
    assert operator.start_worker(f"o-{namespace}", allowed).status == 403
    assert operator.start_worker(f"k-{namespace}", allowed).status == 200
    # A RoleBinding taken away stops working once the review's cached answer expires (1 s here).
    kube.rbac.delete_namespaced_role_binding("start-workers", namespace)
    wait_for(lambda: operator.start_worker(f"k-{namespace}", allowed).status == 403, timeout=15,
             what="403 once the RoleBinding is gone")


def test_a_kubernetes_token_must_carry_an_audience_the_operator_is_given(
    kubeconfig: Path, crd_installed: None, kube: Kube, namespace: str, tmp_path: Path, operator: OperatorProcess,
):
    """WQ_TOKEN_REVIEW_AUDIENCES: a token minted for the API server (or anyone else) does not open a
    queue; one minted for the operator's audience does."""
    kube.create_queue(namespace, "aud", queueId=f"aud-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.grant(namespace, "aud-start", resource="workerqueues/start", verb="create", queue="aud", account="runner")
    plain = service_account_token(kube, namespace, "runner")
    request = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=["workerqueue"],
                                                                           expiration_seconds=3600))
    own = str(kube.core.create_namespaced_service_account_token("runner", namespace, request).status.token)
    audience = OperatorProcess(kubeconfig, tmp_path / "audience.log",
                               env={"WQ_NAMESPACES": namespace, "WQ_TOKEN_REVIEW_AUDIENCES": '["workerqueue"]'})
    with operator.paused():
        try:
            audience.start()
            kube.wait_condition(namespace, "aud", "True")
            assert audience.start_worker(f"aud-{namespace}", own).status == 200
            assert audience.start_worker(f"aud-{namespace}", plain).status == 401
        finally:
            audience.stop()


def test_queue_id_conflict_keeps_the_first(operator: OperatorProcess, kube: Kube, namespace: str):
    qid = f"dup-{namespace}"
    kube.create_queue(namespace, "first", queueId=qid, temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "first", "True")
    kube.create_queue(namespace, "second", queueId=qid, temporal={"host": "t:1", "namespace": "n"})
    c = kube.wait_condition(namespace, "second", "False", "QueueIdConflict")
    assert f"{namespace}/first" in c["message"]
    assert kube.condition(namespace, "first")["status"] == "True"
    r = operator.start_worker(qid, kube.queue_token(namespace, "first"))
    assert r.status == 200 and r.json()["queue_name"] == "first"
    # A Secret it then lacks is told too, though Ready keeps saying QueueIdConflict first.
    kube.patch_queue(namespace, "second", {"litellm": {"url": "https://llm", "apiKeySecretRef": {
        "name": "absent", "key": "k"}}})
    wait_for(lambda: (c := kube.condition(namespace, "second", "SecretsResolved")) and c["status"] == "False",
             what="SecretsResolved=False")
    assert kube.condition(namespace, "second")["reason"] == "QueueIdConflict"
    event = wait_for(lambda: [e for e in kube.events(namespace, "second") if e.reason == "SecretNotFound"],
                     what="a SecretNotFound Event")[0]
    assert event.type == "Warning" and "absent" in event.message


def test_a_queue_name_longer_than_a_label_value_gets_its_token_secret(operator: OperatorProcess, kube: Kube,
                                                                      namespace: str):
    name = "long-" + "q" * 75  # a valid object name, too long for a label value (63)
    kube.create_queue(namespace, name, queueId=f"long-{namespace}", temporal={"host": "t:7233", "namespace": "n"})
    token = kube.queue_token(namespace, name)
    kube.wait_condition(namespace, name, "True")
    assert operator.start_worker(f"long-{namespace}", token).status == 200


def test_a_queue_name_past_the_limit_is_refused_and_the_longest_allowed_one_works(
    operator: OperatorProcess, kube: Kube, namespace: str,
):
    """Kubernetes allows 253 characters, the objects named after a queue need some of them."""
    with pytest.raises(k8s.ApiException) as refused:
        kube.create_queue(namespace, "q" * 231, temporal={"host": "t:7233", "namespace": "n"})
    assert refused.value.status == 422 and "metadata.name must be at most 230 characters" in refused.value.body
    name = "q" * 230
    kube.create_queue(namespace, name, queueId=f"longest-{namespace}", singleExecution=True,
                      temporal={"host": "t:7233", "namespace": "n"})
    token = kube.queue_token(namespace, name)
    assert wait_for(lambda: kube.pod_names(namespace), what="its first pod") == [f"{name}-w0"]
    kube.core.read_namespaced_secret(f"{name}-w0-token", namespace)  # the pod's own token
    assert operator.start_worker(f"longest-{namespace}", token).status == 200


@pytest.mark.parametrize("listed_elsewhere", [False, True], ids=["alone", "listed-by-another-queue"])
def test_a_queue_made_again_before_the_garbage_collector_ran_gets_a_token_of_its_own(
    operator: OperatorProcess, kube: Kube, namespace: str, control_plane: ControlPlane, listed_elsewhere: bool,
):
    """`kubectl replace --force` of a queue with a generated token: the old queue's token Secret waits
    for the garbage collector (held off here by freezing kube-controller-manager). Served for the new
    queue, the old token would go on opening it, and vanish under its workers once collected. Listed
    by another queue too, its data stayed known through the deletion and was served to the new queue,
    whose own token Secret was then never made."""
    spec = {"queueId": f"again-{namespace}", "temporal": {"host": "t:7233", "namespace": "n"}}
    kube.create_queue(namespace, "again", **spec)
    old_token = kube.queue_token(namespace, "again")
    if listed_elsewhere:
        kube.create_queue(namespace, "other", queueId=f"other-{namespace}", temporal=spec["temporal"],
                          auth={"tokenSecretRefs": [{"name": "again-worker-token", "key": "token"}]})
        kube.wait_condition(namespace, "other", "True")
    wait_for(lambda: operator.start_worker(spec["queueId"], old_token).status == 200, what="/start, old token")
    with frozen(control_plane.pid("kube-controller-manager")):
        kube.delete_queue(namespace, "again")
        wait_for(lambda: "again" not in {q["metadata"]["name"] for q in kube.custom.list_namespaced_custom_object(
            "agentcontrol.dev", "v1alpha1", namespace, "workerqueues")["items"]}, what="the old queue gone")
        uid = kube.create_queue(namespace, "again", **spec)["metadata"]["uid"]
        # Gone for a moment between the old one's delete and the new one's create: a 404 is no failure.
        secret = wait_for(lambda: (s := kube.secret_or_none(namespace, "again-worker-token")) is not None
                          and s.metadata.owner_references[0].uid == uid and s, what="a token Secret of the new queue")
        new_token = kube.secret_value(namespace, "again-worker-token", "token")
        assert new_token != old_token
        kube.wait_condition(namespace, "again", "True")
        wait_for(lambda: operator.start_worker(spec["queueId"], new_token).status == 200, what="/start, new token")
        assert operator.start_worker(spec["queueId"], old_token).status == 401
    time.sleep(2)  # the collector at work again: it must find nothing of the new queue's to delete
    assert kube.core.read_namespaced_secret("again-worker-token", namespace).metadata.uid == secret.metadata.uid
    assert operator.start_worker(spec["queueId"], new_token).status == 200


async def test_a_queue_made_again_before_the_status_writer_saw_it_go_gets_a_status_of_its_own(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Deleted and made again under the same name and spec (`kubectl replace --force`), both events
    in before the status writer's next pass (a backlog, a relist): what it wrote to the old queue is
    not the new one's status."""
    here = in_process("twice")
    await here.create_ready()
    kube.delete_queue(namespace, "twice")
    here.store.remove_queue(here.key)
    wait_for(lambda: not kube.custom.list_namespaced_custom_object(
        "agentcontrol.dev", "v1alpha1", namespace, "workerqueues")["items"], what="the old queue gone")
    await here.create_ready()  # its token Secret read again, as for any new user of it


async def test_a_queues_pods_are_listed_in_pages_and_all_of_them_planned(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """Listed whole, a queue of 1,000 pods (~3 MB) was parsed in one go on the event loop at each of
    its passes; in pages, each of them counts all the same."""
    from workerqueue_operator.core import supervisor as supervisor_

    monkeypatch.setattr(supervisor_, "PODS_PAGE_SIZE", 2)
    here = in_process("paged")
    here.spec.update(singleExecution=True, replicas=5)
    await here.create_ready()
    here.watched()
    await here.supervisor.reconcile(here.key)
    assert len(kube.pod_names(namespace, "paged")) == 5
    pages: list[dict[str, str]] = []
    get = here.client.get

    async def counted(path: str, params: dict[str, str] | None = None, **kwargs: Any) -> Any:
        pages.append(dict(params or {}))
        return await get(path, params, **kwargs)

    monkeypatch.setattr(here.client, "get", counted)
    listed = await here.supervisor._list_pods(here.store.queue(here.key))  # type: ignore[arg-type]
    assert len(pages) == 3 and all(page["limit"] == "2" for page in pages)
    assert sorted(p["metadata"]["name"] for p in listed) == [f"paged-w{i}" for i in range(5)]
    here.watched()
    await here.supervisor.reconcile(here.key)  # planned from the pages: all 5 seen, none more made
    assert len(kube.pod_names(namespace, "paged")) == 5


async def test_a_queue_being_deleted_in_the_foreground_gets_no_status_about_its_secrets_going(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, control_plane: ControlPlane,
):
    """`kubectl delete --cascade=foreground` (Argo CD's prune): the queue stays, deleting, while the
    garbage collector deletes its dependents, its token Secret first. It turned Ready=False
    SecretNotFound with a Warning Event on its way out."""
    here = in_process("going")
    await here.create_ready()
    with frozen(control_plane.pid("kube-controller-manager")):  # the dependents wait: the queue stays
        kube.custom.delete_namespaced_custom_object("agentcontrol.dev", "v1alpha1", namespace, "workerqueues",
                                                    "going", propagation_policy="Foreground")
        here.watched()
        assert here.store.queue(here.key).deleting
        here.store.upsert_secret(here.secret, None)  # collected
        await here.writer.reconcile(here.key)
        assert (kube.condition(namespace, "going") or {}).get("status") == "True"
        assert [e for e in kube.core.list_namespaced_event(namespace).items
                if e.involved_object.name == "going" and e.type == "Warning"] == []


async def test_a_status_written_from_an_older_copy_of_the_queue_keeps_what_the_supervisor_wrote_since(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The conditions are one list in a merge patch: the status writer, working from the copy its
    watch last brought, must not undo the TemporalReachable the supervisor wrote after that copy."""
    here = in_process("late")
    writer, key = here.writer, here.key
    reachable = {"type": "TemporalReachable", "status": "False", "reason": "TemporalUnavailable",
                 "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
    await here.create_ready()
    # The supervisor's write, as it makes it (supervisor.py), not seen by the Store.
    await here.client.patch(f"{resources.queue_path(namespace, 'late')}/status",
                            [{"op": "add", "path": "/status/conditions/-", "value": reachable}],
                            content_type=client_.JSON_PATCH)
    here.store.upsert_secret(here.secret, None)  # the token Secret deleted: Ready=False
    await writer.reconcile(key)
    # Tried again in 1 s, then 2 s, ... while the watch does not bring the newer queue (read before
    # the GET below, whose time would count against the timer's).
    loop = asyncio.get_running_loop()
    assert 0.5 < writer._queue._timers[key].when() - loop.time() <= 1.0
    assert kube.condition(namespace, "late", "TemporalReachable") == reachable
    writer._queue._timers.pop(key).cancel()  # as if it had come due (the writer does not run here)
    await writer.reconcile(key)
    assert 1.5 < writer._queue._timers[key].when() - loop.time() <= 2.0
    here.watched()  # the status is written over the newer queue
    await writer.reconcile(key)
    assert (kube.condition(namespace, "late") or {}).get("reason") == "SecretNotFound"
    assert kube.condition(namespace, "late", "TemporalReachable") == reachable
    assert key not in writer._conflicts


async def test_the_supervisor_adds_temporal_reachable_once_though_the_watch_is_behind(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """A scaling queue is probed every second: a second probe before the watch brought the first
    one's condition must not add it again (the conditions list is no map to the API server, which
    would keep both)."""
    here = in_process("twin")
    await here.create_ready()
    here.watched()
    probe = here.supervisor.prober._probes[here.key] = probes._Probe(reachable=False, reason="TemporalUnavailable",
                                                                   message="no answer")
    await here.supervisor.prober._show(here.key, probe)
    await here.supervisor.prober._show(here.key, probe)  # the watch has not brought the first one
    conditions = kube.get_queue(namespace, "twin")["status"]["conditions"]
    assert [c["type"] for c in conditions].count("TemporalReachable") == 1


async def test_temporal_reachable_names_the_endpoint_asked_after_the_operators_default_changed(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The operator restarted with another default Temporal host, still unreachable: no generation
    changed, nor status or reason, and the condition named the old host for good."""
    here = in_process("moved")
    await here.create_ready()
    here.watched()
    prober, key = here.supervisor.prober, here.key
    probe = prober._probes[key] = probes._Probe(
        reachable=False, reason="TemporalUnavailable", message="Temporal at old:7233/agents is unreachable: refused",
        endpoint="old:7233/agents", read_generation=1)
    await prober._show(key, probe)
    here.watched()
    probe.message, probe.endpoint = "Temporal at new:7233/agents is unreachable: refused", "new:7233/agents"
    await prober._show(key, probe)
    assert kube.condition(namespace, "moved", "TemporalReachable")["message"] == probe.message
    here.watched()
    probe.message = "Temporal at new:7233/agents is unreachable: reset by peer"  # the same host: not written again
    await prober._show(key, probe)
    assert "refused" in kube.condition(namespace, "moved", "TemporalReachable")["message"]


async def test_a_temporal_failing_every_other_check_turns_temporal_reachable_once_in_a_while(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Rate limits, or a slow scan, failing every other call: each check (every second on a scaling
    queue) was a status write and an Event, TemporalUnavailable and Reachable in turn; and with the
    watch behind, the same condition was written again, its lastTransitionTime moved."""
    here = in_process("flap")
    await here.create_ready()
    here.watched()
    prober, key = here.supervisor.prober, here.key
    probe = prober._probes[key] = probes._Probe(reachable=True, reason="Reachable", message="ok", read_generation=1)
    await prober._show(key, probe)
    here.watched()
    first = kube.condition(namespace, "flap", "TemporalReachable")
    for i in range(6):
        probe.reachable, probe.reason, probe.message = ((False, "TemporalUnavailable", "rate limited") if i % 2 == 0
                                                        else (True, "Reachable", "ok"))
        await prober._show(key, probe)
        if i:  # the first change is seen only later
            here.watched()
    down = kube.condition(namespace, "flap", "TemporalReachable")
    assert (down["status"], down["reason"]) == ("False", "TemporalUnavailable")
    assert down["lastTransitionTime"] >= first["lastTransitionTime"]
    posting = asyncio.create_task(prober._events.run())  # the poster, not running in-process otherwise
    await prober._events.flush(5)
    posting.cancel()
    told = [e.reason for e in kube.core.list_namespaced_event(namespace).items if e.involved_object.name == "flap"
            and e.reason in ("TemporalUnavailable", "Reachable")]
    assert told == ["TemporalUnavailable"]
    # Once the least time between changes has passed, what the checks find is written again.
    probe.flipped_at -= probes.FLIP_SECONDS
    probe.reachable, probe.reason, probe.message = True, "Reachable", "ok"
    await prober._show(key, probe)
    assert kube.condition(namespace, "flap", "TemporalReachable")["status"] == "True"
    # The watch behind the write: what was just written is not written again, its time moved on.
    here.watched()
    probe.flipped_at -= probes.FLIP_SECONDS
    probe.reachable, probe.reason, probe.message = False, "TemporalUnavailable", "rate limited"
    await prober._show(key, probe)
    written = kube.condition(namespace, "flap", "TemporalReachable")
    assert written["status"] == "False"
    await asyncio.sleep(1.1)  # lastTransitionTime counts seconds
    await prober._show(key, probe)  # the watch still shows True
    assert kube.condition(namespace, "flap", "TemporalReachable") == written


async def test_a_temporal_check_under_way_when_the_spec_changes_says_its_generation_and_is_made_again(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The user fixes the Temporal key while a check with the old one runs: what it found was written
    under the new generation (the fixed key reported as refused), and the check the change asked for
    waited a whole interval (30 s)."""
    here = in_process("gen")
    await here.create_ready()
    here.watched()
    supervisor, key = here.supervisor, here.key
    answer = asyncio.Event()

    class SlowTemporal:
        async def describe_task_queue(self, endpoint: object, task_queue: str) -> object:
            await answer.wait()
            raise temporal_.TemporalUnavailable("Temporal at t:7233/n refused the credentials")

    supervisor.prober._temporal = SlowTemporal()  # type: ignore[assignment]
    probe = supervisor.prober._probes[key] = probes._Probe(generation=1)
    checking = asyncio.create_task(supervisor.prober._probe(key, probe, temporal_.Endpoint("t:7233", "n"), "gen-q"))
    await asyncio.sleep(0)
    kube.patch_queue(namespace, "gen", {"temporal": {"host": "t:7233", "namespace": "n",
                                                    "apiKeySecretRef": {"name": "gen-key", "key": "k"}}})
    here.watched()
    supervisor.queue_changed(here.store.queue(key))
    assert here.store.queue(key).generation == 2
    answer.set()
    await checking
    (condition,) = [c for c in kube.get_queue(namespace, "gen")["status"]["conditions"]
                    if c["type"] == "TemporalReachable"]
    assert (condition["status"], condition["observedGeneration"]) == ("False", 1)
    assert probe.due <= time.monotonic()  # due now: the change's check is next

    # A check of a queue deleted (and made again) meanwhile writes nothing onto the new one.
    here.watched()
    supervisor.queue_deleted(key)
    probe.reachable, probe.read_generation = True, 7
    await supervisor.prober._show(key, probe)
    (condition,) = [c for c in kube.get_queue(namespace, "gen")["status"]["conditions"]
                    if c["type"] == "TemporalReachable"]
    assert (condition["status"], condition["observedGeneration"]) == ("False", 1)


async def test_status_temporal_is_written_again_after_a_standby_spell_in_which_another_replica_wrote_it(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Active, standby (the other replica writes its own reading), then active again with the reading
    this replica wrote first: the queue must show that reading, not keep the other replica's."""
    here = in_process("spell")
    await here.create_ready()
    here.watched()
    supervisor, key = here.supervisor, here.key
    path = f"{resources.queue_path(namespace, 'spell')}/status"

    def reading(pollers: int) -> probes._Probe:
        return probes._Probe(reachable=True, reason="Reachable", message="ok",
                                  wanted=spec_.TemporalStatus(pollers=pollers, backlog=0))

    probe = supervisor.prober._probes[key] = reading(1)
    await supervisor.prober._show(key, probe)
    assert kube.get_queue(namespace, "spell")["status"]["temporal"] == {"pollers": 1, "backlog": 0}
    supervisor._activity_changed(False)
    await here.client.patch(path, [{"op": "add", "path": "/status/temporal", "value": {"pollers": 0, "backlog": 0}}],
                            content_type=client_.JSON_PATCH)  # the other replica's reading
    here.watched()
    supervisor._activity_changed(True)
    probe.shown_at = float("-inf")  # the bounded rate allows a write
    await supervisor.prober._show(key, probe)
    assert kube.get_queue(namespace, "spell")["status"]["temporal"] == {"pollers": 1, "backlog": 0}

    # A replica starting finds the reading it has already shown: not written again.
    version = kube.get_queue(namespace, "spell")["metadata"]["resourceVersion"]
    here.watched()
    again = supervisor.prober._probes[key] = reading(1)
    await supervisor.prober._show(key, again)
    assert kube.get_queue(namespace, "spell")["metadata"]["resourceVersion"] == version

    # A probe that ends after a stand-down writes nothing.
    supervisor._activity.stand_down()
    late = supervisor.prober._probes[key] = reading(5)
    await supervisor.prober._show(key, late)
    assert kube.get_queue(namespace, "spell")["metadata"]["resourceVersion"] == version
    assert not late.shown_known


async def test_a_supervisor_planning_from_an_older_copy_of_the_queue_undoes_no_count(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """A handover while the new replica's watch is behind: the last count the replica before made (a
    finished worker counted, its pod deleted) is not in the copy the new one plans from. Its counts
    written over it undid that one, and a worker too many was started."""
    here = in_process("handover")
    here.spec.update(ephemeral=True, replicas=2)
    await here.create_ready()
    here.watched()
    supervisor, key = here.supervisor, here.key
    await supervisor.reconcile(key)
    assert sorted(kube.pod_names(namespace, "handover")) == ["handover-w0", "handover-w1"]
    here.watched()
    behind = here.store.queue(key)
    assert behind is not None and behind.status["workers"]["succeeded"] == 0
    kube.set_phase(namespace, "handover-w0", "Succeeded", exit_code=0)
    await supervisor.reconcile(key)  # counted, and its pod deleted
    assert kube.get_queue(namespace, "handover")["status"]["workers"]["succeeded"] == 1
    assert kube.pod_names(namespace, "handover", alive=False) == ["handover-w1"]

    supervisor._activity_changed(True)  # a handover: what was written before is not known here
    here.store.refresh_queue(behind)  # the watch has not brought the count yet
    await supervisor.reconcile(key)
    assert kube.get_queue(namespace, "handover")["status"]["workers"]["succeeded"] == 1
    assert kube.pod_names(namespace, "handover", alive=False) == ["handover-w1"]
    here.watched()  # planned again from the newer copy: nothing to do
    await supervisor.reconcile(key)
    workers = kube.get_queue(namespace, "handover")["status"]["workers"]
    assert (workers["succeeded"], workers["counted"]) == (1, [])
    assert kube.pod_names(namespace, "handover", alive=False) == ["handover-w1"]


async def test_a_queue_made_again_during_a_pass_of_its_namesake_takes_none_of_its_pods_for_displaced(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """`kubectl replace --force` while a pass of the old queue was creating its pods: the pass noted
    them under the name after the informer had cleared it, and the new queue's first pass took them
    for deleted from outside (a Warning each, and a back-off for nothing)."""
    here = in_process("swap")
    await here.first_pod_finished()
    supervisor, key = here.supervisor, here.key
    creating = supervisor._create_pods

    async def replaced_meanwhile(queue: queues.QueueObject, indices: tuple[int, ...]) -> str | None:
        kube.delete_queue(namespace, "swap")  # as the informer tells it, then the new one
        here.store.remove_queue(key)
        supervisor.queue_deleted(key)
        here.store.upsert_queue(queues.QueueObject.from_body(kube.create_queue(namespace, "swap", **here.spec)))
        return await creating(queue, indices)

    monkeypatch.setattr(supervisor, "_create_pods", replaced_meanwhile)
    await supervisor.reconcile(key)  # swap-w0 counted and deleted, swap-w1 made for the old queue
    monkeypatch.setattr(supervisor, "_create_pods", creating)
    await here.writer.reconcile(key)
    here.watched()
    await supervisor.reconcile(key)
    workers = kube.get_queue(namespace, "swap")["status"]["workers"]
    assert not workers.get("consecutiveDisplaced") and not workers.get("lastDisplacedTime"), workers


async def test_a_pod_the_replica_before_may_be_creating_is_not_made_again_under_another_name(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """A handover: the replica standing down counted a new pod (nextIndex), made its token, and is
    creating the pod; the new active one, not seeing it, made one more under the next index, and a
    single-execution pool of one ran two workers."""
    here = in_process("coming")
    await here.first_pod_finished()
    supervisor, key = here.supervisor, here.key
    queue = here.store.queue(key)
    assert queue is not None
    # The other replica counted coming-w0, wrote nextIndex 2 and made coming-w1's token; its pod is on its way.
    await here.client.patch(f"{resources.queue_path(namespace, 'coming')}/status", {"status": {"workers": {
        **queue.status.get("workers", {}), "nextIndex": 2, "succeeded": 1, "counted": ["coming-w0"]}}})
    here.watched()
    supervisor._activity_changed(True)
    body = workers.credential_secret_body(queue, "coming-w1", "t1", now=time.time() - 1)
    kube.core.create_namespaced_secret(namespace, body)
    here.store.upsert_worker_credential((namespace, "coming-w1-token"), WorkerCredential(
        queue=key, pod="coming-w1", queue_uid=queue.uid, since=workers.made_at(body)), "t1")
    await supervisor.reconcile(key)
    assert kube.pod_names(namespace, "coming") == []  # none made here: coming-w1 is the other's
    assert kube.get_queue(namespace, "coming")["status"]["workers"]["nextIndex"] == 2
    assert kube.has_secret(namespace, "coming-w1-token")


async def test_a_pod_token_made_a_moment_ago_is_not_taken_for_an_orphan(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """A handover: the replica standing down has counted a pod (nextIndex), made its token, and is
    creating the pod; the new active one sees the token and not the pod yet. Deleted as an orphan,
    the pod would be made without it and never start. An old one is an orphan."""
    here = in_process("young")
    here.spec.update(singleExecution=True)
    await here.create_ready()
    here.watched()
    supervisor, key = here.supervisor, here.key
    await supervisor.reconcile(key)
    assert kube.pod_names(namespace, "young") == ["young-w0"]
    queue = here.store.queue(key)
    assert queue is not None
    await here.client.patch(f"{resources.queue_path(namespace, 'young')}/status",
                            {"status": {"workers": {**queue.status.get("workers", {}), "nextIndex": 2}}})
    here.watched()
    supervisor._activity_changed(True)  # this one active now; the other wrote nextIndex 2

    def made(ago: float) -> None:  # young-w1's token, as the other replica made it, seen by the watch
        body = workers.credential_secret_body(queue, "young-w1", "t1", now=time.time() - ago)
        with contextlib.suppress(k8s.ApiException):
            kube.core.create_namespaced_secret(namespace, body)
        here.store.upsert_worker_credential((namespace, "young-w1-token"), WorkerCredential(
            queue=key, pod="young-w1", queue_uid=queue.uid, since=workers.made_at(body)), "t1")

    made(ago=1)
    await supervisor.reconcile(key)
    assert kube.has_secret(namespace, "young-w1-token")
    made(ago=supervisor_.ORPHAN_GRACE_SECONDS + 1)
    await supervisor.reconcile(key)
    assert not kube.has_secret(namespace, "young-w1-token")
    # A pod listed here before and deleted from outside takes its token along at once, young or not.
    kube.core.delete_namespaced_pod("young-w0", namespace)
    body = kube.core.read_namespaced_secret("young-w0-token", namespace).to_dict()
    here.store.upsert_worker_credential((namespace, "young-w0-token"), WorkerCredential(
        queue=key, pod="young-w0", queue_uid=queue.uid,
        since=workers.made_at({"metadata": {"annotations": body["metadata"]["annotations"]}})), "t0")
    await supervisor.reconcile(key)
    assert not kube.has_secret(namespace, "young-w0-token")


def test_deleted_queue_stops_serving(operator: OperatorProcess, kube: Kube, namespace: str):
    kube.create_queue(namespace, "gone", queueId=f"g-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "gone", "True")
    token = kube.queue_token(namespace, "gone")
    assert operator.start_worker(f"g-{namespace}", token).status == 200
    kube.delete_queue(namespace, "gone")
    wait_for(lambda: operator.start_worker(f"g-{namespace}", token).status in (401, 404), timeout=10,
             what="deleted queue no longer served")


@pytest.mark.parametrize(("spec", "message"), [
    ({"heartbeatIntervalSeconds": 5}, "should be greater than or equal to 10"),
    ({"redis": {"url": "redis://r:6379", "urlSecretRef": {"name": "s", "key": "k"}}},
     "set either redis.url or redis.urlSecretRef, not both"),
    ({"redis": {"passwordSecretRef": {"name": "s", "key": "k"}}}, "redis.passwordSecretRef needs redis.url"),
    ({"websocket": {"url": "http://not-a-websocket"}}, "websocket.url must start with ws:// or wss://"),
    ({"temporal": {"apiKeySecretRef": {"name": "s"}}}, "key: Required value"),
    ({"scaling": {"minIdle": 3, "max": 2}}, "scaling.minIdle must not exceed scaling.max"),
    ({"scaling": {"minIdle": 1}}, "max: Required value"),
    ({"ephemeral": True, "scaling": {"minIdle": 1, "max": 2}}, "an ephemeral queue's scaling.minIdle must be 0"),
    ({"upstream": {"url": 'http://cp"example', "apiKeySecretRef": {"name": "org", "key": "k"}}}, "spec.upstream.url"),
    ({"litellm": {"url": "not a url"}}, "spec.litellm.url"),
    # The SDK dials host:port only: these ran pods that crash-looped under Ready=True.
    ({"temporal": {"host": "temporal.internal"}}, "spec.temporal.host"),
    ({"temporal": {"host": "http://temporal.internal:7233"}}, "spec.temporal.host"),
    ({"temporal": {"host": "temporal.internal:99999"}}, "spec.temporal.host"),
    ({"temporal": {"host": "a\nb:7233"}}, "spec.temporal.host"),
    ({"websocket": {"url": "wss://host with spaces/x"}}, "spec.websocket.url"),
    ({"litellm": {"url": "litellm.internal:4000"}}, "spec.litellm.url"),
    # URLs no client can use: ports out of range, control characters (aiohttp refused each call: a 500).
    ({"litellm": {"url": "http://llm:65536"}},
     "spec.litellm.url: Invalid value: \"http://llm:65536\": the URL's port must be a number from 0 to 65535"),
    ({"redis": {"url": "redis://r:99999"}},
     "spec.redis.url: Invalid value: \"redis://r:99999\": the URL's port must be a number from 0 to 65535"),
    ({"redis": {"url": "redis://r/a b"}}, "spec.redis.url"),
    ({"websocket": {"url": "ws://ws:99999/x"}},
     "spec.websocket.url: Invalid value: \"ws://ws:99999/x\": the URL's port must be a number from 0 to 65535"),
    ({"upstream": {"url": "http://cp:99999", "apiKeySecretRef": {"name": "org", "key": "k"}}},
     "spec.upstream.url: Invalid value: \"http://cp:99999\": the URL's port must be a number from 0 to 65535"),
    ({"upstream": {"url": "http://cp/a\u0001b", "apiKeySecretRef": {"name": "org", "key": "k"}}},
     "spec.upstream.url"),
    ({"worker": {"template": {"spec": {"containers": [{"name": "worker", "env": {"A": "1"}}]}}}},
     "spec.worker.template.spec.containers[0].env"),
    ({"worker": {"template": {"metadata": {"labels": ["a"]}}}}, "spec.worker.template.metadata.labels: Invalid value"),
    ({"worker": {"template": {"spec": {"containers": [{"image": "x"}]}}}},
     "spec.worker.template.spec.containers[0].name: Required value"),
    ({"worker": {"template": {"spec": {"hostNetwork": True}}}}, "worker pods cannot use hostNetwork"),
    # A name that no Secret can have: one with `..` was read from another namespace.
    ({"litellm": {"url": "https://llm", "apiKeySecretRef": {"name": "../../victim/secrets/x", "key": "k"}}},
     "spec.litellm.apiKeySecretRef.name"),
    ({"nats": {"configSecretRef": {"name": "Upper"}}}, "spec.nats.configSecretRef.name"),
    # A key no Secret can hold: the queue waited for it for good (SecretKeyNotFound).
    ({"litellm": {"url": "https://llm", "apiKeySecretRef": {"name": "llm", "key": "a/b"}}},
     "spec.litellm.apiKeySecretRef.key"),
    ({"litellm": {"url": "https://llm", "apiKeySecretRef": {"name": "llm", "key": "..k"}}},
     "spec.litellm.apiKeySecretRef.key: Invalid value: \"..k\": a Secret's key cannot be '.' or begin with '..'"),
    ({"redis": {"urlSecretRef": {"name": "r", "key": "."}}}, "a Secret's key cannot be '.' or begin with '..'"),
])
def test_invalid_queue_is_refused_by_kubectl_apply(kubectl, namespace: str, spec: dict[str, Any], message: str):
    manifest = json.dumps({"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue",
                           "metadata": {"name": "bad", "namespace": namespace}, "spec": spec})
    result = kubectl("apply", "-f", "-", input=manifest, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_an_empty_temporal_host_is_the_operators_and_accepted(kubectl, namespace: str):
    # The host:port pattern refused "", which the operator reads as its own host (a chart rendering an
    # unset value so).
    manifest = {"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue",
                "metadata": {"name": "default-host", "namespace": namespace}, "spec": {"temporal": {"host": ""}}}
    kubectl("apply", "-f", "-", input=json.dumps(manifest))


def test_a_queues_conditions_are_one_of_each_type(kubectl, namespace: str):
    """A list keyed by type, as metav1.Condition lists are: a second Ready is refused, and server-side
    apply merges by type instead of taking the whole list for one value."""
    manifest = {"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue",
                "metadata": {"name": "conds", "namespace": namespace}, "spec": {}}
    kubectl("apply", "-f", "-", input=json.dumps(manifest))
    ready = {"type": "Ready", "status": "True", "reason": "R", "lastTransitionTime": "2026-12-05T00:00:00Z"}
    twice = json.dumps({"status": {"conditions": [ready, {**ready, "status": "False"}]}})
    result = kubectl("patch", "workerqueue", "conds", "-n", namespace, "--subresource=status", "--type=merge",
                     "-p", twice, check=False)
    assert result.returncode != 0 and "Duplicate value" in result.stderr, result.stderr
    late = json.dumps({"status": {"conditions": [{**ready, "lastTransitionTime": "yesterday"}]}})
    result = kubectl("patch", "workerqueue", "conds", "-n", namespace, "--subresource=status", "--type=merge",
                     "-p", late, check=False)
    assert result.returncode != 0 and "lastTransitionTime" in result.stderr, result.stderr


def test_a_queue_stored_under_a_looser_crd_says_its_spec_is_invalid(
        operator: OperatorProcess, kubectl, kube: Kube, namespace: str):
    """An older CRD let through what this one refuses (maxWorkers past 1,000, say). Such a stored
    queue was dropped in silence, one log line naming no field, under the Ready=True an earlier run
    wrote: now it says so, until it is corrected."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    fields = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    del fields["maxWorkers"]["maximum"]

    def created() -> bool:
        try:
            kube.create_queue(namespace, "loose", maxWorkers=5000, temporal={"host": "t:1", "namespace": "n"})
        except k8s.ApiException as exc:
            assert exc.status == 422, exc.body  # the old schema not in force yet
            return False
        return True

    try:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(crd))
        wait_for(created, what="the queue created under the looser CRD")
    finally:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    ready = kube.wait_condition(namespace, "loose", "False", "SpecInvalid")
    assert "spec.maxWorkers" in ready["message"] and "5000" not in ready["message"]
    assert ready["observedGeneration"] == 1
    assert wait_for(lambda: [e for e in kube.events(namespace, "loose") if e.reason == "SpecInvalid"],
                    what="a SpecInvalid Event")[0].type == "Warning"
    kube.patch_queue(namespace, "loose", {"maxWorkers": 5})  # corrected: served again
    kube.wait_condition(namespace, "loose", "True")


def test_queue_id_is_immutable(kubectl, kube: Kube, namespace: str):
    kube.create_queue(namespace, "imm", queueId="first-id", temporal={"host": "t:1", "namespace": "n"})
    with pytest.raises(k8s.ApiException) as info:
        kube.patch_queue(namespace, "imm", {"queueId": "second-id"})
    assert info.value.status == 422 and "queueId is immutable" in info.value.body
    # Not by way of removing the whole spec either (a manifest applied without one, `spec: null`):
    # without an old spec the rule was skipped, and the queue id could then be anything.
    for kind, removal in (("json", [{"op": "remove", "path": "/spec"}]), ("merge", {"spec": None})):
        result = kubectl("patch", "wq", "imm", "-n", namespace, f"--type={kind}", "-p", json.dumps(removal),
                         check=False)
        assert result.returncode != 0 and "queueId is immutable" in result.stderr, result.stderr
    assert kube.get_queue(namespace, "imm")["spec"]["queueId"] == "first-id"
    # A queue made without a spec gets the defaults, and its queue id (its uid) stays so.
    made = kube.custom.create_namespaced_custom_object("agentcontrol.dev", "v1alpha1", namespace, "workerqueues", {
        "apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue", "metadata": {"name": "bare"}})
    assert made["spec"]["heartbeatIntervalSeconds"] == 60
    with pytest.raises(k8s.ApiException) as info:
        kube.patch_queue(namespace, "bare", {"queueId": "taken-over"})
    assert info.value.status == 422 and "queueId is immutable" in info.value.body


def test_ephemeral_is_immutable(kube: Kube, namespace: str):
    """Made ephemeral later, a queue whose workers had succeeded before counted them as this life's
    (no worker wanted) and was deleted at once; the other way, a queue would outlive its purpose."""
    for name, ephemeral in (("eph-on", False), ("eph-off", True)):
        kube.create_queue(namespace, name, ephemeral=ephemeral, temporal={"host": "t:1", "namespace": "n"})
        with pytest.raises(k8s.ApiException) as info:
            kube.patch_queue(namespace, name, {"ephemeral": not ephemeral})
        assert info.value.status == 422 and "ephemeral is immutable" in info.value.body
        assert kube.get_queue(namespace, name)["spec"]["ephemeral"] is ephemeral
    kube.patch_queue(namespace, "eph-on", {"replicas": 2})  # the rest of the spec stays editable


@pytest.mark.parametrize("change", [{"taskQueueName": "other"}, {"temporal": {"host": "t:2"}},
                                    {"temporal": {"namespace": "m"}}])
def test_the_temporal_task_queue_is_immutable(kubectl, kube: Kube, namespace: str, change: dict[str, Any]):
    """Running workers poll the task queue /start gave them: judged by a new one, busy workers were
    taken for idle and deleted (scaling), or never saw their execution end (single execution)."""
    kube.create_queue(namespace, "tq", taskQueueName="tq-1", temporal={"host": "t:1", "namespace": "n"})
    with pytest.raises(k8s.ApiException) as info:
        kube.patch_queue(namespace, "tq", change)
    assert info.value.status == 422 and "the Temporal task queue" in info.value.body
    # Its key, or the queue's TLS, may change (a rotation, a fix).
    kube.patch_queue(namespace, "tq", {"temporal": {"tls": True, "apiKeySecretRef": {"name": "s", "key": "k"}}})
    # Nor by adding the whole block to a queue made without one (on the operator's defaults), or
    # dropping it: a rule is skipped where the old object has no such field.
    kube.create_queue(namespace, "bare")
    with pytest.raises(k8s.ApiException) as info:
        kube.patch_queue(namespace, "bare", change)
    assert info.value.status == 422 and "the Temporal task queue" in info.value.body
    result = kubectl("patch", "wq", "tq", "-n", namespace, "--type=json", "-p",
                     json.dumps([{"op": "remove", "path": "/spec/temporal"}]), check=False)
    assert result.returncode != 0 and "the Temporal task queue" in result.stderr, result.stderr


def test_printer_columns(kubectl, kube: Kube, namespace: str):
    kube.create_queue(namespace, "cols", queueId="cols-id", ephemeral=True, temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "cols", "True")
    # Its pods planned too (a column left blank shifts the others in the split below).
    wait_for(lambda: "running" in kube.workers(namespace, "cols"), what="status.workers written")
    # And its Temporal checked (t:1 never answers): Ready all the same, TEMPORAL tells.
    wait_for(lambda: any(c["type"] == "TemporalReachable" and c["status"] == "False"
                         for c in kube.get_queue(namespace, "cols")["status"].get("conditions", [])),
             what="TemporalReachable=False")
    out = kubectl("get", "wq", "-n", namespace, "-o", "wide").stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "QUEUE-ID", "EPHEMERAL", "SINGLE-EXECUTION", "READY", "TEMPORAL", "RUNNING",
                              "LIVE", "BACKLOG", "POLLERS", "REASON", "DESIRED", "PENDING", "TASK-QUEUE", "SUSPENDED",
                              "AGE"]
    # BACKLOG and POLLERS stay blank until the queue's Temporal has answered (t:1 never does).
    assert row.split()[:9] == ["cols", "cols-id", "true", "false", "True", "False", "0", "0", "Ready"]
    assert row.split()[-3] == "cols-id"  # TASK-QUEUE: the one in effect, none being named
    assert "workerqueue.agentcontrol.dev/cols" in kubectl("get", "agentcontrol", "-n", namespace, "-o", "name").stdout
    assert "queueId" in kubectl("explain", "workerqueue.spec").stdout


def test_every_metric_served_is_in_the_operations_table_with_its_type_and_labels(
        operator: OperatorProcess, kube: Kube, namespace: str):
    kube.put_secret(namespace, "org", k="org-key")
    kube.create_queue(namespace, "measured", queueId=f"measured-{namespace}",
                      temporal={"host": "t:1", "namespace": "n"},
                      upstream={"url": "http://upstream.example", "apiKeySecretRef": {"name": "org", "key": "k"}})
    kube.wait_condition(namespace, "measured", "True")  # an upstream in use: its series are shown
    assert operator.start_worker(f"measured-{namespace}", "not-its-token").status in (401, 503)
    text = http("GET", f"{operator.url}/metrics").body.decode()
    served = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    labels: dict[str, set[str]] = {}
    for name, inside in re.findall(r"^([a-z_]+?)(?:_bucket|_sum|_count)?\{([^}]*)\} ", text, re.M):
        labels.setdefault(name, set()).update(set(re.findall(r'(\w+)="', inside)) - {"le"})
    table = Path(__file__).resolve().parents[2].joinpath("docs", "operations.md").read_text()
    rows = re.findall(r"^\| `(workerqueue_\w+)` \| (\w+) \|([^|]*)\|", table, re.M)
    assert {name: kind for name, kind, _ in rows} == served
    for name, _, named in rows:
        if name in labels:  # shown with no value yet: nothing to compare
            assert labels[name] == set(re.findall(r"`(\w+)`", named)), name


def test_no_secret_value_in_logs_events_or_status(operator: OperatorProcess, kube: Kube, namespace: str):
    queue_id = full_queue(kube, namespace, "leak")
    token = kube.queue_token(namespace, "leak")
    assert operator.start_worker(queue_id, token).status == 200
    kube.put_secret(namespace, "creds", **{"temporal-api-key": "tk-rotated-" + uuid.uuid4().hex})
    operator.start_worker(queue_id, "wrong-" + token)
    values = [*SECRET_VALUES.values(), token, SECRET_VALUES["redis-url"].split(":")[2].split("@")[0]]
    logs = operator.logs()
    assert "HTTP API listening" in logs  # the logs are there, they just hold no secrets
    events = json.dumps([e.to_dict() for e in kube.events(namespace)], default=str)
    status = json.dumps(kube.get_queue(namespace, "leak").get("status"))
    for value in values:
        assert value not in logs and value not in events and value not in status


async def test_a_refusal_the_lease_watch_has_not_brought_yet_is_read_before_the_failure_counts(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The pod watch and the Lease watch are apart: a pod's failure may come before the record of its
    worker's refusal (the Lease watch relisting, or not synced yet after a restart). That record was
    written before the worker was answered, so before its pod failed: it is read then. Here no Lease
    watch runs at all. With backoffLimit 1, a failure counted would make the queue CrashLooping."""
    here = in_process("unseen")
    here.spec.update(singleExecution=True, worker={"backoffLimit": 1})
    activity = Activity(identity="test", priority=0)
    registry = Registry(client=here.client, events=EventPoster(here.client), queue_of=here.store.queue)
    supervisor = Supervisor(store=here.store, client=here.client, settings=Settings(),
                            events=EventPoster(here.client), activity=activity, registry=registry)
    await here.create_ready()
    here.watched()
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "unseen") == ["unseen-w0"]
    # Another replica turned the pod's worker away.
    queue = here.store.queue(here.key)
    assert queue is not None
    other = Registry(client=here.client, events=EventPoster(here.client), queue_of=here.store.queue)
    await other.refusals.start_refused(queue, "unseen-w0", "409: Worker queue is full (max_workers=1)")
    assert registry.refusals.why(queue, "unseen-w0") == ""
    kube.set_phase(namespace, "unseen-w0", "Failed", exit_code=1, reason="Error")
    here.watched()
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "unseen") == ["unseen-w1"]
    assert kube.workers(namespace, "unseen").get("consecutiveFailures", 0) == 0
    # The record went with its pod.
    assert [lease.metadata.name for lease in kube.coordination.list_namespaced_lease(namespace).items] == []


async def test_a_replica_just_started_plans_pods_once_it_knows_the_tokens_of_those_coming(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """Killed mid-create, the replica before left its pods' token Secrets and no pods. The replica
    starting next planned before its Secret list came in: it made two pods anew, then, the tokens
    known, took the two for coming and deleted its own as surplus (a queue without pods for a minute)."""
    here = in_process("left")
    here.spec.update(singleExecution=True, replicas=2)
    await here.create_ready()
    here.watched()
    await here.supervisor.reconcile(here.key)  # the replica killed: its two pods' creates...
    for pod in ("left-w0", "left-w1"):  # ...never made it, their tokens did
        kube.core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
    wait_for(lambda: not kube.pod_names(namespace, "left", alive=False), what="the pods gone")
    here.watched()
    next_one = Supervisor(store=here.store, client=here.client, settings=Settings(), events=EventPoster(here.client),
                          activity=Activity(identity="next", priority=0), secrets_listed=False)
    queue = here.store.queue(here.key)
    assert queue is not None
    next_one.queue_changed(queue)
    await next_one._reconcile(here.key)
    assert kube.pod_names(namespace, "left") == []  # nothing planned without the tokens
    feed = Feed(here.store, here.writer, next_one)
    for pod in ("left-w0", "left-w1"):
        feed.secret_upserted(await here.client.get(f"{resources.secrets_path(namespace)}/{pod}-token"))
    next_one.secrets_synced()
    await next_one._reconcile(here.key)
    # Both may still come (made a moment ago): none made, none deleted, their tokens kept for them.
    assert kube.pod_names(namespace, "left") == []
    assert {s.metadata.name for s in kube.core.list_namespaced_secret(namespace).items} >= {"left-w0-token",
                                                                                           "left-w1-token"}


async def test_a_pod_counted_and_deleted_by_the_replica_before_is_not_waited_for_as_coming(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """Killed after deleting a finished pod (counted in the status) and before its token: the replica
    next took the token, a few seconds old, for a pod still coming, and made no worker for a minute."""
    here = in_process("counted")
    await here.first_pod_finished()
    here.watched()

    async def killed(*_: object) -> None:
        raise asyncio.CancelledError

    monkeypatch.setattr(here.supervisor, "_revoke", killed)
    with contextlib.suppress(asyncio.CancelledError):
        await here.supervisor.reconcile(here.key)
    assert kube.pod_names(namespace, "counted", alive=False) == []
    assert kube.workers(namespace, "counted")["counted"] == ["counted-w0"]
    here.watched()
    next_one = Supervisor(store=here.store, client=here.client, settings=Settings(), events=EventPoster(here.client),
                          activity=Activity(identity="next", priority=0))
    Feed(here.store, here.writer, next_one).secret_upserted(
        await here.client.get(f"{resources.secrets_path(namespace)}/counted-w0-token"))
    await next_one._reconcile(here.key)
    assert kube.pod_names(namespace, "counted") == ["counted-w2"]  # w1 was the killed pass's, never made
    assert "counted-w0-token" not in {s.metadata.name for s in kube.core.list_namespaced_secret(namespace).items}


async def test_a_refused_pod_shows_on_the_queue_though_its_first_write_met_a_newer_copy(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """A new queue's first pod refused: its lastError write raced the status writer's conditions and
    lost, and the queue said `ScalingUp` until the next try, a back-off later (10 s by default)."""
    here = in_process("nopod")
    here.spec.update(singleExecution=True, worker={"template": {"spec": {"containers": [{"name": "no-image"}]}}})
    await here.create_ready()
    here.watched()
    create = here.supervisor._create_pods

    async def refused_meanwhile_changed(queue: queues.QueueObject, indices: tuple[int, ...]) -> str | None:
        refused = await create(queue, indices)
        kube.custom.patch_namespaced_custom_object("agentcontrol.dev", "v1alpha1", namespace, "workerqueues",
                                                   "nopod", {"metadata": {"annotations": {"touched": "1"}}})
        return refused

    monkeypatch.setattr(here.supervisor, "_create_pods", refused_meanwhile_changed)
    await here.supervisor._reconcile(here.key)
    assert kube.workers(namespace, "nopod").get("lastError") is None  # that write met the newer copy
    here.watched()
    await here.supervisor._reconcile(here.key)
    shown = kube.workers(namespace, "nopod")
    assert shown["lastError"].startswith("pod nopod-w0 was refused: ") and shown["nextIndex"] == 1, shown
    assert kube.pod_names(namespace, "nopod", alive=False) == []


async def test_a_refused_pods_back_off_is_timed_by_the_monotonic_clock_not_held_by_a_step_back(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """The wall clock stepped back an hour just after a pod was refused: its 10-s back-off held for an
    hour and ten seconds, the queue without a new try all that while."""
    here = in_process("stepped")
    here.spec.update(singleExecution=True, worker={"template": {"spec": {"containers": [{"name": "no-image"}]}}})
    wall, local = [0.0], [0.0]
    supervisor = Supervisor(store=here.store, client=here.client, settings=Settings(),
                            events=EventPoster(here.client), activity=Activity(identity="test", priority=0),
                            clock=lambda: time.time() + wall[0], monotonic=lambda: time.monotonic() + local[0])
    await here.create_ready()
    here.watched()
    tries: list[tuple[int, ...]] = []
    create = supervisor._create_pods

    async def counted(queue: queues.QueueObject, indices: tuple[int, ...]) -> str | None:
        tries.append(indices)
        return await create(queue, indices)

    monkeypatch.setattr(supervisor, "_create_pods", counted)
    await supervisor._reconcile(here.key)
    assert tries == [(0,)]
    here.watched()
    await supervisor._reconcile(here.key)
    assert tries == [(0,)]  # its back-off
    wall[0], local[0] = -3600.0, 11.0  # 11 s on, and the wall clock an hour back
    here.watched()
    await supervisor._reconcile(here.key)
    assert tries == [(0,), (1,)]  # tried again (under the next name: names are never reused)


async def test_in_a_namespace_being_deleted_a_refused_pod_or_event_is_no_news(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, caplog: pytest.LogCaptureFixture,
):
    """`kubectl delete namespace`: until its queue goes, a pod it lacks is made and refused (the
    namespace is terminating), and was reported as a refusal, in an Event refused in turn and logged
    as a Warning."""
    here = in_process("doomed")
    here.spec.update(singleExecution=True)
    await here.create_ready()
    here.watched()
    queue = here.store.queue(here.key)
    assert queue is not None
    hold = k8s.V1ObjectMeta(name="hold", finalizers=["test.agentcontrol.dev/hold"])  # keeps it terminating
    kube.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(metadata=hold))
    events = EventPoster(here.client)
    poster = asyncio.create_task(events.run())
    try:
        kube.core.delete_namespace(namespace)
        supervisor = Supervisor(store=here.store, client=here.client, settings=Settings(), events=events,
                                activity=Activity(identity="test", priority=0))
        caplog.set_level(logging.INFO)
        for _ in range(2):
            await supervisor._reconcile(here.key)
            here.watched()
        # Refused once, quietly, then left for its back-off (not a pod and a status write each pass).
        assert kube.workers(namespace, "doomed")["nextIndex"] == 1 and "lastError" not in kube.workers(namespace,
                                                                                                      "doomed")
        assert events.waiting == 0 and kube.pods(namespace) == []
        events.post(involved=queue_ref_body(queue), reason="Probe", message="m", warning=True)
        await asyncio.to_thread(wait_for, lambda: events.waiting == 0, what="the Event tried")
        await asyncio.sleep(0.5)  # its answer
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        poster.cancel()
        kube.core.patch_namespaced_config_map("hold", namespace, {"metadata": {"finalizers": None}})


async def test_a_pod_replaced_in_a_pass_leaves_its_slot_to_its_replacement_in_that_pass(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """maxWorkers = replicas: a pod deleted and replaced in one pass (its token Secret deleted, here)
    kept its worker's registration, and slot, until the next pass, so the replacement's worker met a
    full queue (409) at /start, exited, and counted as displaced."""
    here = in_process("handed")
    here.spec.update(singleExecution=True, maxWorkers=1)
    registry, supervisor, queue = await here.first_pod_with_registry()
    assert await registry.claim(queue, "w-old", limit=1, pod="handed-w0") is not None
    kube.core.delete_namespaced_secret("handed-w0-token", namespace)
    here.store.remove_worker_credential((namespace, "handed-w0-token"))  # as the Secret watch tells
    kube.core.patch_namespaced_pod_status("handed-w0", namespace, {"status": {"phase": "Pending", "containerStatuses": [
        {"name": "worker", "image": "worker:1", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "CreateContainerConfigError",
                               "message": 'secret "handed-w0-token" not found'}}}]}})
    here.watched()
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "handed") == ["handed-w1"]
    assert await registry.claim(queue, "w-new", limit=1, pod="handed-w1") is not None


async def test_a_pod_that_failed_for_its_token_is_not_kept_in_place_of_a_crash_though_its_deletion_failed(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """Counted as WorkerTokenGone, its deletion failed; at the next pass, counted already, it was no
    suspect any more, so it was kept for its logs and the crash's pod, whose logs say why the workers
    fail, was deleted in its place."""
    here = in_process("kept")
    shift = [0.0]
    supervisor = await here.first_pod_on(shift=shift)
    kube.set_phase(namespace, "kept-w0", "Failed", exit_code=1, reason="Error")  # the worker crashed
    here.watched()
    await supervisor._reconcile(here.key)  # counted, kept for its logs; its replacement after the back-off
    shift[0] = Settings().worker_backoff_seconds + 1
    here.watched()
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "kept") == ["kept-w1"]
    kube.core.delete_namespaced_secret("kept-w1-token", namespace)
    here.store.remove_worker_credential((namespace, "kept-w1-token"))
    kube.set_phase(namespace, "kept-w1", "Failed", exit_code=1, reason="Error")  # turned away at /start: 401
    delete = supervisor._delete_pod

    async def failing(queue: queues.QueueObject, name: str) -> None:
        if name == "kept-w1":
            raise client_.ApiError(500, "InternalError", "a webhook on deletes is down")
        await delete(queue, name)

    monkeypatch.setattr(supervisor, "_delete_pod", failing)
    here.watched()
    with pytest.raises(client_.ApiError):  # the pass is tried again after the work queue's back-off
        await supervisor._reconcile(here.key)
    assert "kept-w1" in kube.pod_names(namespace, "kept", alive=False)  # its deletion failed
    monkeypatch.setattr(supervisor, "_delete_pod", delete)
    here.watched()
    await supervisor._reconcile(here.key)
    ended = kube.pod_names(namespace, "kept", alive=False)
    assert "kept-w0" in ended and "kept-w1" not in ended, ended


async def test_refusal_records_of_pods_gone_without_the_supervisor_or_expired_are_swept(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """A record is deleted with its pod by the supervisor; one whose pod someone else deleted, or
    that expired, would stay for good but for the active replica's sweep."""
    here = in_process("swept")
    here.spec.update(singleExecution=True)
    shift = [0.0]  # the registry's clock, moved on by hand
    registry, supervisor, queue = await here.first_pod_with_registry(monotonic=lambda: time.monotonic() + shift[0])

    def records() -> list[str]:
        return sorted(lease.metadata.name for lease in kube.coordination.list_namespaced_lease(namespace).items)

    await registry.refusals.start_refused(queue, "swept-w0", "409: Worker queue is full (max_workers=1)")
    kube.core.delete_namespaced_pod("swept-w0", namespace)  # by a user: the supervisor never deletes it
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "swept") == ["swept-w1"]
    await registry.refusals.start_refused(queue, "swept-w1", "409: Worker queue is full (max_workers=1)")
    # The listing began within the margin after the refusal: it may have missed a pod made meanwhile.
    assert await registry.refusals.sweep(supervisor._listed.get) == 0
    assert records() == ["swept-w0-refused", "swept-w1-refused"]
    monkeypatch.setattr(refusals, "REFUSAL_SWEEP_MARGIN", 0.0)
    await supervisor._reconcile(here.key)  # listed after both refusals
    assert await registry.refusals.sweep(supervisor._listed.get) == 1
    assert records() == ["swept-w1-refused"]  # its pod is there: its failure must not count as a crash
    assert registry.refusals.why(queue, "swept-w1") != ""
    shift[0] = refusals.REFUSAL_SECONDS + 1
    assert registry.refusals.why(queue, "swept-w1") == ""  # expired: its pod's failure now counts
    assert await registry.refusals.sweep(supervisor._listed.get) == 1
    assert records() == []
    assert await registry.refusals.sweep(supervisor._listed.get) == 0


async def test_a_pass_after_another_writers_status_write_plans_from_the_watched_copy(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The supervisor planned from its own last write, with that write's version, for good: once the
    live count (or status.temporal, a condition) was written beside it, each of its writes was a
    conflict, and a pod's start waited for the conflict's retry."""
    here = in_process("caught")
    here.spec.update(singleExecution=True)
    await here.create_ready()
    here.watched()
    await here.supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "caught") == ["caught-w0"]
    await resources.patch_queue_status(here.client, namespace, "caught", {"workers": {"live": 1}})  # LiveStatus
    here.watched()
    kube.set_phase(namespace, "caught-w0", "Running")
    await here.supervisor._reconcile(here.key)  # one pass: no conflict to retry from
    assert (kube.workers(namespace, "caught")["running"], kube.workers(namespace, "caught")["live"]) == (1, 1)


async def test_a_replica_that_stands_down_in_a_pass_creates_no_pod(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """Told to stop while its pass writes the status: the replica taking over lists the pods before
    this one would create its pod, and makes its own: one worker too many."""
    here = in_process("down")
    here.spec.update(singleExecution=True)
    activity = Activity(identity="test", priority=0)
    supervisor = Supervisor(store=here.store, client=here.client, settings=Settings(),
                            events=EventPoster(here.client), activity=activity)
    await here.create_ready()
    here.watched()
    write = resources.patch_queue_status

    async def write_then_stop(*args: Any, **kwargs: Any) -> Any:
        written = await write(*args, **kwargs)
        activity.stand_down()  # SIGTERM while the write was on its way
        return written

    monkeypatch.setattr(resources, "patch_queue_status", write_then_stop)
    await supervisor._reconcile(here.key)
    assert kube.workers(namespace, "down")["nextIndex"] == 1  # written before it stood down
    assert kube.pod_names(namespace, "down") == []


async def test_a_replica_whose_queue_watch_is_behind_leaves_the_live_queues_token_alone(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """`kubectl replace --force` seen by the active replica, which made the new queue's token; this
    replica's queue watch still holds the old queue. Taking the live token for the old queue's
    leftover, it deleted it: every worker holding it was locked out."""
    here = in_process("behind")
    here.spec.pop("auth")
    old = kube.create_queue(namespace, "behind", **here.spec)
    here.store.upsert_queue(queues.QueueObject.from_body(old))  # what this replica will keep seeing
    kube.custom.delete_namespaced_custom_object("agentcontrol.dev", "v1alpha1", namespace, "workerqueues", "behind")
    wait_for(lambda: not kube.custom.list_namespaced_custom_object(
        "agentcontrol.dev", "v1alpha1", namespace, "workerqueues")["items"], what="the old queue gone")
    live = queues.QueueObject.from_body(kube.create_queue(namespace, "behind", **here.spec))
    kube.core.create_namespaced_secret(namespace, token_secret_body(live, "live-token"))  # the other replica's
    here.store.fill_secret((namespace, "behind-worker-token"), None)  # its watch: left out, as a namesake's
    await here.writer.reconcile(here.key)
    secret = kube.core.read_namespaced_secret("behind-worker-token", namespace)
    assert secret.metadata.owner_references[0].uid == live.uid
    assert kube.secret_value(namespace, "behind-worker-token", "token") == "live-token"


async def test_a_namesakes_token_secret_whose_queue_the_api_server_still_has_is_waited_for(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """This replica knows a queue made again (`kubectl replace --force`) while the API server it asks
    still answers the old one (a cache behind): the old queue's token Secret is no leftover to delete
    yet, and the queue waits for the Secret watch to say it is gone, neither announced as missing its
    Secret nor given the old queue's token."""
    here = in_process("ahead")
    here.spec.pop("auth")
    old = queues.QueueObject.from_body(kube.create_queue(namespace, "ahead", **here.spec))
    kube.core.create_namespaced_secret(namespace, token_secret_body(old, "old-token"))
    again = kube.get_queue(namespace, "ahead")
    again["metadata"]["uid"] = "uid-of-the-queue-made-again"
    here.store.upsert_queue(queues.QueueObject.from_body(again))  # ahead of what the API server answers
    here.store.fill_secret((namespace, "ahead-worker-token"), None)  # its watch: left out, as a namesake's
    await here.writer.reconcile(here.key)
    await asyncio.sleep(0.5)  # its Events, if any, posted
    assert kube.secret_value(namespace, "ahead-worker-token", "token") == "old-token"  # not deleted, not served
    assert not here.store.opens(here.store.serving(here.spec["queueId"]), queues.digest("old-token"))
    assert kube.condition(namespace, "ahead") is None  # nothing written about a Secret said to be missing
    assert [e.reason for e in kube.events(namespace, "ahead")] == []


async def test_a_token_secret_the_watch_never_told_of_is_learnt_from_the_create_that_meets_it(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """The queue's own token Secret exists, but this replica holds it absent (its Secret list left it
    out as unused then, and no watch event comes again): the create meets it (409). Learnt from the
    read back, the queue is served and Ready; before, it waited for a watch event that never came."""
    here = in_process("unseen-token")
    here.spec.pop("auth")
    made = queues.QueueObject.from_body(kube.create_queue(namespace, "unseen-token", **here.spec))
    kube.core.create_namespaced_secret(namespace, token_secret_body(made, "its-token"))
    here.store.upsert_queue(made)
    here.store.fill_secret((namespace, "unseen-token-worker-token"), None)
    await here.writer.reconcile(here.key)
    assert (kube.condition(namespace, "unseen-token") or {}).get("status") == "True"
    assert here.store.opens(here.store.serving(here.spec["queueId"]), queues.digest("its-token"))


async def test_a_running_pod_whose_token_memory_lacks_is_kept_while_the_api_server_cannot_tell_or_says_it_is_there(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """The Secret watch behind (down, relisting): a running pod whose token memory lacks is asked of the
    API server. A listing that fails must delete nothing (healthy workers would go, the pool drained),
    and its answer that the token is there holds until the resync only: a deletion since is acted on then."""
    here = in_process("lagging")
    shift, local = [0.0], [0.0]
    supervisor = await here.first_pod_on(shift=shift, local=local)
    kube.set_phase(namespace, "lagging-w0", "Running")
    here.store.remove_worker_credential((namespace, "lagging-w0-token"))  # the Secret watch behind
    shift[0] = supervisor_.ORPHAN_GRACE_SECONDS + 1  # its token would have come through the watch by now
    get = here.client.get

    async def secrets_unlisted(path: str, params: Any = None) -> Any:
        if path.endswith("/secrets"):
            raise client_.ApiError(503, "ServiceUnavailable", "the API server is overloaded")
        return await get(path, params)

    monkeypatch.setattr(here.client, "get", secrets_unlisted)
    here.watched()
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "lagging") == ["lagging-w0"]  # it cannot tell: nothing deleted
    monkeypatch.setattr(here.client, "get", get)
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "lagging") == ["lagging-w0"]  # there, says the API server
    kube.core.delete_namespaced_secret("lagging-w0-token", namespace)
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "lagging") == ["lagging-w0"]  # taken as there until the resync
    local[0] = Settings().worker_resync_seconds + 1
    here.watched()
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "lagging") == ["lagging-w1"]  # its token gone: replaced


async def test_a_token_secret_of_another_name_saying_it_is_a_pods_is_not_that_pods_token(
    in_process: Callable[[str], InProcess], kube: Kube, namespace: str,
):
    """A pod's token Secret deleted, and another of the queue's token Secrets naming that pod (a copy
    under another name, made by hand): taken for the pod's, the pod was kept, its worker turned away
    at its next /start for good (the operator's memory, as the store, knows a Secret by its name)."""
    here = in_process("copied")
    shift = [0.0]
    supervisor = await here.first_pod_on(shift=shift)
    kube.set_phase(namespace, "copied-w0", "Running")
    queue = here.store.queue(here.key)
    assert queue is not None
    copy = workers.credential_secret_body(queue, "copied-w0", "wqw1_copy", now=time.time())
    copy["metadata"]["name"] = "copied-w9-token"
    kube.core.create_namespaced_secret(namespace, copy)
    kube.core.delete_namespaced_secret("copied-w0-token", namespace)
    here.store.remove_worker_credential((namespace, "copied-w0-token"))  # as the Secret watch tells
    shift[0] = supervisor_.ORPHAN_GRACE_SECONDS + 1
    here.watched()
    await supervisor._reconcile(here.key)
    assert kube.pod_names(namespace, "copied") == ["copied-w1"]  # its own token gone: replaced
