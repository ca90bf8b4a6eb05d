"""A small asynchronous Kubernetes API client on aiohttp.

Credentials come from the `kubernetes` package's loaders (kubeconfig or in-cluster, token refresh
included), but every request is made on the event loop: nothing here blocks it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import json
import logging
import os
import re
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import kubernetes
import yaml

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"

MAX_WATCH_LINE = 16 * 1024 * 1024
"""Bytes one watch event may take. etcd stores objects up to ~1.5 MiB, whose JSON (base64 data
escaped once more) stays well below this; the cap only bounds memory against a broken stream."""


AUTH_REFRESH_SECONDS = 10.0
"""How long credentials read from the kubeconfig/in-cluster loader are reused (kubelet-rotated
ServiceAccount tokens stay valid for far longer)."""
AUTH_TIMEOUT_SECONDS = 30.0
"""Longest a request waits for credentials being read: a kubeconfig's exec plugin (`aws eks
get-token`) or auth provider runs then, in a thread, for a second or two, or hangs."""
MAX_HUNG_AUTH_READS = 4
"""Reads of credentials left hanging in their threads (a thread cannot be stopped) before calls fail
at once rather than start another."""


ABORT_CLOSED_TLS = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)
"""Before these versions a closed TLS connection keeps its socket until the peer answers the TLS
shutdown (python/cpython#118960): a busy or frozen API server leaves it open, and a client closed
meanwhile leaks it. aiohttp aborts such sockets when asked; later versions warn if asked."""


def tcp_connector(**options: Any) -> aiohttp.TCPConnector:
    """An aiohttp connector that closes every socket it opened, TLS ones included, on every Python."""
    return aiohttp.TCPConnector(enable_cleanup_closed=ABORT_CLOSED_TLS, **options)


class LineTooLong(ValueError):
    """A watch event longer than the reader's cap."""


class WatchIdle(Exception):
    """Nothing came on a watch for its `idle` seconds after the server answered (see KubeClient.watch)."""


class WatchCut(Exception):
    """The connection of a watch the server had answered was cut mid-stream (the API server restarting,
    a proxy's cut): the watch goes on from the last version seen, as client-go's does; no relist."""


class ApiError(Exception):
    """A non-2xx answer of the API server. The message is the server's Status message, never a body."""

    def __init__(self, status: int, reason: str, message: str, causes: tuple[str, ...] = (),
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.causes = causes
        """The Status's `details.causes[].reason` (e.g. NamespaceTerminating)."""
        self.retry_after = retry_after
        """The Status's `details.retryAfterSeconds`: when to try again (a 429 of a storage starting up,
        of priority and fairness), or None."""

    def quiet(self, message: str, *, kind: type[ApiError] | None = None) -> ApiError:
        """This error (as `kind`, a subclass that tells it apart, if given) with `message` in place of
        the server's, for writes of Secrets: a refusal's text (an admission webhook's) may quote the
        object, its data with it."""
        return (kind or ApiError)(self.status, self.reason, message, self.causes, self.retry_after)

    @property
    def namespace_terminating(self) -> bool:
        """Refused because its namespace is going: whatever was to be made there goes with it."""
        return "NamespaceTerminating" in self.causes

    @property
    def refused(self) -> bool:
        """Turned down for what the request is (a policy, RBAC, a quota, a bad object): it will be
        again until someone changes something. Not a conflict or a throttle, nor a 401: the operator's
        own token lapsed, and it is read again within seconds."""
        return 400 <= self.status < 500 and self.status not in (401, 408, 409, 429)

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"


_DOT_SEGMENT = re.compile(r"/\.\.?(/|$|\?)")

ERRORS: tuple[type[Exception], ...] = (ApiError, aiohttp.ClientError, OSError)
"""What a call of KubeClient raises when the API server refuses it, cannot be reached, or drops the
connection mid-answer. A loop that must go on catches all of them: aiohttp's ServerDisconnectedError
and ClientPayloadError (an API server restarting under a request) are not OSErrors; TimeoutError is."""


def in_cluster_server(environ: Mapping[str, str]) -> str | None:
    """The API server a pod is told about (KUBERNETES_SERVICE_HOST/PORT, as client-go reads them)."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class ConfigurationError(Exception):
    """The client configuration could not be loaded: the operator cannot start."""


async def load_configuration_within(kubeconfig: str | None = None, *, timeout: float | None = None) -> Any:
    """load_configuration, in a thread and within `timeout`: a kubeconfig's credential plugin runs
    as it loads, and one that hangs (waiting for a metadata service, an SSO prompt) would leave the
    operator hanging at start without a word. The thread is a daemon's, so that the process can
    still exit when it hangs."""
    loop = asyncio.get_running_loop()
    loaded: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if loaded.done():
            return  # given up on already
        if error is not None:
            loaded.set_exception(error)
        else:
            loaded.set_result(result)

    def load() -> None:
        result, error = None, None
        try:
            result = load_configuration(kubeconfig)
        except Exception as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=load, name="kube-configuration", daemon=True).start()
    timeout = AUTH_TIMEOUT_SECONDS if timeout is None else timeout
    try:
        async with asyncio.timeout(timeout):
            return await loaded
    except TimeoutError:
        raise ConfigurationError(f"the Kubernetes client configuration was not loaded within {timeout:g}s "
                                 "(a kubeconfig credential plugin that does not return?)") from None
    except kubernetes.config.ConfigException as exc:
        raise ConfigurationError(f"no Kubernetes client configuration: {exc}") from None
    except (yaml.YAMLError, TypeError, KeyError, AttributeError, ValueError) as exc:
        # A kubeconfig that is no YAML, or not shaped as one: said in a line, not as a traceback (never
        # quoting it: it may hold a token).
        raise ConfigurationError(f"the kubeconfig could not be read ({type(exc).__name__})") from None


class _PluginOutputUnlogged(logging.Filter):
    """The `kubernetes` library logs a failed credential plugin's error output at ERROR, on the root
    logger, as it loads the kubeconfig and at each refresh: that output may quote a credential. The
    line keeps its first sentence (the exit code)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.pathname.endswith(_KUBE_CONFIG_MODULE) and message.startswith("exec: process returned"):
            record.msg, record.args = message.split(". ", 1)[0] + " (its error output is not logged)", ()
        return True


_KUBE_CONFIG_MODULE = os.path.join("kubernetes", "config", "kube_config.py")
_PLUGIN_OUTPUT_UNLOGGED = _PluginOutputUnlogged()


def load_configuration(kubeconfig: str | None = None) -> Any:
    """The `kubernetes` client configuration: in-cluster if there, else the kubeconfig."""
    logging.getLogger().addFilter(_PLUGIN_OUTPUT_UNLOGGED)  # once: a filter is added once however often
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return configuration
        except kubernetes.config.ConfigException:
            pass
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, client_configuration=configuration)
    return configuration


class KubeClient:
    """JSON in, JSON out. Requests share a connection pool sized for parallel pod creation; watches
    have a pool of their own, without a bound: each holds its connection for as long as it runs, so
    past `pool_size` watches (3 a watched namespace) a shared pool would have no connection left for
    a status write or a TokenReview, and the next watch would wait for one without end."""

    def __init__(self, configuration: Any, *, pool_size: int = 64) -> None:
        self._configuration = configuration
        self.base_url = str(configuration.host).rstrip("/")
        self._ssl = self._ssl_context(configuration)
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._pool_size = pool_size
        self._lanes: list[KubeClient] = []
        self._auth: dict[str, str] = {}
        self._auth_until = 0.0
        self._auth_reading: asyncio.Future[dict[str, str]] | None = None
        self._auth_read_at = 0.0
        self._hung_reads: set[asyncio.Future[dict[str, str]]] = set()
        # Threads of their own: hung reads must not take the default executor's, which resolve
        # host names (aiohttp) for every other call.
        self._auth_threads = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_HUNG_AUTH_READS + 1,
                                                                   thread_name_prefix="kube-credentials")

    @staticmethod
    def _ssl_context(configuration: Any) -> ssl.SSLContext | bool:
        if not str(configuration.host).startswith("https"):
            return False
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
        if not configuration.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        return context

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session(limit=self._pool_size)
        return self._session

    def _watch_session_or_new(self) -> aiohttp.ClientSession:
        if self._watch_session is None or self._watch_session.closed:
            self._watch_session = self._new_session(limit=0)  # 0: no bound
        return self._watch_session

    def _new_session(self, *, limit: int) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=tcp_connector(limit=limit, ssl=self._ssl), raise_for_status=False)

    async def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", **await self._auth_headers()}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _auth_headers(self) -> dict[str, str]:
        # auth_settings() runs the loader's refresh hook, so rotated (in-cluster, exec) tokens are used.
        # It reads files and may run an exec plugin: at most every AUTH_REFRESH_SECONDS, in a thread
        # (never on the event loop, which serves /start meanwhile), one read at a time.
        now = time.monotonic()
        if now < self._auth_until:
            return self._auth
        reading = self._auth_reading
        if reading is not None and now - self._auth_read_at > AUTH_TIMEOUT_SECONDS:
            # Hung (an exec plugin that never returns): left to its thread and read anew, or that one
            # read would fail every call until a restart. At most MAX_HUNG_AUTH_READS threads so.
            self._hung_reads.add(reading)
            reading = self._auth_reading = None
        if reading is None:
            if len(self._hung_reads) >= MAX_HUNG_AUTH_READS:
                raise aiohttp.ClientConnectionError("credentials could not be read: earlier reads still hang")
            reading = self._auth_reading = asyncio.get_running_loop().run_in_executor(self._auth_threads,
                                                                                     self._read_auth)
            self._auth_read_at = now
            reading.add_done_callback(self._auth_read)
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_SECONDS):
                return await asyncio.shield(reading)
        except TimeoutError:
            raise TimeoutError(f"credentials not read within {AUTH_TIMEOUT_SECONDS:g}s") from None
        except Exception as exc:
            # Its text may quote a plugin's output: the type only.
            raise aiohttp.ClientConnectionError(f"credentials could not be read: {type(exc).__name__}") from None

    def _read_auth(self) -> dict[str, str]:
        return {auth["key"].title(): auth["value"] for auth in self._configuration.auth_settings().values()
                if auth.get("in") == "header" and auth.get("value")}

    def _auth_read(self, reading: asyncio.Future[dict[str, str]]) -> None:
        self._hung_reads.discard(reading)
        if self._auth_reading is reading:
            self._auth_reading = None
        if not reading.cancelled() and reading.exception() is None:
            self._auth = reading.result()
            self._auth_until = time.monotonic() + AUTH_REFRESH_SECONDS

    def lane(self, pool_size: int) -> KubeClient:
        """A client of the same API server and credentials with a connection pool of its own, closed with
        this one: for the calls a request waits on (TokenReviews), which must not queue for a
        connection behind background writes (Lease renewals, status writes, pod creates)."""
        lane = KubeClient(self._configuration, pool_size=pool_size)
        self._lanes.append(lane)
        return lane

    async def close(self) -> None:
        for lane in self._lanes:
            await lane.close()
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._auth_threads.shutdown(wait=False, cancel_futures=True)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> JSON:
        if _DOT_SEGMENT.search(urllib.parse.unquote(path)):  # the client decodes %2e before it resolves
            # The HTTP client resolves `..` (even a name's): the call would reach another object.
            raise ApiError(400, "BadRequest", "a path with a dot segment is not sent")
        session = self._session_or_new()
        data = None if body is None else json.dumps(body)
        # `timeout` bounds the whole call, the credentials' read included (an exec plugin may hang).
        async with asyncio.timeout(timeout):
            headers = await self._headers(content_type if data is not None else None)
            async with session.request(method, self.base_url + path, data=data, params=params, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                payload = await response.read()
        if response.status >= 400:
            raise _api_error(response.status, payload, path)
        try:
            result: JSON = json.loads(payload) if payload else {}
        except ValueError:
            # A proxy's HTML page, say: an answer that cannot be read, as any loop catching ERRORS expects.
            raise aiohttp.ClientPayloadError(f"the answer to {method} {path} is not JSON") from None
        if not isinstance(result, dict):
            # `null`, a list: JSON, but no Kubernetes object; read as one, it failed where nothing caught it.
            raise aiohttp.ClientPayloadError(f"the answer to {method} {path} is no JSON object")
        return result

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> JSON:
        return await self.request("GET", path, params=params)

    async def clock_offset(self, *, timeout: float = 10.0) -> float | None:
        """The API server's clock minus this one's, in seconds, from the `Date` of its answer to
        GET /version: within about a second (Date has whole seconds). None without a Date."""
        session = self._session_or_new()
        async with asyncio.timeout(timeout):
            headers = await self._headers(None)
            sent = time.time()
            async with session.get(self.base_url + "/version", headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                await response.read()
            received = time.time()
        try:
            server = email.utils.parsedate_to_datetime(response.headers.get("Date", "")).timestamp()
        except (TypeError, ValueError):
            return None
        # The server's time lay within [Date, Date + 1) when it answered, between sent and received.
        return server + 0.5 - (sent + received) / 2

    async def create(self, path: str, body: JSON, *, params: Mapping[str, str] | None = None) -> JSON:
        return await self.request("POST", path, body=body, params=params)

    async def patch(self, path: str, body: Any, *, content_type: str = MERGE_PATCH) -> JSON:
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def delete(self, path: str, body: JSON | None = None) -> JSON:
        return await self.request("DELETE", path, body=body)

    async def watch(self, path: str, params: Mapping[str, str], *, timeout: float, idle: float | None = None,
                    max_line: int = MAX_WATCH_LINE,
                    on_open: Callable[[], None] | None = None) -> AsyncGenerator[JSON, None]:
        """The events of one watch request, until the server ends it.

        With `idle`, WatchIdle once nothing at all has come for that many seconds after the server
        answered, for the caller to watch again: a connection dropped without a word (a load
        balancer's or NAT's idle cut) would otherwise go unnoticed for the whole `timeout`. The API
        server sends a bookmark a minute to a watch that allows them, so a live one is never quiet
        that long. `on_open` is called once the server has accepted the watch (answered 200).
        """
        session = self._watch_session_or_new()
        silence = idle if idle is not None else timeout + 30
        async with session.get(
            self.base_url + path,
            params={**params, "watch": "true"},
            headers=await self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=silence),
        ) as response:
            if response.status >= 400:
                raise _api_error(response.status, await response.read(), path)
            if on_open is not None:
                on_open()
            try:
                async for line in watch_lines(response.content, max_line=max_line):
                    yield json.loads(line)
            except TimeoutError as exc:
                if idle is None:
                    raise
                raise WatchIdle(f"nothing received for {idle:g}s") from exc
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionResetError) as exc:
                raise WatchCut(f"the stream was cut ({type(exc).__name__})") from exc


async def watch_lines(content: aiohttp.StreamReader, *, max_line: int = MAX_WATCH_LINE) -> AsyncIterator[bytes]:
    """The non-empty lines of a watch stream, each one event.

    Not `readline()`/`readuntil()`: their limit (about 128 KiB) is far below one event's size, which
    can reach 1.5 MiB of JSON for a full 1 MiB Secret. A partial last line at the end is dropped: the
    server cut the stream mid-event, and the informer resumes from the last complete one.
    """
    pending = bytearray()
    async for chunk in content.iter_any():
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if pending:
                pending += chunk[start:end]
                line = bytes(pending)
                pending.clear()
            else:
                line = chunk[start:end]
            start = end + 1
            if line.strip():
                yield line
        pending += chunk[start:]
        if len(pending) > max_line:
            raise LineTooLong(f"a watch event exceeds {max_line} bytes")


def _api_error(status: int, payload: bytes, path: str) -> ApiError:
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = {}
    if not isinstance(parsed, dict):
        parsed = {}
    if status == 404 and not parsed:
        # No Status: the path itself is unknown ("404 page not found"), most often a CRD not installed,
        # which would otherwise read `404 : ` in the log of an operator that never gets ready.
        return ApiError(status, "NotFound", f"the API server does not serve {path} "
                        "(for a custom resource: is its CustomResourceDefinition installed?)")
    return status_error(status, parsed)


def status_error(status: int, parsed: Mapping[str, Any]) -> ApiError:
    """The error a Status says (an answer's body, or a watch's ERROR event's object)."""
    details = parsed.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    # A StatusCause's type is `reason` on the wire (its Go field is Type).
    types = tuple(str(c.get("reason")) for c in causes if isinstance(c, dict)) if isinstance(causes, list) else ()
    after = details.get("retryAfterSeconds") if isinstance(details, dict) else None
    retry_after = float(after) if isinstance(after, int) and not isinstance(after, bool) and after > 0 else None
    return ApiError(status, str(parsed.get("reason", "")), str(parsed.get("message", ""))[:500], types, retry_after)
