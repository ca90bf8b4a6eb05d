"""The HTTP server as the operator runs it (runner.serve_http): timeouts, the connection cap, quiet logs."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.certs import self_signed
from tests.unit import apps
from tests.unit.factories import queue
from workerqueue_operator import runner as runner_
from workerqueue_operator.api import logs, serving
from workerqueue_operator.core.store import Store
from workerqueue_operator.models.settings import Settings

START = b"POST /api/v1/worker-queues/q-1/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good-token\r\n"



class Server:
    def __init__(self, app: web.Application, port: int) -> None:
        self.app = app
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer

    async def metrics(self) -> str:
        reader, writer = await self.connect()
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return (await reader.read()).decode()


@pytest.fixture
def wildcard_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wildcard `*` resolved to the two loopback addresses, as the passive lookup resolves it to
    0.0.0.0 and ::: the wildcard's own path is run, and no test listens beyond this machine."""
    real = socket.getaddrinfo

    def loopback(host: str | None, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        if host is None:
            return [*real("127.0.0.1", *args, **kwargs), *real("::1", *args, **kwargs)]  # type: ignore[arg-type]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(serving.socket, "getaddrinfo", loopback)


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    values = {"http_host": "127.0.0.1", "http_port": 0, "http_idle_timeout_seconds": 0.5,
              "http_body_timeout_seconds": 0.5, **getattr(request, "param", {})}
    settings = Settings.model_validate(values)
    store = Store(settings=settings)
    store.upsert_queue(queue("q1", queueId="q-1"))
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "good-token"})
    app = apps.make_app(store, settings=settings)
    http, port = await runner_.serve_http(app, settings)
    s = Server(app, port)
    try:
        yield s
    finally:
        for writer in s.writers:
            writer.close()
        await http.cleanup()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing the connection, which it must do within `seconds`."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_a_connection_that_sends_nothing_is_closed(server: Server):
    reader, _ = await server.connect()
    began = time.monotonic()
    assert await closed_within(reader, 3) == b""
    assert time.monotonic() - began >= 0.4


async def test_a_request_head_that_trickles_is_closed(server: Server):
    reader, writer = await server.connect()
    began = time.monotonic()
    for byte in START[:40]:
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)
        if reader.at_eof() or time.monotonic() - began > 1.5:
            break
    assert await closed_within(reader, 3) == b""
    assert time.monotonic() - began < 2


async def test_an_idle_keep_alive_connection_is_closed(server: Server):
    reader, writer = await server.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
    assert await closed_within(reader, 3) == b""


async def test_a_body_that_trickles_is_408(server: Server):
    reader, writer = await server.connect()
    writer.write(START + b"Content-Length: 100\r\n\r\n{")
    answer = await closed_within(reader, 4)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"Request body not received in time"' in answer


@pytest.mark.parametrize("server", [{"http_max_connections": 5, "http_idle_timeout_seconds": 30}], indirect=True)
async def test_at_the_limit_the_longest_idle_connection_makes_room(server: Server):
    idle = [await server.connect() for _ in range(5)]
    await asyncio.sleep(0.1)
    reader, writer = await server.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await closed_within(reader, 3)).startswith(b"HTTP/1.1 200")
    # The oldest went, for the newcomer, and the one after it for the /healthz above.
    assert await closed_within(idle[0][0], 1) == b""
    assert not idle[-1][0].at_eof()
    assert "workerqueue_http_problems_total{kind=\"connections_evicted\"}" in await server.metrics()


async def test_with_tls_sockets_that_never_start_their_handshake_do_not_shut_out_new_clients(tmp_path: Path):
    """At the limit, a TLS handshake still under way (a client that never sent its ClientHello: it
    is in no list of connections) makes room for a new client, as an idle connection would."""
    cert, key = self_signed(tmp_path, "localhost")
    settings = Settings.model_validate({"http_host": "127.0.0.1", "http_port": 0, "http_idle_timeout_seconds": 30,
                                        "http_max_connections": 5})
    app = apps.make_app(Store(settings=settings), settings=settings)
    http, port = await runner_.serve_http(app, settings, serving.Certificate(str(cert), str(key)))
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    try:
        await asyncio.sleep(0.2)
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await closed_within(reader, 3)).startswith(b"HTTP/1.1 200")
        writer.close()
        assert await closed_within(silent[0][0], 1) == b""  # the oldest handshake was given up
    finally:
        for _, w in silent:
            w.close()
        await http.cleanup()


@pytest.mark.parametrize("server", [{"http_max_connections": 3, "http_body_timeout_seconds": 30}], indirect=True)
async def test_when_every_connection_is_busy_a_new_one_is_503(server: Server):
    for _ in range(3):  # requests in progress: their bodies have not all arrived
        _, writer = await server.connect()
        writer.write(START + b"Content-Length: 10\r\n\r\n{")
    await asyncio.sleep(0.2)
    reader, writer = await server.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await closed_within(reader, 3)
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
    assert b'"Too many connections, try again"' in answer


@pytest.mark.parametrize("server", [{"http_max_connections": 4, "http_body_timeout_seconds": 30}], indirect=True)
async def test_one_client_holding_every_connection_busy_shuts_out_no_other(server: Server):
    # Bodies trickling in (or websockets, streams) within their timeouts, from one address: another
    # client (a kubelet probe, another worker) gets in; the address holding them all does not.
    hog = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=("127.0.0.2", 0))
        server.writers.append(writer)
        writer.write(START + b"Content-Length: 10\r\n\r\n{")
        hog.append(reader)
    await asyncio.sleep(0.2)
    reader, writer = await server.connect()  # from 127.0.0.1
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await closed_within(reader, 3)).startswith(b"HTTP/1.1 200")
    assert await closed_within(hog[-1], 1) == b""  # its newest went
    assert not hog[0].at_eof()
    for request in (START + b"Content-Length: 10\r\n\r\n{", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=("127.0.0.2", 0))
        server.writers.append(writer)
        writer.write(request)
        await asyncio.sleep(0.2)
    # Its fourth again took the slot the probe left; a fifth of its own makes no room among its own.
    assert (await closed_within(reader, 3)).startswith(b"HTTP/1.1 503")


async def test_malformed_requests_are_one_line_each_at_most_and_counted(
        server: Server, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    for _ in range(20):
        reader, writer = await server.connect()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        assert (await closed_within(reader, 3)).startswith(b"HTTP/1.")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in caplog.records if "BadHttpMessage" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].endswith("BadHttpMessage: Invalid header token")  # why, and not the bytes that follow
    assert 'workerqueue_http_problems_total{kind="bad_request"} 20' in await server.metrics()


async def test_a_malformed_request_is_logged_by_its_fault_never_by_what_it_sent(
        server: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """aiohttp's texts quote what the client sent, after the reason or within it: a token, in an
    Authorization header, a cookie, a query string, a CONNECT target, a chunk's size line."""
    caplog.set_level(logging.DEBUG)
    said_of: list[tuple[str, str]] = []  # each one's words: the log takes one a kind every 10 s
    told = logs.what_was_wrong

    def recorded(exc: BaseException) -> str:
        said_of.append((type(exc).__name__, told(exc)))
        return said_of[-1][1]

    monkeypatch.setattr(logs, "what_was_wrong", recorded)
    secret = b"SECRETTOKEN123"
    long = b"A" * 9000
    start = b"POST /api/v1/worker-queues/q/start HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    requests = {
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + b"\x01\r\n\r\n":
            "BadHttpMessage: Invalid header value char",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + long + b"\r\n\r\n":
            "LineTooLong: a line over 8190 bytes",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: s=" + secret + long + b"\r\n\r\n":
            "LineTooLong: a line over 8190 bytes",
        b"GET /healthz?token=" + secret + long + b" HTTP/1.1\r\nHost: x\r\n\r\n":
            "LineTooLong: a line over 8190 bytes",
        b"CONNECT ::" + secret + b" HTTP/1.1\r\nHost: x\r\n\r\n": "InvalidURLError",
        start + secret + b"\r\n": "BadHttpMessage: Invalid character in chunk size",
        start + b"5;" + secret + b"\nx\r\n": "BadHttpMessage: Missing expected CR after chunk extension name",
    }
    for request in requests:
        reader, writer = await server.connect()
        writer.write(request)
        assert (await closed_within(reader, 3)).startswith(b"HTTP/1.")
        writer.close()
    await asyncio.sleep(0.2)
    assert secret.decode() not in caplog.text
    assert [f"{kind}: {words}" if words else kind for kind, words in said_of] == list(requests.values())
    assert caplog.records[-1].getMessage().endswith("BadHttpMessage: Invalid header value char")
    # aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS) quotes what it read in its texts: fixed words.
    from aiohttp import http_exceptions, web_protocol

    quoting = http_exceptions.TransferEncodingError(f"Unexpected LF in chunk-extension: {secret!r}")
    assert logs.what_was_wrong(quoting) == "a malformed chunked body"
    wrapped = web_protocol.RequestPayloadError(str(quoting))
    wrapped.__cause__ = quoting
    assert logs.what_was_wrong(wrapped) == "a malformed chunked body"
    assert logs.what_was_wrong(http_exceptions.BadStatusLine(f"GET /?token={secret!r}")) == ""


@pytest.mark.parametrize("parser", ["HttpRequestParserC", "HttpRequestParserPy"])
async def test_either_parsers_refusal_is_said_without_what_the_client_sent(parser: str):
    """aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS, or no compiled wheel) quotes a request
    target raw, where a bare LF passes: taken for the C parser's layout, it was logged word for word."""
    from unittest import mock

    from aiohttp import http_exceptions, http_parser

    parse = getattr(http_parser, parser)
    for request in (b"GET /SECRET\n\nx HTTP/1.1\r\nHost: x\r\n\r\n", b"CONNECT SECRET\n\nx HTTP/1.1\r\n\r\n",
                    b"GET /?t=SECRET:\n\n\tb'x' HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1\r\nAuthorization: Bearer SECRET\x01\r\n\r\n"):
        with pytest.raises(http_exceptions.HttpProcessingError) as refused:
            parse(mock.Mock(), asyncio.get_running_loop(), 2**16, max_line_size=8190,
                  max_field_size=8190).feed_data(request)
        assert "SECRET" not in logs.what_was_wrong(refused.value), request


async def test_a_client_leaving_mid_body_is_499_not_500(server: Server, caplog: pytest.LogCaptureFixture):
    for _ in range(3):
        _, writer = await server.connect()
        writer.write(START + b"Content-Length: 100\r\n\r\n{")
        await asyncio.sleep(0.1)
        writer.close()
    await asyncio.sleep(0.2)
    text = await server.metrics()
    assert 'method="POST",code="499"} 3' in text
    assert 'code="500"' not in text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


@pytest.mark.parametrize("body", [
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"Content-Encoding: gzip\r\nContent-Length: 8\r\n\r\nnot gzip",
], ids=["bad-chunk-size", "bad-gzip"])
async def test_a_body_that_cannot_be_decoded_is_400(server: Server, body: bytes, caplog: pytest.LogCaptureFixture):
    reader, writer = await server.connect()
    writer.write(START + body)
    answer = await closed_within(reader, 3)
    assert answer.split(b" ", 2)[1] == b"400"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert 'workerqueue_http_problems_total{kind="bad_request"} 1\n' in await server.metrics()


def test_the_connection_limit_stays_below_the_fd_limit(monkeypatch: pytest.MonkeyPatch):
    def refuse(*args: object) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 1024))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert serving.connection_limit(4096, 256) == 768
    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 1 << 20))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: raised.append(limits))
    assert serving.connection_limit(4096, 256) == 4096
    assert raised == [(4352, 1 << 20)]
    # The pass-through's connections to an upstream host (each proxied websocket one more fd): room
    # made for them, or half of what is left under a low hard limit.
    raised.clear()
    assert serving.connection_limit(4096, 256, 1100) == 4096
    assert raised == [(5452, 1 << 20)]
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 1024))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert serving.connection_limit(4096, 256, 1100) == 384
    assert serving.connection_limit(4096, 256, 100) == 668


def test_a_certificate_is_reloaded_when_its_files_change_and_kept_when_they_do_not_load(tmp_path: Path):
    old, new = self_signed(tmp_path, "old"), self_signed(tmp_path, "new")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(old[0], cert)
    shutil.copy(old[1], key)
    certificate = serving.Certificate(str(cert), str(key))
    first = certificate.context
    assert not certificate.reload() and certificate.context is first  # unchanged files: nothing read again
    shutil.copy(new[0], cert)  # half-way through a rotation: the new certificate, the old key
    with pytest.raises(ssl.SSLError):
        certificate.reload()
    assert certificate.context is first  # still serving the old pair
    shutil.copy(new[1], key)
    assert certificate.reload() and certificate.context is not first


@pytest.mark.parametrize("server", [{"http_host": "*"}], indirect=True)
async def test_the_default_host_serves_ipv4_and_ipv6_alike(wildcard_on_loopback: None, server: Server):
    """`*` (the default, the chart's): a Service reaches the pod over IPv4 or IPv6, whichever the
    cluster has. Asked here on the two loopback addresses."""
    for host in ("127.0.0.1", "::1"):
        reader, writer = await asyncio.open_connection(host, server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 "), host
        writer.close()


async def test_a_named_host_that_cannot_be_listened_on_is_an_error():
    settings = Settings.model_validate({"http_host": "192.0.2.1", "http_port": 0})  # TEST-NET-1: not this machine's
    with pytest.raises(OSError):
        await runner_.serve_http(apps.make_app(Store(settings=settings), settings=settings), settings)
    assert Settings().http_host == serving.ANY_HOST


async def test_the_default_host_serves_on_a_machine_without_ipv6(wildcard_on_loopback: None,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """A kernel booted without IPv6 refuses the socket itself: IPv4 serves alone."""
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(serving.socket, "socket", no_ipv6)
    settings = Settings.model_validate({"http_host": "*", "http_port": 0})
    http, port = await runner_.serve_http(apps.make_app(Store(settings=settings), settings=settings), settings)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        writer.close()
    finally:
        await http.cleanup()


async def test_a_port_in_use_is_an_error_also_for_the_default_host(wildcard_on_loopback: None):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        settings = Settings.model_validate({"http_host": "*", "http_port": taken.getsockname()[1]})
        with pytest.raises(OSError):
            await runner_.serve_http(apps.make_app(Store(settings=settings), settings=settings), settings)
    finally:
        taken.close()


async def test_the_end_of_a_flood_of_client_problems_is_told_once_its_pace_allows(caplog: pytest.LogCaptureFixture):
    from workerqueue_operator.api import logs, metrics

    now = [0.0]
    log = logs.Throttled(logging.getLogger("throttled-test"), metrics.Metrics(), clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="throttled-test")
    for i in range(5):
        log.warning("bad_request", "bad request %s", i)
    settling = log.settling(object())
    await anext(settling)  # started as the app starts
    now[0] = 11.0
    await asyncio.sleep(1.2)
    with pytest.raises(StopAsyncIteration):
        await anext(settling)  # stopped as the app stops
    assert [r.getMessage() for r in caplog.records] == [
        "bad request 0", "bad request 4 (and 3 more like it in the last 11s)"]


def test_the_servers_own_errors_stay_errors_with_their_traceback_and_only_clients_faults_are_quiet(
        caplog: pytest.LogCaptureFixture):
    """aiohttp logs a malformed request and a failure of ours (a response that could not be written)
    alike, with `exception()`: both were turned into one INFO line counted as a bad request."""
    from aiohttp import http_exceptions

    from workerqueue_operator.api import logs, metrics

    counted = metrics.Metrics()
    server = serving.server_logger(logs.Throttled(logging.getLogger("server-test"), counted))
    caplog.set_level(logging.DEBUG, logger="server-test")
    for exc in (http_exceptions.BadHttpMessage("no"), ConnectionResetError("gone"), RuntimeError("a bug of ours")):
        try:
            raise exc
        except Exception as raised:
            server.exception("Error handling request from %s", "127.0.0.1", exc_info=raised)
    levels = [(r.levelno, r.exc_info is not None) for r in caplog.records]
    assert levels == [(logging.INFO, False), (logging.ERROR, True)]  # the second client's fault paced
    assert "RuntimeError: a bug of ours" in caplog.text
    text = counted.render()
    assert 'workerqueue_http_problems_total{kind="bad_request"} 2' in text
    assert 'workerqueue_http_problems_total{kind="unhandled_error"} 1' in text
