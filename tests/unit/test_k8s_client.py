"""Where the operator finds the API server in a pod; what its client leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import ssl
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
import pytest

from tests.certs import self_signed
from workerqueue_operator.k8s import client


@pytest.mark.parametrize(("environ", "server"), [
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, "https://10.96.0.1:443"),
    ({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}, "https://[fd00::1]:6443"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None),  # half the contract: not in a pod
    ({}, None),
])
def test_in_cluster_server_is_where_the_kubelet_says(environ: dict[str, str], server: str | None):
    assert client.in_cluster_server(environ) == server


@contextlib.contextmanager
def silent_tls_server(tmp_path: Path) -> Iterator[int]:
    """A TLS server on loopback (its port) that answers one watch with one event, then neither
    writes nor reads: a client's TLS shutdown is never answered, as by a busy or frozen API server."""
    cert, key = self_signed(tmp_path, "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    done = threading.Event()
    line = b'{"type": "ADDED", "object": {}}\n'

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            request = b""
            while b"\r\n\r\n" not in request:
                request += tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"%x\r\n%s\r\n" % (len(line), line))
            done.wait(30)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            done.set()
            thread.join(30)


def exec_kubeconfig(tmp_path: Path, server: str, plugin: Path) -> Path:
    """A kubeconfig whose user's credentials come from `plugin`, an exec plugin run by this Python."""
    import json
    import sys

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": [str(plugin)],
            "interactiveMode": "Never"}}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return kubeconfig

def test_a_closed_client_leaves_no_socket_open_though_the_server_never_answers_its_tls_shutdown(tmp_path: Path):
    # Found as a socket the garbage collector met long after the test that opened it: a watch ended
    # while the API server was busy, then its client closed and its event loop with it.
    with silent_tls_server(tmp_path) as port:
        configuration = kubernetes.client.Configuration(host=f"https://127.0.0.1:{port}")
        configuration.verify_ssl = False

        async def watch_then_close() -> None:
            kube = client.KubeClient(configuration)
            events = kube.watch("/api/v1/secrets", {}, timeout=30)
            assert await anext(events) == {"type": "ADDED", "object": {}}
            await events.aclose()  # the response closed mid-stream, as when the informer stops
            await kube.close()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            loop = asyncio.new_event_loop()  # its own loop, ended in the test as pytest-asyncio ends one
            try:
                loop.run_until_complete(watch_then_close())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
            gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_a_watch_that_goes_quiet_ends_after_its_idle_time(tmp_path: Path):
    with silent_tls_server(tmp_path) as port:
        configuration = kubernetes.client.Configuration(host=f"https://127.0.0.1:{port}")
        configuration.verify_ssl = False
        kube = client.KubeClient(configuration)
        events = []
        try:
            async with asyncio.timeout(20):
                with pytest.raises(client.WatchIdle, match=r"nothing received for 0\.5s"):
                    async for event in kube.watch("/api/v1/secrets", {}, timeout=30, idle=0.5):
                        events.append(event)
        finally:
            await kube.close()
    assert events == [{"type": "ADDED", "object": {}}]


async def test_no_call_leaves_the_object_it_names_by_way_of_dot_segments():
    """The HTTP client resolves `..`: a Secret named `../../victim/secrets/x` was read from another
    namespace. Such a name is no Secret's (refused by the schema too), and no such path is sent."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from workerqueue_operator.k8s import resources

    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"kind": "Secret", "data": {"k": "c2VjcmV0"}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    async with TestServer(app) as server:
        kube = client.KubeClient(kubernetes.client.Configuration(host=str(server.make_url("")).rstrip("/")))
        try:
            assert await resources.read_secret(kube, "team-a", "../../victim/secrets/x") is None
            for path in ("/api/v1/namespaces/team-a/secrets/../../victim/secrets/x", "/api/v1/namespaces/a/./b",
                         "/api/v1/namespaces/team-a/secrets/..", "/api/v1/namespaces/a/leases/q-%2e%2e/%2E%2E/b"):
                with pytest.raises(client.ERRORS, match="dot segment"):
                    await kube.get(path)
            assert await resources.read_secret(kube, "team-a", "creds") is not None  # a name as ever
        finally:
            await kube.close()
    assert seen == ["/api/v1/namespaces/team-a/secrets/creds"]


async def test_an_answer_that_is_not_json_is_one_of_the_errors_callers_catch():
    # A proxy in front of the API server answering with a page: callers catch ERRORS (a 503, a retry),
    # and anything else became a 500 with a traceback, or ended a background loop.
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def page(request: web.Request) -> web.Response:
        if request.path.endswith("/json"):  # JSON, but no object: read as one, an AttributeError (a 500)
            return web.json_response([{"sign in": True}] if "list" in request.path else None)
        return web.Response(text="<html>sign in</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    async with TestServer(app) as server:
        kube = client.KubeClient(kubernetes.client.Configuration(host=str(server.make_url("")).rstrip("/")))
        try:
            with pytest.raises(client.ERRORS, match="not JSON") as caught:
                await kube.create("/apis/authentication.k8s.io/v1/tokenreviews", {"spec": {"token": "t"}})
            for path in ("/api/v1/null/json", "/api/v1/list/json"):
                with pytest.raises(client.ERRORS, match="no JSON object") as object_caught:
                    await kube.get(path)
                assert "sign in" not in str(object_caught.value)
        finally:
            await kube.close()
    assert "sign in" not in str(caught.value)


async def test_an_exec_plugin_refreshing_credentials_does_not_stop_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # `run --kubeconfig` with an exec user (`aws eks get-token`): the plugin runs again whenever its
    # token is near expiry. On the event loop, every /start and heartbeat waited for it meanwhile.

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    seen: list[str] = []

    async def api(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"kind": "APIVersions"})

    app = web.Application()
    app.router.add_get("/api", api)
    plugin = tmp_path / "plugin.py"
    plugin.write_text(  # a token that expires within the client's 5-min skew: read again at each refresh
        "import datetime, json, time\n"
        "time.sleep(1)\n"
        "expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)\n"
        "status = {'token': 'from-plugin', 'expirationTimestamp': expiry.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "                  'status': status}))\n")
    async with TestServer(app) as server:
        kubeconfig = exec_kubeconfig(tmp_path, str(server.make_url("")).rstrip("/"), plugin)
        kube = client.KubeClient(client.load_configuration(str(kubeconfig)))
        monkeypatch.setattr(client, "AUTH_REFRESH_SECONDS", 0.0)  # every request reads credentials anew
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            await kube.get("/api")  # the plugin runs for a second meanwhile
        finally:
            ticker.cancel()
            await kube.close()
    assert seen == ["Bearer from-plugin"]
    assert ticks >= 20, "the event loop stood still while the plugin ran"


async def test_a_call_is_bounded_by_its_timeout_credentials_included(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # An exec plugin that hangs: the read of credentials waited up to its own 30 s before the call's
    # timeout began, past the worker's own timeout on a heartbeat or a disconnect.
    import time

    plugin = tmp_path / "plugin.py"
    plugin.write_text(  # answers once (the configuration's load), then hangs
        "import datetime, json, pathlib, sys, time\n"
        f"marker = pathlib.Path({str(tmp_path / 'ran')!r})\n"
        "if marker.exists():\n"
        "    time.sleep(6)\n"
        "marker.touch()\n"
        "expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)\n"
        "status = {'token': 't', 'expirationTimestamp': expiry.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "                  'status': status}))\n")
    kubeconfig = exec_kubeconfig(tmp_path, "http://127.0.0.1:9", plugin)
    monkeypatch.setattr(client, "AUTH_TIMEOUT_SECONDS", 5.0)
    kube = client.KubeClient(client.load_configuration(str(kubeconfig)))
    monkeypatch.setattr(client, "AUTH_REFRESH_SECONDS", 0.0)  # read anew at the call: the plugin hangs
    began = time.monotonic()
    try:
        with pytest.raises(client.ERRORS):
            await kube.request("GET", "/api", timeout=0.5)
    finally:
        await kube.close()
    assert time.monotonic() - began < 4, "the call waited for the credentials' own timeout"


async def test_credentials_whose_read_hangs_are_read_anew_not_waited_for_until_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):

    plugin = tmp_path / "plugin.py"
    plugin.write_text(  # answers (the configuration's load), then hangs once, then answers again
        "import datetime, json, pathlib, time\n"
        f"runs = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "n = int(runs.read_text()) + 1 if runs.exists() else 1\n"
        "runs.write_text(str(n))\n"
        "if n == 2:\n"
        "    time.sleep(6)\n"
        "expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)\n"
        "status = {'token': 't', 'expirationTimestamp': expiry.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "                  'status': status}))\n")
    kubeconfig = exec_kubeconfig(tmp_path, "http://127.0.0.1:9", plugin)  # nothing listens there
    monkeypatch.setattr(client, "AUTH_TIMEOUT_SECONDS", 1.0)
    kube = client.KubeClient(client.load_configuration(str(kubeconfig)))
    monkeypatch.setattr(client, "AUTH_REFRESH_SECONDS", 0.0)
    try:
        with pytest.raises(TimeoutError):
            await kube.request("GET", "/api", timeout=0.5)  # the hung read
        await asyncio.sleep(1.1)
        # Read anew: past the credentials, to the server (refused), within the call's timeout.
        with pytest.raises(aiohttp.ClientConnectorError):
            await kube.request("GET", "/api", timeout=2.5)
    finally:
        await kube.close()


@pytest.mark.parametrize(("payload", "terminating"), [
    (b'{"kind": "Status", "reason": "Forbidden", "message": "unable to create new content in namespace ops", '
     b'"details": {"causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace"}]}}', True),
    (b'{"kind": "Status", "reason": "Forbidden", "message": "exceeded quota: q"}', False),
    (b'{"kind": "Status", "reason": "Forbidden", "details": {"causes": "not a list"}}', False),
    (b'<html>busy</html>', False),
])
def test_a_refusal_tells_whether_its_namespace_is_going(payload: bytes, terminating: bool):
    # A namespace being deleted takes the queue with it: re-making its token Secret there is no problem
    # to report, whereas a quota's refusal is.
    assert client._api_error(403, payload, "/api/v1/namespaces/ops/secrets").namespace_terminating is terminating


def test_a_quiet_error_keeps_what_decides_and_drops_the_servers_text():
    loud = client.ApiError(500, "InternalError", 'admission webhook denied: data.token "s3cr3t"', ("X",))
    quiet = loud.quiet("creating Secret q-worker-token failed (500 InternalError)")
    assert (quiet.status, quiet.reason, quiet.causes) == (500, "InternalError", ("X",))
    assert "s3cr3t" not in str(quiet) and "s3cr3t" not in quiet.message


def test_run_gives_up_on_a_kubeconfig_whose_credential_plugin_hangs(tmp_path: Path):
    """The plugin runs as the configuration loads: hanging (a metadata service that never answers),
    it left the operator hanging at start, saying nothing."""
    import subprocess
    import sys

    plugin = tmp_path / "plugin.py"
    plugin.write_text("import time\ntime.sleep(5)\n")  # bounded, so that it ends by itself after the test
    kubeconfig = exec_kubeconfig(tmp_path, "https://127.0.0.1:9", plugin)
    code = ("import sys\nfrom workerqueue_operator import cli\nfrom workerqueue_operator.k8s import client\n"
            "client.AUTH_TIMEOUT_SECONDS = 0.5\n"
            f"sys.exit(cli.main(['run', '--kubeconfig', {str(kubeconfig)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WQ_HTTP_PORT": "0"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot start: the Kubernetes client configuration was not loaded within 0.5s" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("text", ["clusters: [\n  token: s3cr3t", "- a\n- b\n", "users: 5\ncurrent-context: x\n"])
async def test_a_kubeconfig_that_cannot_be_read_is_said_in_a_line_never_quoted(tmp_path: Path, text: str):
    """No YAML, or not shaped as a kubeconfig: a traceback of the YAML parser or of a TypeError, which
    may quote the file (a token in it)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(text)
    with pytest.raises(client.ConfigurationError) as raised:
        await client.load_configuration_within(str(kubeconfig))
    assert "s3cr3t" not in str(raised.value) and "kubeconfig" in str(raised.value)


def test_a_failing_credential_plugins_output_is_not_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The library logs it at ERROR as the kubeconfig loads; a plugin's error output may quote a credential."""
    plugin = tmp_path / "plugin.py"
    plugin.write_text("import sys\nsys.stderr.write('refresh token hunter2 expired\\n')\nsys.exit(3)\n")
    kubeconfig = exec_kubeconfig(tmp_path, "https://127.0.0.1:9", plugin)
    with caplog.at_level(logging.ERROR):
        client.load_configuration(str(kubeconfig))
    assert "exec: process returned 3 (its error output is not logged)" in caplog.text
    assert "hunter2" not in caplog.text


@pytest.mark.parametrize(("status", "refused"), [
    (400, True), (403, True), (404, True), (413, True), (422, True),
    # Tried again: the operator's own token lapsed (read again within seconds), a timeout, a conflict,
    # a throttle, an outage.
    (401, False), (408, False), (409, False), (429, False), (500, False), (503, False)])
def test_what_counts_as_the_api_servers_refusal_is_one_rule(status: int, refused: bool):
    assert client.ApiError(status, "Reason", "message").refused is refused


@contextlib.asynccontextmanager
async def version_answered_by(handler: Any) -> AsyncIterator[client.KubeClient]:
    """A client of a server whose /version `handler` answers."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    app = web.Application()
    app.router.add_get("/version", handler)
    async with TestServer(app) as server:
        configuration = kubernetes.client.Configuration()
        configuration.host = str(server.make_url("")).rstrip("/")
        kube = client.KubeClient(configuration)
        try:
            yield kube
        finally:
            await kube.close()


async def test_the_operator_waits_for_an_api_server_out_of_reach_and_is_told_of_wrong_credentials():
    """kopf, started at once, gave up on an API server out of reach after a minute, with a traceback,
    and the pod crash-looped; a 401 is no outage, and is said at once."""
    from aiohttp import web

    from workerqueue_operator import runner

    answers = [503, 503, 200]

    async def version(request: web.Request) -> web.Response:
        status = answers.pop(0) if answers else 401
        return web.json_response({"kind": "Status", "code": status, "reason": "x"} if status != 200 else
                                 {"major": "1"}, status=status)

    stopping = asyncio.Event()
    async with version_answered_by(version) as kube:
        assert await asyncio.wait_for(runner.api_server_answers(kube, stopping), 10)  # after 1 + 2 s
        assert answers == []
        with pytest.raises(runner.StartupError, match="401 Unauthorized"):
            await runner.api_server_answers(kube, stopping)

    async def page(request: web.Request) -> web.Response:  # a web server where the API server was meant
        return web.Response(text="<html>welcome</html>", content_type="text/html")

    async with version_answered_by(page) as kube:
        with pytest.raises(runner.StartupError, match="not the Kubernetes API"):
            await runner.api_server_answers(kube, asyncio.Event())

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async with version_answered_by(hang) as kube:  # a stop is not held up by a call that hangs
        told = asyncio.Event()
        waiting = asyncio.create_task(runner.api_server_answers(kube, told))
        await asyncio.sleep(0.5)
        told.set()
        assert await asyncio.wait_for(waiting, 1) is False

    out_of_reach = kubernetes.client.Configuration()
    out_of_reach.host = "http://127.0.0.1:9"
    kube = client.KubeClient(out_of_reach)
    try:
        waiting = asyncio.create_task(runner.api_server_answers(kube, stopping))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        stopping.set()
        assert await asyncio.wait_for(waiting, 5) is False
    finally:
        await kube.close()


async def test_a_lane_reaches_the_api_server_while_the_clients_own_pool_is_taken_and_closes_with_it():
    """TokenReviews shared the pool with background writes: behind them, with the API server slow,
    a review waited for a connection past its bound, and /start answered 503."""
    from aiohttp import web

    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if request.query.get("slow"):
            await release.wait()
        return web.json_response({"major": "1"})

    async with version_answered_by(slow) as kube:
        kube._pool_size = 2
        lane = kube.lane(1)
        held = [asyncio.create_task(kube.get("/version", {"slow": "1"})) for _ in range(2)]
        try:
            with pytest.raises(TimeoutError):  # the pool is taken: a third call waits for a connection
                await asyncio.wait_for(kube.get("/version"), 1.0)
            assert await asyncio.wait_for(lane.get("/version"), 1.0) == {"major": "1"}
        finally:
            release.set()
            await asyncio.gather(*held)
    assert lane._session is not None and lane._session.closed
