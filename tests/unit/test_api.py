"""The HTTP API over a Store fed directly: request parsing, error shapes, the response (no cluster)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.unit import apps
from tests.unit.factories import UID, queue, queue_body
from workerqueue_operator.api import app as app_
from workerqueue_operator.api import unseen
from workerqueue_operator.api.keys import DRAIN, METRICS, REGISTRY, STORE, UNSEEN
from workerqueue_operator.core import queues, reviews
from workerqueue_operator.core.store import Store, WorkerCredential
from workerqueue_operator.models.settings import Settings

START = "/api/v1/worker-queues/{}/start"
AUTH = {"Authorization": "Bearer good-token"}
SA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2ln"
"""Shaped as a ServiceAccount's token (a JWT): only such tokens are reviewed."""


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "good-token"})
    store.upsert_queue(queue("q2", queueId="q-2"))
    store.upsert_secret(("team-a", "q2-worker-token"), {"token": "other-token"})
    store.upsert_queue(queue("paused", queueId="q-paused", suspend=True))
    store.upsert_secret(("team-a", "paused-worker-token"), {"token": "paused-token"})
    store.upsert_queue(queue("broken", queueId="q-broken", litellm={"apiKeySecretRef": {"name": "llm", "key": "k"}}))
    store.upsert_secret(("team-a", "broken-worker-token"), {"token": "broken-token"})
    store.upsert_secret(("team-a", "llm"), None)
    app = apps.make_app(store)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_start_answers_the_contract_fields(client: TestClient):
    r = await client.post(START.format("q-1"), json={"worker_sdk_version": "1", "system_info": {"hostname": "h"},
                                                     "control_plane_url": "https://cp.example/"}, headers=AUTH)
    assert r.status == 200
    body = await r.json()
    assert body["control_plane_url"] == "https://cp.example"
    assert body["queue_id"] == "q-1" and body["queue_name"] == "q1"
    assert body["control_plane_sdk_version"] == "0.6.0"
    assert len(body["worker_id"]) == 36


async def test_worker_ids_are_fresh_per_call(client: TestClient):
    ids = {(await (await client.post(START.format("q-1"), headers=AUTH)).json())["worker_id"] for _ in range(3)}
    assert len(ids) == 3
    # Each counted, for its queue alone; a refused /start is not.
    assert (await client.post(START.format("q-1"), headers={"Authorization": "Bearer wrong"})).status == 401
    text = await (await client.get("/metrics")).text()
    assert 'workerqueue_workers_started_total{namespace="team-a",queue="q1"} 3' in text
    assert 'workerqueue_workers_started_total{namespace="team-a",queue="q2"} 0' in text


async def test_control_plane_url_falls_back_to_the_request(client: TestClient):
    body = await (await client.post(START.format("q-1"), headers=AUTH)).json()
    assert body["control_plane_url"] == f"http://{client.host}:{client.port}"


@pytest.mark.parametrize("payload", [b"", b"{}", b'{"unknown": 1}'])
async def test_empty_and_unknown_bodies_mean_defaults(client: TestClient, payload: bytes):
    r = await client.post(START.format("q-1"), data=payload, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == 200


@pytest.mark.parametrize(("payload", "status", "detail"), [
    # As the reference (FastAPI 0.165, `body: WorkerStartRequest = WorkerStartRequest()`) answers them.
    (b"null", 422, [{"type": "model_attributes_type", "loc": ["body"],
                     "msg": "Input should be a valid dictionary or object to extract fields from", "input": None}]),
    (b" \n", 422, [{"type": "json_invalid", "loc": ["body", 2], "msg": "JSON decode error", "input": {},
                    "ctx": {"error": "Expecting value"}}]),
    (b'{"worker_sdk_version": "\xff"}', 400, "There was an error parsing the body"),
])
async def test_null_blank_and_undecodable_bodies_are_answered_as_the_reference_does(
        client: TestClient, payload: bytes, status: int, detail: object):
    r = await client.post(START.format("q-1"), data=payload, headers={**AUTH, "Content-Type": "application/json"})
    assert (r.status, (await r.json())["detail"]) == (status, detail)


async def test_malformed_json_is_json_invalid(client: TestClient):
    r = await client.post(START.format("q-1"), data=b"{nope", headers=AUTH)
    assert r.status == 422
    (error,) = (await r.json())["detail"]
    assert error["type"] == "json_invalid" and error["loc"][0] == "body" and error["msg"] == "JSON decode error"


async def test_wrong_types_get_fastapi_shaped_errors(client: TestClient):
    r = await client.post(START.format("q-1"), json={"worker_sdk_version": 5, "system_info": {"pid": "x"}},
                          headers=AUTH)
    assert r.status == 422
    errors = (await r.json())["detail"]
    assert {tuple(e["loc"]) for e in errors} == {("body", "worker_sdk_version"), ("body", "system_info", "pid")}
    assert {e["type"] for e in errors} == {"string_type", "int_parsing"}
    assert all({"type", "loc", "msg", "input"} <= set(e) for e in errors)
    # Not an object where one is wanted: FastAPI validates from attributes, and says so.
    for body in ([], {"system_info": "x"}):
        r = await client.post(START.format("q-1"), json=body, headers=AUTH)
        (error,) = (await r.json())["detail"]
        assert (r.status, error["type"]) == (422, "model_attributes_type") and "ctx" not in error


async def test_body_over_one_mebibyte_is_413(client: TestClient):
    big = io.BytesIO(json.dumps({"worker_sdk_version": "x" * (1024 * 1024)}).encode())
    r = await client.post(START.format("q-1"), data=big, headers=AUTH)
    assert r.status == 413
    assert "detail" in await r.json()


@pytest.mark.parametrize(("headers", "status"), [({}, 401), ({"Authorization": "Bearer nobody"}, 401),
                                                 ({"Authorization": "Basic Zm9vOmJhcg=="}, 401)])
async def test_unauthenticated(client: TestClient, headers: dict, status: int):
    r = await client.post(START.format("q-1"), headers=headers)
    assert r.status == status
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert isinstance((await r.json())["detail"], str)


async def test_another_queues_token_is_403(client: TestClient):
    r = await client.post(START.format("q-1"), headers={"Authorization": "Bearer other-token"})
    assert r.status == 403


async def test_unknown_queue_is_404(client: TestClient):
    r = await client.post(START.format("nope"), headers=AUTH)
    assert (r.status, await r.json()) == (404, {"detail": "Worker queue not found"})


async def test_suspended_queue_is_400(client: TestClient):
    r = await client.post(START.format("q-paused"), headers={"Authorization": "Bearer paused-token"})
    assert (r.status, await r.json()) == (400, {"detail": "Worker queue is not active (status: suspended)"})


async def test_a_queue_being_deleted_starts_no_worker():
    # Its pods go with it and none is made for it: a worker started now would register on a queue
    # whose Leases and tokens are on their way out.
    store = Store(settings=Settings())
    going = queue_body("going", queueId="q-going")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # a finalizer of someone else's holds it
    store.upsert_queue(queues.QueueObject.from_body(going))
    store.upsert_secret(("team-a", "going-worker-token"), {"token": "going-token"})
    async with TestClient(TestServer(apps.make_app(store))) as client:
        r = await client.post(START.format("q-going"), headers={"Authorization": "Bearer going-token"})
        assert (r.status, await r.json()) == (400, {"detail": "Worker queue is not active (status: deleting)"})


async def test_not_ready_queue_is_503_naming_the_secret(client: TestClient):
    r = await client.post(START.format("q-broken"), headers={"Authorization": "Bearer broken-token"})
    assert r.status == 503
    assert "secret llm not found" in (await r.json())["detail"]


async def test_unknown_route_is_json_404(client: TestClient):
    r = await client.get("/nope")
    assert (r.status, await r.json()) == (404, {"detail": "Not Found"})


async def test_metrics_count_requests_by_route_and_code(client: TestClient):
    await client.post(START.format("nope"), headers=AUTH)
    text = await (await client.get("/metrics")).text()
    labels = 'route="/api/v1/worker-queues/{queue_id}/start",method="POST",code="404"'
    assert f"workerqueue_http_requests_total{{{labels}}} 1" in text
    assert "workerqueue_queues 4" in text
    assert "workerqueue_queues_not_ready 1" in text  # the broken one; not the one suspended
    assert "workerqueue_queues_suspended 1" in text


async def test_metrics_on_a_port_of_their_own_are_not_served_on_the_api_port():
    """Their labels name every queue and namespace: whoever may reach /start need not read them."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("secret-project", queueId="q-1"))
    app = apps.make_app(store, settings=Settings(metrics_port=9090))
    async with TestClient(TestServer(app)) as api, \
            TestClient(TestServer(app_.make_metrics_app(app[METRICS]))) as scraper:
        r = await api.get("/metrics")
        assert (r.status, await r.json()) == (404, {"detail": "Not Found"})
        assert "/metrics" not in (await (await api.get("/openapi.json")).json())["paths"]
        text = await (await scraper.get("/metrics")).text()
        assert 'queue="secret-project"' in text and "workerqueue_queues 1" in text
        assert (await scraper.get("/healthz")).status == 404  # nothing else there


def test_metrics_port_must_differ_from_the_api_port():
    with pytest.raises(ValueError, match="metrics_port must differ from http_port"):
        Settings(http_port=8080, metrics_port=8080)
    assert Settings(http_port=0, metrics_port=0).metrics_port == 0  # tests: any two free ports


async def test_openapi_names_the_contract_operation(client: TestClient):
    doc = await (await client.get("/openapi.json")).json()
    op = doc["paths"]["/api/v1/worker-queues/{queue_id}/start"]["post"]
    assert op["operationId"] == "start_worker_for_queue_api_v1_worker_queues__queue_id__start_post"
    schemas = doc["components"]["schemas"]
    assert {"WorkerStartResponse", "HTTPValidationError", "ValidationError", "WorkerSystemInfo",
            "control_plane_api__app__routers__worker_queues__WorkerStartRequest"} <= set(schemas)


async def raw_exchange(client: TestClient, request: bytes) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one request written byte for byte, as a hostile client would."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()  # every request below asks the server to close
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


@pytest.mark.parametrize("body", [
    b"[" * 1000 + b"]" * 1000,
    b'{"system_info": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"system_info": {"pid": ' + b"7" * 5000 + b"}}",
    b'{"unknown": ' + b"7" * 4400 + b"}",
    b'{"worker_sdk_version": ' + b"[" * 990 + b"]" * 990 + b"}",
], ids=["nested-1000", "nested-5000", "int-5000-digits", "unknown-int-4400-digits", "nested-990"])
async def test_hostile_json_is_422_not_500(client: TestClient, body: bytes, caplog: pytest.LogCaptureFixture):
    r = await client.post(START.format("q-1"), data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == 422
    errors = (await r.json())["detail"]
    assert errors and all(e["loc"][0] == "body" for e in errors)
    assert "Traceback" not in caplog.text


async def test_a_lone_surrogate_in_a_string_is_read_as_the_replacement_character(client: TestClient):
    # What Python makes of a cwd that is not UTF-8; valid JSON, but it cannot be written out as UTF-8.
    info = b'{"system_info": {"cwd": "/home/u/caf\\udce9", "hostname": "h\\ud83d\\ude00"}}'
    headers = {**AUTH, "Content-Type": "application/json"}
    r = await client.post(START.format("q-1"), data=info, headers=headers)
    assert r.status == 200
    worker_id = (await r.json())["worker_id"]
    worker = client.app[REGISTRY].get(worker_id)
    assert worker is not None and worker.system_info is not None
    assert json.loads(worker.system_info) == {"cwd": "/home/u/caf\ufffd", "hostname": "h\U0001f600"}
    beat = await client.post(f"/api/v1/workers/{worker_id}/heartbeat", data=info[:-1] + b', "status": "busy"}',
                             headers=headers)
    assert beat.status == 200
    assert 'workerqueue_http_problems_total{kind="unhandled_error"} 0' in await (await client.get("/metrics")).text()


@pytest.mark.parametrize("value", [b"NaN", b"1e999"])
async def test_error_inputs_json_cannot_carry_are_left_out(client: TestClient, value: bytes):
    r = await client.post(START.format("q-1"), data=b'{"system_info": {"pid": ' + value + b"}}", headers=AUTH)
    assert r.status == 422
    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    (error,) = json.loads(await r.read(), parse_constant=strict)["detail"]
    assert error["loc"] == ["body", "system_info", "pid"] and error["input"] is None


@pytest.mark.parametrize("authorization", [b"Bearer \xe9", b"Bearer caf\xc3\xa9", b"Bearer a\tb", b"Bearer \xff\xfe"])
async def test_non_ascii_authorization_is_401(client: TestClient, authorization: bytes,
                                              caplog: pytest.LogCaptureFixture):
    status, head, body = await raw_exchange(client, (
        b"POST /api/v1/worker-queues/q-1/start HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: " + authorization + b"\r\nContent-Length: 0\r\n\r\n"))
    assert status == 401
    assert b"WWW-Authenticate: Bearer" in head
    assert isinstance(json.loads(body)["detail"], str)
    assert "Traceback" not in caplog.text


async def test_openapi_lists_every_answer_of_start(client: TestClient):
    doc = await (await client.get("/openapi.json")).json()
    responses = doc["paths"]["/api/v1/worker-queues/{queue_id}/start"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "409", "413", "422", "503"} <= set(responses)
    for status in ("400", "401", "403", "404", "409", "413", "503"):
        content = responses[status]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/HTTPError"}
        assert isinstance(content["example"]["detail"], str)
    assert doc["components"]["schemas"]["HTTPError"]["required"] == ["detail"]
    assert "WWW-Authenticate" in responses["401"]["headers"]


async def test_openapi_lists_what_the_worker_routes_answer_and_no_more(client: TestClient):
    """A body that never arrives is 408 and one not UTF-8 is 400 on every route that reads one; a
    route that reads neither body nor query never answers 422."""
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    for path in ("/api/v1/workers/{worker_id}/heartbeat", "/api/v1/workers/{worker_id}/disconnect"):
        assert {"400", "408", "413", "422"} <= set(paths[path]["post"]["responses"]), path
    assert "422" not in paths["/api/v1/worker-queues/{queue_id}/workers"]["get"]["responses"]
    assert "422" not in paths["/api/v1/worker-queues/{queue_id}"]["delete"]["responses"]
    assert "422" in paths["/api/v1/worker-queues/{queue_id}/executions"]["get"]["responses"]


async def test_wrong_method_is_405_with_allow(client: TestClient):
    # (Another method on any other /api/v1/ path is passed through to the queue's upstream instead.)
    for path in ("/healthz", "/openapi.json"):
        r = await client.post(path)
        assert (r.status, await r.json()) == (405, {"detail": "Method Not Allowed"})
        assert set(r.headers["Allow"].split(",")) >= {"GET"}


async def _chunks(size: int) -> AsyncIterator[bytes]:
    body = b'{"worker_sdk_version": "' + b"x" * (size - 26) + b'"}'
    assert len(body) == size
    for offset in range(0, size, 64 * 1024):
        yield body[offset:offset + 64 * 1024]


@pytest.mark.parametrize(("size", "status"), [(1024 * 1024, 200), (1024 * 1024 + 1, 413)])
async def test_chunked_body_limit_is_exactly_one_mebibyte(client: TestClient, size: int, status: int):
    r = await client.post(START.format("q-1"), data=_chunks(size), headers=AUTH)
    assert r.status == status
    assert "chunked" in r.request_info.headers.get("Transfer-Encoding", "")


@pytest.mark.parametrize(("unavailable", "retry_after"), [
    (reviews.Unavailable("TokenReview", "TimeoutError: no answer within 4s"), None),
    (reviews.Unavailable("TokenReview", "no review slot free in time (16 in flight)", busy=True), "1"),
])
async def test_review_unavailable_is_503_with_its_reason_in_the_log(
        unavailable: reviews.Unavailable, retry_after: str | None, caplog: pytest.LogCaptureFixture):
    store = Store(settings=Settings())
    app = apps.make_app(store, reviewer=apps.NoReviews(unavailable))
    async with TestClient(TestServer(app)) as c:
        for _ in range(5):
            r = await c.post(START.format("q-1"), headers={"Authorization": f"Bearer {SA_TOKEN}"})
            assert r.status == 503
            assert r.headers.get("Retry-After") == retry_after
        metrics_text = await (await c.get("/metrics")).text()
    lines = [r.getMessage() for r in caplog.records if "TokenReview" in r.getMessage()]
    assert len(lines) == 1, lines  # one line, the next four only counted
    assert unavailable.reason in lines[0]
    kind = "reviews_busy" if unavailable.busy else "reviews_unavailable"
    assert f'workerqueue_http_problems_total{{kind="{kind}"}} 5' in metrics_text


async def test_registrations_waiting_for_a_first_heartbeat_are_bounded_per_queue_and_in_all():
    # A client calling /start in a loop would hold a registration each until it expires: bounded.
    store = Store(settings=Settings())
    for name, token in (("q1", "good-token"), ("q2", "other-token")):
        store.upsert_queue(queue(name, queueId=f"q-{name[1]}"))
        store.upsert_secret(("team-a", f"{name}-worker-token"), {"token": token})
    other = {"Authorization": "Bearer other-token"}
    settings = Settings(registry_max_pending_per_queue=3, registry_max_pending=5)
    async with TestClient(TestServer(apps.make_app(store, settings=settings))) as c:
        started = [await c.post(START.format("q-1"), headers=AUTH) for _ in range(4)]
        assert [r.status for r in started] == [200, 200, 200, 503]
        assert started[3].headers["Retry-After"] == "5"
        assert await started[3].json() == {"detail": "Too many workers are starting at once, try again"}
        # Another queue is not refused for the first one's load, until all of them hold the global bound.
        assert [(await c.post(START.format("q-2"), headers=other)).status for _ in range(3)] == [200, 200, 503]
        # A first heartbeat ends the wait: room for one more.
        first = (await started[0].json())["worker_id"]
        beat = await c.post(f"/api/v1/workers/{first}/heartbeat", json={"status": "active"}, headers=AUTH)
        assert beat.status == 200
        assert (await c.post(START.format("q-1"), headers=AUTH)).status == 200
        assert (await c.post(START.format("q-1"), headers=AUTH)).status == 503
        text = await (await c.get("/metrics")).text()
    assert "workerqueue_workers_pending 5" in text and "workerqueue_registrations_refused_total 3" in text
    assert "workerqueue_workers_live 6" in text


async def test_registrations_in_all_are_bounded_with_their_own_answer():
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "good-token"})
    settings = Settings(registry_max_workers_per_queue=2)
    async with TestClient(TestServer(apps.make_app(store, settings=settings))) as c:
        for _ in range(2):  # a loop that heartbeats once per worker never has one waiting
            started = await (await c.post(START.format("q-1"), headers=AUTH)).json()
            beat = await c.post(f"/api/v1/workers/{started['worker_id']}/heartbeat", json={}, headers=AUTH)
            assert beat.status == 200
        refused = await c.post(START.format("q-1"), headers=AUTH)
        assert refused.status == 503 and refused.headers["Retry-After"] == "30"
        assert await refused.json() == {"detail": "Too many workers are registered, try again later"}


async def test_live_workers_keep_working_while_a_token_rotation_lists_a_secret_not_made_yet():
    # Rotation as the README has it (several token Secrets allowed): listing the new Secret before
    # creating it, or deleting the old one before unlisting it, must not lock out the workers that hold
    # the token that still resolves: their heartbeats and goodbyes go on, only new starts wait.
    store = Store(settings=Settings())
    old_ref, new_ref = {"name": "old", "key": "token"}, {"name": "new", "key": "token"}
    store.upsert_queue(queue("q1", queueId="q-1", auth={"tokenSecretRefs": [old_ref]}))
    store.upsert_secret(("team-a", "old"), {"token": "old-token"})
    old = {"Authorization": "Bearer old-token"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        worker_id = (await (await c.post(START.format("q-1"), headers=old)).json())["worker_id"]
        store.upsert_queue(queue("q1", queueId="q-1", generation=2, auth={"tokenSecretRefs": [old_ref, new_ref]}))
        beat = await c.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"}, headers=old)
        assert beat.status == 200, await beat.text()
        refused = await c.post(START.format("q-1"), headers=old)
        assert refused.status == 503 and await refused.json() == {
            "detail": "Worker queue is not ready: secret new has not been read yet"}
        store.upsert_secret(("team-a", "new"), {"token": "new-token"})
        for token in ("old-token", "new-token"):
            assert (await c.post(START.format("q-1"), headers={"Authorization": f"Bearer {token}"})).status == 200
        store.upsert_secret(("team-a", "old"), None)  # the old Secret deleted before it is unlisted
        assert (await c.post(START.format("q-1"), headers={"Authorization": "Bearer new-token"})).status == 503
        beat = await c.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"},
                            headers={"Authorization": "Bearer new-token"})
        assert beat.status == 200, await beat.text()
        # The deleted Secret's token is revoked, as it was before.
        assert (await c.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"},
                             headers=old)).status == 401
        bye = await c.post(f"/api/v1/workers/{worker_id}/disconnect", json={"reason": "shutdown"},
                           headers={"Authorization": "Bearer new-token"})
        assert bye.status == 200, await bye.text()


def store_with_pod() -> Store:
    """Queue q1 (token q1-token) and its pod q1-w0, whose own token is pod-tok."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "q1-token"})
    store.upsert_worker_credential(("team-a", "q1-w0-token"), WorkerCredential(("team-a", "q1"), "q1-w0", UID),
                                   "pod-tok")
    return store


async def test_a_pods_worker_turned_away_at_start_is_told_to_the_registry():
    """Its pod fails as the worker exits on the refusal: the supervisor must not take that for a
    crash (workers.plan). A caller with the queue token has no pod; one registered later is no
    longer refused."""
    store = store_with_pod()
    store.upsert_queue(queue("q1", queueId="q-1", suspend=True))
    pod = {"Authorization": "Bearer pod-tok"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        registry = c.server.app[REGISTRY]
        assert (await c.post(START.format("q-1"), headers={"Authorization": "Bearer q1-token"})).status == 400
        suspended = store.queue(("team-a", "q1"))
        assert suspended is not None and registry.refusals.why(suspended, "q1-w0") == ""
        assert (await c.post(START.format("q-1"), headers=pod)).status == 400
        assert registry.refusals.why(suspended, "q1-w0") == "400: Worker queue is not active (status: suspended)"
        store.upsert_queue(queue("q1", queueId="q-1"))
        assert (await c.post(START.format("q-1"), headers=pod)).status == 200
        assert registry.refusals.why(suspended, "q1-w0") == ""


async def test_a_pods_worker_starts_while_the_queue_token_the_operator_makes_is_missing():
    """The supervisor starts pods while the generated queue token is on its way (a new queue, or its
    Secret deleted): they sign in with their own tokens, so /start serves them, and only them. A
    missing upstream key still turns them away (their executions could not reach it)."""
    store = store_with_pod()
    store.upsert_secret(("team-a", "q1-worker-token"), None)
    resolution = store.resolution(("team-a", "q1"))
    assert resolution is not None and resolution.awaiting_generated_token and resolution.starts_workers
    async with TestClient(TestServer(apps.make_app(store))) as c:
        started = await c.post(START.format("q-1"), headers={"Authorization": "Bearer pod-tok"})
        assert started.status == 200, await started.text()
        assert (await started.json())["queue_id"] == "q-1"
        store.upsert_queue(queue("q1", queueId="q-1", upstream={
            "url": "https://up.example", "apiKeySecretRef": {"name": "org", "key": "api-key"}}))
        refused = await c.post(START.format("q-1"), headers={"Authorization": "Bearer pod-tok"})
        assert refused.status == 503 and "not ready" in (await refused.json())["detail"]


async def test_a_pods_worker_registers_again_after_its_queue_token_was_rotated():
    # A pod's worker holds its own token, which no rotation of the queue token touches: its id must
    # stay its own too, or a heartbeat reaching a replica that does not know its registration (or
    # coming back after it expired) is a 404 for the rest of its life once the queue token changed.
    store = store_with_pod()
    pod = {"Authorization": "Bearer pod-tok"}
    async with TestClient(TestServer(apps.make_app(store))) as first:
        worker_id = (await (await first.post(START.format("q-1"), headers=pod)).json())["worker_id"]
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "rotated"})  # e.g. deleted and made anew
    async with TestClient(TestServer(apps.make_app(store))) as other:  # a replica that never saw it
        beat = await other.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"}, headers=pod)
        assert beat.status == 200, await beat.text()
        sibling = {"Authorization": "Bearer sib-tok"}
        store.upsert_worker_credential(("team-a", "q1-w1-token"), WorkerCredential(("team-a", "q1"), "q1-w1", UID),
                                       "sib-tok")
        stolen = await other.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"}, headers=sibling)
        assert stolen.status == 403  # still another pod's worker


async def test_a_pod_token_acts_only_for_its_own_pods_worker_of_its_own_queue():
    """Not for a worker registered with the queue token (no pod), and not for a queue made again
    under its queue's name (`kubectl replace --force`): its pod was the old queue's."""
    store = store_with_pod()
    store.upsert_worker_credential(("team-a", "q1-w9-token"), WorkerCredential(("team-a", "q1"), "q1-w9", "old-uid"),
                                   "old-pod-tok")
    pod = {"Authorization": "Bearer pod-tok"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        shared = (await (await c.post(START.format("q-1"), headers={"Authorization": "Bearer q1-token"})).json())
        beat = await c.post(f"/api/v1/workers/{shared['worker_id']}/heartbeat", json={"status": "busy"}, headers=pod)
        assert beat.status == 403
        bye = await c.post(f"/api/v1/workers/{shared['worker_id']}/disconnect", json={"reason": "x"}, headers=pod)
        assert bye.status == 403
        assert (await c.post(START.format("q-1"), headers=pod)).status == 200
        assert (await c.post(START.format("q-1"), headers={"Authorization": "Bearer old-pod-tok"})).status == 403


async def test_a_queue_that_lists_another_queues_pod_tokens_cannot_take_its_pods_workers_over():
    # Whoever may edit q2 (not q1) lists q1's pod token Secret (its name can be guessed) as a q2 queue
    # token: q1's pod must still be its own queue's worker, not a q2 caller refused on q1 (403), which
    # would leave q1 failing into CrashLooping.
    store = store_with_pod()
    store.upsert_queue(queue("q2", uid="uid-2", queueId="q-2",
                             auth={"tokenSecretRefs": [{"name": "q1-w0-token", "key": "token"}]}))
    store.upsert_secret(("team-a", "q1-w0-token"), {"token": "pod-tok"})
    pod = {"Authorization": "Bearer pod-tok"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        started = await c.post(START.format("q-1"), headers=pod)
        assert started.status == 200, await started.text()
        worker_id = (await started.json())["worker_id"]
        beat = await c.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"}, headers=pod)
        assert beat.status == 200, await beat.text()
        assert (await c.post(START.format("q-2"), headers=pod)).status == 403


async def test_a_worker_started_with_the_new_token_of_a_rotation_registers_again_after_the_old_is_unlisted():
    # Its id is keyed by the token it holds: keyed by the old one (listed first), a heartbeat reaching
    # a replica that does not know it would be a 404 for the rest of its life once the old one goes.
    store = Store(settings=Settings())
    old_ref, new_ref = {"name": "old", "key": "token"}, {"name": "new", "key": "token"}
    store.upsert_queue(queue("q1", queueId="q-1", auth={"tokenSecretRefs": [old_ref, new_ref]}))
    store.upsert_secret(("team-a", "old"), {"token": "old-token"})
    store.upsert_secret(("team-a", "new"), {"token": "new-token"})
    new = {"Authorization": "Bearer new-token"}
    async with TestClient(TestServer(apps.make_app(store))) as first:
        worker_id = (await (await first.post(START.format("q-1"), headers=new)).json())["worker_id"]
    store.upsert_queue(queue("q1", queueId="q-1", generation=2, auth={"tokenSecretRefs": [new_ref]}))
    async with TestClient(TestServer(apps.make_app(store))) as other:  # a replica that never saw it
        beat = await other.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"}, headers=new)
        assert beat.status == 200, await beat.text()


async def test_a_heartbeat_of_a_worker_its_queue_issued_registers_it_again_when_unknown_here():
    # As after an expiry while it could not reach the operator, or a first heartbeat that reaches
    # another replica before that replica has seen the worker's Lease.
    from workerqueue_operator.core import queues

    store = Store(settings=Settings())
    shared = {"auth": {"tokenSecretRefs": [{"name": "shared", "key": "token"}]}}
    for name, extra in (("q1", {}), ("q2", {}), ("paused", {"suspend": True}), ("capped", {"maxWorkers": 3}),
                        ("s1", shared), ("s2", shared)):
        store.upsert_queue(queue(name, queueId=f"q-{name}", **extra))
        store.upsert_secret(("team-a", f"{name}-worker-token"), {"token": f"{name}-token"})
    store.upsert_secret(("team-a", "shared"), {"token": "shared-token"})
    going = queue_body("going", queueId="q-going")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    store.upsert_queue(queues.QueueObject.from_body(going))
    store.upsert_secret(("team-a", "going-worker-token"), {"token": "going-token"})

    def lost(name: str) -> str:
        """An id the queue issued whose registration this replica does not know."""
        return queues.new_worker_id(queues.digest(f"{name}-token" if name[0] != "s" else "shared-token"))

    def beat(worker_id: str, token: str, **body: object):
        return c.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy", **body},
                      headers={"Authorization": f"Bearer {token}"})

    async with TestClient(TestServer(apps.make_app(store))) as c:
        started = await (await c.post(START.format("q-q1"), headers={"Authorization": "Bearer q1-token"})).json()
        assert queues.issued_worker_id(started["worker_id"], [queues.digest("q1-token")])
        worker_id = lost("q1")
        answer = await beat(worker_id, "q1-token", system_info={"hostname": "box-7"})
        assert answer.status == 200
        assert await answer.json() == {"status": "ok", "worker_id": worker_id, "heartbeat_interval": 60}
        one = {"Authorization": "Bearer q1-token"}
        listed = await (await c.get("/api/v1/worker-queues/q-q1/workers", headers=one)).json()
        assert {(w["id"], w["status"], w["hostname"]) for w in listed} == {
            (started["worker_id"], "starting", None), (worker_id, "busy", "box-7")}
        assert (await beat(worker_id, "q1-token")).status == 200  # known now

        # Not for an id the caller's queue did not issue, a queue that would not register it at
        # /start or whose token does not say which queue, nor for a worker that said goodbye.
        assert (await beat(lost("q1"), "q2-token")).status == 404
        assert (await beat(queues.new_worker_id(), "q1-token")).status == 404
        assert (await beat(lost("paused"), "paused-token")).status == 404
        assert (await beat(lost("going"), "going-token")).status == 404
        assert (await beat(lost("s1"), "shared-token")).status == 404
        # maxWorkers: the API server says whether it holds a slot (test_registry.py); none here.
        assert (await beat(lost("capped"), "capped-token")).status == 503
        bye = await c.post(f"/api/v1/workers/{worker_id}/disconnect", json={"reason": "shutdown"},
                           headers={"Authorization": "Bearer q1-token"})
        assert bye.status == 200
        assert (await beat(worker_id, "q1-token")).status == 404
        assert (await beat(lost("q1"), "no-such-token")).status == 401

        # A pod's own token: only an id issued to that pod, and only while the pod has no other worker.
        for pod in ("q1-w1", "q1-w2"):
            store.upsert_worker_credential(("team-a", f"{pod}-token"), WorkerCredential(("team-a", "q1"), pod, UID),
                                           f"{pod}-token")
        key = queues.digest("q1-token")
        of_w1 = queues.new_worker_id(key, pod="q1-w1")
        assert (await beat(of_w1, "q1-w2-token")).status == 404  # a sibling's id
        assert (await beat(queues.new_worker_id(key), "q1-w1-token")).status == 404  # not issued to a pod
        assert (await beat(of_w1, "q1-w1-token")).status == 200
        workers = await (await c.get("/api/v1/worker-queues/q-q1/workers", headers=one)).json()
        assert {(w["pod"], w["hostname"]) for w in workers if w["id"] == of_w1} == {("q1-w1", "q1-w1")}
        assert (await beat(queues.new_worker_id(key, pod="q1-w1"), "q1-w1-token")).status == 404
        text = await (await c.get("/metrics")).text()
    assert "workerqueue_workers_rejoined_total 2" in text


async def test_a_draining_replica_is_unready_and_closes_each_connection_after_its_answer(client: TestClient):
    before = await client.get("/readyz")
    assert before.status == 200 and before.headers.get("Connection", "").lower() != "close"
    assert "\nworkerqueue_ready 1\n" in await (await client.get("/metrics")).text()
    client.app[DRAIN].begin()
    ready = await client.get("/readyz")
    assert (ready.status, await ready.json()) == (503, {"status": "draining"})
    assert "\nworkerqueue_ready 0\n" in await (await client.get("/metrics")).text()  # an alert's readiness
    # Still served (a client the Service sent here before the endpoints changed), its connection then closed.
    started = await client.post(START.format("q-1"), headers=AUTH)
    assert started.status == 200 and started.headers["Connection"] == "close"
    missing = await client.get("/nope")
    assert missing.status == 404 and missing.headers["Connection"] == "close"


async def test_workerqueue_ready_says_what_readyz_answers():
    """An alert on a replica not ready (a watch failing for minutes) reads it from the metrics."""
    ready = [True]
    async with TestClient(TestServer(apps.make_app(Store(settings=Settings()), ready=lambda: ready[0]))) as c:
        assert (await c.get("/readyz")).status == 200
        assert "\nworkerqueue_ready 1\n" in await (await c.get("/metrics")).text()
        ready[0] = False
        assert (await c.get("/readyz")).status == 503
        assert "\nworkerqueue_ready 0\n" in await (await c.get("/metrics")).text()


async def test_calls_reaching_a_replica_before_its_lists_wait_for_them_then_503():
    """A restarted replica listens before its watches have listed: a valid queue token was 401 and a
    known queue 404 from its empty memory, and a worker exits for good on either."""
    from workerqueue_operator.api import serving

    store = Store(settings=Settings())
    listing = serving.Listing(listed=False, hold_seconds=0.5)
    async with TestClient(TestServer(apps.make_app(store, listing=listing))) as c:
        assert (await c.get("/healthz")).status == 200  # probes, metrics: at once
        assert (await c.get("/readyz")).status == 200
        held = await c.post(START.format("q-1"), headers=AUTH)
        assert (held.status, await held.json()) == (503, {"detail": app_._STARTING})
        assert held.headers["Retry-After"] == "1"
        assert (await c.get("/api/v1/executions/e1", headers=AUTH)).status == 503  # the pass-through too

        listing.hold_seconds = 30
        waiting = asyncio.create_task(c.post(START.format("q-1"), headers=AUTH))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        # The lists come in: the queue and its token with them.
        store.upsert_queue(queue("q1", queueId="q-1"))
        store.upsert_secret(("team-a", "q1-worker-token"), {"token": "good-token"})
        listing.done.set()
        assert (await waiting).status == 200


@pytest.mark.parametrize(("query", "expected"), [
    ("", (10, "all")), ("limit=5&status=all", (5, "all")), ("limit=5.0", (5, "all")),
    ("limit=5&limit=7", (7, "all")),  # the last, as Starlette reads a repeated parameter
])
def test_the_executions_query_is_read_as_fastapi_reads_it(query: str, expected: tuple[int, str]):
    from aiohttp.test_utils import make_mocked_request

    from workerqueue_operator.api import workers
    assert workers._query(make_mocked_request("GET", f"/api/v1/worker-queues/q/executions?{query}")) == expected


@pytest.mark.parametrize(("query", "kind"), [("limit=x", "int_parsing"), ("limit=5&limit=500", "less_than_equal"),
                                             ("limit=0", "greater_than_equal"), ("limit=%D9%A5", "int_parsing")])
async def test_a_bad_executions_limit_is_422_as_fastapi_says_it(query: str, kind: str):
    from aiohttp.test_utils import make_mocked_request

    from workerqueue_operator.api import workers
    answer = workers._query(make_mocked_request("GET", f"/api/v1/worker-queues/q/executions?{query}"))
    assert not isinstance(answer, tuple) and answer.status == 422
    (error,) = json.loads(answer.body)["detail"]  # type: ignore[arg-type]
    assert (error["type"], error["loc"]) == (kind, ["query", "limit"])


@pytest.mark.parametrize("status", ["bogus", "", "RUNNING"])
def test_an_unknown_executions_status_is_422_not_an_empty_list(status: str):
    from aiohttp.test_utils import make_mocked_request

    from workerqueue_operator.api import workers
    answer = workers._query(make_mocked_request("GET", f"/api/v1/worker-queues/q/executions?status={status}"))
    assert not isinstance(answer, tuple) and answer.status == 422
    (error,) = json.loads(answer.body)["detail"]  # type: ignore[arg-type]
    assert (error["type"], error["loc"], error["input"]) == ("enum", ["query", "status"], status)


async def test_a_start_that_outlives_its_queue_leaves_no_metric_series(client: TestClient,
                                                                       monkeypatch: pytest.MonkeyPatch):
    """The queue deleted while /start awaited (a SubjectAccessReview, a slot claim): its series had
    gone with it, and the start made it again, for good."""
    from workerqueue_operator.api import callers
    from workerqueue_operator.api.keys import STORE

    authorize = callers.authorize

    async def deleted_meanwhile(request: web.Request, *args: object, **kwargs: object) -> web.Response | None:
        allowed = await authorize(request, *args, **kwargs)  # type: ignore[arg-type]
        request.app[STORE].remove_queue(("team-a", "q1"))  # while the review was awaited
        return allowed

    monkeypatch.setattr(callers, "authorize", deleted_meanwhile)
    r = await client.post(START.format("q-1"), headers=AUTH)
    assert r.status == 200, await r.text()
    assert 'queue="q1"' not in await (await client.get("/metrics")).text()


async def test_a_queue_suspended_while_a_slot_was_claimed_gets_no_worker(monkeypatch: pytest.MonkeyPatch):
    """The claim waits for the API server (seconds, at worst): a queue suspended meanwhile was answered
    200, and its new worker ran on while the pool drained."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("capped", queueId="q-capped", maxWorkers=1))
    store.upsert_secret(("team-a", "capped-worker-token"), {"token": "capped-token"})
    async with TestClient(TestServer(apps.make_app(store))) as c:
        registry = c.server.app[REGISTRY]

        async def suspended_meanwhile(queue_: Any, worker_id: str, **kwargs: Any) -> Any:
            store.upsert_queue(queue("capped", queueId="q-capped", maxWorkers=1, suspend=True))
            return registry.register(queue_, worker_id)  # as a claim that got its slot

        monkeypatch.setattr(registry, "claim", suspended_meanwhile)
        answer = await c.post(START.format("q-capped"), headers={"Authorization": "Bearer capped-token"})
        assert answer.status == 400
        assert await answer.json() == {"detail": "Worker queue is not active (status: suspended)"}
        assert registry.live(("team-a", "capped")) == []


def _q1() -> Store:
    """A store holding queue `q1` (`q-1`) and its token Secret, `queue-token`."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "queue-token"})
    return store


async def test_a_queue_set_for_deletion_while_an_identitys_registration_was_written_gets_no_worker(
        monkeypatch: pytest.MonkeyPatch):
    """A Kubernetes identity's registration is written before the answer (another replica may be asked
    for it at once), which waits for the API server: a queue suspended or set for deletion meanwhile
    was answered 200 all the same."""
    store = _q1()
    async with TestClient(TestServer(apps.make_app(store, reviewer=apps.Allowed()))) as c:
        registry = c.server.app[REGISTRY]
        sa = {"Authorization": f"Bearer {SA_TOKEN}"}
        assert (await c.post(START.format("q-1"), headers=sa)).status == 200  # written at once: not waited for
        assert len(registry.live(("team-a", "q1"))) == 1

        going = queue_body("q1", queueId="q-1")
        going["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"  # someone's finalizer holds it

        async def deleted_meanwhile(worker: Any) -> None:
            store.upsert_queue(queues.QueueObject.from_body(going))

        monkeypatch.setattr(registry, "write_now", deleted_meanwhile)
        answer = await c.post(START.format("q-1"), headers=sa)
        assert answer.status == 400
        assert await answer.json() == {"detail": "Worker queue is not active (status: deleting)"}
        assert len(registry.live(("team-a", "q1"))) == 1  # the first one's only


async def test_a_disconnect_whose_worker_ended_during_its_access_review_ends_nothing_twice(
        monkeypatch: pytest.MonkeyPatch):
    """Two disconnects of one worker (a worker retrying one that timed out) whose reviews overlap:
    the second, let in after the first had ended the worker, ended it again, a second Event and a
    second deletion of its Lease."""
    class Gated(apps.Allowed):
        def __init__(self) -> None:
            self.gate: asyncio.Event | None = None

        async def may(self, identity: reviews.Identity, token_digest: bytes, namespace: str, name: str, *,
                      verb: str = "create", subresource: str = "start", peer: str = "") -> bool:
            if self.gate is not None:
                await self.gate.wait()
            return True

    store = _q1()
    reviewer = Gated()
    async with TestClient(TestServer(apps.make_app(store, reviewer=reviewer))) as c:
        registry = c.server.app[REGISTRY]
        ended: list[str] = []
        monkeypatch.setattr(registry, "_post_disconnected", lambda involved, worker_id, *_: ended.append(worker_id))
        sa = {"Authorization": f"Bearer {SA_TOKEN}"}
        started = await c.post(START.format("q-1"), headers=sa)
        worker_id = (await started.json())["worker_id"]
        reviewer.gate = asyncio.Event()
        path = f"/api/v1/workers/{worker_id}/disconnect"
        both = [asyncio.create_task(c.post(path, json={"reason": "shutdown"}, headers=sa)) for _ in range(2)]
        await asyncio.sleep(0.2)  # both under review
        reviewer.gate.set()
        answers = await asyncio.gather(*both)
        assert sorted(a.status for a in answers) == [200, 404]
        assert (await c.post(path, json={"reason": "shutdown"}, headers=sa)).status == 404  # as one made after
        assert ended == [worker_id]


async def test_only_a_jwt_shaped_token_is_sent_to_a_token_review():
    """Any other unknown token (a queue token rotated out, an organization's key) reached the API
    server, its audit log and webhook authenticators, for nothing: it is refused unreviewed."""
    class Counting(apps.NoReviews):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[str] = []

        async def authenticate(self, token: str, token_digest: bytes, *, peer: str = "") -> reviews.Identity | None:
            self.asked.append(token)
            return None

    store = _q1()
    reviewer = Counting()
    async with TestClient(TestServer(apps.make_app(store, reviewer=reviewer))) as c:
        for token in ("rotated-out-queue-token", "eyJhbGciOiJSUzI1NiJ9", "eyJ.a.b.c", SA_TOKEN):
            answer = await c.post(START.format("q-1"), headers={"Authorization": f"Bearer {token}"})
            assert answer.status == 401
            assert await answer.json() == {"detail": "Invalid authentication credentials"}
    assert reviewer.asked == [SA_TOKEN]
    assert reviewer.outcomes["not_a_jwt"] == 3


WORKER_TOKEN = "wqw1_made-for-q1-w0"


async def test_a_pod_token_whose_secret_is_on_its_way_is_awaited_not_refused():
    # The pod's worker calls /start before this replica's Secret watch brought its token: a 401 would
    # make the worker exit 1, and its pod count as a crash.
    store = store_with_pod()
    pod = {"Authorization": f"Bearer {WORKER_TOKEN}"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        started = asyncio.create_task(c.post(START.format("q-1"), headers=pod))
        await asyncio.sleep(0.5)
        assert not started.done()
        store.upsert_worker_credential(("team-a", "q1-w0-token"), WorkerCredential(("team-a", "q1"), "q1-w0", UID),
                                       WORKER_TOKEN)
        answer = await started
        assert answer.status == 200, await answer.text()
        worker_id = (await answer.json())["worker_id"]
        beat = await c.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"}, headers=pod)
        assert beat.status == 200  # the pod's own worker, not a queue-token caller
        assert c.server.app[UNSEEN].waited == 1


async def test_a_pods_worker_whose_queue_this_replica_has_not_seen_is_awaited_then_refused_as_such(
        monkeypatch: pytest.MonkeyPatch):
    """The pod's token known here, its queue not (this replica's queue watch behind, or relisting): a 404
    at once made the worker exit, and its pod count as a crash. Awaited as an unseen token is; still
    not there, the refusal is recorded for the pod, under the queue it was made for."""
    monkeypatch.setattr(unseen, "LAG_SECONDS", 0.5)
    store = store_with_pod()
    key = ("team-a", "q1")
    made = store.queue(key)
    assert made is not None
    store.remove_queue(key)
    pod = {"Authorization": "Bearer pod-tok"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        started = asyncio.create_task(c.post(START.format("q-1"), headers=pod))
        await asyncio.sleep(0.2)
        assert not started.done()
        store.upsert_queue(made)
        answer = await started
        assert answer.status == 200, await answer.text()
        store.remove_queue(key)
        refused = await c.post(START.format("q-1"), headers=pod)
        assert refused.status == 404
        assert c.server.app[REGISTRY].refusals.why(made, "q1-w0") == "404: Worker queue not found"
        assert c.server.app[UNSEEN].waited == 2
        # Its queue known here, another id asked for (a wrong QUEUE_ID): no lag, answered at once as before.
        store.upsert_queue(made)
        assert (await c.post(START.format("q-other"), headers=pod)).status == 404
        assert c.server.app[UNSEEN].waited == 2
        # No place left to wait in: answered at once from what is known, refused as such, no 500.
        store.remove_queue(key)
        monkeypatch.setattr(c.server.app[UNSEEN], "_max_waiting", 0)
        crowded = await c.post(START.format("q-1"), headers=pod)
        assert crowded.status == 404 and await crowded.json() == {"detail": "Worker queue not found"}
        assert c.server.app[UNSEEN].waited == 2


async def test_a_pods_worker_whose_queue_was_made_again_is_awaited_while_this_replica_knows_the_old_one(
        monkeypatch: pytest.MonkeyPatch):
    """`kubectl replace --force`: another replica made the new queue's pod; this one's queue watch still
    holds the deleted namesake (another uid). Answered at once, the worker was refused for good, its
    pod counted as a crash: it is the watch's lag, awaited as for a queue not seen at all."""
    monkeypatch.setattr(unseen, "LAG_SECONDS", 2.0)
    store = store_with_pod()  # the pod's token made for the queue of uid UID
    made = store.queue(("team-a", "q1"))
    assert made is not None and made.uid == UID
    store.upsert_queue(queue("q1", queueId="q-1", uid="uid-of-the-deleted-one"))
    pod = {"Authorization": "Bearer pod-tok"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        started = asyncio.create_task(c.post(START.format("q-1"), headers=pod))
        await asyncio.sleep(0.3)
        assert not started.done()
        store.upsert_queue(made)  # the watch catches up
        answer = await started
        assert answer.status == 200, await answer.text()
        assert c.server.app[UNSEEN].waited == 1


async def test_a_pod_token_still_unseen_is_refused_while_the_secret_watch_is_well(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(unseen, "LAG_SECONDS", 0.3)
    store = store_with_pod()

    class Counted(apps.NoReviews):
        async def authenticate(self, token: str, token_digest: bytes, *, peer: str = "") -> reviews.Identity | None:
            self.asked = getattr(self, "asked", 0) + 1
            return None

    reviewer = Counted()
    async with TestClient(TestServer(apps.make_app(store, reviewer=reviewer))) as c:
        answer = await c.post(START.format("q-1"), headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
        assert answer.status == 401
        assert getattr(reviewer, "asked", 0) == 0  # the operator's mark is no Kubernetes token: no review
        # Only the operator's mark is awaited: any other unknown token is reviewed and refused at once.
        assert (await c.post(START.format("q-1"), headers={"Authorization": f"Bearer {SA_TOKEN}"})).status == 401
        assert c.server.app[UNSEEN].waited == 1 and reviewer.asked == 1


async def test_a_pod_token_still_unseen_while_the_secret_watch_is_down_is_a_503(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(unseen, "DOWN_SECONDS", 0.5)
    watch_up = False
    store = store_with_pod()
    async with TestClient(TestServer(apps.make_app(store, secrets_current=lambda: watch_up))) as c:
        answer = await c.post(START.format("q-1"), headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
        assert answer.status == 503
        assert answer.headers["Retry-After"] == "1"
        assert await answer.json() == {"detail": "Worker credentials are being loaded, try again"}
        # The watch comes back within the wait, its relist without the token: the token is wrong.
        started = asyncio.create_task(c.post(START.format("q-1"), headers={"Authorization": f"Bearer {WORKER_TOKEN}"}))
        await asyncio.sleep(0.2)
        watch_up = True
        assert (await started).status == 401


async def test_a_running_workers_call_with_an_unseen_token_is_answered_within_its_own_timeout(
        monkeypatch: pytest.MonkeyPatch):
    """The real worker gives a heartbeat or a disconnect 10 s, a /start 60 s: held 15 s as a /start
    is, the call timed out at the worker rather than getting its 503 (a disconnect was lost)."""
    monkeypatch.setattr(unseen, "DOWN_SECONDS", 30.0)
    monkeypatch.setattr(unseen, "CALL_DOWN_SECONDS", 0.5)
    store = store_with_pod()
    async with TestClient(TestServer(apps.make_app(store, secrets_current=lambda: False))) as c:
        began = time.monotonic()
        answer = await c.post("/api/v1/workers/w-1/heartbeat", headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
                              json={"status": "active"})
        assert answer.status == 503 and time.monotonic() - began < 5
        start = asyncio.create_task(c.post(START.format("q-1"), headers={"Authorization": f"Bearer {WORKER_TOKEN}"}))
        await asyncio.sleep(1.0)
        assert not start.done()  # a /start is held longer
        start.cancel()


async def test_unseen_pod_tokens_wait_a_bounded_number_at_a_time(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(unseen, "MAX_WAITING", 2)
    monkeypatch.setattr(unseen, "LAG_SECONDS", 1.0)
    store = store_with_pod()
    async with TestClient(TestServer(apps.make_app(store))) as c:
        forged = [c.post(START.format("q-1"), headers={"Authorization": f"Bearer wqw1_forged{i}"}) for i in range(5)]
        answers = await asyncio.gather(*forged)
        # Two waited and were refused; three found no place to wait: not known to be wrong, a 503.
        assert sorted(a.status for a in answers) == [401, 401, 503, 503, 503]
        crowded = next(a for a in answers if a.status == 503)
        assert crowded.headers["Retry-After"] == "1"
        assert await crowded.json() == {"detail": "Too many worker credentials are awaited, try again"}
        assert c.server.app[UNSEEN].waited == 2


async def test_one_address_cannot_take_every_place_to_wait_for_an_unseen_token(monkeypatch: pytest.MonkeyPatch):
    """Forged tokens with the operator's mark from one client kept every place taken: while the
    Secret watch lagged, the real pods' /start then got an instant 401, and their pods failed."""
    monkeypatch.setattr(unseen, "MAX_WAITING", 4)
    monkeypatch.setattr(unseen, "MAX_WAITING_PER_PEER", 2)
    monkeypatch.setattr(unseen, "LAG_SECONDS", 0.5)
    tokens = unseen.UnseenTokens(lambda: True)

    def nothing() -> None:  # never found
        return None

    async def waited(peer: str) -> str:
        try:
            return "waited" if await tokens.until(nothing, peer=peer) is None else "found"
        except unseen.Crowded:
            return "crowded"

    flood = [asyncio.create_task(waited("10.0.0.9")) for _ in range(5)]
    await asyncio.sleep(0)
    assert tokens.waiting == 2  # half the places taken, by one address: the other three answered at once
    pods = [asyncio.create_task(waited(f"10.0.0.{i}")) for i in range(3)]
    await asyncio.sleep(0)
    assert tokens.waiting == 4  # other addresses still wait, up to the bound on all
    assert await asyncio.gather(*flood, *pods) == ["waited"] * 2 + ["crowded"] * 3 + ["waited"] * 2 + ["crowded"]
    assert tokens.waiting == 0 and tokens._by_peer == {}
    # Behind a proxy every pod is one address: up to half the places, as many as come.
    shared = [asyncio.create_task(waited("127.0.0.6")) for _ in range(3)]
    await asyncio.sleep(0)
    assert tokens.waiting == 2 and await asyncio.gather(*shared) == ["waited"] * 2 + ["crowded"]


async def test_a_registrations_hostname_is_bounded_in_memory_and_in_its_lease(client: TestClient):
    # system_info is bounded to 4 KiB; its hostname must be too, or a 1-MB one per /start costs a MB
    # of memory per registration and makes a Lease the API server refuses (annotations: 256 KiB).
    from workerqueue_operator.core import leases

    started = await client.post(START.format("q-1"), json={"system_info": {"hostname": "h" * 1_000_000}},
                                headers=AUTH)
    assert started.status == 200
    worker = client.server.app[REGISTRY].get((await started.json())["worker_id"])
    assert worker is not None and worker.hostname == "h" * 253
    annotations = leases.lease_body(worker, queue_name="q1")["metadata"]["annotations"]
    assert len(json.dumps(annotations)) < 16 * 1024
    real = await client.post(START.format("q-1"), json={"system_info": {"hostname": "q1-w0"}}, headers=AUTH)
    assert client.server.app[REGISTRY].get((await real.json())["worker_id"]).hostname == "q1-w0"


async def test_a_start_whose_slot_claim_failed_leaves_no_registration_to_come_back():
    # The API server may have made the slot Lease though its answer never came: /start tells the
    # registry, which deletes that Lease when its watch shows it (test_registry.py), so that a Lease
    # nobody renews does not keep other workers out of the slot.
    store = Store(settings=Settings())
    store.upsert_queue(queue("capped", queueId="q-capped", maxWorkers=1))
    store.upsert_secret(("team-a", "capped-worker-token"), {"token": "capped-token"})
    async with TestClient(TestServer(apps.make_app(store))) as c:  # an API server nobody answers for
        answer = await c.post(START.format("q-capped"), headers={"Authorization": "Bearer capped-token"})
        assert answer.status == 503
        ended = c.server.app[REGISTRY]._ended
        assert len(ended) == 1 and next(iter(ended.values())).on_purpose


def test_a_token_bound_to_a_pod_registers_as_that_pods():
    extra = (("authentication.kubernetes.io/pod-name", ("run-a",)), ("authentication.kubernetes.io/pod-uid", ("u-1",)))
    bound = reviews.Identity(username="system:serviceaccount:team-a:runner", uid="u", groups=(), extra=extra)
    unbound = dataclasses.replace(bound, extra=())
    assert bound.pod_uid == "u-1" and unbound.pod_uid is None
    assert unbound.registrant == "system:serviceaccount:team-a:runner"
    assert bound.registrant != unbound.registrant
    assert bound.registrant != dataclasses.replace(bound, extra=(("authentication.kubernetes.io/pod-uid", ("u-2",)),)
                                                   ).registrant


async def test_an_identitys_executions_wait_for_no_registration_the_api_server_cannot_be_asked_about(
        caplog: pytest.LogCaptureFixture):
    # A Kubernetes identity with no registration known here may have one another replica wrote: the
    # API server is asked (test_worker_life.py); unreachable, that is a 503, never the whole queue,
    # which a worker of that identity would take for its own.
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))

    async with TestClient(TestServer(apps.make_app(store, reviewer=apps.Allowed()))) as c:
        with caplog.at_level(logging.INFO):
            for _ in range(5):
                listed = await c.get("/api/v1/worker-queues/q-1/executions?limit=5&status=all",
                                     headers={"Authorization": f"Bearer {SA_TOKEN}"})
                assert listed.status == 503
                assert (await listed.json())["detail"].startswith("The worker registry is temporarily unavailable")
        # An outage meets every call at once: one line, each counted.
        assert len([r for r in caplog.records if "registering a worker of team-a/q1 failed" in r.getMessage()]) == 1
        metrics = await (await c.get("/metrics")).text()
        assert 'workerqueue_http_problems_total{kind="registry_unavailable"} 5' in metrics


async def test_a_disconnect_reaching_a_replica_that_has_not_seen_the_worker_ends_it_there_too():
    """Two replicas behind one Service: started on A, its disconnect reaches B, whose watch has not
    brought the registration. It was 404 and B kept no end: the Lease, once B saw it, was a live
    worker there. Now B ends it as a disconnect; an id the queue never issued is still unknown."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "good"})
    auth = {"Authorization": "Bearer good"}
    async with TestClient(TestServer(apps.make_app(store))) as a, TestClient(TestServer(apps.make_app(store))) as b:
        worker_id = (await (await a.post(START.format("q-1"), headers=auth)).json())["worker_id"]
        bye = await b.post(f"/api/v1/workers/{worker_id}/disconnect", json={"reason": "shutdown", "exit_code": 0},
                           headers=auth)
        assert bye.status == 200 and await bye.json() == {"status": "disconnected", "worker_id": worker_id}
        registry = b.server.app[REGISTRY]
        assert not registry.may_rejoin(store.serving("q-1").queue, worker_id)  # ended on purpose
        beat = await b.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "idle"}, headers=auth)
        assert beat.status == 404  # a late heartbeat brings it back nowhere
        made_up = "00000000-0000-4000-8000-000000000000"
        unknown = await b.post(f"/api/v1/workers/{made_up}/disconnect", json={"reason": "x"}, headers=auth)
        assert unknown.status == 404 and await unknown.json() == {"detail": "Worker not found"}


async def test_a_disconnect_ends_a_registration_past_its_lease_that_is_not_ended_yet():
    """Its heartbeat would renew it (expired=True); its disconnect was 404 and left it to the sweep,
    which took it for an expiry (a Warning, and the worker free to come back)."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "good"})
    auth = {"Authorization": "Bearer good"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        worker_id = (await (await c.post(START.format("q-1"), headers=auth)).json())["worker_id"]
        registry = c.server.app[REGISTRY]
        worker = registry.get(worker_id)
        assert worker is not None
        registry._clock = lambda: worker.expires_at() + 1.0  # past its lease; the sweep not run yet
        assert registry.get(worker_id) is None and registry.get(worker_id, expired=True) is worker
        bye = await c.post(f"/api/v1/workers/{worker_id}/disconnect", json={"reason": "shutdown"}, headers=auth)
        assert bye.status == 200, await bye.text()
        assert registry.get(worker_id, expired=True) is None
        assert not registry.may_rejoin(store.serving("q-1").queue, worker_id)


async def test_a_heartbeat_or_disconnect_past_the_bounds_is_kept_cut_not_refused(client: TestClient):
    """The reference takes any string or integer there: a heartbeat refused with 422 renewed nothing,
    and its worker (which only logs the refusal) expired while it ran."""
    worker_id = (await (await client.post(START.format("q-1"), headers=AUTH)).json())["worker_id"]
    beat = await client.post(f"/api/v1/workers/{worker_id}/heartbeat", headers=AUTH, json={
        "status": "s" * 100, "tasks_processed": -1, "current_task_id": "t" * 300})
    assert beat.status == 200, await beat.text()
    worker = client.server.app[REGISTRY].get(worker_id)
    assert worker is not None
    assert (worker.status, worker.tasks_processed, worker.current_task_id) == ("s" * 64, 0, "t" * 256)
    bye = await client.post(f"/api/v1/workers/{worker_id}/disconnect", headers=AUTH,
                            json={"reason": "r" * 300, "exit_code": 2**32})
    assert bye.status == 200, await bye.text()


async def test_a_disconnect_of_a_namesake_queues_worker_stays_unknown():
    """Queue q1 deleted and made again with the same token Secret: its old worker, still registered
    here until its Lease's deletion is seen, is no worker of the new queue. Its disconnect was taken
    for one the other replica registered, and failed with a 500 (ValueError)."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1", uid="uid-old"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "good"})
    auth = {"Authorization": "Bearer good"}
    async with TestClient(TestServer(apps.make_app(store))) as c:
        worker_id = (await (await c.post(START.format("q-1"), headers=auth)).json())["worker_id"]
        store.upsert_queue(queue("q1", queueId="q-1", uid="uid-new"))
        store.upsert_secret(("team-a", "q1-worker-token"), {"token": "good"})  # the same token, the new queue's
        assert (await c.post(START.format("q-1"), headers=auth)).status == 200
        bye = await c.post(f"/api/v1/workers/{worker_id}/disconnect", json={"reason": "shutdown"}, headers=auth)
        assert bye.status == 404 and await bye.json() == {"detail": "Worker not found"}


async def test_a_call_refused_for_its_token_is_noted_on_its_worker_only_with_the_token_it_was_issued_with(
        client: TestClient, monkeypatch: pytest.MonkeyPatch):
    worker_id = (await (await client.post(START.format("q-1"), json={}, headers=AUTH)).json())["worker_id"]
    beat = await client.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "active"},
                             headers={"Authorization": "Bearer someone-elses-made-up-token"})
    assert beat.status == 401
    assert not client.app[REGISTRY].get(worker_id).token_refused  # proves nothing about the worker
    store = client.app[STORE]
    monkeypatch.setattr(store, "is_queue_token", lambda digest: False)  # the queue token revoked
    beat = await client.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "active"}, headers=AUTH)
    assert beat.status == 401
    assert client.app[REGISTRY].get(worker_id).token_refused
    monkeypatch.undo()  # restored
    assert (await client.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "active"},
                              headers=AUTH)).status == 200
    assert not client.app[REGISTRY].get(worker_id).token_refused


async def test_counters_are_shown_from_0_for_every_kind_and_known_queue():
    """Shown only from their first increment, an alert on `increase()` missed each first incident."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))
    async with TestClient(TestServer(apps.make_app(store))) as c:
        text = await (await c.get("/metrics")).text()
        assert 'workerqueue_workers_started_total{namespace="team-a",queue="q1"} 0' in text
        store.upsert_queue(queue("q2", queueId="q-2"))  # known later
        text = await (await c.get("/metrics")).text()
    assert 'workerqueue_workers_started_total{namespace="team-a",queue="q2"} 0' in text
    for kind in ("unhandled_error", "registry_unavailable", "bad_request"):
        assert f'workerqueue_http_problems_total{{kind="{kind}"}} 0' in text


async def test_queues_whose_spec_cannot_be_taken_count_as_queues_and_as_not_ready():
    """SpecInvalid queues are held by no Store: they were missing from both gauges."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    async with TestClient(TestServer(apps.make_app(store, invalid_count=lambda: 2))) as c:
        text = await (await c.get("/metrics")).text()
    assert "workerqueue_queues 3\n" in text and "workerqueue_queues_not_ready 2\n" in text


async def test_the_token_of_a_queue_whose_id_another_holds_is_told_so_not_taken_for_a_wrong_one():
    """The same manifest applied in two namespaces: the later queue's token was a 401 "Invalid
    authentication credentials" (after a TokenReview), which sent its owner checking the token."""
    store = Store(settings=Settings())
    store.upsert_queue(queue("agents", "team-a", queueId="q-1", created="2026-01-01T00:00:00Z"))
    store.upsert_secret(("team-a", "agents-worker-token"), {"token": "first"})
    store.upsert_queue(queue("agents", "team-b", queueId="q-1", created="2026-02-01T00:00:00Z"))
    store.upsert_secret(("team-b", "agents-worker-token"), {"token": "second"})
    async with TestClient(TestServer(apps.make_app(store))) as c:
        refused = await c.post("/api/v1/worker-queues/q-1/start", headers={"Authorization": "Bearer second"})
        assert (refused.status, await refused.json()) == (409, {
            "detail": "WorkerQueue team-b/agents is not served: its queue id q-1 is held by a WorkerQueue in "
                      "another namespace"})
        beat = await c.post("/api/v1/workers/w-1/heartbeat", json={"status": "active"},
                            headers={"Authorization": "Bearer second"})
        assert beat.status == 409
        served = await c.post("/api/v1/worker-queues/q-1/start", headers={"Authorization": "Bearer first"})
        assert served.status == 200


async def test_a_kubernetes_identity_acts_only_for_the_workers_it_registered_rotation_or_not():
    # Who each token is comes from TokenReview (stubbed: tests/integration/test_worker_life.py asks the
    # real API server). Two pods of one ServiceAccount, each with a token bound to it: each may start
    # workers on the queue, and heartbeat or end its own worker only. Its worker, expired and come
    # back, is known by its registration, not by a queue token a rotation has unlisted since.
    def bound(pod: str) -> reviews.Identity:
        extra = (("authentication.kubernetes.io/pod-name", (pod,)), ("authentication.kubernetes.io/pod-uid", (pod,)))
        return reviews.Identity(username="system:serviceaccount:team-a:runner", uid="u", groups=(), extra=extra)

    class Pods(apps.NoReviews):
        async def authenticate(self, token: str, token_digest: bytes, *, peer: str = "") -> reviews.Identity | None:
            return bound(token.split(".")[1]) if token.startswith("eyJ") else None

        async def may(self, identity: reviews.Identity, token_digest: bytes, namespace: str, name: str, *,
                      verb: str = "create", subresource: str = "start", peer: str = "") -> bool:
            return True

    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def sa(pod: str) -> str:  # a token bound to the pod, shaped as a JWT (only such tokens are reviewed)
        return f"eyJhbGciOiJSUzI1NiJ9.{pod}.c2ln"

    store = Store(settings=Settings())
    refs = [{"name": "old", "key": "token"}, {"name": "new", "key": "token"}]
    store.upsert_queue(queue("q1", queueId="q-1", auth={"tokenSecretRefs": refs}))
    store.upsert_secret(("team-a", "old"), {"token": "old-token"})
    store.upsert_secret(("team-a", "new"), {"token": "new-token"})
    async with TestClient(TestServer(apps.make_app(store, reviewer=Pods()))) as c:
        registry = c.server.app[REGISTRY]
        started = await c.post(START.format("q-1"), headers=auth(sa("p2")), json={"system_info": {"hostname": "p2"}})
        worker_id = (await started.json())["worker_id"]
        for route in ("heartbeat", "disconnect"):
            other = await c.post(f"/api/v1/workers/{worker_id}/{route}", json={"status": "busy"},
                                 headers=auth(sa("p1")))
            assert other.status == 403
            assert await other.json() == {"detail": "This worker was registered by another identity"}
        # Expired (its pace slower than expected, say), then the old queue token unlisted.
        worker = registry.get(worker_id)
        registry._clock = lambda: worker.expires_at() + 2
        registry._sweep(ending=True)
        assert registry.get(worker_id) is None
        store.upsert_queue(queue("q1", queueId="q-1", auth={"tokenSecretRefs": refs[1:]}))
        other = await c.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"}, headers=auth(sa("p1")))
        assert other.status == 404  # not its registration to bring back
        own = await c.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy"}, headers=auth(sa("p2")))
        assert own.status == 200, await own.text()
        assert registry.get(worker_id).identity == bound("p2").registrant
