"""The pass-through over a Store fed directly, against the stand-in upstream in the same loop (no cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from yarl import URL

from tests import standin
from tests.unit import apps
from tests.unit.factories import UID, queue
from workerqueue_operator.api import passthrough
from workerqueue_operator.api import serving as serving_
from workerqueue_operator.core import queues, reviews
from workerqueue_operator.core.store import Store, WorkerCredential
from workerqueue_operator.models.settings import Settings

WS_A = f"/api/v1/ws/workers/{queues.new_worker_id(queues.digest('tok-a'))}"
"""The websocket /start names for a worker that started with tok-a."""

ORG_KEY = "org-key-A"
UPSTREAM_FAILED = re.compile(r"^workerqueue_upstream_failures_total\{[^}]*\} [1-9]", re.MULTILINE)
"""A failure counted (every kind is shown from 0)."""


# --- pure parts ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "expected"), [
    ("Bearer tok", ("Bearer", "tok")),
    ("bearer  tok ", ("bearer", "tok")),
    ("UserKey tok", ("UserKey", "tok")),
    ("userkey tok", ("userkey", "tok")),
    ("Basic dXNlcjpwdw==", None),
    ("Bearer", None),
    ("", None),
    ("Bearer \udce9", None),  # a non-ASCII byte, as aiohttp decodes it: never hashed (it would raise)
    ("UserKey caf\u00e9", None),
])
def test_worker_credential(header: str, expected: tuple[str, str] | None):
    assert passthrough.worker_credential(header) == expected


@pytest.mark.parametrize("cause", [
    aiohttp.ConnectionTimeoutError("Connection timeout to host http://up.example/api/v1/ws/workers/w1?token=SECRET"),
    aiohttp.ClientResponseError(aiohttp.RequestInfo(URL("http://up.example/api/v1/x?api_key=SECRET"), "GET", {},
                                                    URL("http://up.example/api/v1/x?api_key=SECRET")),
                                (), status=400, message="Bad Header: SECRET"),
    aiohttp.ClientConnectorError(aiohttp.client_reqrep.ConnectionKey("up.example", 80, False, True, None, None, None),
                                 ConnectionRefusedError(111, "Connection refused")),
])
def test_a_failure_is_logged_without_the_url_or_what_the_upstream_sent(
        cause: BaseException, caplog: pytest.LogCaptureFixture):
    # aiohttp's texts quote the whole URL, query included (a websocket's token may be in it), and the
    # upstream's malformed header line.
    passthrough._Reporter().failure("http://up.example", "unreachable", cause)
    assert caplog.records and "SECRET" not in caplog.text
    assert type(cause).__name__ in caplog.text


def test_failure_reports_forget_quiet_upstreams_past_their_bound(caplog: pytest.LogCaptureFixture):
    """Upstreams come and go with queues: the reports keep a bounded memory of them, and failures
    counted for one that is forgotten are still reported."""
    now = [0.0]
    reporter = passthrough._Reporter(kept=3, clock=lambda: now[0])
    cause = ConnectionRefusedError(111, "Connection refused")
    reporter.failure("http://a.example", "unreachable", cause)
    reporter.failure("http://a.example", "unreachable", cause)  # within the minute: counted
    for i in range(100):
        now[0] += 1.0
        reporter.failure(f"http://up-{i}.example", "unreachable", cause)
    assert len(reporter._last) <= 3 + 60  # those of the last minute, and no more than it
    assert "http://a.example unreachable: 1 more failures since the last report" in caplog.text
    # One reported within the minute is still remembered: its next failure is counted, not logged.
    caplog.clear()
    reporter.failure("http://up-99.example", "unreachable", cause)
    assert "up-99" not in caplog.text


def test_request_headers_drop_hop_by_hop_and_replace_the_credential():
    incoming = [("Host", "operator:8080"), ("Authorization", "Bearer worker-token"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("TE", "trailers"),
                ("Proxy-Authorization", "Basic x"), ("Upgrade", "h2c"), ("Expect", "100-continue"),
                ("Content-Type", "application/json"), ("Content-Length", "12"), ("Accept", "text/event-stream"),
                ("X-Custom", "a"), ("X-Custom", "b"), ("X-Forwarded-For", "10.0.0.1"), ("Cookie", "s=1"),
                ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "evil.example"), ("Forwarded", "host=x"),
                ("X-Real-IP", "1.2.3.4"),
                # Another path or method, honoured by some upstreams and intermediaries; a made-up client address.
                ("X-Original-URL", "/admin"), ("X-Rewrite-URL", "/admin"), ("X-HTTP-Method-Override", "DELETE"),
                ("X-Method-Override", "DELETE"), ("X-Forwarded-Prefix", "/x"), ("X-Forwarded-Port", "1"),
                ("True-Client-IP", "1.2.3.4"), ("x-client-ip", "1.2.3.4")]
    out = passthrough.request_headers(incoming, authorization="UserKey org", remote="10.0.0.2", proto="https")
    assert out.getall("Authorization") == ["UserKey org"]
    assert list(out.items()) == [
        ("Content-Type", "application/json"), ("Content-Length", "12"), ("Accept", "text/event-stream"),
        ("X-Custom", "a"), ("X-Custom", "b"), ("X-Forwarded-For", "10.0.0.1, 10.0.0.2"),
        ("Authorization", "UserKey org"), ("Accept-Encoding", "identity"), ("X-Forwarded-Proto", "https")]


def test_response_headers_drop_hop_by_hop_ones_and_cookies():
    incoming = [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked"),
                ("Connection", "close, X-Hop"), ("X-Hop", "1"),  # named by Connection: this hop's only
                ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Encoding", "gzip")]
    assert list(passthrough.response_headers(incoming, upstream_url="https://cp.example").items()) == [
        ("Content-Type", "text/event-stream"), ("Content-Encoding", "gzip")]


@pytest.mark.parametrize(("location", "expected"), [
    ("https://cp.example/base/api/v1/executions/e2?x=1", "/api/v1/executions/e2?x=1"),
    ("https://cp.example/elsewhere", "https://cp.example/elsewhere"),
    ("https://other.example/base/api/v1/x", "https://other.example/base/api/v1/x"),
    ("/api/v1/x", "/api/v1/x"),
    ("HTTPS://CP.example:443/base/api/v1/y", "/api/v1/y"),  # the same origin, as URLs compare
    ("/base/api/v1/z?q=%2F#f", "/api/v1/z?q=%2F#f"),  # path-only: the upstream's own path
    ("http://cp.example/base/api/v1/x", "http://cp.example/base/api/v1/x"),  # another scheme
    ("https://cp.example/basement/x", "https://cp.example/basement/x"),
    ("next", "next"),
    ("http://cp.example:99999/x", "http://cp.example:99999/x"),  # no URL at all: as it came, not a 500
])
def test_redirects_into_the_upstream_stay_with_the_operator(location: str, expected: str):
    out = passthrough.response_headers([("Location", location)], upstream_url="https://cp.example/base")
    assert out["Location"] == expected


@pytest.mark.parametrize(("base", "raw", "expected"), [
    ("https://cp.example", "/api/v1/executions/e1?x=1&x=2", "https://cp.example/api/v1/executions/e1?x=1&x=2"),
    ("https://cp.example/prefix/", "/api/v1/a%2Fb?q=%20", "https://cp.example/prefix/api/v1/a%2Fb?q=%20"),
])
def test_target_url_keeps_the_path_and_query_as_sent(base: str, raw: str, expected: str):
    assert str(passthrough.target_url(base, raw)) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("/api/v1/executions/e1?x=1", True),
    ("/api/v1/a%2Fb?next=../..", True),  # a query is no path
    ("/api/v1/x..y/z.", True),
    ("evil://x/api/v1/executions/e1", False),  # absolute-form: appended whole, it would change the host
    ("http://cp.example/api/v1/x", False),
    ("//other.example/api/v1/x", False),
    ("/api/v1/../../admin", False),
    ("/api/v1/%2e%2e/%2E%2E/admin", False),
    ("/api/v1/./x", False),
    ("/api/v1/%2e%2e%2f%2e%2e%2fadmin", False),  # `../../admin` once decoded
    ("/api/v1/%2E%2E%5Cadmin", False),  # a backslash: a separator to some servers
    ("/api/v1/..\\admin", False),
    ("/api/v1/..;/admin", False),  # `..` to servers that take `;` as a segment's parameters
    ("/api/v1/.;x/admin", False),
    ("/api/v1/%252e%252e/admin", False),  # `..` to whatever decodes twice
    ("/api/v1/%252E%252E%252Fadmin", False),
    ("/api/v1/executions/e1;v=2", True),
    ("/api/v1/a%2520b", True),
])
def test_only_a_path_without_dot_segments_is_passed_through(raw: str, expected: bool):
    assert passthrough.stays_under(raw) is expected


# --- against the stand-in upstream ---------------------------------------------------------------

@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    async with TestServer(standin.make_app()) as server:
        yield server


class OperatorLikeServer(TestServer):
    """Served as the operator serves (runner.serve_http): a handler whose client leaves is not
    cancelled, it sees the connection end. aiohttp's TestServer cancels it, which would hide how the
    pass-through meets a worker that goes away."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **{**kwargs, "handler_cancellation": False,
                                          "lingering_time": serving_.LINGERING_SECONDS})


@pytest.fixture
async def hub(upstream: TestServer) -> AsyncIterator[tuple[Store, TestClient]]:
    async with serving(upstream) as served:
        yield served


@contextlib.asynccontextmanager
async def serving(upstream: TestServer, idle: float = 1, connections: int = 100,
                  per_namespace: int = 75, connect: float = 1) -> AsyncIterator[tuple[Store, TestClient]]:
    """Queue `a` (token tok-a) has an upstream, `b` (tok-b, another namespace) another on the same
    host, `plain` (tok-p) none."""
    settings = Settings(upstream_connect_timeout_seconds=connect, upstream_idle_timeout_seconds=idle,
                        upstream_max_connections=connections, upstream_max_connections_per_namespace=per_namespace)
    store = Store(settings=settings)
    url = str(upstream.make_url("/")).rstrip("/")
    store.upsert_queue(queue("a", queueId="q-a", upstream={"url": url, "apiKeySecretRef": {"name": "org", "key": "k"}}))
    store.upsert_secret(("team-a", "a-worker-token"), {"token": "tok-a"})
    store.upsert_secret(("team-a", "org"), {"k": ORG_KEY})
    store.upsert_queue(queue("b", "team-b", queueId="q-b",
                             upstream={"url": url + "/b-prefix", "apiKeySecretRef": {"name": "org", "key": "k"}}))
    store.upsert_secret(("team-b", "b-worker-token"), {"token": "tok-b"})
    store.upsert_secret(("team-b", "org"), {"k": "org-key-B"})
    store.upsert_queue(queue("plain", queueId="q-p"))
    store.upsert_secret(("team-a", "plain-worker-token"), {"token": "tok-p"})
    app = apps.make_app(store, settings=settings)
    async with TestClient(OperatorLikeServer(app)) as client:
        yield store, client


async def echoed(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.status == 200, await response.text()
    assert response.headers["X-Stand-In"] == "yes"
    body: dict[str, Any] = await response.json()
    return body


@pytest.mark.parametrize("scheme", ["Bearer", "UserKey"])
async def test_forwards_exactly_with_the_organizations_key(hub: tuple[Store, TestClient], scheme: str):
    _, client = hub
    raw = URL(f"http://{client.host}:{client.port}/api/v1/executions/e-1?a=1&a=2&b=%2F", encoded=True)
    r = await client.session.patch(raw, data=b'{"status": "running"}',
                                   headers={"Authorization": f"{scheme} tok-a", "Content-Type": "application/json"})
    got = await echoed(r)
    assert got["method"] == "PATCH" and got["path_qs"] == "/api/v1/executions/e-1?a=1&a=2&b=%2F"
    assert got["body_length"] == 21
    assert standin.header_values(got, "Authorization") == [f"{scheme} {ORG_KEY}"]
    assert "tok-a" not in json.dumps(standin.headers(got))
    assert standin.header_values(got, "Content-Type") == ["application/json"]


async def test_upstreams_are_dialled_directly_not_through_a_proxy_of_the_environment(
        upstream: TestServer, monkeypatch: pytest.MonkeyPatch):
    """As the README says: a proxy variable meant for something else (the image's build, say) would
    send every call through it, the organization's key with them."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:1")  # nothing listens there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "")
    async with serving(upstream) as (_, client):
        r = await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-a"})
        assert (await echoed(r))["path_qs"] == "/api/v1/executions/e-1"


@pytest.mark.parametrize("query", ["", "?pad=70000", "?stream=1", "?stream=1&pad=70000", "?coding=gzip",
                                   "?coding=gzip&pad=70000&stream=1", "?coding=deflate", "?coding=deflate&raw=1",
                                   "?coding=identity,gzip", "?coding=gzip&pad=3000000"])
@pytest.mark.parametrize("scheme", ["Bearer", "UserKey"])
async def test_the_organizations_key_an_upstream_answers_with_is_the_workers_own_token(
        hub: tuple[Store, TestClient], scheme: str, query: str):
    # The Agent Control Plane answers an agent's resolved environment with the key it was called with
    # (KUBIYA_API_KEY): through the operator, the organization's, which every worker pod then held.
    _, client = hub
    got = await client.get(f"/api/v1/execution-environment/agents/a1/resolved/full{query}",
                           headers={"Authorization": f"{scheme} tok-a", "Accept-Encoding": "gzip"},
                           auto_decompress=False)
    assert got.status == 200 and "Content-Encoding" not in got.headers  # compressed all the same: read decoded
    body = await got.read()
    assert ORG_KEY.encode() not in body and ORG_KEY not in str(got.headers)
    assert json.loads(body)["resolved_env_vars"]["KUBIYA_API_KEY"] == "tok-a"
    assert got.headers["X-Called-With"] == "tok-a"
    assert "Content-Digest" not in got.headers  # the upstream's body's, not this one's


async def test_an_answer_is_asked_for_whole_and_uncompressed_and_one_in_an_unreadable_coding_is_502(
        hub: tuple[Store, TestClient]):
    # The key is found only in what is read whole: two ranges could split it, a coding hide it.
    _, client = hub
    got = await echoed(await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a", "Range": "bytes=0-9",
                                                               "If-Range": "x", "Accept-Encoding": "gzip, br"}))
    assert standin.header_values(got, "Accept-Encoding") == ["identity"]
    assert standin.header_values(got, "Range") == [] and standin.header_values(got, "If-Range") == []
    for coding, said in [("br", "a coding it was not asked for (br)"),
                         ("gzip,gzip", "a coding it was not asked for (gzip, gzip)"),
                         ("gzip&plain=1", "a body that is not the gzip it names")]:
        unread = await client.get(f"/api/v1/execution-environment/agents/a1/resolved/full?coding={coding}",
                                  headers={"Authorization": "Bearer tok-a"})
        assert unread.status == 502 and ORG_KEY not in await unread.text()
        assert (await unread.json())["detail"] == f"The upstream control plane answered in {said}"


@pytest.mark.parametrize("query", ["trail=garbage", "cut=8"])
async def test_a_compressed_answer_cut_short_or_with_bytes_past_its_end_is_broken_off(
        hub: tuple[Store, TestClient], query: str):
    # Decoded, its end is the decoder's to tell: one cut short was passed on as whole, and bytes past
    # its end piled up unread for as long as they came.
    _, client = hub
    got = await client.get(f"/api/v1/execution-environment/agents/a1/resolved/full?coding=gzip&pad=70000&{query}",
                           headers={"Authorization": "Bearer tok-a"})
    assert got.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await got.read()


async def test_the_organizations_key_an_upstream_says_over_a_websocket_is_the_workers_own_token(
        hub: tuple[Store, TestClient]):
    _, client = hub
    async with client.ws_connect(WS_A, headers={"Authorization": "Bearer tok-a"}) as ws:
        await ws.receive_str(timeout=5)  # its hello
        await ws.send_str(f'{{"key": "{ORG_KEY}"}}')  # echoed back by the stand-in, as the upstream saying it
        assert await ws.receive_str(timeout=5) == '{"key": "tok-a"}'
        await ws.send_bytes(ORG_KEY.encode())
        assert await ws.receive_bytes(timeout=5) == b"tok-a"


async def test_each_token_reaches_its_own_queues_upstream(hub: tuple[Store, TestClient]):
    _, client = hub
    got = await echoed(await client.get("/api/v1/skills/x", headers={"Authorization": "Bearer tok-b"}))
    assert got["path_qs"] == "/b-prefix/api/v1/skills/x"
    assert standin.header_values(got, "Authorization") == ["Bearer org-key-B"]


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "Bearer nobody"}, 401),
    ({"Authorization": "Basic tok-a"}, 401),
    ({"Authorization": "Bearer tok-p"}, 404),  # a queue without an upstream: nothing is served there
])
async def test_no_forwarding_without_a_token_of_a_queue_with_an_upstream(
        hub: tuple[Store, TestClient], headers: dict[str, str], status: int):
    _, client = hub
    r = await client.get("/api/v1/executions/e-1", headers=headers)
    assert r.status == status
    assert "X-Stand-In" not in r.headers
    assert "detail" in await r.json()


async def test_operator_routes_win_over_the_pass_through(hub: tuple[Store, TestClient]):
    _, client = hub
    r = await client.post("/api/v1/worker-queues/q-a/start", headers={"Authorization": "Bearer tok-a"})
    assert r.status == 200 and "X-Stand-In" not in r.headers
    assert (await r.json())["queue_id"] == "q-a"


async def test_routes_added_later_still_win(upstream: TestServer):
    store = Store(settings=Settings())
    app = apps.make_app(store, version="1")

    async def later(request: web.Request) -> web.Response:
        return web.json_response({"served": "here"})

    app.router.add_post("/api/v1/workers/{worker_id}/later", later)
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/api/v1/workers/w1/later", headers={"Authorization": "Bearer x"})
        assert await r.json() == {"served": "here"}
        # The operator's own worker routes are served, never passed through (unknown worker: its 404).
        r = await client.post("/api/v1/workers/w1/heartbeat", headers={"Authorization": "Bearer x"})
        assert r.status == 401 and await r.json() == {"detail": "Invalid authentication credentials"}


async def test_without_any_upstream_unknown_paths_stay_404():
    store = Store(settings=Settings())
    store.upsert_queue(queue("plain", queueId="q-p"))
    store.upsert_secret(("team-a", "plain-worker-token"), {"token": "tok-p"})
    app = apps.make_app(store, version="1")
    async with TestClient(TestServer(app)) as client:
        for headers in ({}, {"Authorization": "Bearer tok-p"}, {"Authorization": "Bearer nobody"}):
            r = await client.get("/api/v1/executions/e-1", headers=headers)
            assert r.status == 404 and await r.json() == {"detail": "Not Found"}


async def test_a_token_shared_by_two_queues_reaches_neither(hub: tuple[Store, TestClient]):
    store, client = hub
    store.upsert_secret(("team-b", "b-worker-token"), {"token": "tok-a"})
    r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
    assert r.status == 403 and "X-Stand-In" not in r.headers


async def test_rotated_key_is_used_from_the_next_request(hub: tuple[Store, TestClient]):
    store, client = hub
    store.upsert_secret(("team-a", "org"), {"k": "rotated"})
    got = await echoed(await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"}))
    assert standin.header_values(got, "Authorization") == ["Bearer rotated"]


async def test_missing_key_is_503_naming_the_secret_not_its_value(hub: tuple[Store, TestClient]):
    store, client = hub
    store.upsert_secret(("team-a", "org"), None)
    r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
    assert r.status == 503
    assert await r.json() == {"detail": "The worker queue's upstream is not ready: secret org not found in namespace "
                                        "team-a"}
    resolution = store.resolution(("team-a", "a"))
    assert resolution is not None and resolution.problem is not None and resolution.problem.reason == "SecretNotFound"


async def test_live_workers_keep_their_upstream_while_a_token_secret_is_missing(hub: tuple[Store, TestClient]):
    """The generated token Secret deleted (and being made anew), or a rotation listing a token Secret
    not made yet: a 404 here would fail the running executions of the queue's workers at once."""
    store, client = hub
    store.upsert_worker_credential(("team-a", "a-w0-token"), WorkerCredential(("team-a", "a"), "a-w0", UID), "pod-tok")
    store.upsert_secret(("team-a", "a-worker-token"), None)
    got = await echoed(await client.patch("/api/v1/executions/e-1", data=b"{}",
                                          headers={"Authorization": "UserKey pod-tok"}))
    assert standin.header_values(got, "Authorization") == [f"UserKey {ORG_KEY}"]
    refs = [{"name": "a-worker-token", "key": "token"}, {"name": "next", "key": "token"}]
    store.upsert_secret(("team-a", "a-worker-token"), {"token": "tok-a"})
    store.upsert_queue(queue("a", queueId="q-a", generation=2, auth={"tokenSecretRefs": refs},
                             upstream=store.queue(("team-a", "a")).spec.upstream.model_dump(by_alias=True)))
    got = await echoed(await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-a"}))
    assert standin.header_values(got, "Authorization") == [f"Bearer {ORG_KEY}"]


async def test_streamed_answer_arrives_in_pieces(hub: tuple[Store, TestClient]):
    _, client = hub
    loop = asyncio.get_running_loop()
    r = await client.get("/api/v1/executions/e-1/stream?events=3&gap=0.3", headers={"Authorization": "Bearer tok-a"})
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    arrivals = []
    async for chunk in r.content.iter_any():
        arrivals.append((loop.time(), chunk))
    assert b"".join(c for _, c in arrivals) == b"data: event 0\n\ndata: event 1\n\ndata: event 2\n\n"
    assert len(arrivals) >= 3 and arrivals[-1][0] - arrivals[0][0] >= 0.5
    # Counted, but an event stream's life is no latency; a plain answer's time is.
    await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-a"})
    text = await (await client.get("/metrics")).text()
    assert 'workerqueue_http_requests_total{route="/api/v1/{tail}",method="GET",code="200"} 2' in text
    assert 'workerqueue_http_request_duration_seconds_count{route="/api/v1/{tail}"} 1' in text


async def test_a_worker_that_goes_away_mid_stream_releases_the_upstream(hub: tuple[Store, TestClient],
                                                                         upstream: TestServer):
    _, client = hub
    path = "/api/v1/executions/e-1/stream?events=50&gap=0.1"
    r = await client.get(path, headers={"Authorization": "Bearer tok-a"})
    assert await r.content.readline() == b"data: event 0\n"
    r.close()  # the worker hangs up with 49 events to go
    received = upstream.app[standin.RECEIVED]
    for _ in range(60):  # the operator closes its side at the next event, 0.1 s away
        if ("GONE", path, None) in received:
            break
        await asyncio.sleep(0.05)
    assert ("GONE", path, None) in received


async def test_a_compressed_body_goes_on_decoded_and_whole(hub: tuple[Store, TestClient]):
    """aiohttp's server decompresses request bodies: sent on with the worker's Content-Encoding and
    Content-Length, the upstream read a gzip's length of the plain bytes (or waited for the rest)."""
    _, client = hub
    plain = json.dumps({"events": ["x" * 60] * 50}).encode()
    r = await client.post("/api/v1/executions/e-1/events", data=gzip.compress(plain),
                          headers={"Authorization": "Bearer tok-a", "Content-Encoding": "gzip",
                                   "Content-Type": "application/json"})
    got = await echoed(r)
    assert got["body_length"] == len(plain) and got["body_sha256"] == hashlib.sha256(plain).hexdigest()
    assert standin.header_values(got, "Content-Encoding") == []


async def test_a_body_in_a_coding_aiohttp_leaves_alone_goes_on_as_sent_and_says_so(hub: tuple[Store, TestClient]):
    """An unknown coding, or gzip twice: aiohttp passes the bytes as they came, and its Content-Encoding
    was dropped all the same, so the upstream read compressed bytes as plain."""
    _, client = hub
    for coding in ("x-custom", "gzip, gzip"):
        raw = gzip.compress(gzip.compress(b'{"a": 1}'))
        r = await client.post("/api/v1/executions/e-1/events", data=raw,
                              headers={"Authorization": "Bearer tok-a", "Content-Encoding": coding})
        got = await echoed(r)
        assert got["body_sha256"] == hashlib.sha256(raw).hexdigest(), coding
        assert standin.header_values(got, "Content-Encoding") == [coding]
    # Two headers: aiohttp's parser decodes by one of them (which, its C and Python parsers differ
    # on). Whichever: the body goes on decoded and without them, or as sent and with them.
    plain = b'{"a": 1}'
    for codings in (["gzip", "x-custom"], ["x-custom", "gzip"]):
        headers = CIMultiDict([("Authorization", "Bearer tok-a"), *(("Content-Encoding", c) for c in codings)])
        got = await echoed(await client.post("/api/v1/executions/e-1/events", data=gzip.compress(plain),
                                             headers=headers))
        sent = standin.header_values(got, "Content-Encoding")
        if got["body_sha256"] == hashlib.sha256(plain).hexdigest():
            assert sent == [], codings
        else:
            assert got["body_sha256"] == hashlib.sha256(gzip.compress(plain)).hexdigest() and sent, codings


async def test_cookies_pass_neither_way_and_where_it_came_from_is_the_operators_to_say(
    hub: tuple[Store, TestClient],
):
    _, client = hub
    r = await client.get("/api/v1/executions/e-1", headers={
        "Authorization": "Bearer tok-a", "Cookie": "worker=1", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example", "Forwarded": "host=evil.example"})
    got = await echoed(r)
    assert "Set-Cookie" not in r.headers  # the stand-in sets one: a session of the organization's key
    assert standin.header_values(got, "Cookie") == []
    assert standin.header_values(got, "X-Forwarded-Proto") == ["http"]
    assert standin.header_values(got, "X-Forwarded-Host") == standin.header_values(got, "Forwarded") == []


async def test_a_worker_token_in_a_userkey_header_of_its_own_never_reaches_the_upstream(
    hub: tuple[Store, TestClient],
):
    """The Agent Control Plane also takes `UserKey: <key>` as a header of its own: forwarded, a
    worker's token sent so went upstream beside the organization's key."""
    _, client = hub
    r = await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-a", "UserKey": "tok-a"})
    got = await echoed(r)
    assert standin.header_values(got, "UserKey") == []
    assert standin.header_values(got, "Authorization") != []


async def test_a_websocket_handshake_is_never_redirected(hub: tuple[Store, TestClient], upstream: TestServer):
    _, client = hub
    r = await client.get("/api/v1/ws/redirect", headers={
        "Authorization": "Bearer tok-a", "Connection": "Upgrade", "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status == 502 and "redirected the websocket (307)" in (await r.json())["detail"]
    assert [path for _, path, _ in upstream.app[standin.RECEIVED]] == ["/api/v1/ws/redirect"]
    # Counted as the 502 the worker got, and a failure to alert on (it was a 3xx, and no failure).
    text = await (await client.get("/metrics")).text()
    origin = f"http://{upstream.host}:{upstream.port}"
    assert f'workerqueue_upstream_requests_total{{upstream="{origin}",code="5xx"}} 1' in text
    assert f'workerqueue_upstream_requests_total{{upstream="{origin}",code="3xx"}}' not in text
    assert f'workerqueue_upstream_failures_total{{upstream="{origin}",kind="bad_answer"}} 1' in text


async def test_a_worker_that_leaves_mid_body_is_not_an_upstream_failure(hub: tuple[Store, TestClient]):
    _, client = hub
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /api/v1/executions/e-1/events HTTP/1.1\r\nHost: operator\r\n"
                 b"Authorization: Bearer tok-a\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    await asyncio.sleep(0.2)  # the forward has begun
    writer.close()
    text = ""
    for _ in range(40):
        text = await (await client.get("/metrics")).text()
        if 'kind="client_disconnected"' in text:
            break
        await asyncio.sleep(0.05)
    assert 'workerqueue_http_problems_total{kind="client_disconnected"} 1' in text
    assert not UPSTREAM_FAILED.search(text)


async def test_a_worker_that_leaves_before_the_answer_frees_the_upstream_connection(upstream: TestServer):
    async with serving(upstream, idle=60) as (_, client):
        _, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET /api/v1/executions/e-1/hang HTTP/1.1\r\nHost: operator\r\n"
                     b"Authorization: Bearer tok-a\r\n\r\n")
        await writer.drain()
        received = upstream.app[standin.RECEIVED]
        for _ in range(40):
            if any(path == "/api/v1/executions/e-1/hang" for _, path, _ in received):
                break
            await asyncio.sleep(0.05)
        writer.close()  # the worker gives up; the upstream is still thinking (for up to 60 s of idle timeout)
        for _ in range(100):  # the operator looks every second
            if ("GONE", "/api/v1/executions/e-1/hang", None) in received:
                break
            await asyncio.sleep(0.05)
        assert ("GONE", "/api/v1/executions/e-1/hang", None) in received
        text = await (await client.get("/metrics")).text()
        assert 'workerqueue_http_problems_total{kind="client_disconnected"} 1' in text
        assert not UPSTREAM_FAILED.search(text)


async def test_a_worker_that_leaves_during_the_websocket_handshake_frees_the_upstream_connection(
        upstream: TestServer):
    """The upstream slow to answer the handshake (up to the connect and idle timeouts, 65 s by default):
    a worker gone meanwhile held an upstream connection and its namespace's websocket share all along,
    and counted as the upstream's failure once that ran out."""
    ended = asyncio.Event()

    async def thinking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")  # the handshake, never answered
            await reader.read()  # until the operator lets go
        ended.set()
        writer.close()

    server = await asyncio.start_server(thinking, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with serving(upstream, idle=30) as (store, client):
        store.upsert_queue(queue("a", queueId="q-a", upstream={"url": f"http://127.0.0.1:{port}",
                                                                "apiKeySecretRef": {"name": "org", "key": "k"}}))
        _, worker = await asyncio.open_connection(client.host, client.port)
        worker.write(f"GET {WS_A} HTTP/1.1\r\nHost: operator\r\nAuthorization: Bearer tok-a\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        await worker.drain()
        await asyncio.sleep(0.5)  # the operator's handshake with the upstream is under way
        worker.close()
        await asyncio.wait_for(ended.wait(), 5)  # the operator looks every second; the handshake may take 31 s
        text = await (await client.get("/metrics")).text()
        assert 'workerqueue_http_problems_total{kind="client_disconnected"} 1' in text
        assert not UPSTREAM_FAILED.search(text)
    server.close()


async def test_hanging_upstream_is_504(hub: tuple[Store, TestClient]):
    _, client = hub
    loop = asyncio.get_running_loop()
    began = loop.time()
    r = await client.get("/api/v1/hang", headers={"Authorization": "Bearer tok-a"})
    assert r.status == 504 and "did not answer" in (await r.json())["detail"]
    assert loop.time() - began < 5
    text = await (await client.get("/metrics")).text()
    assert 'kind="timeout"} 1' in text and 'code="5xx"} 1' in text


async def test_a_worker_that_stalls_mid_body_gets_408_and_holds_nothing(hub: tuple[Store, TestClient]):
    _, client = hub
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /api/v1/executions/e-1/events HTTP/1.1\r\nHost: operator\r\n"
                 b"Authorization: Bearer tok-a\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # the idle timeout is 1 s here
        body = await asyncio.wait_for(reader.read(100), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 ") and b"Request body not received in time" in body


async def test_an_upstream_that_takes_not_even_the_end_of_the_body_cannot_hold_the_request():
    # aiohttp's last write of a chunked body (the terminating chunk) waits for the socket with no
    # timeout of its own: the upload's deadline must still run then, or a stalled upstream holds the
    # request, and a pooled connection, for ever.
    from aiohttp.base_protocol import BaseProtocol

    from workerqueue_operator.api.metrics import UpstreamStats

    loop = asyncio.get_running_loop()
    content = aiohttp.StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    content.feed_data(b"x" * 100)
    content.feed_eof()
    upload = passthrough._Upload(content, UpstreamStats(), idle=0.2, still_opens=lambda: True)

    async def send() -> None:
        async with upload.deadline:
            async for _ in upload.chunks():
                pass
            await asyncio.Event().wait()  # the terminating chunk, which the upstream never takes

    sending = asyncio.create_task(send())
    done, _ = await asyncio.wait({sending}, timeout=10)
    sending.cancel()
    assert sending in done and isinstance(sending.exception(), TimeoutError)


async def test_a_connection_dropped_mid_upload_to_an_upstream_that_stopped_reading_is_reset(
        hub: tuple[Store, TestClient]):
    """A hung upstream whose kernel still takes bytes: an upload cut there (504) was closed, not reset,
    and its socket stayed open holding what was left to send for as long as the upstream did not read,
    outside the pool's limit: one more socket, and some 250 KiB, at each retry of the worker."""
    store, client = hub
    accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()
    over = asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(reader)  # read by the test only once the operator has given up
        await over.wait()
        writer.close()

    server = await asyncio.start_server(stalled, "127.0.0.1", 0)
    for listening in server.sockets:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    port = server.sockets[0].getsockname()[1]

    size = 200 * 65536  # 12.5 MiB: more than both kernels buffer
    worker_reads, worker = await asyncio.open_connection(client.host, client.port)

    async def upload() -> None:
        worker.write(b"POST /api/v1/executions/e-1/events HTTP/1.1\r\nHost: operator\r\n"
                     b"Authorization: Bearer tok-a\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(200):
            worker.write(b"y" * 65536)
            await worker.drain()

    try:
        store.upsert_queue(queue("a", queueId="q-a", upstream={"url": f"http://127.0.0.1:{port}",
                                                                "apiKeySecretRef": {"name": "org", "key": "k"}}))
        uploading = asyncio.create_task(upload())
        head = await asyncio.wait_for(worker_reads.readuntil(b"\r\n\r\n"), 10)  # the idle timeout is 1 s here
        uploading.cancel()
        worker.transport.abort()  # the worker gives up the rest of its upload
        assert head.startswith(b"HTTP/1.1 504 ")
        reader = await accepted.get()
        with pytest.raises(ConnectionResetError):  # closed, it would go on sending, then end in order
            async with asyncio.timeout(10):
                while await reader.read(2**20):  # what the kernel took before the cut
                    pass
    finally:
        over.set()
        server.close()


async def test_a_worker_that_stops_reading_releases_the_upstream(hub: tuple[Store, TestClient],
                                                                 upstream: TestServer):
    _, client = hub
    path = "/api/v1/executions/e-1/stream?events=400000&gap=0"
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: operator\r\nAuthorization: Bearer tok-a\r\n\r\n".encode())
    received = upstream.app[standin.RECEIVED]
    try:
        for _ in range(200):  # never read: the operator gives up writing after its idle timeout (1 s)
            if ("GONE", path, None) in received:
                break
            await asyncio.sleep(0.05)
    finally:
        writer.close()
    assert ("GONE", path, None) in received


async def test_a_streamed_answer_that_stalls_is_cut_not_completed(hub: tuple[Store, TestClient],
                                                                   upstream: TestServer):
    _, client = hub
    length = passthrough.SMALL_ANSWER + 1
    r = await client.get(f"/api/v1/stall?length={length}", headers={"Authorization": "Bearer tok-a"})
    # Chunked: where the key was, the worker's token may be of another length (api/keymask.py).
    assert r.status == 200 and "Content-Length" not in r.headers and r.headers["Transfer-Encoding"] == "chunked"
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.read()  # 10 bytes, then the connection breaks: never a short "complete" answer
    text = await (await client.get("/metrics")).text()
    origin = f"http://{upstream.host}:{upstream.port}"
    assert f'workerqueue_upstream_failures_total{{upstream="{origin}",kind="cut"}} 1' in text


async def test_a_small_answer_that_stalls_is_504(hub: tuple[Store, TestClient]):
    _, client = hub
    r = await client.get("/api/v1/stall?length=100", headers={"Authorization": "Bearer tok-a"})
    assert r.status == 504 and "did not answer" in (await r.json())["detail"]


@pytest.mark.parametrize("trickled", ["headers", "small body", "websocket handshake"])
async def test_an_upstream_that_trickles_is_504_within_its_timeouts(hub: tuple[Store, TestClient], trickled: str):
    """A byte every half idle timeout: a silence limit restarts at each, and the call was held for as
    long as the upstream liked (30 s for 30 bytes). Connect (1 s) and idle (1 s) bound it in all."""
    store, client = hub
    answer = {
        "headers": b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 30 + b"\r\nContent-Length: 2\r\n\r\nok",
        "small body": b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + b"a" * 30,
        "websocket handshake": b"HTTP/1.1 101 Switching Protocols\r\nX-Slow: " + b"a" * 30 + b"\r\n\r\n",
    }[trickled]
    head = answer.index(b"\r\n\r\n") + 4 if trickled == "small body" else 0

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer[:head])
        try:
            for byte in answer[head:]:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.5)
        except ConnectionError:
            pass  # the operator gave up, as it should
        finally:
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        store.upsert_queue(queue("a", queueId="q-a", upstream={"url": f"http://127.0.0.1:{port}",
                                                                "apiKeySecretRef": {"name": "org", "key": "k"}}))
        began = loop.time()
        if trickled == "websocket handshake":
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(WS_A, headers={"Authorization": "Bearer tok-a"})
            status = refused.value.status
        else:
            r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
            status = r.status
            assert "did not answer" in (await r.json())["detail"]
        took = loop.time() - began
    finally:
        server.close()
    assert status == 504
    assert took < 5  # the trickle takes 15 s; both timeouts together 2 s


async def test_unreachable_upstream_is_502(hub: tuple[Store, TestClient]):
    store, client = hub
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        store.upsert_queue(queue("a", queueId="q-a", upstream={"url": f"http://127.0.0.1:{port}",
                                                                "apiKeySecretRef": {"name": "org", "key": "k"}}))
        r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
    assert r.status == 502 and await r.json() == {"detail": "The upstream control plane cannot be reached"}
    text = await (await client.get("/metrics")).text()
    assert f'workerqueue_upstream_failures_total{{upstream="http://127.0.0.1:{port}",kind="unreachable"}} 1' in text


async def test_an_answer_that_cannot_be_read_is_502_of_its_own_kind(hub: tuple[Store, TestClient]):
    store, client = hub

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nBad Header: SECRET\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(malformed, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store.upsert_queue(queue("a", queueId="q-a", upstream={"url": f"http://127.0.0.1:{port}",
                                                                "apiKeySecretRef": {"name": "org", "key": "k"}}))
        r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
    finally:
        server.close()
    assert r.status == 502 and await r.json() == {
        "detail": "The upstream control plane sent an answer that cannot be read"}
    text = await (await client.get("/metrics")).text()
    assert f'workerqueue_upstream_failures_total{{upstream="http://127.0.0.1:{port}",kind="bad_answer"}} 1' in text


async def test_no_connection_to_be_had_in_time_is_a_503_busy_not_the_upstreams_fault(upstream: TestServer):
    # Every connection of the pool busy (one allowed, held by a request that hangs): the next request
    # waits for one as long as the connect timeout (1 s), not the idle timeout (5 s), and is told the
    # operator is busy. It was a 504 that the upstream could not be connected to, counted as its timeout.
    async with serving(upstream, idle=5, connections=1) as (_, client):
        hanging = asyncio.create_task(client.get("/api/v1/hang", headers={"Authorization": "Bearer tok-a"}))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
        assert r.status == 503 and r.headers["Retry-After"] == "1" and await r.json() == {
            "detail": "All 1 connections to upstream control planes are in use, try again"}
        assert 0.9 <= time.monotonic() - started < 4
        text = await (await client.get("/metrics")).text()
        assert 'kind="busy"} 1' in text and 'kind="timeout"} 0' in text
        hanging.cancel()
        await asyncio.gather(hanging, return_exceptions=True)


async def test_namespaces_whose_shares_fill_the_pool_leave_another_a_busy_answer_and_the_next_place(
        upstream: TestServer):
    """Two namespaces' shares may add up to the whole pool (75 + 25 of 100 by default): a third one's
    request waited for aiohttp's pool and got a 504 blaming the upstream. It is told the operator is
    busy; and once a connection ends, places go namespace by namespace in turn, so that it is not
    behind every waiter of a namespace that came first."""
    async with serving(upstream, idle=5, connections=3, per_namespace=3) as (store, client):
        store.upsert_queue(queue("c", "team-c", queueId="q-c", upstream={
            "url": str(upstream.make_url("/")).rstrip("/"), "apiKeySecretRef": {"name": "org", "key": "k"}}))
        store.upsert_secret(("team-c", "c-worker-token"), {"token": "tok-c"})
        store.upsert_secret(("team-c", "org"), {"k": ORG_KEY})
        hanging = [asyncio.create_task(client.get("/api/v1/hang", headers={"Authorization": f"Bearer {token}"}))
                   for token in ("tok-a", "tok-a", "tok-b")]
        await asyncio.sleep(0.3)
        r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-c"})
        assert r.status == 503 and await r.json() == {
            "detail": "All 3 connections to upstream control planes are in use, try again"}
        answered: list[str] = []

        async def call(name: str, token: str) -> None:
            await echoed(await client.get("/api/v1/executions/e-1", headers={"Authorization": f"Bearer {token}"}))
            answered.append(name)

        waiting = []
        for name, token in (("b1", "tok-b"), ("b2", "tok-b"), ("c", "tok-c")):  # b's two wait first
            waiting.append(asyncio.create_task(call(name, token)))
            await asyncio.sleep(0.1)
        hanging[0].cancel()  # one place is free, then given back after each call
        await asyncio.gather(*waiting)
        assert answered == ["b1", "c", "b2"]  # namespace by namespace in turn, not first come, first served
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)


@pytest.mark.parametrize(("full", "connections", "per_namespace", "holder"),
                         [("pool", 1, 1, "tok-b"), ("share", 2, 1, "tok-a")])
async def test_a_worker_that_leaves_while_it_waits_for_a_connection_leaves_its_line_and_is_never_sent_on(
        upstream: TestServer, full: str, connections: int, per_namespace: int, holder: str):
    """aiohttp's server does not cancel a handler whose client left: a request waiting for the pool
    (or its namespace's share) stayed in line for the whole connect timeout, and once a place came it
    was sent to the upstream (a PATCH, an event) for a worker no longer there, or counted `busy`."""
    async with serving(upstream, idle=5, connections=connections, per_namespace=per_namespace,
                       connect=6) as (_, client):
        hanging = asyncio.create_task(client.get("/api/v1/hang", headers={"Authorization": f"Bearer {holder}"}))
        await asyncio.sleep(0.3)  # the pool's one connection, or team-a's one share, is taken
        _, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"PATCH /api/v1/executions/gone HTTP/1.1\r\nHost: operator\r\n"
                     b"Authorization: Bearer tok-a\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()  # the worker gives up while it waits
        await asyncio.sleep(2.0)  # noticed within GONE_CHECK_SECONDS
        hanging.cancel()
        await asyncio.gather(hanging, return_exceptions=True)
        await echoed(await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-a"}))
        assert not [path for _, path, _ in upstream.app[standin.RECEIVED] if "gone" in path]
        text = await (await client.get("/metrics")).text()
        assert 'kind="busy"} 1' not in text


async def test_a_worker_gone_as_its_turn_comes_is_not_sent_on(upstream: TestServer, monkeypatch: pytest.MonkeyPatch):
    """Its place came before the wait noticed its leaving (looked for every GONE_CHECK_SECONDS): it is
    looked at once more before anything is sent to the upstream."""
    monkeypatch.setattr(passthrough, "GONE_CHECK_SECONDS", 30.0)  # the wait never notices in time
    async with serving(upstream, idle=5, connections=1, connect=6) as (_, client):
        holder = asyncio.create_task(client.get("/api/v1/stream?events=2&gap=1",
                                                headers={"Authorization": "Bearer tok-b"}))
        await asyncio.sleep(0.3)  # the pool's one connection is team-b's, for ~2 s
        _, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"PATCH /api/v1/executions/gone HTTP/1.1\r\nHost: operator\r\n"
                     b"Authorization: Bearer tok-a\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()
        assert (await (await holder).read())  # its answer streamed whole: the place is given on
        await echoed(await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-a"}))
        assert not [path for _, path, _ in upstream.app[standin.RECEIVED] if "gone" in path]


async def test_one_namespace_holds_at_most_its_share_of_an_upstream_hosts_connections(upstream: TestServer):
    # Every pooled connection to a host held by one team's hanging calls (slow bodies, slow reads, or
    # many calls) left every other team's calls to that host waiting, then 504.
    async with serving(upstream, idle=5, connections=3, per_namespace=2) as (_, client):
        hanging = [asyncio.create_task(client.get("/api/v1/hang", headers={"Authorization": "Bearer tok-a"}))
                   for _ in range(2)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
        assert r.status == 503 and r.headers["Retry-After"] == "1" and await r.json() == {
            "detail": "Too many requests of this namespace are open to the upstream control plane (2), try again"}
        assert time.monotonic() - started >= 0.9  # it waited the connect timeout for one of its own to end
        await echoed(await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-b"}))
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
        await asyncio.sleep(0.2)
        await echoed(await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-a"}))
        text = await (await client.get("/metrics")).text()
        assert 'kind="busy"} 1' in text


async def test_one_namespace_holds_at_most_its_share_all_upstream_hosts_together(upstream: TestServer):
    # A share a (namespace, host) let one team naming a host per queue hold all the pool's
    # connections (it is one for all hosts), and as many sockets as it named hosts.
    async with TestServer(standin.make_app()) as other, serving(
            upstream, idle=5, connections=4, per_namespace=2) as (store, client):
        store.upsert_queue(queue("a2", queueId="q-a2", upstream={
            "url": str(other.make_url("/")).rstrip("/"), "apiKeySecretRef": {"name": "org", "key": "k"}}))
        store.upsert_secret(("team-a", "a2-worker-token"), {"token": "tok-a2"})
        hanging = [asyncio.create_task(client.get("/api/v1/hang", headers={"Authorization": f"Bearer {token}"}))
                   for token in ("tok-a", "tok-a2")]
        await asyncio.sleep(0.2)
        r = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
        assert r.status == 503 and await r.json() == {
            "detail": "Too many requests of this namespace are open to the upstream control plane (2), try again"}
        await echoed(await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-b"}))
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)


async def test_the_pool_keeps_at_most_its_idle_bound_all_hosts_together():
    # aiohttp kept every released connection for its keep-alive, per host: a queue a host, and the
    # idle sockets grew with the number of hosts called within 15 s.
    opened: list[list[asyncio.BaseTransport]] = []

    def host() -> web.Application:
        seen: list[asyncio.BaseTransport] = []
        opened.append(seen)

        async def answer(request: web.Request) -> web.Response:
            if request.transport is not None and request.transport not in seen:
                seen.append(request.transport)
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/", answer)
        return app

    def open_at(server: int) -> int:
        return sum(1 for transport in opened[server] if not transport.is_closing())

    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(TestServer(host())) for _ in range(5)]
        pool = passthrough.Pool(limit=10, idle=2)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=pool))
        for server in servers:
            async with session.get(server.make_url("/")) as r:
                assert await r.text() == "ok"
        await asyncio.sleep(0.2)  # the servers see the closed ones end
        assert [open_at(i) for i in range(5)] == [0, 0, 0, 1, 1]
        async with session.get(servers[4].make_url("/")) as r:  # an idle one kept is used again
            assert await r.text() == "ok"
        assert len(opened[4]) == 1
        # Several in use at once to one host: released, all but the bound's worth close.
        answers = await asyncio.gather(*(session.get(servers[0].make_url("/")) for _ in range(4)))
        for r in answers:
            await r.read()
            r.release()
        await asyncio.sleep(0.2)
        assert sum(open_at(i) for i in range(5)) == 2


async def test_the_wait_for_a_share_and_for_a_pooled_connection_are_one_connect_timeout(upstream: TestServer):
    # Waiting its turn in its namespace, then for the pool as long again, a request took twice the
    # connect timeout to be told the operator was busy. (Real time: the pass-through measures the wait on the real
    # clock. With a 6-s connect timeout and the second request 2 s after the first, the right answer
    # comes after ~6 s and the fault's after ~10 s, each 2 s from the bound.)
    async with serving(upstream, idle=60, connections=1, per_namespace=1, connect=6) as (_, client):
        hanging = asyncio.create_task(client.get("/api/v1/hang", headers={"Authorization": "Bearer tok-b"}))
        await asyncio.sleep(0.5)  # the pool's one connection is team-b's
        first = asyncio.create_task(client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"}))
        await asyncio.sleep(2.0)  # team-a's share is the first's, which waits for the pool
        started = time.monotonic()
        second = await client.get("/api/v1/x", headers={"Authorization": "Bearer tok-a"})
        took = time.monotonic() - started
        assert second.status == 503 and took < 8.0, took  # its share at ~4 s, then the 2 s left
        assert (await first).status == 503
        hanging.cancel()
        await asyncio.gather(hanging, return_exceptions=True)


async def test_an_absolute_form_target_is_400_and_goes_nowhere(hub: tuple[Store, TestClient]):
    _, client = hub
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET evil://x/api/v1/executions/e1 HTTP/1.1\r\nHost: operator\r\n"
                 b"Authorization: Bearer tok-a\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"must be a path under /api/v1/" in answer
    assert ORG_KEY.encode() not in answer


async def test_upstream_status_and_metrics(hub: tuple[Store, TestClient], upstream: TestServer):
    _, client = hub
    r = await client.post("/api/v1/x", data=b"12345",
                          headers={"Authorization": "Bearer tok-a", "X-Answer-Status": "404"})
    assert r.status == 404
    text = await (await client.get("/metrics")).text()
    origin = f"http://{upstream.host}:{upstream.port}"
    assert f'workerqueue_upstream_requests_total{{upstream="{origin}",code="4xx"}} 1' in text
    assert f'workerqueue_upstream_bytes_total{{upstream="{origin}",direction="sent"}} 5' in text
    assert f'workerqueue_upstream_response_seconds_count{{upstream="{origin}"}} 1' in text
    assert ORG_KEY not in text


async def test_websocket_is_proxied_with_the_organizations_key(hub: tuple[Store, TestClient]):
    _, client = hub
    async with client.ws_connect(f"{WS_A}?x=1", headers={"Authorization": "Bearer tok-a"},
                                 protocols=("agent.v1",)) as ws:
        assert ws.protocol == "agent.v1"
        first = await ws.receive_str(timeout=5)
        hello = json.loads(first)
        assert hello["path_qs"] == f"{WS_A}?x=1"
        assert standin.header_values(hello, "Authorization") == [f"Bearer {ORG_KEY}"]
        await ws.send_str("ping?")
        assert await ws.receive_str(timeout=5) == "ping?"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01"
        await ws.send_str("close")
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 4000
    # Each way counted: "ping?", 2 bytes, "close" to the upstream; the hello and both echoes back.
    text = await (await client.get("/metrics")).text()
    counted = [line for line in text.splitlines() if line.startswith("workerqueue_upstream_bytes_total")]
    assert any(line.endswith('direction="sent"} 12') for line in counted), counted
    assert any(line.endswith(f'direction="received"}} {len(first) + 7}') for line in counted), counted
    # Counted as a request, but its life is no latency: it was the top bucket and most of the sum.
    assert 'workerqueue_http_requests_total{route="/api/v1/{tail}",method="GET",code="101"} 1' in text
    assert 'workerqueue_http_request_duration_seconds_count{route="/api/v1/{tail}"}' not in text


@pytest.mark.parametrize("offered", [
    ("agent.v1", "bearer.secret-in-a-protocol", "base64url.bearer.authorization.k8s.io.c2VjcmV0"),
    ("bearer.secret-in-a-protocol", "base64url.bearer.authorization.k8s.io.c2VjcmV0")])
async def test_the_subprotocols_a_worker_offers_are_never_logged(
        hub: tuple[Store, TestClient], offered: tuple[str, ...], caplog: pytest.LogCaptureFixture):
    # aiohttp logged them at WARNING at every handshake, unpaced: a client may send a credential as one.
    _, client = hub
    with caplog.at_level(logging.DEBUG):
        async with client.ws_connect(WS_A, headers={"Authorization": "Bearer tok-a"}, protocols=offered) as ws:
            assert ws.protocol == ("agent.v1" if "agent.v1" in offered else None)  # the upstream's choice
            hello = json.loads(await ws.receive_str(timeout=5))
    assert "secret-in-a-protocol" not in caplog.text
    # Nor is a Kubernetes token in one sent upstream: the operator's websocket route takes no such identity.
    sent = ",".join(standin.header_values(hello, "Sec-WebSocket-Protocol"))
    assert "c2VjcmV0" not in sent and "bearer.secret-in-a-protocol" in sent


async def test_open_websockets_leave_requests_their_pool(upstream: TestServer):
    """Each proxied websocket holds its upstream connection for its worker's life: in the requests'
    pool, `upstream_max_connections` of them left every other call to that host a 504."""
    async with serving(upstream, idle=5, connections=1) as (_, client), client.ws_connect(
            WS_A, headers={"Authorization": "Bearer tok-a"}) as ws:
        json.loads(await ws.receive_str(timeout=5))  # relayed: its upstream connection is open
        r = await client.get("/api/v1/executions/e-1", headers={"Authorization": "Bearer tok-a"})
        await echoed(r)


@pytest.mark.parametrize("status", [503, 401])
async def test_an_upstreams_refusal_of_a_websocket_keeps_when_to_try_again_and_how_to_authenticate(
        hub: tuple[Store, TestClient], status: int):
    """Its status was passed on, but not its Retry-After: reconnecting workers lost the upstream's back-off."""
    _, client = hub
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(WS_A, headers={"Authorization": "Bearer tok-a", "X-Answer-Status": str(status)})
    assert refused.value.status == status
    assert refused.value.headers is not None
    assert refused.value.headers.get("Retry-After") == "7" and refused.value.headers.get("WWW-Authenticate") == "Bearer"


async def test_websocket_needs_a_queue_token(hub: tuple[Store, TestClient]):
    _, client = hub
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(WS_A, headers={"Authorization": "Bearer nobody"})
    assert caught.value.status == 401


async def test_a_broken_websocket_handshake_is_400_and_not_forwarded(hub: tuple[Store, TestClient]):
    _, client = hub
    r = await client.get(WS_A, headers={"Authorization": "Bearer tok-a", "Upgrade": "websocket",
                                                            "Connection": "Upgrade"})
    assert r.status == 400 and await r.json() == {"detail": "Not a valid websocket handshake"}


async def test_a_websocket_is_closed_once_its_token_no_longer_opens_the_queue(hub: tuple[Store, TestClient]):
    store, client = hub
    async with client.ws_connect(WS_A, headers={"Authorization": "Bearer tok-a"}) as ws:
        await ws.receive_str(timeout=5)  # the stand-in's hello: the relay is up
        store.upsert_secret(("team-a", "a-worker-token"), {"token": "tok-a2"})  # rotated: tok-a unlisted
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_a_revoked_websocket_whose_worker_reads_nothing_more_is_cut(upstream: TestServer,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """The close frame of a revoked token waits behind what the worker does not read: it held the
    relay, the worker's connection and its slot for as long as that worker stayed connected."""
    monkeypatch.setattr(passthrough, "CLOSE_SECONDS", 0.5)
    async with serving(upstream, idle=60) as (store, client):  # heartbeats far off: no rescue from them
        loop = asyncio.get_running_loop()
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        worker.setblocking(False)
        with worker:
            await loop.sock_connect(worker, (client.host, client.port))
            await loop.sock_sendall(worker, (
                f"GET {WS_A} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                "Authorization: Bearer tok-a\r\n\r\n").encode())
            assert (await loop.sock_recv(worker, 12)) == b"HTTP/1.1 101"
            payload, mask = b"flood", b"\x01\x02\x03\x04"  # a client's frames are masked
            await loop.sock_sendall(worker, b"\x81" + bytes([0x80 | len(payload)]) + mask +
                                    bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            await asyncio.sleep(1)  # the upstream floods; the worker reads nothing: writes to it wait
            store.upsert_secret(("team-a", "a-worker-token"), None)
            # Seen within a second, the close given half of one: then the worker's connection is
            # gone from the server, though the worker still reads nothing.
            server = client.server.runner.server if client.server.runner is not None else None
            assert server is not None and len(server.connections) == 1
            for _ in range(50):
                if not server.connections:
                    break
                await asyncio.sleep(0.1)
            assert not server.connections

async def test_a_streamed_answer_is_broken_off_once_its_token_no_longer_opens_the_queue(
        hub: tuple[Store, TestClient]):
    store, client = hub
    r = await client.get("/api/v1/executions/e-1/stream?events=50&gap=0.1", headers={"Authorization": "Bearer tok-a"})
    assert r.status == 200
    await r.content.readuntil(b"\n\n")
    store.upsert_secret(("team-a", "a-worker-token"), None)  # its Secret deleted
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(r.read(), 5)  # cut, never a short "complete" answer
    assert not UPSTREAM_FAILED.search(await (await client.get("/metrics")).text())


async def test_an_upload_is_broken_off_once_its_token_no_longer_opens_the_queue(
        hub: tuple[Store, TestClient], upstream: TestServer):
    """A chunk every few seconds (within the idle timeout) could go on for as long as the worker
    liked after its token was revoked, and the upstream then acted on it with the organization's key."""
    store, client = hub
    path = "/api/v1/executions/e-1/events"

    async def body() -> AsyncIterator[bytes]:
        yield b'{"events": ['
        await asyncio.sleep(0.3)  # under way: the upstream has the request's start
        assert ("POST", path, f"Bearer {ORG_KEY}") in upstream.app[standin.RECEIVED]
        store.upsert_secret(("team-a", "a-worker-token"), None)  # its Secret deleted
        for _ in range(3):
            await asyncio.sleep(0.3)
            yield b'"more",'
        yield b'"end"]}'

    r = await client.post(path, data=body(), headers={"Authorization": "Bearer tok-a"})
    assert r.status == 401  # the upstream's answer (200, had it the whole body) never comes


async def test_an_answer_that_comes_after_its_token_was_revoked_is_broken_off(
        hub: tuple[Store, TestClient], upstream: TestServer, monkeypatch: pytest.MonkeyPatch):
    store, client = hub
    path = "/api/v1/executions/e-1"
    original = store.queue_of_token

    def revoked_once_received(digest: bytes) -> Any:  # revoked while the upstream works on it
        received = ("GET", path, f"Bearer {ORG_KEY}") in upstream.app[standin.RECEIVED]
        return None if received else original(digest)

    monkeypatch.setattr(store, "queue_of_token", revoked_once_received)
    with pytest.raises(aiohttp.ClientError):  # cut: the upstream acted, so no 401 either
        await (await client.get(path, headers={"Authorization": "Bearer tok-a"})).read()


async def test_another_method_on_a_route_the_operator_serves_is_405_never_passed_through(
        hub: tuple[Store, TestClient], upstream: TestServer):
    """A GET of /start or a heartbeat, with a queue token, went to the upstream with the organization's
    key (and without an upstream was a 404): the operator's own routes answer as aiohttp and FastAPI do."""
    _, client = hub
    for method, path, allow in (("GET", "/api/v1/worker-queues/q-a/start", "POST"),
                                ("GET", "/api/v1/workers/w-1/heartbeat", "POST"),
                                ("PUT", "/api/v1/workers/w-1/disconnect", "POST"),
                                ("POST", "/api/v1/worker-queues/q-a/executions", "GET, HEAD")):
        r = await client.request(method, path, headers={"Authorization": "Bearer tok-a"})
        assert (r.status, await r.json(), r.headers.get("Allow")) == (405, {"detail": "Method Not Allowed"}, allow)
    assert upstream.app[standin.RECEIVED] == []
    # The queue itself is the operator's to DELETE only: the rest of it is the upstream's.
    got = await echoed(await client.get("/api/v1/worker-queues/q-a", headers={"Authorization": "Bearer tok-a"}))
    assert got["method"] == "GET"


async def test_a_websocket_whose_worker_stops_reading_lets_go_of_its_socket(hub: tuple[Store, TestClient]):
    """The upstream floods, the worker reads nothing: aiohttp's heartbeat gives the worker up with a
    close, not an abort, and with bytes still buffered its socket stayed open until the worker closed
    its end (a lost host: never)."""
    _, client = hub
    loop = asyncio.get_running_loop()
    worker = socket.socket()
    worker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    worker.setblocking(False)
    try:
        await loop.sock_connect(worker, (client.host, client.port))
        await loop.sock_sendall(worker, (
            f"GET {WS_A} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Authorization: Bearer tok-a\r\n\r\n").encode())
        assert (await loop.sock_recv(worker, 12)).startswith(b"HTTP/1.1 101")
        payload, mask = b"flood", b"\x01\x02\x03\x04"
        await loop.sock_sendall(worker, b"\x81" + bytes([0x80 | len(payload)]) + mask
                                + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        assert client.server.runner is not None and client.server.runner.server is not None
        connections = client.server.runner.server.connections
        for _ in range(200):  # the heartbeat (1 s here) gives up, then the grace after the relay ends
            await asyncio.sleep(0.1)
            if all(c.transport is None for c in connections):
                break
        assert all(c.transport is None for c in connections)
    finally:
        worker.close()


async def test_trace_is_never_passed_through(hub: tuple[Store, TestClient], upstream: TestServer):
    """An intermediary answering TRACE (Apache's default) would echo the request, the organization's
    key with it, back to the worker."""
    _, client = hub
    r = await client.request("TRACE", "/api/v1/anything", headers={"Authorization": "Bearer tok-a"})
    assert (r.status, await r.json()) == (405, {"detail": "Method Not Allowed"})
    assert "TRACE" not in r.headers["Allow"] and "GET" in r.headers["Allow"]
    assert upstream.app[standin.RECEIVED] == []


async def test_a_route_the_operator_serves_spelt_otherwise_is_never_passed_through(
        hub: tuple[Store, TestClient], upstream: TestServer):
    """`/start/` (a trailing slash) went to the upstream with the organization's key: an upstream may
    route it as /start, so may a merged slash or another case."""
    _, client = hub
    for method, path in (("POST", "/api/v1/worker-queues/q-a/start/"), ("POST", "/api/v1/worker-queues/q-a/start//"),
                         ("POST", "/api/v1/worker-queues//q-a/start"), ("POST", "/api/v1/Worker-Queues/Q-A/START"),
                         ("POST", "/api/v1/workers/w-1/heartbeat/"), ("GET", "/api/v1/worker-queues/q-a/executions/"),
                         ("DELETE", "/api/v1/worker-queues/q-a/"), ("DELETE", "/api/v1/Worker-Queues/q-a"),
                         ("DELETE", "/api/v1//worker-queues/q-a"),
                         # Matrix parameters (Tomcat, Jetty, Spring drop them), whitespace or NULs trimmed.
                         ("POST", "/api/v1/worker-queues/q-a/start;x"), ("POST", "/api/v1/worker-queues/q-a/start;"),
                         ("POST", "/api/v1/worker-queues/q-a/start%20"), ("POST", "/api/v1/worker-queues/q-a/start%09"),
                         ("POST", "/api/v1/worker-queues/q-a/%00start"), ("DELETE", "/api/v1/worker-queues/q-a;x"),
                         # `\` read as `/`, Unicode whitespace, encoded twice.
                         ("POST", "/api/v1/worker-queues/q-a\\start"),
                         ("POST", "/api/v1/worker-queues/q-a/start%c2%a0"),
                         ("POST", "/api/v1/worker-queues/q-a%252Fstart")):
        r = await client.request(method, path, headers={"Authorization": "Bearer tok-a"}, json={})
        # Not Found, or the operator's own route taking `q-a;x` for a queue id it does not know.
        assert (r.status, await r.json()) in ((404, {"detail": "Not Found"}),
                                              (404, {"detail": "Worker queue not found"})), path
    assert upstream.app[standin.RECEIVED] == []
    # Routes of the upstream's own alike are still passed through.
    got = await echoed(await client.get("/api/v1/worker-queues/q-a/", headers={"Authorization": "Bearer tok-a"}))
    assert got["method"] == "GET"


@contextlib.asynccontextmanager
async def relaying(upstream: TestServer) -> AsyncIterator[tuple[TestServer, aiohttp.ClientWebSocketResponse]]:
    """A server with default settings (shut down by the test) and a worker's websocket relayed to `upstream`."""
    settings = Settings()
    store = Store(settings=settings)
    url = str(upstream.make_url("/")).rstrip("/")
    store.upsert_queue(queue("a", queueId="q-a", upstream={"url": url, "apiKeySecretRef": {"name": "org", "key": "k"}}))
    store.upsert_secret(("team-a", "a-worker-token"), {"token": "tok-a"})
    store.upsert_secret(("team-a", "org"), {"k": ORG_KEY})
    server = TestServer(apps.make_app(store, settings=settings, version="1"))
    await server.start_server()
    async with aiohttp.ClientSession() as session, session.ws_connect(
            server.make_url(WS_A), headers={"Authorization": "Bearer tok-a"}) as ws:
        await ws.receive_str(timeout=5)  # the stand-in's hello: the proxy is up
        yield server, ws


async def test_websockets_are_closed_going_away_on_shutdown(upstream: TestServer):
    async with relaying(upstream) as (server, ws):
        closing = asyncio.create_task(server.close())
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(closing, 5)


async def test_a_worker_that_stopped_reading_does_not_hold_up_shutdown(upstream: TestServer):
    # Its close frame waits for the socket; its heartbeat (the idle timeout, 60 s here) would give up
    # on it only after a minute and more, and the pod's grace period ends sooner.
    async with relaying(upstream) as (server, ws):
        async def flood() -> None:  # echoed back by the stand-in, to a worker that reads none of it
            for _ in range(2000):
                await ws.send_bytes(b"x" * 2**16)

        flooding = asyncio.create_task(flood())
        done, _ = await asyncio.wait({flooding}, timeout=5)  # until every buffer on the way is full
        assert not done, "the operator took the whole flood: nothing waits for the worker's socket"
        closing = asyncio.create_task(server.close())
        done, _ = await asyncio.wait({closing}, timeout=30)
        flooding.cancel()
        assert closing in done


async def test_a_workers_websocket_opens_only_with_the_token_it_started_with():
    """The upstream takes whoever opens a worker's websocket for that worker: another queue's token,
    or a sibling pod's, must not open it (heartbeats for that worker are 403 to them as well)."""
    async with TestServer(standin.make_app()) as upstream:
        url = str(upstream.make_url("/")).rstrip("/")
        settings = Settings(upstream_url=url, upstream_api_key_secret="ops/org:k")
        store = Store(settings=settings)
        for name in ("q1", "q2"):
            store.upsert_queue(queue(name, uid=f"uid-{name}", queueId=name, websocket={"enabled": True}))
            store.upsert_secret(("team-a", f"{name}-worker-token"), {"token": f"tok-{name}"})
        for pod in ("q2-w0", "q2-w1"):
            credential = WorkerCredential(("team-a", "q2"), pod, "uid-q2")
            store.upsert_worker_credential(("team-a", f"{pod}-token"), credential, f"tok-{pod}")
        store.upsert_secret(("ops", "org"), {"k": ORG_KEY})
        async with TestClient(TestServer(apps.make_app(store, settings=settings))) as c:
            async def websocket(worker: str, token: str) -> int:
                try:
                    async with c.ws_connect(f"/api/v1/ws/workers/{worker}",
                                            headers={"Authorization": f"Bearer {token}"}) as ws:
                        await ws.receive_str(timeout=5)  # the upstream's hello: relayed
                        return 101
                except aiohttp.WSServerHandshakeError as refused:
                    return refused.status

            async def started(token: str) -> str:
                answer = await c.post("/api/v1/worker-queues/q2/start", headers={"Authorization": f"Bearer {token}"})
                body = await answer.json()
                assert body["websocket_url"].endswith(f"/api/v1/ws/workers/{body['worker_id']}")
                return str(body["worker_id"])

            shared, pod = await started("tok-q2"), await started("tok-q2-w0")
            assert await websocket(shared, "tok-q2") == 101
            assert await websocket(pod, "tok-q2-w0") == 101
            assert await websocket(shared, "tok-q1") == 403  # another queue's token
            assert await websocket(pod, "tok-q2-w1") == 403  # a sibling pod's
            assert await websocket(pod, "tok-q2") == 403  # the queue token, for a pod's worker
            assert await websocket("not-an-id", "tok-q2") == 403
            # Spelt otherwise, as an upstream merging slashes or ignoring case would route it.
            assert await websocket(f"/{pod}", "tok-q2-w1") == 403
            assert await websocket(pod.upper(), "tok-q2-w1") == 403
            # A worker id that is blank, or matrix parameters alone, once trimmed: still no worker of this token's.
            for blank in ("%20", ";x", "%09/"):
                assert await websocket(blank, "tok-q2") == 403, blank
            assert await websocket(f"{pod};x", "tok-q2-w1") == 403
            heartbeat = await c.post(f"/api/v1/workers/{shared}/heartbeat", json={},
                                     headers={"Authorization": "Bearer tok-q1"})
            assert heartbeat.status == 403


async def test_a_pods_token_not_seen_yet_is_held_as_at_start_not_refused(monkeypatch: pytest.MonkeyPatch):
    """A pod's own token whose Secret this replica has not seen (made by another replica a moment ago,
    or the Secret watch down): /start held it and answered 503 while the watch was down; the
    pass-through answered 401 at once, on which the worker exits."""
    from workerqueue_operator.api import unseen

    monkeypatch.setattr(unseen, "CALL_DOWN_SECONDS", 0.3)
    monkeypatch.setattr(unseen, "LAG_SECONDS", 0.3)
    store = Store(settings=Settings())
    store.upsert_queue(queue("q1", queueId="q-1",
                             upstream={"url": "http://127.0.0.1:9", "apiKeySecretRef": {"name": "org", "key": "k"}}))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "q1-token"})
    store.upsert_secret(("team-a", "org"), {"k": "org-key"})
    pod = {"Authorization": "Bearer wqw1_made-for-q1-w0"}  # the operator's mark (workers.is_worker_token)
    watching = [False]
    async with TestClient(TestServer(apps.make_app(store, secrets_current=lambda: watching[0]))) as client:
        down = await client.get("/api/v1/executions/e-1", headers=pod)
        assert down.status == 503 and down.headers["Retry-After"] == "1"
        watching[0] = True
        unknown = await client.get("/api/v1/executions/e-1", headers=pod)  # after the lag: no such pod
        assert unknown.status == 401



async def test_only_a_service_accounts_worker_registered_in_one_queue_of_its_namespace_is_passed_through(
        upstream: TestServer):
    # Who a token is comes from TokenReview (stubbed here; tests/integration/test_passthrough.py asks
    # the real API server): what is decided from it is the pass-through's.
    from workerqueue_operator.api.keys import REGISTRY

    # Shaped as JWTs, as ServiceAccount and OIDC tokens are: only such tokens are reviewed.
    sa_token, user_token = "eyJhbGciOiJSUzI1NiJ9.sa.c2ln", "eyJhbGciOiJSUzI1NiJ9.user.c2ln"
    people = {sa_token: "system:serviceaccount:team-a:runner", user_token: "jane@example.com"}

    class Stub(apps.NoReviews):
        async def authenticate(self, token: str, token_digest: bytes, *, peer: str = "") -> reviews.Identity | None:
            return reviews.Identity(people[token], "uid", (), ()) if token in people else None

        async def may(self, identity: reviews.Identity, token_digest: bytes, namespace: str, name: str, *,
                      verb: str = "create", subresource: str = "start", peer: str = "") -> bool:
            return (verb, subresource) == ("create", "start")  # RBAC lets everyone start workers anywhere

    store = Store(settings=Settings())
    url = str(upstream.make_url("/")).rstrip("/")
    for namespace in ("team-a", "team-b"):
        upstream_of = {"url": f"{url}/{namespace}", "apiKeySecretRef": {"name": "org", "key": "k"}}
        store.upsert_queue(queue("a", namespace, uid=f"uid-{namespace}", queueId=f"q-{namespace}",
                                 upstream=upstream_of))
        store.upsert_secret((namespace, "org"), {"k": f"key-{namespace}"})
    app = apps.make_app(store, reviewer=Stub())
    registry = app[REGISTRY]
    async with TestClient(OperatorLikeServer(app)) as client:
        async def call(token: str) -> aiohttp.ClientResponse:
            return await client.get("/api/v1/teams/t", headers={"Authorization": f"Bearer {token}"})

        for token in people:
            registry.register(store.queue(("team-b", "a")), f"w-{token}", identity=people[token])
        # Registered in another namespace only (a Lease anyone writing Leases there could forge).
        refused = await call(sa_token)
        assert refused.status == 403 and "no worker queue of its namespace" in (await refused.json())["detail"]
        registry.register(store.queue(("team-a", "a")), "w-own", identity=people[sa_token])
        got = await echoed(await call(sa_token))
        assert got["path_qs"] == "/team-a/api/v1/teams/t" and standin.header_values(got, "Authorization") == [
            "Bearer key-team-a"]
        refused = await call(user_token)
        assert refused.status == 403 and "is no ServiceAccount" in (await refused.json())["detail"]
        assert (await call("made-up")).status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as ws_refused:
            await client.ws_connect("/api/v1/ws/anything", headers={"Authorization": f"Bearer {sa_token}"})
        assert ws_refused.value.status == 403


async def test_a_namespace_whose_upstream_names_do_not_resolve_holds_up_no_other_namespace(
        upstream: TestServer, monkeypatch: pytest.MonkeyPatch):
    """A lookup blocks its thread until the resolver gives up (here 3 s), whatever the request's
    timeout. On the event loop's few shared threads, one team's queues naming hosts whose DNS never
    answers held them all, and another team's upstream could not be connected to (504); so did a
    lookup of a host both teams name, merged into the first team's (aiohttp's DNS cache)."""
    import threading

    real = socket.getaddrinfo
    release = threading.Event()

    def blackholed(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".blackholed"):
            release.wait(3)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real("127.0.0.1" if host == "shared.example" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", blackholed)
    settings = Settings(upstream_connect_timeout_seconds=1, upstream_idle_timeout_seconds=5)
    store = Store(settings=settings)
    ref = {"apiKeySecretRef": {"name": "org", "key": "k"}}
    shared = f"http://shared.example:{upstream.port}"
    many = 40  # more than any default executor has threads
    for i in range(many):
        store.upsert_queue(queue(f"a{i}", queueId=f"q-a{i}", upstream={"url": f"http://h{i}.blackholed", **ref}))
        store.upsert_secret(("team-a", f"a{i}-worker-token"), {"token": f"tok-a{i}"})
    store.upsert_queue(queue("as", queueId="q-as", upstream={"url": shared, **ref}))
    store.upsert_secret(("team-a", "as-worker-token"), {"token": "tok-as"})
    store.upsert_secret(("team-a", "org"), {"k": ORG_KEY})
    for name, url in (("b", f"http://localhost:{upstream.port}"), ("bs", shared)):
        store.upsert_queue(queue(name, "team-b", queueId=f"q-{name}", upstream={"url": url, **ref}))
        store.upsert_secret(("team-b", f"{name}-worker-token"), {"token": f"tok-{name}"})
    store.upsert_secret(("team-b", "org"), {"k": "org-key-B"})
    try:
        async with TestClient(OperatorLikeServer(apps.make_app(store, settings=settings))) as client:
            flood = [asyncio.create_task(client.get("/api/v1/x", headers={"Authorization": f"Bearer tok-a{i}"}))
                     for i in range(many)]
            await asyncio.sleep(0.3)  # their lookups under way
            theirs = asyncio.create_task(client.get("/api/v1/x", headers={"Authorization": "Bearer tok-as"}))
            await asyncio.sleep(0.1)  # team-a's lookup of the shared host waits for team-a's threads
            for token in ("tok-b", "tok-bs"):
                r = await client.get("/api/v1/x", headers={"Authorization": f"Bearer {token}"})
                assert r.status == 200, (token, await r.text())
            answers = await asyncio.gather(*flood)
            assert {a.status for a in answers} == {504}  # team-a's own: no connection within its timeout
            assert (await theirs).status == 504
    finally:
        release.set()


async def test_upstream_names_are_looked_up_once_per_cache_time_and_merged_per_namespace(
        monkeypatch: pytest.MonkeyPatch):
    from workerqueue_operator.api import lookups

    calls: list[str] = []

    def counted(host: Any, *args: Any) -> Any:
        calls.append(host)
        time.sleep(0.05)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", counted)
    now = [0.0]
    looked = lookups.Lookups(clock=lambda: now[0])
    resolver = looked.resolver()
    try:
        async def resolve(namespace: str) -> Any:
            lookups.NAMESPACE.set(namespace)
            return await resolver.resolve("h.example", 80)

        answers = await asyncio.gather(*(resolve("team-a") for _ in range(5)), resolve("team-b"))
        assert all(a[0]["host"] == "127.0.0.1" for a in answers)
        assert calls == ["h.example", "h.example"]  # one lookup a namespace, five callers merged
        await resolve("team-c")
        assert len(calls) == 2  # answered from the cache
        now[0] = lookups.CACHE_SECONDS + 1
        await resolve("team-c")
        assert len(calls) == 3
    finally:
        looked.close()


async def test_a_lookup_its_callers_gave_up_on_fails_without_an_error_in_the_log(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """A request's connect timeout gives up on a lookup that goes on (its thread cannot be stopped):
    its failure later, taken by nobody, was logged by asyncio as an ERROR with its traceback."""
    import gc
    import threading

    from workerqueue_operator.api import lookups

    release = threading.Event()

    def blackholed(host: Any, *args: Any) -> Any:
        release.wait(2)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", blackholed)
    looked = lookups.Lookups()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await looked.getaddrinfo("h.blackholed", 80)
        release.set()
        await asyncio.sleep(0.3)  # the lookup ends, with its failure
        gc.collect()
        await asyncio.sleep(0)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        looked.close()
