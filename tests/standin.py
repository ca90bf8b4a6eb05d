"""A stand-in upstream control plane: an aiohttp app that tells what it received.

Every path echoes the request as JSON (method, path and query as sent, headers, body length and
sha256, the body read as it streams in, never held whole), except:
- `.../resolved/full` (an agent's resolved environment): the credential it was called with, as the
  Agent Control Plane answers it (`resolved_env_vars.KUBIYA_API_KEY`), in a header too
  (`X-Called-With`); `?pad=N` adds N bytes; streamed in pieces, the credential split across two of
  them, with `?stream=1`; `?coding=gzip` (or `deflate`, raw with `&raw=1`) compresses it whatever
  the request asked (another coding is only named; `a,b` names two, one header line each),
  `&plain=1` names the coding only, `&trail=X` adds bytes X after the compressed ones, `&cut=N`
  takes its last N bytes off;
- `.../stream?events=N&gap=S`: N server-sent events, S seconds apart (a client that goes away
  meanwhile is noted in `received` as method `GONE`);
- `.../hang`, and every path under a leading `/hang/` (an LLM proxy that never answers): never
  answers (until the client goes away);
- `.../stall?length=N`: answers headers (Content-Length: N, default 100) and 10 bytes, then nothing more;
- `.../ws/workers/{worker_id}`: a websocket that first sends the headers it was opened with, then
  echoes every message back (text as text, binary as binary); `close` closes it with code 4000,
  `flood` makes it send 64 KiB messages for as long as it is open; with `X-Answer-Status`, the
  handshake is refused with that status, `Retry-After: 7` and `WWW-Authenticate: Bearer`.

The echoed headers are sealed (base64 of their JSON; read with `headers`, `header_values`): the
pass-through gives a worker its own token wherever the organization's key shows in an answer, and
what the upstream received is to be read as it was.

`StandIn` runs it in a thread of its own, for tests that drive HTTP synchronously; `received`
lists what came in.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import threading
import zlib
from typing import Any

from aiohttp import WSMsgType, web
from multidict import CIMultiDict

RECEIVED: web.AppKey[list[tuple[str, str, str | None]]] = web.AppKey("received")


async def echo(request: web.Request) -> web.StreamResponse:
    request.app[RECEIVED].append((request.method, request.raw_path, request.headers.get("Authorization")))
    tail = request.match_info["tail"]
    if tail.endswith("/hang") or tail == "hang" or tail.startswith("hang/"):
        try:
            await asyncio.sleep(3600)
        finally:  # cancelled: the connection to it was closed (test servers cancel handlers)
            request.app[RECEIVED].append(("GONE", request.raw_path, None))
    if tail.endswith("stall"):
        response = web.StreamResponse(headers={"Content-Length": request.query.get("length", "100")})
        await response.prepare(request)
        await response.write(b"0123456789")
        await asyncio.sleep(3600)
    if tail.endswith("stream") and request.method == "GET":
        return await _events(request)
    if tail.endswith("resolved/full"):
        return await _resolved(request)
    if tail.endswith("redirect"):  # elsewhere on this host, websocket handshakes too
        raise web.HTTPTemporaryRedirect("/api/v1/redirected")
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _websocket(request)
    digest, length = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return web.json_response({
        "method": request.method,
        "path_qs": request.raw_path,
        "headers": _sealed(request),
        "body_length": length,
        "body_sha256": digest.hexdigest(),
    }, status=int(request.headers.get("X-Answer-Status", "200")),
        headers={"X-Stand-In": "yes", "Set-Cookie": "standin-session=s3cret; Path=/"})


async def _events(request: web.Request) -> web.StreamResponse:
    count, gap = int(request.query.get("events", "3")), float(request.query.get("gap", "0.2"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    sent = 0
    try:
        for index in range(count):
            if index:
                await asyncio.sleep(gap)
            await response.write(f"data: event {index}\n\n".encode())
            sent += 1
    except ConnectionResetError:
        return response
    finally:  # a reset, or the handler cancelled (test servers cancel handlers of lost connections)
        if sent < count:
            request.app[RECEIVED].append(("GONE", request.raw_path, None))
    await response.write_eof()
    return response


async def _websocket(request: web.Request) -> web.StreamResponse:
    if "X-Answer-Status" in request.headers:
        return web.json_response({"detail": "refused"}, status=int(request.headers["X-Answer-Status"]),
                                 headers={"Retry-After": "7", "WWW-Authenticate": "Bearer"})
    ws = web.WebSocketResponse(protocols=("agent.v1",))
    await ws.prepare(request)
    hello = {"path_qs": request.raw_path, "headers": _sealed(request)}
    await ws.send_str(json.dumps(hello))
    async for message in ws:
        if message.type is WSMsgType.TEXT and message.data == "close":
            await ws.close(code=4000, message=b"bye")
        elif message.type is WSMsgType.TEXT and message.data == "flood":
            while not ws.closed:  # 64 KiB messages, as fast as they are taken
                await ws.send_str("x" * 65536)
        elif message.type is WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def make_app(received: list[tuple[str, str, str | None]] | None = None) -> web.Application:
    """`received` collects (method, path and query, Authorization) of every request."""
    app = web.Application()
    app[RECEIVED] = received if received is not None else []
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def _coded(body: bytes, coding: str, *, raw: bool) -> bytes:
    """`body` in the last of `coding`'s codings (gzip, deflate: zlib's, or raw deflate with `raw`);
    left as it is in any other."""
    last = coding.split(",")[-1]
    if last == "gzip":
        return gzip.compress(body)
    if last == "deflate":
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        return packer.compress(body) + packer.flush()
    return body


def _sealed(request: web.Request) -> str:
    return base64.b64encode(json.dumps([[k, v] for k, v in request.headers.items()]).encode()).decode()


def headers(echoed: dict[str, Any]) -> list[list[str]]:
    """The headers the stand-in received, as the echo tells them."""
    found: list[list[str]] = json.loads(base64.b64decode(echoed["headers"]))
    return found


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in headers(echoed) if k.lower() == name.lower()]


async def _resolved(request: web.Request) -> web.StreamResponse:
    credential = request.headers.get("Authorization", "").partition(" ")[2]
    padding = "x" * int(request.query.get("pad", "0"))  # past SMALL_ANSWER, streamed by the pass-through
    body = json.dumps({"resolved_env_vars": {"KUBIYA_API_KEY": credential, "OTHER": padding}}).encode()
    answer_headers = {"Content-Type": "application/json", "X-Called-With": credential,
                      "Content-Digest": "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"}
    coding = request.query.get("coding")  # compressed all the same, as a server that ignores what it is asked
    if coding is not None:
        if request.query.get("plain") != "1":  # named, not done: a body that is not of its coding
            body = _coded(body, coding, raw=request.query.get("raw") == "1")
        body += request.query.get("trail", "").encode()
        body = body[:-int(request.query.get("cut", "0"))] if request.query.get("cut") else body
    headers = CIMultiDict(answer_headers)
    for line in (coding or "").split(","):  # one Content-Encoding line each
        if line:
            headers.add("Content-Encoding", line)
    if request.query.get("stream") != "1":
        return web.Response(body=body, headers=headers)
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    at = body.find(credential.encode())  # not found once compressed: halved then
    middle = at + len(credential) // 2 if at >= 0 else len(body) // 2
    for piece in (body[:middle], body[middle:]):
        await response.write(piece)
        await asyncio.sleep(0.05)  # two chunks for the reader, not one
    await response.write_eof()
    return response


class StandIn:
    """The stand-in on 127.0.0.1 at a free port, served from a thread of its own."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[tuple[str, str, str | None]] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="stand-in upstream", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StandIn:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(self.received), handle_signals=False, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        transports: list[asyncio.BaseTransport] = []
        if self._runner is not None:
            if self._runner.server is not None:
                transports = [h.transport for h in self._runner.server.connections if h.transport is not None]
            await self._runner.cleanup()
        # A `hang` handler outlives its client (aiohttp does not cancel handlers on a disconnect).
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        # The operator keeps its connections to the upstream alive: each is closed here, its socket
        # too, before this loop ends. Left to the garbage collector, such a socket would fail
        # whichever later test the collector ran in (an unraisable ResourceWarning).
        for transport in transports:
            transport.abort()
        for _ in range(3):  # connection_lost, which closes the socket, comes on a later loop turn
            await asyncio.sleep(0)
