"""The HTTP API over a Store fed directly: request parsing, error shapes, the response (no cluster)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.unit import apps
from tests.unit.factories import queue
from workerqueue_operator.core.store import Store
from workerqueue_operator.models.settings import Settings

START = "/api/v1/worker-queues/{}/start"
AUTH = {"Authorization": "Bearer good-token"}


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    store = Store(settings=Settings(), version="9.9.9")
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
    assert body["control_plane_sdk_version"] == "9.9.9"
    assert len(body["worker_id"]) == 36


async def test_worker_ids_are_fresh_per_call(client: TestClient):
    ids = {(await (await client.post(START.format("q-1"), headers=AUTH)).json())["worker_id"] for _ in range(3)}
    assert len(ids) == 3


async def test_control_plane_url_falls_back_to_the_request(client: TestClient):
    body = await (await client.post(START.format("q-1"), headers=AUTH)).json()
    assert body["control_plane_url"] == f"http://{client.host}:{client.port}"


@pytest.mark.parametrize("payload", [b"", b"null", b"{}", b'{"unknown": 1}'])
async def test_empty_and_unknown_bodies_mean_defaults(client: TestClient, payload: bytes):
    r = await client.post(START.format("q-1"), data=payload, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == 200


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
    assert "workerqueue_queues_not_ready 2" in text


async def test_openapi_names_the_contract_operation(client: TestClient):
    doc = await (await client.get("/openapi.json")).json()
    op = doc["paths"]["/api/v1/worker-queues/{queue_id}/start"]["post"]
    assert op["operationId"] == "start_worker_for_queue_api_v1_worker_queues__queue_id__start_post"
    schemas = doc["components"]["schemas"]
    assert {"WorkerStartResponse", "HTTPValidationError", "ValidationError", "WorkerSystemInfo",
            "control_plane_api__app__routers__worker_queues__WorkerStartRequest"} <= set(schemas)
