"""Serving the app: connections bounded in number and in time, so that no client can use up the fds.

aiohttp closes a connection that has not delivered a complete request head within its
`keepalive_timeout` of opening, or of its previous answer: that one timeout covers connections
that send nothing, request heads that trickle in, and idle keep-alive (the body has its own, see
bodies.read). What aiohttp does not bound is how many connections are open: every one holds
an fd, and at the fd limit the operator can no longer reach the API server. So the listener here
accepts at most `limit` at once (kept below RLIMIT_NOFILE with room for the API-server client);
at the limit a new connection makes room by closing the longest-idle one (no request being
handled), so that a flood of idle sockets cannot lock out /healthz or a worker; when every
connection is busy, by closing the newest of the address holding the most, so that one client
cannot either; only when that address is the newcomer's own is the newcomer answered 503 and
closed. A TLS handshake must end within the idle timeout too.

Over TLS, each connection gets the `Certificate`'s current context, which follows the certificate
files: a renewed certificate is served without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import http_exceptions, web, web_protocol

from workerqueue_operator.api import logs

logger = logging.getLogger(__name__)

ANY_HOST = "*"
"""The listening address meaning every address of both IPv4 and IPv6 (the chart's: a cluster may be
IPv4-only, dual-stack or IPv6-only)."""
_FAMILY_MISSING = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}
"""Errors of an address family the machine does not have, as opposed to a port in use."""
LINGERING_SECONDS = 2.0
"""After an answer given before the whole body arrived (413, 408), how long the rest is read and
dropped so that the client sees the answer rather than a reset; aiohttp's 10 s default would let
a trickling client hold the connection five times longer."""

_REFUSED_BODY = b'{"detail": "Too many connections, try again"}'
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY)


LISTING_HOLD_SECONDS = 45.0
"""How long a worker's call waits for a replica just started to list what it answers from (see Listing)."""


class Listing:
    """Whether the replica's watches have listed, once, what the API answers from: queues, Secrets,
    registrations. The listener opens before that (its /readyz says so), and a call reaching it
    meanwhile (a restarted container before its endpoint is marked not ready, a client calling the
    pod directly) would be answered from empty memory: a valid queue token 401, a queue 404, which a
    worker takes for good (it exits on a /start that fails). Such calls wait for the lists instead,
    up to `hold_seconds`, then get a 503, as fatal to a worker's /start as the rest, which waits 60 s
    for its answer."""

    def __init__(self, *, listed: bool = True, hold_seconds: float = LISTING_HOLD_SECONDS) -> None:
        self.done = asyncio.Event()
        if listed:
            self.done.set()
        self.hold_seconds = hold_seconds

    async def wait(self) -> bool:
        """Whether the lists came in time."""
        try:
            async with asyncio.timeout(self.hold_seconds):
                await self.done.wait()
        except TimeoutError:
            return False
        return True


class Drain:
    """A stopping replica's last seconds of serving (settings.http_drain_seconds).

    A pod's endpoints are removed from its Service some time after it is told to stop; a connection
    opened meanwhile that meets a closed listener is refused, and a worker whose /start is refused
    exits for good (worker-protocol.md). So the listener stays open for a while, /readyz answers 503,
    and every answer closes its connection, so that keep-alive clients open their next one through
    the Service, to a replica that stays.
    """

    def __init__(self) -> None:
        self.active = False

    def begin(self) -> None:
        self.active = True


def connection_limit(wanted: int, reserved_fds: int, upstream_fds: int = 0) -> int:
    """`wanted`, or fewer when the fd limit leaves less after `reserved_fds` and `upstream_fds` (the
    pass-through's connections to the upstream hosts); raises the soft fd limit towards the hard one
    first if that makes room (as Go's runtime and nginx do). Under a low hard limit the upstream gets
    at most half of what `reserved_fds` leaves, not all of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + reserved_fds + upstream_fds
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    left = soft - reserved_fds
    return max(1, min(wanted, left - min(upstream_fds, left // 2)))


class _OneLine(logging.Filter):
    """aiohttp's own error lines (a malformed request, mostly: ~1 KiB of traceback each) as one
    throttled line naming the exception, instead of an ERROR with a traceback per request."""

    def __init__(self, log: logs.Throttled) -> None:
        super().__init__()
        self._log = log

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            self._log.log(min(record.levelno, logging.INFO), "http_server", "%s", record.getMessage())
        elif not isinstance(exc, _CLIENTS_FAULTS):
            # Ours, not the client's (a response that failed to be written, say): an ERROR with its
            # traceback, paced as any.
            self._log.log(record.levelno, "unhandled_error", "%s", record.getMessage(), exc_info=exc)
        else:
            first = logs.what_was_wrong(exc)
            # A client's fault, not ours: INFO (aiohttp logs plain-text port scans at DEBUG; kept so).
            self._log.fault(exc, "bad_request", "%s: %s%s", record.getMessage(), type(exc).__name__,
                            f": {first}" if first else "", level=min(record.levelno, logging.INFO))
        return False


_CLIENTS_FAULTS = (http_exceptions.HttpProcessingError, web_protocol.RequestPayloadError, ConnectionError)
"""What aiohttp logs of a malformed request, a body it cannot decode, a client gone."""


def server_logger(log: logs.Throttled) -> logging.Logger:
    """The logger to give aiohttp's server (AppRunner(logger=...))."""
    # Not from getLogger: one per app, each with its own throttle; it emits nothing itself.
    server = logging.Logger(f"{__name__}.aiohttp")
    server.addFilter(_OneLine(log))
    return server


class Listener:
    """Accepts connections itself, so that it decides how many are open (asyncio's own accept loop
    would take up to `backlog` sockets per turn whatever the limit, and hit EMFILE under a flood).

    `busy` holds the connections (aiohttp protocols) whose request is being handled; the app's
    middleware keeps it, since only it knows when a request starts and ends.
    """

    _BATCH = 16
    """Sockets accepted per turn of the loop: the most the fd count can overshoot `limit`, since a
    connection closed to make room gives its fd back on the next turn."""

    def __init__(self, server: web.Server, *, limit: int, busy: set[object], log: logs.Throttled,
                 certificate: Certificate | None, handshake_timeout: float) -> None:
        self._server = server
        self.limit = limit
        self._busy = busy
        self._log = log
        self._tls = certificate
        self._handshake_timeout = handshake_timeout
        self._socks: list[socket.socket] = []
        # Accepted, transport not made yet (TLS handshakes), oldest first.
        self._pending: dict[asyncio.Task[None], None] = {}
        self._resume: asyncio.TimerHandle | None = None

    @property
    def open(self) -> int:
        return len(self._server.connections) + len(self._pending)

    def listen(self, host: str, port: int) -> int:
        """Starts listening on every address `host` resolves to, as asyncio's create_server does
        (`*`: every address of IPv4 and of IPv6, the families the pod has); the bound port."""
        loop = asyncio.get_running_loop()
        wildcard = host == ANY_HOST
        bound: set[tuple[int, str]] = set()
        for family, _, _, _, address in socket.getaddrinfo(None if wildcard else host, port,
                                                           type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            ip = str(address[0])
            if (family, ip) in bound:
                continue
            sock: socket.socket | None = None
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((ip, port))
            except OSError as exc:
                if sock is not None:
                    sock.close()
                if not (wildcard and exc.errno in _FAMILY_MISSING):
                    raise
                # A family the pod lacks (IPv6 turned off, an IPv6-only cluster): the other serves.
                logger.info("not listening on %s: %s", ip, exc)
                continue
            bound.add((family, ip))
            self._socks.append(sock)
            port = int(sock.getsockname()[1])  # with port 0, every address gets the first one's port
            sock.listen(1024)
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, sock)
        if not bound:
            raise OSError(f"no address of {host!r} could be listened on (port {port})")
        return port

    async def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        loop = asyncio.get_running_loop()
        for sock in self._socks:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._socks = []
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self._BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the limit should prevent it; back off, never spin
                self._log.log(logging.ERROR, "accept_failed", "accepting HTTP connections failed: %s: %s",
                              type(exc).__name__, exc)
                loop.remove_reader(sock.fileno())
                self._resume = loop.call_later(0.5, self._resume_accepting, sock)
                return
            if self.open >= self.limit and not self._make_room(_host(address)):
                self._refuse(conn)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._connect(conn))
            self._pending[task] = None
            task.add_done_callback(self._handshake_done)

    def _resume_accepting(self, sock: socket.socket) -> None:
        self._resume = None
        if sock in self._socks:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._pending.pop(task, None)

    def _make_room(self, newcomer: str) -> bool:
        """Closes the longest-idle connection (the server keeps them oldest first), else the oldest
        TLS handshake still under way, else the newest busy one of the address holding the most when
        that is not `newcomer`'s (the address of the connection to make room for); False if none."""
        connections = self._server.connections
        # Skipping those closed already this turn: they leave the list on the next one.
        idle = next((c for c in connections if c.transport is not None and c not in self._busy), None)
        close: Callable[[], object]
        if idle is not None:
            what, close = "the longest-idle one was closed", idle.force_close
        elif waiting := next((t for t in self._pending if not t.cancelling()), None):
            # A socket that never sends its ClientHello holds a slot for the whole handshake timeout, and
            # is in no list of connections: a flood of them would otherwise shut out every client, probes too.
            what, close = "the oldest TLS handshake was given up", waiting.cancel
        else:
            # Every one busy (bodies trickling in, websockets, streams): one client holding them all
            # must not shut out every other, kubelet probes included. One address with more than the
            # newcomer's gives up its newest; the newcomer's own address never gains on another.
            by_host: dict[str, list[web.RequestHandler]] = {}
            for c in connections:
                if c.transport is not None:
                    by_host.setdefault(_host(c.transport.get_extra_info("peername")), []).append(c)
            most = max(by_host.values(), key=len, default=[])
            if len(by_host.get(newcomer, ())) + 1 >= len(most):
                return False
            what, close = f"the newest of {len(most)} busy ones from one address was closed", most[-1].force_close
        self._log.log(logging.WARNING, "connections_evicted", "%d HTTP connections (the limit): %s for a new one",
                      self.open, what)
        close()
        return True

    def _refuse(self, conn: socket.socket) -> None:
        self._log.log(logging.WARNING, "connections_refused",
                      "%d HTTP connections, all busy: a new one was refused", self.open)
        with contextlib.suppress(OSError):
            if self._tls is None:  # a plain-text answer means nothing inside TLS
                conn.setblocking(False)
                conn.send(_REFUSED)
        conn.close()

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                self._server, conn, ssl=self._tls.context if self._tls else None,
                ssl_handshake_timeout=self._handshake_timeout if self._tls else None)
        except (OSError, TimeoutError, ssl.SSLError, asyncio.CancelledError):
            conn.close()  # a failed handshake, or a client already gone


def _host(address: object) -> str:
    """The host part of a socket address (IPv4 or IPv6); "" for none (a Unix socket)."""
    return str(address[0]) if isinstance(address, tuple) and address else ""


class Certificate:
    """The HTTP API's certificate and key, read again when their files change. cert-manager renews a
    certificate well before it expires and the kubelet updates the files of the mounted Secret; a
    context loaded once at start-up would go on serving the old one until every worker's TLS fails."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self._files = (Path(cert_file), Path(key_file))
        self._loaded = self._read()
        self.context = self._load()

    def _read(self) -> tuple[bytes, bytes]:
        return self._files[0].read_bytes(), self._files[1].read_bytes()

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self._files)
        return context

    def reload(self) -> bool:
        """A new context when the files changed (True); a pair that does not load keeps the old one."""
        files = self._read()
        if files == self._loaded:
            return False
        # load_cert_chain reads the files again; if they changed since, the next check loads them once more
        self.context = self._load()
        self._loaded = files
        return True

    async def watch(self, every: float) -> None:
        failing = False
        while True:
            await asyncio.sleep(every)
            try:
                if self.reload():
                    logger.info("TLS certificate reloaded from %s", self._files[0])
                failing = False
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                if not failing:  # retried at every check, said once
                    logger.warning("TLS certificate %s not reloaded, the previous one is served: %s",
                                   self._files[0], exc)
                failing = True


class _Site(web.BaseSite):
    """The Listener as an aiohttp site, so that the runner's cleanup stops it."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, listener: Listener) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._listener = listener
        self.port = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        self.port = self._listener.listen(self._host, self._port)

    async def stop(self) -> None:
        await self._listener.close()
        await super().stop()


async def serve(runner: web.AppRunner, host: str, port: int, *, listener: Listener) -> int:
    """Listens on host:port for `runner` (set up) through `listener`; the bound port."""
    site = _Site(runner, host, port, listener)
    await site.start()
    return site.port
