"""The watch stream's line reader: events of any size the API server can send, bounded memory."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from workerqueue_operator.k8s import client


class Stream:
    """What `watch_lines` reads: chunks as the network delivers them."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


async def lines(chunks: list[bytes], **kwargs: int) -> list[bytes]:
    return [line async for line in client.watch_lines(Stream(chunks), **kwargs)]  # type: ignore[arg-type]


async def test_an_event_of_a_full_one_mebibyte_secret_is_read_whole():
    secret = {"type": "ADDED", "object": {"metadata": {"name": "big"}, "data": {"k": "A" * 1_400_000}}}
    first = json.dumps(secret).encode()
    data = first + b"\n" + b'{"type":"BOOKMARK"}\n'
    for size in (1, 7, 65_536, len(data)):
        if size == 1 and len(data) > 100_000:
            size = 4093  # byte by byte takes too long; odd chunk sizes split lines anywhere
        assert await lines(chunked(data, size)) == [first, b'{"type":"BOOKMARK"}']


async def test_blank_lines_are_skipped_and_a_cut_last_line_is_dropped():
    assert await lines([b'{"a":1}\n\n', b'  \n{"b":', b"2}\n", b'{"c":']) == [b'{"a":1}', b'{"b":2}']


async def test_a_line_over_the_cap_fails_loudly():
    with pytest.raises(client.LineTooLong):
        await lines(chunked(b"x" * 5000, 1000), max_line=4096)



@pytest.mark.parametrize("how", ["event", "status"])
async def test_a_watch_gone_at_once_after_its_list_backs_off_loudly(how: str, caplog: pytest.LogCaptureFixture):
    """A server (a caching proxy, a lagging watch cache) that answers 410 to the version its own list
    has just given: relisted at once, that was thousands of list+watch pairs a second, never logged,
    never counted, the replica ready all along. A stand-in server: the real one cannot be made to."""
    from aiohttp import web

    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}

    async def gone_at_once(request: web.Request, number: int) -> web.StreamResponse:
        if how == "status":
            return web.json_response(gone, status=410)
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
        return response

    lists, _, watch = await _against(gone_at_once, 2, path="/api/v1/secrets")
    assert 2 <= len(lists) <= 4  # at 0, 0.5, 1.5 s: backed off
    assert watch.failures >= 2 and watch.down_since is not None  # counted, and /readyz will say so
    assert "410 Gone for the version just listed" in caplog.text


async def test_a_watch_cut_mid_stream_goes_on_from_its_version_without_a_relist():
    """An API server restarting, or a proxy cutting long connections: each cut was counted a failure
    and cost a full relist (the replica's Secrets and Leases too, all replicas at once), where client-go
    watches again from the last version it saw, also through the refusals of a server starting up."""
    import asyncio

    import kubernetes
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from workerqueue_operator.k8s import informer

    lists, versions, refused = 0, [], 0
    third = asyncio.Event()

    async def api(request: web.Request) -> web.StreamResponse:
        nonlocal lists
        if request.query.get("watch") != "true":
            lists += 1
            return web.json_response({"metadata": {"resourceVersion": "100"}, "items": []})
        nonlocal refused
        if len(versions) == 1 and refused < 2:  # the API server restarting after it cut the stream
            refused += 1
            return web.json_response({"kind": "Status", "code": 503, "reason": "ServiceUnavailable"}, status=503)
        versions.append(request.query["resourceVersion"])
        if len(versions) == 3:
            third.set()
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        after = int(request.query["resourceVersion"]) + 1
        event = {"type": "ADDED", "object": {"metadata": {"name": f"s{after}", "namespace": "n",
                                                          "resourceVersion": str(after)}}}
        await response.write(json.dumps(event).encode() + b"\n")
        await asyncio.sleep(0.3)  # read by then; an event came, so no ShortWatch
        assert request.transport is not None
        request.transport.abort()  # cut mid-stream: no last chunk
        return response

    app = web.Application()
    app.router.add_get("/api/v1/secrets", api)
    seen: list[str] = []
    async with TestServer(app) as server:
        kube = client.KubeClient(kubernetes.client.Configuration(host=str(server.make_url("")).rstrip("/")))
        watch = informer.Informer(kube, "/api/v1/secrets", on_upsert=lambda body: seen.append(body["metadata"]["name"]),
                                  on_delete=lambda *_: None, name="secrets")
        task = asyncio.create_task(watch.run())
        try:
            await asyncio.wait_for(third.wait(), 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()
    assert lists == 1 and versions[:3] == ["100", "101", "102"]  # each watch goes on from the last event
    assert seen[:2] == ["s101", "s102"] and watch.cut_restarts >= 2
    assert refused == 2 and watch.failures == 2  # the refusals after the cut count, and are backed off


@pytest.mark.looptime
async def test_refusals_that_say_when_to_try_again_are_tried_then_and_resumed_from_for_minutes():
    """A restarted API server refuses watches of custom resources with 429 `retryAfterSeconds: 1`
    while their storage starts: the informer waited out its doubled back-off instead (30 s), and after
    six refusals relisted everything; queues made meanwhile went unseen ~40 s after it answered."""
    import asyncio
    import itertools

    from aiohttp import web

    async def starting(request: web.Request, number: int) -> web.StreamResponse:
        if number > 9:  # started: a watch that stays
            response = web.StreamResponse()
            await response.prepare(request)
            await asyncio.sleep(3600)
            return response
        throttle = web.json_response(_status(429, "TooManyRequests", retryAfterSeconds=1), status=429)
        return await _cut_once_then(request, number, throttle)

    lists, watched, watch = await _against(starting, 30)
    assert len(lists) == 1  # no relist: eight refusals, each tried again after the second it said
    assert [round(b - a, 1) for a, b in itertools.pairwise(watched[1:10])] == [1.0] * 8
    assert len(watched) == 10 and watch.failures == 8


@pytest.mark.looptime
async def test_a_scope_refused_for_good_is_a_warning_every_ten_minutes_not_every_back_off(
        caplog: pytest.LogCaptureFixture):
    """A namespace deleted while still listed in watchNamespaces (or its RoleBinding gone): each of the
    replica's watches there logged a WARNING every 30 s for as long as the operator ran."""
    import asyncio
    import logging

    import kubernetes
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from workerqueue_operator.k8s import informer

    loop = asyncio.get_running_loop()
    refused = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "secrets is forbidden"}
    asked = 0

    async def api(request: web.Request) -> web.StreamResponse:
        nonlocal asked
        asked += 1
        return web.json_response(refused, status=403)

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/gone/secrets", api)
    caplog.set_level(logging.DEBUG, logger=informer.__name__)
    async with TestServer(app) as server:
        kube = client.KubeClient(kubernetes.client.Configuration(host=str(server.make_url("")).rstrip("/")))
        watch = informer.Informer(kube, "/api/v1/namespaces/gone/secrets", on_upsert=lambda _: None,
                                  on_delete=lambda *_: None, name="secrets/gone", clock=loop.time)
        task = asyncio.create_task(watch.run())
        try:
            await asyncio.sleep(1300)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()
    told = [r for r in caplog.records if "watch secrets/gone failed" in r.getMessage()]
    assert len(told) == asked > 40 and watch.refused  # every refusal said, and tried again at the back-off
    assert [r.levelno for r in told].count(logging.WARNING) == 3  # at its start, 10 and 20 minutes on


async def _against(answer_watch: Any, seconds: float, *, path: str = "/apis/agentcontrol.dev/v1alpha1/workerqueues",
                   made: list[Any] | None = None, refused_lists: int = 0) -> tuple[list[float], list[float], Any]:
    """An informer run for `seconds` (loop time) against a server that lists nothing (its first
    `refused_lists` lists refused, 403) and answers each watch with `answer_watch(request, number)`:
    when each list and each watch was asked, the informer (also put in `made` as soon as it is made,
    for `answer_watch` to look at)."""
    import asyncio

    import kubernetes
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from workerqueue_operator.k8s import informer

    loop = asyncio.get_running_loop()
    lists: list[float] = []
    watched: list[float] = []

    async def api(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            lists.append(loop.time())
            if len(lists) <= refused_lists:
                return web.json_response(_status(403, "Forbidden"), status=403)
            return web.json_response({"metadata": {"resourceVersion": "100"}, "items": []})
        watched.append(loop.time())
        return await answer_watch(request, len(watched))

    app = web.Application()
    app.router.add_get(path, api)
    async with TestServer(app) as server:
        kube = client.KubeClient(kubernetes.client.Configuration(host=str(server.make_url("")).rstrip("/")))
        watch = informer.Informer(kube, path, on_upsert=lambda _: None, on_delete=lambda *_: None, name="w",
                                  clock=loop.time)
        if made is not None:
            made.append(watch)
        task = asyncio.create_task(watch.run())
        try:
            await asyncio.sleep(seconds)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()
    return lists, watched, watch


def _status(code: int, reason: str, **details: Any) -> dict[str, Any]:
    return {"kind": "Status", "code": code, "reason": reason, "message": reason, "details": details}


async def _cut_once_then(request: Any, number: int, then: Any) -> Any:
    """The first watch sends an event and is cut (the API server going away); every later one, `then`."""
    import asyncio

    from aiohttp import web

    if number > 1:
        return then
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    event = {"type": "ADDED", "object": {"metadata": {"name": "s", "namespace": "n", "resourceVersion": "101"}}}
    await response.write(json.dumps(event).encode() + b"\n")
    await asyncio.sleep(0.3)
    request.transport.abort()
    return response


@pytest.mark.looptime
async def test_a_watch_refused_with_a_retry_after_is_relisted_at_the_back_off_not_at_its_word():
    """A watch cache starting answers lists and refuses watches (429, `retryAfterSeconds: 1`): each
    refusal relisted the whole scope a second later, 120 full lists in two minutes, every informer."""
    from aiohttp import web

    async def starting(request: web.Request, number: int) -> web.StreamResponse:
        return web.json_response(_status(429, "TooManyRequests", retryAfterSeconds=1), status=429)

    lists, _, _ = await _against(starting, 120)
    assert 8 <= len(lists) <= 12  # 0.5 s doubling to 30 s


@pytest.mark.looptime
async def test_a_watch_resumed_after_a_cut_follows_the_retry_after_for_two_minutes_then_backs_off():
    """A throttle that goes on: a watch a second (and a WARNING line each) for as long as it lasted."""
    from aiohttp import web

    async def throttled(request: web.Request, number: int) -> web.StreamResponse:
        throttle = web.json_response(_status(429, "TooManyRequests", retryAfterSeconds=1), status=429)
        return await _cut_once_then(request, number, throttle)

    lists, watched, _ = await _against(throttled, 400)
    cut = watched[0]
    assert [t for t in lists if t <= cut + 121] == lists[:1]  # resumed from its version, no relist
    within = [t for t in watched if t <= cut + 121]
    assert 115 <= len(within) <= 125  # at its word, a second apart
    assert len(watched) - len(within) < 20  # then relisted, backed off up to 30 s


@pytest.mark.looptime
async def test_a_watch_refused_403_after_a_cut_marks_its_scope_refused_while_it_is_resumed_from():
    """Resumed from its version for two minutes, a scope refused since the cut (its RoleBinding deleted
    while the API server restarted) was not marked refused: the replica turned unready for every tenant.
    Still resumed from (an API server just restarted may refuse until its caches fill): no relist."""
    from aiohttp import web

    async def forbidden(request: web.Request, number: int) -> web.StreamResponse:
        return await _cut_once_then(request, number, web.json_response(_status(403, "Forbidden"), status=403))

    lists, watched, watch = await _against(forbidden, 3)
    assert watch.refused and len(lists) == 1 and len(watched) >= 3


@pytest.mark.looptime
async def test_a_watch_ended_by_an_error_event_saying_when_to_try_again_is_tried_again_then():
    """The API server may refuse a watch in its stream, as an ERROR event with a Status: its
    `retryAfterSeconds` was not read there."""
    import asyncio
    import itertools

    from aiohttp import web

    async def told(request: web.Request, number: int) -> web.StreamResponse:
        if number == 1:
            return await _cut_once_then(request, number, None)
        response = web.StreamResponse()
        await response.prepare(request)
        error = {"type": "ERROR", "object": _status(429, "TooManyRequests", retryAfterSeconds=20)}
        await response.write(json.dumps(error).encode() + b"\n")
        await asyncio.sleep(0.1)
        return response

    _, watched, _ = await _against(told, 65)
    gaps = [round(b - a) for a, b in itertools.pairwise(watched[1:])]
    assert gaps and all(gap == 20 for gap in gaps), gaps


@pytest.mark.looptime
async def test_a_watch_that_works_a_few_seconds_then_fails_is_relisted_at_a_growing_back_off():
    """A proxy that breaks every watch a few seconds in (an ERROR event, a relist each): each watch
    worked past STABLE_SECONDS, which reset the back-off, so the whole scope was listed every 3 s."""
    import asyncio

    from aiohttp import web

    async def breaking(request: web.Request, number: int) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await asyncio.sleep(2.5)
        error = {"type": "ERROR", "object": _status(500, "InternalError")}
        await response.write(json.dumps(error).encode() + b"\n")
        return response

    lists, watched, watch = await _against(breaking, 300)
    assert 8 <= len(lists) <= 16 and watch.failures == len(watched)  # the back-off grew to 30 s
    assert watch.down_since is None or watch.down_for() <= 31  # each watch worked a while: not down all along


@pytest.mark.looptime
async def test_a_scope_whose_watches_are_refused_stays_refused_across_the_lists_between():
    """RBAC with `list` and without `watch`: each list accepted turned the scope not refused until its
    watch was refused again, so readiness counted the namespace in and out."""
    from aiohttp import web

    made: list[Any] = []
    seen: list[bool] = []

    async def forbidden(request: web.Request, number: int) -> web.StreamResponse:
        seen.append(made[0].refused)  # a list has just been accepted
        return web.json_response(_status(403, "Forbidden"), status=403)

    lists, _, watch = await _against(forbidden, 60, made=made)
    assert len(lists) >= 3 and seen[0] is False and all(seen[1:]) and watch.refused


@pytest.mark.looptime
async def test_a_scope_refused_once_whose_watches_then_fail_otherwise_is_counted_again():
    """Access given back, every watch ended at once (a proxy): with only a working watch clearing it,
    the scope stayed refused for good, left out of readiness while it was failing all along."""
    from aiohttp import web

    async def ended(request: web.Request, number: int) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        return response  # ended at once, without an event

    lists, _, watch = await _against(ended, 60, refused_lists=1)
    assert len(lists) >= 3 and not watch.refused and watch.down_for() > 50


@pytest.mark.looptime
async def test_a_watch_that_worked_a_while_after_an_outage_fails_again_at_the_least_back_off():
    """The API server away for 40 s (the back-off grown to 30 s, the watch back at 61 s), then a watch
    that works 49 s and fails: waiting the 30 s grown in the outage left the store that /start serves
    30 s behind."""
    import asyncio

    from aiohttp import web

    loop = asyncio.get_running_loop()
    start = loop.time()

    async def outage_then_blip(request: web.Request, number: int) -> web.StreamResponse:
        if loop.time() - start < 40:
            return web.json_response(_status(503, "ServiceUnavailable"), status=503)
        response = web.StreamResponse()
        await response.prepare(request)
        if loop.time() - start < 110:
            await asyncio.sleep(110 - (loop.time() - start))
            error = {"type": "ERROR", "object": _status(500, "InternalError")}
            await response.write(json.dumps(error).encode() + b"\n")
            return response
        await asyncio.sleep(3600)
        return response

    lists, _, _ = await _against(outage_then_blip, 130)
    after = [t - start for t in lists if t - start >= 110]
    assert after and after[0] < 112  # at the least back-off, not 30 s on


@pytest.mark.looptime
async def test_a_resumed_watch_whose_version_is_gone_relists_at_once_without_a_failure():
    """Resumed after a cut from a version the API server no longer has (410 at once): a relist is
    what it needs, now; backed off and counted as a failure as a freshly listed version's 410 is, the
    replica stayed behind for nothing and turned unready."""
    from aiohttp import web

    gone = _status(410, "Expired")

    async def cut_then_gone(request: web.Request, number: int) -> web.StreamResponse:
        if number == 2:
            return web.json_response(gone, status=410)
        if number > 2:  # after the relist: a quiet watch
            await asyncio.sleep(3600)
        return await _cut_once_then(request, number, web.json_response(gone, status=410))

    made: list[Any] = []
    lists, watched, _ = await _against(cut_then_gone, 10, made=made)
    assert len(lists) == 2 and len(watched) == 3
    assert lists[1] - watched[1] < 0.1  # relisted at once
    assert made[0].failures == 0


@pytest.mark.looptime
async def test_a_watch_cut_at_once_after_a_cut_mid_stream_is_watched_again_from_its_version():
    """An API server going away cuts the watches mid-stream, and while it restarts cuts the next ones
    at once, before any event: each such watch is resumed from its version, backed off, not relisted
    (every replica relisting everything at once as it comes back)."""
    from aiohttp import web

    async def cut_then_cut_at_once(request: web.Request, number: int) -> web.StreamResponse:
        if number == 1:
            return await _cut_once_then(request, number, None)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        if number <= 4:  # restarting: answered, then cut before any event
            request.transport.abort()
        else:
            await asyncio.sleep(3600)
        return response

    made: list[Any] = []
    lists, watched, _ = await _against(cut_then_cut_at_once, 20, made=made)
    assert len(lists) == 1 and len(watched) == 5  # every watch from its version: no relist
    assert made[0].failures == 3 and made[0].cut_restarts == 1
    assert watched[2] - watched[1] >= 0.5 and watched[3] - watched[2] >= 1.0  # backed off
