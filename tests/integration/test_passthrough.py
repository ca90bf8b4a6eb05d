"""Pass-through to an upstream control plane: the operator process, the real API server, and the
stand-in upstream (tests/standin.py) on loopback in this test process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from http import client as http_client
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes import client as k8s

from tests import standin
from tests.integration.conftest import Http, Kube, OperatorProcess, http, wait_for
from tests.integration.test_start import service_account_token
from tests.integration.test_worker_life import pod_bound_token
from tests.proxy import Proxy
from workerqueue_operator.core import leases, queues

pytestmark = pytest.mark.usefixtures("operator")

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def upstream() -> Iterator[standin.StandIn]:
    with standin.StandIn() as server:
        yield server


def queue_with_upstream(kube: Kube, namespace: str, name: str, url: str, org_key: str) -> str:
    """A Ready queue whose upstream is `url` with `org_key`; returns its token."""
    kube.put_secret(namespace, f"{name}-org", key=org_key)
    kube.create_queue(namespace, name, queueId=f"{name}-{namespace}", temporal={"host": "t:1", "namespace": "n"},
                      upstream={"url": url, "apiKeySecretRef": {"name": f"{name}-org", "key": "key"}})
    kube.wait_condition(namespace, name, "True")
    return kube.queue_token(namespace, name)


def call(operator: OperatorProcess, method: str, path: str, token: str, *, scheme: str = "Bearer",
         body: bytes | None = None, timeout: float = 20) -> Http:
    headers = {"Authorization": f"{scheme} {token}"}
    return http(method, f"{operator.url}{path}", body=body, headers=headers, timeout=timeout)


def echoed(r: Http) -> dict[str, Any]:
    assert r.status == 200 and r.headers.get("X-Stand-In") == "yes", (r.status, r.body[:500])
    body: dict[str, Any] = r.json()
    return body


def org_key() -> str:
    return "org-" + uuid.uuid4().hex


@pytest.mark.parametrize("scheme", ["Bearer", "UserKey"])
def test_forwarded_exactly_with_the_organizations_key(operator: OperatorProcess, kube: Kube, namespace: str,
                                                      upstream: standin.StandIn, scheme: str):
    key = org_key()
    token = queue_with_upstream(kube, namespace, "fwd", upstream.url, key)
    body = json.dumps({"status": "running", "note": "ü"}).encode()
    path = "/api/v1/executions/e-1/events?limit=5&status=all&x=%2F&x=2"
    got = echoed(call(operator, "PATCH", path, token, scheme=scheme, body=body))
    assert got["method"] == "PATCH" and got["path_qs"] == path
    assert got["body_length"] == len(body) and got["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert standin.header_values(got, "Authorization") == [f"{scheme} {key}"]
    assert standin.header_values(got, "Content-Type") == ["application/json"]
    assert standin.header_values(got, "Host") == [f"127.0.0.1:{upstream.port}"]
    assert token not in json.dumps(standin.headers(got))  # in no header at all
    assert key not in operator.logs()


def test_a_token_reaches_only_its_own_queues_upstream(operator: OperatorProcess, kube: Kube, namespace: str,
                                                      upstream: standin.StandIn):
    key_a, key_b = org_key(), org_key()
    token_a = queue_with_upstream(kube, namespace, "qa", f"{upstream.url}/a", key_a)
    token_b = queue_with_upstream(kube, namespace, "qb", f"{upstream.url}/b", key_b)
    kube.create_queue(namespace, "plain", queueId=f"plain-{namespace}", temporal={"host": "t:1", "namespace": "n"})
    kube.wait_condition(namespace, "plain", "True")
    token_plain = kube.queue_token(namespace, "plain")

    got = echoed(call(operator, "GET", "/api/v1/teams/t1", token_a))
    assert got["path_qs"] == "/a/api/v1/teams/t1" and standin.header_values(got, "Authorization") == [f"Bearer {key_a}"]
    got = echoed(call(operator, "GET", "/api/v1/teams/t1", token_b))
    assert got["path_qs"] == "/b/api/v1/teams/t1" and standin.header_values(got, "Authorization") == [f"Bearer {key_b}"]

    seen = len(upstream.received)
    assert call(operator, "GET", "/api/v1/teams/t1", token_plain).status == 404  # its queue has no upstream
    assert call(operator, "GET", "/api/v1/teams/t1", "not-a-token").status == 401
    assert http("GET", f"{operator.url}/api/v1/teams/t1").status == 401
    assert len(upstream.received) == seen  # none of them was forwarded


async def test_a_kubernetes_identitys_worker_reaches_the_upstream_of_the_queue_it_started_in(
        operator: OperatorProcess, kube: Kube, namespace: str, other_namespace: str, upstream: standin.StandIn):
    # Its activities call the control plane with its own token: refused, every execution's first
    # PATCH was retried for the rest of its time, never run. Its calls name no queue: its registration does.
    key_a, key_b = org_key(), org_key()
    queue_with_upstream(kube, namespace, "ka", f"{upstream.url}/a", key_a)
    queue_with_upstream(kube, namespace, "kb", f"{upstream.url}/b", key_b)
    for queue in ("ka", "kb"):
        kube.grant(namespace, f"{queue}-start", resource="workerqueues/start", verb="create", queue=queue,
                   account="runner")
    runner = service_account_token(kube, namespace, "runner")
    in_a, in_b = (pod_bound_token(kube, namespace, "runner", pod) for pod in ("pod-a", "pod-b"))
    path = "/api/v1/executions/e-1"
    seen = len(upstream.received)
    started = operator.start_worker(f"ka-{namespace}", runner, {"system_info": {"hostname": "h1"}})
    assert started.status == 200 and started.json()["websocket_enabled"] is False
    refused = call(operator, "PATCH", path, in_a, body=b"{}")  # its worker has not started yet
    assert refused.status == 403 and "no worker queue" in refused.json()["detail"]
    for scheme in ("Bearer", "UserKey"):
        got = echoed(call(operator, "PATCH", path, runner, scheme=scheme, body=b"{}"))
        assert got["path_qs"] == f"/a{path}" and standin.header_values(got, "Authorization") == [f"{scheme} {key_a}"]
        assert runner not in json.dumps(standin.headers(got))
    # Registrations are Leases: whoever may write Leases in another namespace can write one naming
    # this ServiceAccount, in a queue RBAC lets it start workers in. That must neither send its calls
    # (an execution's data) to that queue's upstream nor lock it out of its own.
    queue_with_upstream(kube, other_namespace, "kc", f"{upstream.url}/c", org_key())
    kube.rbac.create_namespaced_role(other_namespace, k8s.V1Role(
        metadata=k8s.V1ObjectMeta(name="start-kc"), rules=[k8s.V1PolicyRule(
            api_groups=["agentcontrol.dev"], resources=["workerqueues/start"], verbs=["create"])]))
    kube.rbac.create_namespaced_role_binding(other_namespace, k8s.V1RoleBinding(
        metadata=k8s.V1ObjectMeta(name="start-kc"),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="start-kc"),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="runner", namespace=namespace)]))
    kc = kube.get_queue(other_namespace, "kc")
    now = time.time()
    forged = leases.Worker(worker_id="forged", queue=(other_namespace, "kc"), queue_uid=kc["metadata"]["uid"],
                           queue_id=f"kc-{other_namespace}", lease="kc-forged", duration=600, registered_at=now,
                           renewed_at=now, seen_at=now, identity=f"system:serviceaccount:{namespace}:runner")
    kube.coordination.create_namespaced_lease(other_namespace, leases.lease_body(forged, queue_name="kc"))
    kc_token = kube.queue_token(other_namespace, "kc")
    wait_for(lambda: "forged" in {w["id"] for w in operator.call(
        "GET", f"/api/v1/worker-queues/kc-{other_namespace}/workers", kc_token).json()}, what="the forged Lease seen")
    assert echoed(call(operator, "PATCH", path, runner, body=b"{}"))["path_qs"] == f"/a{path}"
    # No websocket: /start gives it none, and none is opened for it on any path.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
            await session.ws_connect(f"{operator.url}/api/v1/ws/anything",
                                     headers={"Authorization": f"Bearer {runner}"})
        assert refused_ws.value.status == 403
    # Registered in two queues, it cannot be told which one a call is for: none is guessed.
    in_kb = operator.start_worker(f"kb-{namespace}", runner, {"system_info": {"hostname": "h2"}})
    assert in_kb.status == 200
    refused = call(operator, "PATCH", path, runner, body=b"{}")
    assert refused.status == 403 and "2 worker queues" in refused.json()["detail"]
    bye = call(operator, "POST", f"/api/v1/workers/{in_kb.json()['worker_id']}/disconnect", runner,
               body=json.dumps({"reason": "shutdown", "exit_code": 0}).encode())
    assert bye.status == 200
    assert echoed(call(operator, "PATCH", path, runner, body=b"{}"))["path_qs"] == f"/a{path}"
    # Tokens bound to their pods are one worker's each, whatever queues their ServiceAccount may open.
    for token, queue, key, prefix in ((in_a, "ka", key_a, "/a"), (in_b, "kb", key_b, "/b")):
        assert operator.start_worker(f"{queue}-{namespace}", token, {"system_info": {"hostname": queue}}).status == 200
        got = echoed(call(operator, "GET", "/api/v1/teams/t1", token))
        assert got["path_qs"] == f"{prefix}/api/v1/teams/t1" and standin.header_values(got, "Authorization") == [
            f"Bearer {key}"]
    assert call(operator, "GET", "/api/v1/teams/t1", "not-a-token").status == 401
    assert len(upstream.received) == seen + 6


def test_rotated_key_is_used_without_a_restart(operator: OperatorProcess, kube: Kube, namespace: str,
                                                upstream: standin.StandIn):
    token = queue_with_upstream(kube, namespace, "rot", upstream.url, org_key())
    rotated = org_key()
    kube.put_secret(namespace, "rot-org", key=rotated)

    def uses_rotated() -> bool:
        got = echoed(call(operator, "GET", "/api/v1/client/config", token, scheme="UserKey"))
        return standin.header_values(got, "Authorization") == [f"UserKey {rotated}"]

    wait_for(uses_rotated, timeout=30, what="the rotated key upstream")
    assert rotated not in operator.logs()


def test_streamed_answer_arrives_in_pieces(operator: OperatorProcess, kube: Kube, namespace: str,
                                           upstream: standin.StandIn):
    token = queue_with_upstream(kube, namespace, "sse", upstream.url, org_key())
    conn = http_client.HTTPConnection("127.0.0.1", operator.port, timeout=20)
    try:
        began = time.monotonic()
        conn.request("GET", "/api/v1/executions/e-1/stream?events=4&gap=1",
                     headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        arrivals = []
        while line := response.readline():
            if line.startswith(b"data:"):
                arrivals.append((time.monotonic() - began, line.strip()))
    finally:
        conn.close()
    assert [line for _, line in arrivals] == [f"data: event {i}".encode() for i in range(4)]
    # The first event is read while the upstream still has 3 s of events to send (an answer held
    # whole would bring them all at once): half of that spread, slack for a loaded machine.
    assert arrivals[-1][0] - arrivals[0][0] >= 1.5, arrivals


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_one_gibibyte_upload_is_streamed_through(operator: OperatorProcess, kube: Kube, namespace: str,
                                                 upstream: standin.StandIn):
    token = queue_with_upstream(kube, namespace, "big", upstream.url, org_key())
    echoed(call(operator, "POST", "/api/v1/analytics/warm-up", token, body=b"x" * MIB))  # pools and buffers exist
    assert operator.process is not None
    pid = operator.process.pid
    rss_before, hwm_before = vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM")

    block = os.urandom(MIB)  # one MiB, sent 1,024 times: the test holds no more than that either
    expected = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        for _ in range(1024):
            expected.update(block)
            yield block

    conn = http_client.HTTPConnection("127.0.0.1", operator.port, timeout=120)
    try:
        conn.request("POST", "/api/v1/analytics/upload", body=chunks(), encode_chunked=True,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        got = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200
    assert got["body_length"] == 1024 * MIB and got["body_sha256"] == expected.hexdigest()
    rss_after, hwm_after = vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM")
    # A few MiB: buffers of a flow-controlled stream, not the body (1,024 MiB).
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after)
    assert hwm_after - hwm_before < 8 * 1024, (hwm_before, hwm_after)


def test_unreachable_upstream_is_502_and_readiness_does_not_care(operator: OperatorProcess, kube: Kube,
                                                                 namespace: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
        token = queue_with_upstream(kube, namespace, "down", f"http://127.0.0.1:{s.getsockname()[1]}", org_key())
        began = time.monotonic()
        r = call(operator, "GET", "/api/v1/executions/e-1", token)
    assert r.status == 502 and r.json() == {"detail": "The upstream control plane cannot be reached"}
    assert time.monotonic() - began < 2 + 2  # the connect timeout (2 s in tests), with room
    assert http("GET", f"{operator.url}/readyz").status == 200


def test_hanging_upstream_is_504_within_the_idle_timeout(operator: OperatorProcess, kube: Kube, namespace: str,
                                                         upstream: standin.StandIn):
    token = queue_with_upstream(kube, namespace, "hang", upstream.url, org_key())
    began = time.monotonic()
    r = call(operator, "GET", "/api/v1/executions/e-1/hang", token)
    elapsed = time.monotonic() - began
    assert r.status == 504 and r.json() == {"detail": "The upstream control plane did not answer within 3s"}
    assert 3 <= elapsed < 3 + 5  # the idle timeout (3 s in tests), with room for a busy machine


async def test_websocket_is_proxied_with_the_organizations_key(operator: OperatorProcess, kube: Kube, namespace: str,
                                                         upstream: standin.StandIn):
    key = org_key()
    token = queue_with_upstream(kube, namespace, "ws", upstream.url, key)
    path = f"/api/v1/ws/workers/{queues.new_worker_id(queues.digest(token))}"  # as /start names it

    async def session() -> tuple[dict[str, Any], list[Any], int | None]:
        async with aiohttp.ClientSession() as client, client.ws_connect(
                f"{operator.url}{path}", headers={"Authorization": f"Bearer {token}"}) as ws:
            hello = json.loads(await ws.receive_str(timeout=10))
            await ws.send_str("event 1")
            await ws.send_bytes(b"\x01\x02")
            echoes = [await ws.receive_str(timeout=10), await ws.receive_bytes(timeout=10)]
            await ws.send_str("close")
            await ws.receive(timeout=10)
            return hello, echoes, ws.close_code

    hello, echoes, code = await session()
    assert hello["path_qs"] == path
    assert standin.header_values(hello, "Authorization") == [f"Bearer {key}"]
    assert echoes == ["event 1", b"\x01\x02"] and code == 4000


async def test_a_websocket_whose_upstream_vanishes_without_a_word_is_closed(
        operator: OperatorProcess, kube: Kube, namespace: str, upstream: standin.StandIn):
    # The upstream behind a proxy that, once frozen, carries nothing more and closes nothing: a lost
    # node, a NAT's cut. The operator's ping after the idle timeout (3 s here) goes unanswered.
    proxy = Proxy(("127.0.0.1", upstream.port))
    try:
        token = queue_with_upstream(kube, namespace, "ws-gone", f"http://127.0.0.1:{proxy.port}", org_key())
        async with asyncio.timeout(30), aiohttp.ClientSession() as client, client.ws_connect(
                f"{operator.url}/api/v1/ws/workers/{queues.new_worker_id(queues.digest(token))}",
                headers={"Authorization": f"Bearer {token}"}) as ws:
            json.loads(await ws.receive_str(timeout=10))  # the upstream's hello: relayed both ways
            proxy.freeze()
            message = await ws.receive(timeout=15)
            assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == aiohttp.WSCloseCode.BAD_GATEWAY
    finally:
        proxy.close()


def test_operator_wide_default_upstream(operator: OperatorProcess, kube: Kube, namespace: str, kubeconfig: Path,
                                        upstream: standin.StandIn, tmp_path: Path):
    """Queues without spec.upstream use the operator's; a queue's own upstream never gets the default key."""
    default_key, own_key = org_key(), org_key()
    kube.put_secret(namespace, "org-default", key=default_key)
    own = OperatorProcess(kubeconfig, tmp_path / "default-upstream.log", env={
        "WQ_UPSTREAM_URL": f"{upstream.url}/default", "WQ_UPSTREAM_API_KEY_SECRET": f"{namespace}/org-default:key"})
    with operator.paused():  # the session's operator has no default upstream: it would fight over the status
        try:
            own.start()
            kube.create_queue(namespace, "plain", queueId=f"plain-{namespace}",
                              temporal={"host": "t:1", "namespace": "n"})
            kube.wait_condition(namespace, "plain", "True")
            token_own = queue_with_upstream(kube, namespace, "own", upstream.url, own_key)
            got = echoed(call(own, "GET", "/api/v1/skills/s1", kube.queue_token(namespace, "plain"), scheme="UserKey"))
            assert got["path_qs"] == "/default/api/v1/skills/s1"
            assert standin.header_values(got, "Authorization") == [f"UserKey {default_key}"]
            got = echoed(call(own, "GET", "/api/v1/skills/s1", token_own))
            assert got["path_qs"] == "/api/v1/skills/s1"
            assert standin.header_values(got, "Authorization") == [f"Bearer {own_key}"]

            kube.core.delete_namespaced_secret("org-default", namespace)
            kube.wait_condition(namespace, "plain", "False", "SecretNotFound")
            r = call(own, "GET", "/api/v1/skills/s1", kube.queue_token(namespace, "plain"))
            assert r.status == 503 and r.json() == {
                "detail": f"The worker queue's upstream is not ready: secret org-default not found in namespace "
                          f"{namespace} (the operator's default: WQ_UPSTREAM_API_KEY_SECRET, Helm's "
                          "upstream.apiKeySecret)"}
            assert default_key not in own.logs() and own_key not in own.logs()
        finally:
            own.stop()
