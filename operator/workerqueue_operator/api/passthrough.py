"""Pass-through: whatever a worker calls under /api/v1/ that the operator does not serve goes to its
queue's upstream control plane, with the organization's API key in place of the worker's token.

Streamed both ways, never buffered whole: the worker's body is sent upstream as it arrives, the
answer is written back chunk by chunk as the upstream sends it (server-sent events keep flowing);
only an answer of a known length up to SMALL_ANSWER is read before it is sent on.
Websocket upgrades are proxied message by message. The key comes from the watch-fed Store, so a
rotated Secret is used from the next request on and no request reads the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict
from yarl import URL

from workerqueue_operator.api import callers, errors, lookups, metrics
from workerqueue_operator.api.keymask import KeyMask
from workerqueue_operator.core import queues, workers
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.shares import FairGate, Shares
from workerqueue_operator.core.store import Store
from workerqueue_operator.k8s.client import ABORT_CLOSED_TLS
from workerqueue_operator.models import settings as settings_

logger = logging.getLogger(__name__)
T = TypeVar("T")

_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

ROUTE = "/api/v1/{tail:.*}"
_WORKER_WEBSOCKET = re.compile(r"/api/v1/ws/workers/([^/]+)(?:/.*)?")
"""The websocket route /start names for a worker (queues.websocket_url_for): its worker's only."""
WORKER_SCHEMES = ("bearer", "userkey")
"""How workers present their token: `Bearer` on most calls, `UserKey` on some activity calls."""

# RFC 9110 §7.6.1 connection-specific headers, plus what the proxy sets itself (Host, Authorization,
# X-Forwarded-Proto) or negotiates on its own with the upstream (Expect); Proxy-* are for a proxy,
# never passed on. Where the request came from is the operator's to say, not the worker's. Cookies
# neither way: a session the upstream opens for a request signed with the organization's key is
# that key's, not the worker's to hold. `UserKey` as a header of its own is a credential the Agent
# Control Plane also reads: a worker's token sent so must not reach the upstream either. The answer
# is asked for uncompressed (Accept-Encoding: identity) and whole (no Range): the organization's key
# must be found in it (api/keymask.py), not split across two ranges a worker joins.
_NOT_FORWARDED = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Host", "Authorization", "UserKey", "Expect", "Cookie", "Accept-Encoding",
    "Range", "If-Range",
    "Forwarded", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP",
    # Where the request came from, said by the worker: the operator says so (X-Forwarded-For) itself.
    "X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Server", "X-Forwarded-Uri", "X-Client-IP",
    "X-Cluster-Client-IP", "True-Client-IP", "CF-Connecting-IP", "Fastly-Client-IP",
    # Another path or method than the request's, which some frameworks and intermediaries honour: the
    # checks above (a path under the base, no TRACE, the operator's own routes) would be undone.
    "X-Original-URL", "X-Rewrite-URL", "X-Original-URI", "X-Original-Method", "X-HTTP-Method-Override",
    "X-HTTP-Method", "X-Method-Override",
))
_NOT_RETURNED = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "TE", "Trailer", "Transfer-Encoding",
    "Upgrade", "Set-Cookie",
))
_DECODED = frozenset(("content-encoding", "content-length"))
"""What a compressed request's body no longer is once aiohttp's server has decompressed it: it goes
on decoded, chunked."""
# The websocket handshake's own headers are the client library's business on each side.
_WEBSOCKET_HANDSHAKE = frozenset(h.lower() for h in (
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept", "Content-Length",
))
_REFUSAL_HEADERS = ("Retry-After", "WWW-Authenticate")
"""What is kept of an upstream's refusal of a websocket handshake (its body is the operator's)."""
_DECODABLE = frozenset(("gzip", "x-gzip", "deflate"))
_DIGESTS = ("Content-MD5", "Digest", "Content-Digest", "Repr-Digest")
"""What says what the body's bytes are: no longer so where the worker's token took the key's place."""
_GZIP_OR_ZLIB = 47
"""zlib's window bits that read a gzip or a zlib stream, whichever it is (HTTP's deflate is zlib's)."""
SMALL_ANSWER = 64 * 1024
"""Answers of a known length up to this are read before they are sent on: headers and body then
leave in one write instead of two, which is most of the hop's cost for the JSON answers workers get.
Anything longer, or of unknown length (server-sent events), is streamed."""
_REPORT_EVERY = 60.0
"""Seconds between two warnings about the same upstream failing; the failures meanwhile are counted."""
_REPORTS_KEPT = 256
"""Upstreams remembered by the failure reports before the quiet ones are forgotten."""
CLOSE_TIMEOUT_SECONDS = 5.0
"""On shutdown, how long proxied websockets get to take their close frame."""


def worker_credential(authorization: str) -> tuple[str, str] | None:
    """(scheme as the worker wrote it, token) of an `Authorization: Bearer|UserKey <token>` header."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() not in WORKER_SCHEMES or not token or not queues.visible_ascii(token):
        return None
    return scheme, token


def _headers_listed_in_connection(values: Iterable[str]) -> set[str]:
    return {part.strip().lower() for value in values for part in value.split(",") if part.strip()}


_INFLATED_PIECE = 256 * 1024


class _Inflater:
    """A gzip- or deflate-coded answer decoded a bounded piece at a time: a chunk of a few KiB may
    decode to gigabytes, which must not be held at once. Raises zlib.error on what is not whole
    and well-formed (a body cut short, bytes past its end), for the answer to be broken off."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._decoder: Any = None
        self._fed = False

    def open(self, chunk: bytes) -> bytes:
        """The first byte the answer's first chunk decodes to; zlib.error when it is not of the coding.
        `deflate` is read as zlib's, or as raw deflate, which servers send under that name too."""
        for wbits in (_GZIP_OR_ZLIB, -zlib.MAX_WBITS) if self._coding == "deflate" else (_GZIP_OR_ZLIB,):
            decoder = zlib.decompressobj(wbits)
            try:
                head = decoder.decompress(chunk, 1)
            except zlib.error:
                continue
            self._decoder, self._fed = decoder, bool(chunk)
            return head
        raise zlib.error(f"a body that is not the {self._coding} it names")

    def pieces(self, chunk: bytes) -> Iterator[bytes]:
        decoder = self._decoder
        self._fed = self._fed or bool(chunk)
        piece = decoder.decompress(decoder.unconsumed_tail + chunk, _INFLATED_PIECE)
        while piece:
            yield piece
            piece = decoder.decompress(decoder.unconsumed_tail, _INFLATED_PIECE) if decoder.unconsumed_tail else b""
        if decoder.eof and decoder.unused_data:
            raise zlib.error("bytes past the end of the compressed answer")

    def end(self) -> bytes:
        rest: bytes = self._decoder.flush()
        if self._fed and not self._decoder.eof:
            raise zlib.error("the compressed answer ended early")
        return rest


def _coding(answer: aiohttp.ClientResponse) -> str | None:
    """The answer's codings, if any: every Content-Encoding line, and a Transfer-Encoding other than
    chunked (aiohttp's client takes the chunks apart and leaves the rest coded)."""
    named = [*answer.headers.getall("Content-Encoding", []),
             *(c for v in answer.headers.getall("Transfer-Encoding", []) for c in v.split(",")
               if c.strip().lower() != "chunked")]
    codings = [c.strip().lower() for v in named for c in v.split(",")]
    return ", ".join(c for c in codings if c and c != "identity") or None


_SEGMENT_NOISE = re.compile(r"^[\s\x00]+|[\s\x00]+$")


def _spellings(path: str) -> set[str]:
    """`path` (decoded once) as an upstream may route it: slashes merged, in any case; decoded once
    more; `\\` read as `/`; each segment without its matrix parameters (`;x`, which Tomcat, Jetty and
    Spring drop) or the whitespace and NULs around it (which some proxies trim)."""
    spelt = set()
    for decoded in {path, unquote(path)}:
        for form in (decoded, decoded.replace("\\", "/")):
            spelt.add(re.sub("/{2,}", "/", form).rstrip("/").lower())
            segments = (_SEGMENT_NOISE.sub("", segment.split(";", 1)[0]) for segment in form.split("/"))
            spelt.add(re.sub("/{2,}", "/", "/".join(segments)).rstrip("/").lower())
    return spelt


def _decompressed(request: web.BaseRequest) -> bool:
    """Whether aiohttp's server decompresses the body: its parser's own decision as it read the
    headers (which of several Content-Encoding values it follows, its C and Python parsers differ
    on). Read where the request keeps it: the public `Request.message` is deprecated."""
    return getattr(getattr(request, "_message", None), "compression", None) is not None


def request_headers(
    incoming: Iterable[tuple[str, str]], *, authorization: str, remote: str | None, proto: str,
    decoded: bool = False,
) -> CIMultiDict[str]:
    """The headers sent upstream: the worker's, less the hop-by-hop ones and its credential, plus
    the organization's credential and where the request came from."""
    pairs = list(incoming)
    dropped = _NOT_FORWARDED | _headers_listed_in_connection(v for k, v in pairs if k.lower() == "connection")
    # `decoded`: aiohttp's server decompressed the body (its parser's own decision, as it took the
    # headers). Otherwise (an unknown coding, "gzip, gzip") the body goes on as sent, and the upstream
    # must be told its coding.
    if decoded:
        dropped |= _DECODED
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in pairs if k.lower() not in dropped)
    out["Authorization"] = authorization
    out["Accept-Encoding"] = "identity"
    if remote:
        # Appended, as a proxy does: behind an ingress the chain holds the worker's address. An entry
        # the worker made up is the upstream's to weigh (it trusts only what its own proxies add).
        previous = out.getall("X-Forwarded-For", [])
        out["X-Forwarded-For"] = ", ".join([*previous, remote])
    out["X-Forwarded-Proto"] = proto
    return out


def response_headers(incoming: Iterable[tuple[str, str]], *, upstream_url: str,
                     mask: KeyMask | None = None) -> CIMultiDict[str]:
    """The upstream's answer headers as the worker gets them: the hop-by-hop ones left out, and a
    redirect into the upstream made relative, so that the worker follows it through the operator
    (straight to the upstream it would carry its own token there, and lack the organization's key);
    the key, should one say it, in `mask`'s care."""
    pairs = list(incoming)
    dropped = _NOT_RETURNED | _headers_listed_in_connection(v for k, v in pairs if k.lower() == "connection")
    out: CIMultiDict[str] = CIMultiDict((k, mask.header(v) if mask is not None else v)
                                        for k, v in pairs if k.lower() not in dropped)
    location = out.get("Location")
    if location is not None:
        out["Location"] = _through_operator(location, upstream_url)
    return out


FORWARDED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
UNFORWARDED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
"""Never passed through (any other is, as an upstream may define its own)."""


def _through_operator(location: str, upstream_url: str) -> str:
    """A redirect into the upstream's base URL as a path on the operator; any other as it is. The
    scheme and host are compared as URLs compare them (case-insensitively, default ports), and a
    path-only one counts as the upstream's (it is relative to the upstream)."""
    try:
        target, base = URL(location, encoded=True), URL(upstream_url)
        # yarl parses lazily: a port out of range raises only here.
        foreign = target.is_absolute() and (target.scheme.lower(), (target.host or "").lower(), target.port) != (
            base.scheme.lower(), (base.host or "").lower(), base.port)
    except ValueError:
        return location
    if target.is_absolute():
        if foreign:
            return location
    elif not location.startswith("/") or location.startswith("//"):
        return location  # relative to the request's path, or to its scheme only: left as it is
    prefix = base.raw_path.rstrip("/")
    path = target.raw_path
    if prefix and path != prefix and not path.startswith(prefix + "/"):
        return location  # outside the base: not the pass-through's to serve
    rest = path[len(prefix):] or "/"
    query = f"?{target.raw_query_string}" if target.raw_query_string else ""
    fragment = f"#{target.raw_fragment}" if target.raw_fragment else ""
    return rest + query + fragment


def stays_under(raw_path: str) -> bool:
    """Whether a request target can only name a path under the upstream's base URL and /api/v1/.

    Its path is appended to the base as sent, so it must be a path: an absolute-form target
    (`GET http://x/api/v1/... HTTP/1.1`, routed by aiohttp on its path) would be appended whole
    and change the host the organization's key goes to. Nor may it hold dot-segments, plain or
    percent-encoded: an upstream or ingress that resolves them would serve what lies outside."""
    path = raw_path.partition("?")[0]
    if not path.startswith("/") or path.startswith("//"):
        return False
    # Decoded whole, then split: `%2e%2e%2f` is `../` to whatever decodes the path before resolving
    # it, and a backslash is a separator to some servers. Twice, for one that decodes twice
    # (`%252e`); and `..;x` is `..` to servers that take `;` as starting a segment's parameters.
    once = unquote(path)
    return not any(part.partition(";")[0] in (".", "..")
                   for decoded in (once, unquote(once)) for part in re.split(r"[/\\]", decoded))


def target_url(base: str, raw_path: str) -> URL:
    """The upstream URL of a request: the base URL's path, then the worker's path and query as sent
    (percent-encoding kept byte for byte)."""
    return URL(base.rstrip("/") + raw_path, encoded=True)


@dataclass(frozen=True)
class _Route:
    upstream: queues.Upstream
    scheme: str
    key: queues.QueueKey
    token_digest: bytes
    token: str = field(repr=False)
    """The worker's, given back in place of the upstream's key (api/keymask.py)."""
    identity: str | None = None
    """For a Kubernetes identity's worker: who it registered as (reviews.Identity.registrant)."""

    def mask(self) -> KeyMask:
        return KeyMask(self.upstream.api_key, self.token)


class _Reporter:
    """One warning per upstream and kind a minute at most: a dead upstream must not flood the log.

    Upstreams come and go with the queues naming them: past `kept` of them, those not reported on
    within the minute are forgotten (their failures counted since are reported then)."""

    def __init__(self, *, kept: int = _REPORTS_KEPT, clock: Callable[[], float] = time.monotonic) -> None:
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._kept = kept
        self._clock = clock

    def failure(self, origin: str, kind: str, cause: BaseException) -> None:
        key = (origin, kind)
        now = self._clock()
        if now - self._last.get(key, -_REPORT_EVERY) < _REPORT_EVERY:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        logger.warning("upstream %s %s: %s%s", origin, kind, _describe(cause),
                       f" (and {more} more since the last report)" if more else "")
        if len(self._last) > self._kept:
            self._forget(now)

    def _forget(self, now: float) -> None:
        for key, last in list(self._last.items()):
            if now - last >= _REPORT_EVERY:
                del self._last[key]
                more = self._suppressed.pop(key, 0)
                if more:
                    logger.warning("upstream %s %s: %d more failures since the last report", *key, more)


def _describe(cause: BaseException) -> str:
    """What went wrong, in words that never quote a URL (a worker's query may carry its token) nor what
    the upstream sent: aiohttp's own texts do both."""
    name = type(cause).__name__
    if isinstance(cause, _Redirected):
        return f"the websocket's handshake was answered with a redirect ({cause.status}), never followed"
    if isinstance(cause, aiohttp.ClientConnectorError):
        os_error = cause.os_error
        return f"{name}: {os_error.strerror or type(os_error).__name__}"
    if isinstance(cause, aiohttp.ClientResponseError):
        return f"{name}: status {cause.status}"
    if isinstance(cause, OSError) and not isinstance(cause, aiohttp.ClientError) and cause.strerror:
        return f"{name}: {cause.strerror}"
    return name


class Pool(aiohttp.TCPConnector):
    """aiohttp's connection pool, its idle connections bounded too, all hosts together.

    aiohttp bounds the connections in use (`limit`) but keeps each one released for its keep-alive
    (15 s) whatever their number: queues naming many upstream hosts (a team's own servers, one a
    queue) could leave thousands idle, each a socket and, over TLS, some 50 KiB. Beyond `idle`, the
    one idle longest is closed. aiohttp has no public hook for this: `_release` and `_conns` are its
    own, and tests/unit/test_passthrough.py fails if they stop behaving so."""

    def __init__(self, *, limit: int, idle: int, resolver: aiohttp.abc.AbstractResolver | None = None) -> None:
        # Lookups cache and merge their answers themselves (api/lookups.py): aiohttp's cache would merge
        # two namespaces' lookups of one host under the first one's share.
        super().__init__(limit=limit, limit_per_host=0, enable_cleanup_closed=ABORT_CLOSED_TLS, resolver=resolver,
                         use_dns_cache=resolver is None)
        self.idle_limit = idle

    def _release(self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        if (should_close or protocol.should_close) and protocol.transport is not None:
            # Dropped part-way (a request cut mid-upload, an answer not read to its end): nothing on it
            # is worth sending. Closed, the socket stayed open with what was left unsent for as long as
            # a stalled upstream did not read, beyond the pool's limit: one more at each retry. Reset,
            # not even the kernel keeps it.
            _reset(protocol.transport)
        super()._release(key, protocol, should_close=should_close)
        pooled: Any = self._conns  # host -> [(protocol, released at)], oldest first
        over = sum(len(entries) for entries in pooled.values()) - self.idle_limit
        while over > 0:
            host = min(pooled, key=lambda h: pooled[h][0][1])
            oldest, _ = pooled[host][0]
            del pooled[host][0]
            if not pooled[host]:
                del pooled[host]
            if oldest.transport is not None:
                oldest.transport.abort()  # idle: nothing to flush, and a TLS close would wait for its peer
            oldest.close()
            over -= 1


def _reset(transport: asyncio.Transport) -> None:
    """Closes a connection at once, with a reset: what it still had to send is dropped, in the kernel too."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


_KUBERNETES_TOKEN_PROTOCOL = "base64url.bearer.authorization.k8s.io."
"""The subprotocol Kubernetes' websocket clients carry their bearer token in: never the upstream's."""


class _NoOfferedProtocols(logging.Filter):
    """Drops aiohttp's warning that none of a client's websocket subprotocols was taken (the upstream
    chose none): it quotes them, and a client may send a credential as one (Kubernetes' clients send
    their bearer token so). Nothing else is logged there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Client protocols" not in str(record.msg)


def _quiet_websocket_log() -> None:
    websocket_log = logging.getLogger("aiohttp.websocket")
    if not any(isinstance(f, _NoOfferedProtocols) for f in websocket_log.filters):
        websocket_log.addFilter(_NoOfferedProtocols())


class Passthrough:
    """The catch-all handler, and the one client session (a connection pool per host) it sends with."""

    def __init__(self, *, store: Store, settings: settings_.Settings, metrics: metrics.Metrics,
                 owned: Sequence[tuple[re.Pattern[str], str]] = (),
                 owned_deletes: Sequence[re.Pattern[str]] = (), registry: Registry | None = None) -> None:
        _quiet_websocket_log()
        self._owned = tuple(owned)
        """Paths the operator serves (pattern, the methods it allows there): another method is a 405
        with `Allow`, as aiohttp (and FastAPI) answer it, never a request passed through."""
        self._owned_deletes = tuple(owned_deletes)
        """Paths whose DELETE only is the operator's (the queue's own): other methods go upstream."""
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._registry = registry
        """Where a Kubernetes identity's worker is registered: without it, such callers are refused."""
        self._session: aiohttp.ClientSession | None = None
        self._websocket_session: aiohttp.ClientSession | None = None
        # The pool of a host is shared by every queue that names it: one team holding all of it (slow
        # bodies, slow reads, or just many calls) left everyone else's calls waiting, then 504.
        self._shares = Shares(settings.upstream_max_connections_per_namespace)
        self._websocket_shares = Shares(settings.upstream_max_websockets_per_namespace)
        # The pools' own places, let in namespace by namespace in turn once all are taken: the shares
        # of two namespaces may add up to a pool, and a third's request then waited for aiohttp's pool
        # until its 504, blamed on an upstream that was fine.
        self._places = FairGate(settings.upstream_max_connections)
        self._websocket_places = FairGate(settings.upstream_max_websockets)
        self._reporter = _Reporter()
        self._websockets: set[web.WebSocketResponse] = set()

    async def close_websockets(self, app: web.Application) -> None:
        """aiohttp on_shutdown: proxied websockets end with 1001 Going Away, so that their workers
        reconnect (to another replica) at once instead of waiting out the shutdown timeout."""
        # All at once, each within a bound: a close frame waits for the socket, and a worker that
        # stopped reading would hold the shutdown until its heartbeat gave up on it (a minute and more).
        closing = [asyncio.ensure_future(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY,
                                                  message=b"operator shutting down"))
                   for ws in list(self._websockets)]
        if closing:
            _, late = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT_SECONDS)
            for task in late:
                task.cancel()

    async def session_context(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: the pool lives exactly as long as the HTTP server."""
        s = self._settings
        looked_up = lookups.Lookups()  # both pools' threads: the namespaces' shares are of these
        self._session = self._new_session(s.upstream_max_connections, looked_up)
        # A proxied websocket holds its connection as long as its worker lives: in the requests' pool,
        # upstream_max_connections of them would leave every request 504 for want of one.
        self._websocket_session = self._new_session(s.upstream_max_websockets, looked_up)
        try:
            yield
        finally:
            await self._session.close()
            await self._websocket_session.close()
            self._session = self._websocket_session = None
            looked_up.close()

    def _timeout_after(self, waited: float) -> aiohttp.ClientTimeout:
        """The session's timeouts, less what the request waited already for its connection."""
        s = self._settings
        # connect bounds the wait for a pooled connection plus the connection itself; sock_read
        # bounds every silence of the upstream (before its headers and between chunks).
        connect = max(s.upstream_connect_timeout_seconds - waited, 0.001)
        return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect,
                                     sock_read=s.upstream_idle_timeout_seconds)

    def _new_session(self, limit: int, looked_up: lookups.Lookups) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=Pool(limit=limit, idle=limit, resolver=looked_up.resolver()),
            timeout=self._timeout_after(0.0),
            auto_decompress=False,  # bytes pass as sent, Content-Encoding with them
            cookie_jar=aiohttp.DummyCookieJar(),  # workers' cookies are theirs; the pool keeps none
            raise_for_status=False,
            trace_configs=[_no_websocket_redirects()],
            # trust_env stays off: it would read ~/.netrc for every request and refuse our Authorization
            # where an entry matches; HTTPS_PROXY is therefore not used either.
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method.upper() in UNFORWARDED_METHODS:
            # TRACE would have an intermediary echo the request, the organization's key with it.
            return errors.detail(405, "Method Not Allowed", headers={"Allow": ", ".join(FORWARDED_METHODS)})
        if not stays_under(request.raw_path):
            return errors.detail(400, "The request target must be a path under /api/v1/")
        # One of the operator's own routes spelt otherwise (a trailing slash, merged slashes, another
        # case), as an upstream may route it: never sent there with the organization's key.
        spellings = _spellings(request.path)
        for pattern, allow in self._owned:
            if pattern.fullmatch(request.path):
                return errors.detail(405, "Method Not Allowed", headers={"Allow": allow})
            if any(pattern.fullmatch(spelt) for spelt in spellings):
                return errors.detail(404, "Not Found")
        if request.method == "DELETE" and any(pattern.fullmatch(spelt) for pattern in self._owned_deletes
                                              for spelt in spellings):
            return errors.detail(404, "Not Found")
        route = await self._route(request)
        if isinstance(route, web.Response):
            return route
        # Matched as an upstream may route it (slashes merged, any case), not only as spelt.
        for spelt in spellings:
            worker = _WORKER_WEBSOCKET.fullmatch(spelt)
            if worker is not None and not self._acts_for(route, worker.group(1)):
                return errors.detail(403, "This token may not act for this worker")
        websocket = request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"
        if websocket and route.identity is not None:
            return errors.detail(403, "A Kubernetes identity's worker has no websocket through the operator")
        shares = self._websocket_shares if websocket else self._shares
        # A websocket's share is held for its worker's life: none is waited for.
        wait = 0.0 if websocket else self._settings.upstream_connect_timeout_seconds
        # One share a namespace, all its queues' upstream hosts together: the pool is one for all
        # hosts, and a share a host let a namespace naming several of them take all of it.
        share_key = route.key[0]
        lookups.NAMESPACE.set(share_key)  # this request's task's own: its name lookups are counted so too
        asked = time.monotonic()
        if not await _taken(request, shares.take, share_key, wait):
            stats = self._metrics.upstream(route.upstream.origin)
            stats.failed("busy", 503)
            what = "websockets" if websocket else "requests"
            return errors.detail(503, f"Too many {what} of this namespace are open to the upstream control plane "
                                 f"({shares.share}), try again", headers={"Retry-After": "1"})
        try:
            places = self._websocket_places if websocket else self._places
            # The wait for its share and the pool's together within the connect timeout.
            if not await _taken(request, places.take, share_key,
                                max(wait - (time.monotonic() - asked), 0.0) if wait else 0.0):
                self._metrics.upstream(route.upstream.origin).failed("busy", 503)
                what = "websockets" if websocket else "connections"
                return errors.detail(503, f"All {places.limit} {what} to upstream control planes are in use, "
                                     "try again", headers={"Retry-After": "1"})
            try:
                if _worker_gone(request):  # left as its turn came: nothing is sent on for it
                    raise ConnectionResetError("the worker went away while it waited for a connection")
                if websocket:
                    return await self._websocket(request, route)
                return await self._forward(request, route, waited=time.monotonic() - asked)
            finally:
                places.give_back()
        finally:
            shares.give_back(share_key)

    async def _route(self, request: web.Request) -> _Route | web.Response:
        """The upstream this caller's token leads to, or the answer saying why there is none."""
        store = self._store
        if not store.passes_through:
            return errors.detail(404, "Not Found")  # no upstream anywhere: exactly as without the feature
        credential = worker_credential(request.headers.get("Authorization", ""))
        if credential is None:
            return errors.unauthorized("Not authenticated")
        scheme, token = credential
        token_digest = queues.digest(token)
        key = store.queue_of_token(token_digest)
        if key is None and workers.is_worker_token(token) and store.worker_credential(token_digest) is None:
            # A pod's token whose Secret this replica has not seen yet: as for /start (callers.authenticate).
            found = await callers.unseen_worker(request, token_digest)
            if isinstance(found, web.Response):
                return found
            key = store.queue_of_token(token_digest)
        if key is None:
            if store.is_queue_token(token_digest):
                return errors.detail(403, "This token belongs to several worker queues; give each queue its own "
                                          "token to reach its upstream")
            conflict = store.conflict_of_token(token_digest)
            if conflict is not None:
                return errors.detail(409, conflict)
            if self._registry is None or workers.is_worker_token(token):
                return errors.unauthorized("Invalid authentication credentials")
            return await self._identity_route(request, scheme, token, token_digest)
        return self._upstream_route(store.resolution(key), scheme, key, token_digest, token)

    async def _identity_route(self, request: web.Request, scheme: str, token: str, token_digest: bytes
                              ) -> _Route | web.Response:
        """A ServiceAccount's worker reaches the upstream of the one queue of its namespace it is
        registered in (its calls name no queue) while RBAC lets it start workers there. Its token may
        open many queues: registered in several, none is guessed (a token bound to its pod is one
        pod's, one queue's). Only its own namespace's: registrations are Leases, which whoever may
        write Leases in a namespace could write naming anyone, and those of another namespace must
        neither send its calls to that namespace's upstream nor lock it out of its own."""
        caller = await callers.kubernetes_caller(request, token, token_digest)
        if isinstance(caller, web.Response):
            return caller
        assert caller.identity is not None and self._registry is not None
        identity = caller.identity
        namespace = identity.service_account_namespace
        if namespace is None:
            return errors.detail(403, f"{identity.username} is no ServiceAccount: only a ServiceAccount's worker "
                                      "reaches an upstream with a Kubernetes token")
        keys = [key for key in self._registry.queues_registered_by(identity.registrant) if key[0] == namespace]
        if len(keys) != 1:
            where = "no worker queue" if not keys else f"{len(keys)} worker queues"
            return errors.detail(403, f"{identity.username} has workers registered in {where} of its namespace: a "
                                      "ServiceAccount reaches the upstream of the one queue of its namespace its "
                                      "worker started in (give each worker a token bound to its pod, or its "
                                      "queue's token)")
        resolution = self._store.resolution(keys[0])
        if resolution is None:
            return errors.detail(404, "Not Found")
        allowed = await callers.allowed(request, caller, resolution, verb="create", subresource="start")
        if isinstance(allowed, web.Response):
            return allowed
        if not allowed:
            return errors.detail(403, f"{identity.username} may not create workerqueues/start on the worker "
                                      "queue its worker started in")
        return self._upstream_route(resolution, scheme, keys[0], token_digest, token, identity=identity.registrant)

    @staticmethod
    def _upstream_route(resolution: queues.Resolution | None, scheme: str, key: queues.QueueKey,
                        token_digest: bytes, token: str, *, identity: str | None = None) -> _Route | web.Response:
        if resolution is not None and resolution.upstream is not None:
            return _Route(resolution.upstream, scheme, key, token_digest, token, identity)
        problem = resolution.upstream_problem if resolution is not None else None
        if problem is not None:
            return errors.detail(503, f"The worker queue's upstream is not ready: {problem.message}")
        return errors.detail(404, "Not Found")  # the queue has no upstream: the operator serves nothing here

    def _acts_for(self, route: _Route, worker_id: str) -> bool:
        """Whether the caller's token is the one /start gave `worker_id` for (api/app.py), or another
        token of the same queue for a worker that has no pod: the upstream takes whoever opens a
        worker's websocket for that worker, with the queue's upstream key. Never a Kubernetes identity's
        (/start gives it no websocket)."""
        if route.identity is not None:
            return False
        credential = self._store.worker_credential(route.token_digest)
        resolution = self._store.resolution(route.key)
        keys = resolution.token_digests if resolution is not None else ()
        return queues.issued_worker_id(worker_id, (route.token_digest, *keys),
                                       pod=credential.pod if credential is not None else None)

    def _still_opens(self, route: _Route) -> bool:
        """Whether the token a long answer or a websocket was opened with still leads to its queue
        (a rotation that unlisted it, a deleted Secret or queue: whatever it relays is cut); for a
        Kubernetes identity, whether its worker is still registered there (this call's stream goes on
        if it has registered in another queue since; new calls are refused)."""
        if route.identity is not None:
            return self._registry is not None and route.key in self._registry.queues_registered_by(route.identity)
        return self._store.queue_of_token(route.token_digest) == route.key

    async def _forward(self, request: web.Request, route: _Route, *, waited: float = 0.0) -> web.StreamResponse:
        assert self._session is not None, "the session lives as long as the app"
        upstream = route.upstream
        stats = self._metrics.upstream(upstream.origin)
        headers = request_headers(request.headers.items(), authorization=f"{route.scheme} {upstream.api_key}",
                                  remote=request.remote, proto=request.scheme,
                                  decoded=_decompressed(request))
        idle = self._settings.upstream_idle_timeout_seconds
        upload = (_Upload(request.content, stats, idle, still_opens=lambda: self._still_opens(route))
                  if request.body_exists else None)
        started = time.perf_counter()
        # Without a body, the connection and then the answer's headers within their timeouts in all:
        # sock_read alone restarts at every byte, and an upstream trickling its headers held the call.
        connect = max(self._settings.upstream_connect_timeout_seconds - waited, 0.0)
        try:
            async with upload.deadline if upload is not None else asyncio.timeout(connect + idle):
                try:
                    answer = await _unless_gone(request, self._session.request(
                        request.method, target_url(upstream.url, request.raw_path), headers=headers,
                        timeout=self._timeout_after(waited),
                        data=upload.chunks() if upload is not None else None, allow_redirects=False,
                        # What the worker did not send, the upstream must not get either (aiohttp adds these).
                        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type")))
                finally:
                    if upload is not None:
                        upload.held = False  # an answer may come before the whole body is sent
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            if upload is not None and upload.revoked:
                # Its token no longer opens the queue: the rest of its body is not sent on.
                refused = errors.unauthorized("Invalid authentication credentials")
                refused.force_close()
                return refused
            if (upload is not None and upload.worker_gone) or _worker_gone(request):
                # Not the upstream's failure: counted as the worker's leaving (499), as on any route.
                raise ConnectionResetError("the worker went away before the upstream's answer") from exc
            if upload is not None and upload.worker_stalled and isinstance(exc, TimeoutError):
                late = errors.detail(408, "Request body not received in time")
                late.force_close()
                return late
            return self._unanswered(stats, upstream, exc)
        latency = time.perf_counter() - started
        if not self._still_opens(route):
            # Revoked while the upstream worked on it: broken off, as a streamed answer is. The
            # upstream has acted, so no answer is the truth (a 401 would say it did not).
            _done_with(answer, False)
            if request.transport is not None:
                request.transport.abort()
            return errors.unauthorized("Invalid authentication credentials")  # its connection is gone
        mask = route.mask()
        answer_headers = response_headers(answer.headers.items(), upstream_url=upstream.url, mask=mask)
        inflater = None
        chunks = answer.content.iter_any()
        head = b""
        if mask.active and request.method != "HEAD" and (coding := _coding(answer)) is not None:
            # Compressed though asked for none: read only decoded, or the key would pass unseen.
            inflater = _Inflater(coding) if coding in _DECODABLE else None
            try:
                if inflater is None:
                    raise zlib.error(f"a coding it was not asked for ({coding})")
                first = await anext(chunks, b"")
                stats.bytes_received += len(first)
                head = inflater.open(first)  # a body that is not of its coding: a 502 yet
            except zlib.error as exc:
                _done_with(answer, False)
                return self._failed(stats, upstream, "bad_answer", exc, 502,
                                    f"The upstream control plane answered in {exc}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                _done_with(answer, False)
                return self._unanswered(stats, upstream, exc)
            answer_headers.popall("Content-Encoding", None)
        length = answer.content_length
        if inflater is None and length is not None and length <= SMALL_ANSWER and request.method != "HEAD":
            return await self._small(answer, answer_headers, upstream, stats, latency, mask)
        stats.answered(answer.status, latency)
        if request.method != "HEAD" and mask.active:
            # The key's place taken, the body may be other than these say.
            for name in ("Content-Length", *_DIGESTS):
                answer_headers.popall(name, None)
        response = web.StreamResponse(status=answer.status, reason=mask.header(answer.reason or "") or None,
                                      headers=answer_headers)
        read_whole = False
        try:
            await response.prepare(request)
            if inflater is not None:
                for piece in itertools.chain((head,), inflater.pieces(b"")):  # the rest of the first chunk
                    async with asyncio.timeout(idle):
                        await response.write(mask.feed(piece))
            async for chunk in chunks:
                if not self._still_opens(route):
                    raise _Revoked
                stats.bytes_received += len(chunk)
                # A worker that stops reading must not hold the upstream's connection for ever.
                for piece in inflater.pieces(chunk) if inflater is not None else (chunk,):
                    async with asyncio.timeout(idle):
                        await response.write(mask.feed(piece))
            read_whole = True
            rest = mask.feed(inflater.end()) if inflater is not None else b""
            async with asyncio.timeout(idle):  # its last chunk waits for the socket too
                await response.write_eof(rest + mask.end())
        except ConnectionResetError:
            return response  # the worker went away
        except _Revoked:
            # Broken off, as a cut: the worker must not take what it got for the whole answer.
            if request.transport is not None:
                request.transport.abort()
            return response
        except (TimeoutError, aiohttp.ClientError, zlib.error) as exc:
            # Its headers are sent: the worker must see the answer break off, not a short complete one.
            stats.failed("cut")
            self._reporter.failure(upstream.origin, "cut", exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            _done_with(answer, read_whole)
        return response

    async def _small(self, answer: aiohttp.ClientResponse, headers: CIMultiDict[str], upstream: queues.Upstream,
                     stats: metrics.UpstreamStats, latency: float, mask: KeyMask) -> web.StreamResponse:
        read_whole = False
        try:
            async with asyncio.timeout(self._settings.upstream_idle_timeout_seconds):  # a trickle too
                payload = await answer.read()
            read_whole = True
        except TimeoutError as exc:
            return self._unanswered(stats, upstream, exc)
        except aiohttp.ClientError as exc:
            return self._failed(stats, upstream, "cut", exc, 502, "The upstream control plane broke off its answer")
        finally:
            _done_with(answer, read_whole)
        stats.answered(answer.status, latency)
        stats.bytes_received += len(payload)
        headers.popall("Content-Length", None)  # the Response sets it from the payload
        body = mask.whole(payload)
        if body != payload:
            for name in _DIGESTS:  # of the body as the upstream sent it
                headers.popall(name, None)
        return web.Response(status=answer.status, reason=mask.header(answer.reason or "") or None,
                            body=body, headers=headers)

    def _failed(self, stats: metrics.UpstreamStats, upstream: queues.Upstream, kind: str, exc: BaseException,
                status: int, message: str) -> web.Response:
        stats.failed(kind, status)
        self._reporter.failure(upstream.origin, kind, exc)
        return errors.detail(status, message)

    def _unanswered(self, stats: metrics.UpstreamStats, upstream: queues.Upstream, exc: OSError | aiohttp.ClientError
                    ) -> web.Response:
        """The 504 of an upstream that did not answer in time, or the 502 of one that cannot be reached
        or whose answer cannot be read."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):  # a TimeoutError too: no connection was made
            return self._failed(stats, upstream, "timeout", exc, 504, "The upstream control plane could not be "
                                f"connected to within {self._settings.upstream_connect_timeout_seconds:g}s")
        if isinstance(exc, TimeoutError):
            return self._failed(stats, upstream, "timeout", exc, 504, "The upstream control plane did not answer "
                                f"within {self._settings.upstream_idle_timeout_seconds:g}s")
        if isinstance(exc, aiohttp.ClientResponseError):
            return self._failed(stats, upstream, "bad_answer", exc, 502,
                                "The upstream control plane sent an answer that cannot be read")
        return self._failed(stats, upstream, "unreachable", exc, 502, "The upstream control plane cannot be reached")

    async def _websocket(self, request: web.Request, route: _Route) -> web.StreamResponse:
        assert self._websocket_session is not None, "the session lives as long as the app"
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        # Offered ones all taken here: the upstream chooses (aiohttp would log those it takes none of).
        ours = web.WebSocketResponse(protocols=protocols, autoping=True)
        if not ours.can_prepare(request).ok:
            return errors.detail(400, "Not a valid websocket handshake")
        upstream = route.upstream
        stats = self._metrics.upstream(upstream.origin)
        headers = request_headers(
            [(k, v) for k, v in request.headers.items() if k.lower() not in _WEBSOCKET_HANDSHAKE],
            authorization=f"{route.scheme} {upstream.api_key}", remote=request.remote, proto=request.scheme)
        started = time.perf_counter()
        try:
            # Pinged after its idle timeout of silence: an upstream gone without a word (a lost node,
            # a NAT's cut) would otherwise hold the worker's websocket open on a dead relay for ever.
            # The handshake within the connect and idle timeouts in all, however slowly its answer trickles.
            async with asyncio.timeout(self._settings.upstream_connect_timeout_seconds
                                       + self._settings.upstream_idle_timeout_seconds):
                # Given up once the worker has left: it held a connection and its namespace's share.
                theirs = await _unless_gone(request, self._websocket_session.ws_connect(
                    target_url(upstream.url, request.raw_path), headers=headers,
                    protocols=[p for p in protocols if not p.startswith(_KUBERNETES_TOKEN_PROTOCOL)],
                    autoping=True, heartbeat=self._settings.upstream_idle_timeout_seconds))
        except _Redirected as exc:
            # Never followed: the worker gets the operator's 502, counted and logged as such.
            return self._failed(stats, upstream, "bad_answer", exc, 502,
                                f"The upstream control plane redirected the websocket ({exc.status})")
        except aiohttp.WSServerHandshakeError as exc:
            if not 400 <= exc.status < 600:  # a 200, say: no answer to a handshake
                return self._failed(stats, upstream, "bad_answer", exc, 502,
                                    f"The upstream control plane refused the websocket ({exc.status})")
            # The upstream answered, only not with an upgrade (e.g. 401, 404): its status passed on, with
            # what tells the worker when to try again, or how to authenticate.
            stats.answered(exc.status, time.perf_counter() - started)
            told = {name: value for name in _REFUSAL_HEADERS
                    if exc.headers is not None and (value := exc.headers.get(name))}
            return errors.detail(exc.status, f"The upstream control plane refused the websocket ({exc.status})",
                                 headers=told)
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            if _worker_gone(request):
                raise ConnectionResetError("the worker went away before the upstream's handshake") from exc
            return self._unanswered(stats, upstream, exc)
        stats.answered(101, time.perf_counter() - started)
        ours = web.WebSocketResponse(protocols=(theirs.protocol,) if theirs.protocol else (), autoping=True,
                                     heartbeat=self._settings.upstream_idle_timeout_seconds)  # the worker, alike
        self._websockets.add(ours)
        transport: asyncio.BaseTransport | None = None
        try:
            await ours.prepare(request)
            transport = request.transport  # upgraded: the connection is this websocket's alone
            await _pump_both_ways(ours, theirs, stats, still_opens=lambda: self._still_opens(route),
                                  abort_ours=lambda: request.transport.abort() if request.transport else None,
                                  mask=route.mask())
        finally:
            self._websockets.discard(ours)
            await theirs.close()
            if transport is not None:
                asyncio.get_running_loop().call_later(self._settings.upstream_idle_timeout_seconds, _cut_if_stuck,
                                                      transport)
        return ours


def _cut_if_stuck(transport: asyncio.BaseTransport) -> None:
    """A worker's side that aiohttp's heartbeat gave up on is closed, not aborted: with bytes the
    worker never read still buffered, its socket was held until the worker closed its end."""
    if transport.is_closing() and isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
        transport.abort()


class _Revoked(Exception):
    """The token a streamed answer was asked with no longer opens its queue."""


REVOCATION_CHECK_SECONDS = 1.0
"""How often an open websocket looks whether the token it was opened with still opens its queue."""

GONE_CHECK_SECONDS = 1.0
"""How often a request waiting for the upstream's answer looks whether its worker is still there."""


def _worker_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _unless_gone(request: web.Request, call: Awaitable[T]) -> T:
    """`call`'s result; cancelled, and ConnectionResetError raised, once the worker's connection
    ends. aiohttp's server does not cancel a handler whose client left: a request abandoned while the
    upstream thinks would otherwise hold one of its host's pooled connections up to the idle timeout."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=GONE_CHECK_SECONDS)
            if done:
                return task.result()
            if _worker_gone(request):
                raise ConnectionResetError("the worker went away while the upstream had not answered")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
                await task


async def _taken(request: web.Request, take: Callable[[str, float], Awaitable[bool]], key: str, wait: float
                 ) -> bool:
    """`take(key, wait)`: a share or a pool's place. A free one is taken at once; a wait is given up
    as soon as the worker leaves (ConnectionResetError: counted as its leaving, not as a busy upstream)."""
    if await take(key, 0.0):
        return True
    return wait > 0 and await _unless_gone(request, take(key, wait))


class _Redirected(aiohttp.ClientError):
    def __init__(self, status: int) -> None:
        super().__init__(f"redirected ({status})")
        self.status = status


def _no_websocket_redirects() -> aiohttp.TraceConfig:
    """A redirect is never followed. Forwarded requests ask so (allow_redirects=False); a websocket
    handshake cannot, and following one would take the organization's key wherever it points."""
    async def refuse(session: aiohttp.ClientSession, context: object,
                     params: aiohttp.TraceRequestRedirectParams) -> None:
        raise _Redirected(params.response.status)

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(refuse)
    return trace


def _done_with(answer: aiohttp.ClientResponse, read_whole: bool) -> None:
    """An answer read to its end leaves its connection to the pool; any other (the worker went away,
    the handler was cancelled, the upstream stalled) closes it, so that what the upstream still
    sends can never be read as the next request's answer."""
    if read_whole:
        answer.release()
    else:
        answer.close()


class _Upload:
    """The worker's body as it arrives, counted; read only as fast as the upstream takes it. Neither
    side may stall for longer than `idle`: else a worker sending 10 of 1,000 bytes, or an upstream
    taking none, held a pooled connection of that upstream's host for ever, and the other queues'
    requests waited. `deadline` (held around the request until the answer's headers come) moves on
    with every chunk read and every chunk sent, and runs on after the last one: aiohttp's
    terminating chunk waits for the socket with no timeout of its own, and only then starts the
    answer's (sock_read)."""

    def __init__(self, content: aiohttp.StreamReader, stats: metrics.UpstreamStats, idle: float, *,
                 still_opens: Callable[[], bool]) -> None:
        self._content = content
        self._stats = stats
        self._idle = idle
        self._still_opens = still_opens
        self.revoked = False
        """Its token stopped opening its queue while it was sent (a chunk every idle timeout could
        otherwise go on as long as the worker liked)."""
        self.deadline = asyncio.timeout(idle)
        self.held = True
        """Whether `deadline` still guards the request (only then may it move)."""
        self.worker_stalled = False
        self.worker_gone = False
        """Its connection ended before the whole body came."""

    def _move(self, when: float | None) -> None:
        if self.held:
            self.deadline.reschedule(when)

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        while True:
            self.worker_stalled = True
            self._move(loop.time() + self._idle)
            try:
                chunk = await self._content.readany()
            except Exception:
                self.worker_gone = True
                raise
            self.worker_stalled = False
            if not self._still_opens():
                self.revoked = True
                raise _Revoked
            if not chunk:
                break
            self._stats.bytes_sent += len(chunk)
            self._move(loop.time() + self._idle)
            yield chunk
        self._move(loop.time() + self._idle)  # the end of the body, then the answer, within idle


CLOSE_SECONDS = 5.0
"""Longest a websocket's close may take. A peer that reads nothing more holds the write of the close
frame for good, the relay with it: its connection is cut then."""


async def _close_within(ws: _WebSocket, code: int, message: bytes = b"", *,
                        abort: Callable[[], None] | None = None) -> None:
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            await ws.close(code=code, message=message)
    except TimeoutError:
        if abort is not None:  # closed, the transport would still wait to send what the peer never reads
            abort()


async def _relay(source: _WebSocket, sink: _WebSocket, counted: Callable[[int], None], *,
                 abort_sink: Callable[[], None] | None = None, mask: KeyMask | None = None) -> None:
    """Text and binary messages from `source` to `sink` until `source` closes; `sink` is then closed
    with the same code. `mask`: what the upstream says, to the worker."""
    async for message in source:
        if message.type is aiohttp.WSMsgType.TEXT:
            counted(len(message.data))
            await sink.send_str(mask.message(message.data) if mask is not None else message.data)
        elif message.type is aiohttp.WSMsgType.BINARY:
            counted(len(message.data))
            await sink.send_bytes(mask.whole(message.data) if mask is not None else message.data)
    await _close_within(sink, _passed_on(source.close_code, aiohttp.WSCloseCode.OK), abort=abort_sink)


def _passed_on(code: int | None, default: int) -> int:
    """The close code to give the other side of one side's close. Those that only say how a
    connection ended here must not be sent: none given (`default` then), or the connection lost or
    a pong missed (1006, 1015: 1014, a gateway's)."""
    if code is None or code == 1005:
        return default
    if code in (1006, 1015):
        return aiohttp.WSCloseCode.BAD_GATEWAY
    return code


async def _pump_both_ways(ours: web.WebSocketResponse, theirs: aiohttp.ClientWebSocketResponse,
                          stats: metrics.UpstreamStats, *, still_opens: Callable[[], bool],
                          abort_ours: Callable[[], None] | None = None, mask: KeyMask | None = None) -> None:
    """Messages both ways until either side closes; the other is then closed with the same code. Both
    are closed (the worker's with 1008) once the token it was opened with no longer opens its queue.
    `abort_ours` cuts the worker's connection, when its close does not end in time."""

    def sent(size: int) -> None:
        stats.bytes_sent += size

    def received(size: int) -> None:
        stats.bytes_received += size

    async def until_revoked() -> None:
        while True:  # polled: a dict lookup a second, against a subscription per websocket to the Store
            await asyncio.sleep(REVOCATION_CHECK_SECONDS)
            if not still_opens():
                return

    revoked = asyncio.create_task(until_revoked())
    tasks = [asyncio.create_task(_relay(ours, theirs, sent)),
             asyncio.create_task(_relay(theirs, ours, received, abort_sink=abort_ours, mask=mask)), revoked]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if revoked.done() and not ours.closed:
            await _close_within(ours, aiohttp.WSCloseCode.POLICY_VIOLATION, b"token revoked", abort=abort_ours)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, ConnectionError):
                await task
    if not ours.closed:
        await _close_within(ours, _passed_on(theirs.close_code, aiohttp.WSCloseCode.GOING_AWAY), abort=abort_ours)
    if not theirs.closed:
        await _close_within(theirs, _passed_on(ours.close_code, aiohttp.WSCloseCode.GOING_AWAY))
