"""List-then-watch, the informer pattern: keeps a consumer in step with one kind of object.

After every (re)list the consumer gets the full set, so objects deleted while the watch was down
are reported as deleted too. `synced` is set after the first complete list; `settled` once the
informer has either listed or been refused.

A watch never dies quietly: whatever breaks it (the API server, the network, an event too large, an
ERROR event other than 410) is logged in one line with its cause, counted in `failures`, and the
informer relists after a back-off; `down_since` says since when it has been failing, for readiness.
A successful list alone is no recovery: only a watch the API server accepted and that has run for
STABLE_SECONDS since resets `down_since`, so a watch refused after every good list (429, RBAC without
`watch`, however long the refusal takes) turns the replica unready. The back-off is reset only by a
watch that has worked for BACKOFF_RESET_SECONDS: one that works for a few seconds and then fails (a
proxy that breaks streams) is relisted every 30 s, not every 3. A watch the server ends before
STABLE_SECONDS without a single event (a proxy closing watches at once) is a failure too, not a
reason to watch again at once.

A watch that has received nothing, not even the API server's bookmark a minute, for `idle_seconds`
is watched again from where it was (no relist, no failure): its connection may have died unheard.
So is a watch whose stream is cut mid-way (the API server restarting, a proxy), as client-go's: the
watches that fail after such a cut (refused while the API server restarts, 429 or 503 while it
starts) are failures, backed off, but watched again from that version for RESUME_SECONDS before a
relist. Only a version too old (410) is relisted at once. A watch refused in words that say when to
try again (a 429's `retryAfterSeconds`: a resource's storage starting up, priority and fairness) is
tried again then, not after the back-off grown meanwhile, which put a restarted API server's queues
off by 30 s.

A list or watch refused with 403 marks the informer `refused` until a watch works again, or a list
is accepted and what fails next is no 403 (a list accepted between two watches refused says nothing
of them): the operator may not read that scope (a namespace's admins removed its RoleBinding, or the
namespace is gone), which the consumer may judge apart from an outage.

A callback that fails on one object fails for that object only (logged with its traceback, counted
in `callback_failures`): relisting would meet the same object again, and every object after it
would go unseen, in every namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from workerqueue_operator.k8s import client as client_

logger = logging.getLogger(__name__)

IDLE_SECONDS = 70.0
"""Past the API server's bookmark a minute: a watch silent that long has lost its connection."""
STABLE_SECONDS = 2.0
"""A watch open this long without failing works: the informer is healthy again."""
RESUME_SECONDS = 120.0
"""How long watches from the version a cut stream left may fail one after another before a relist:
an API server restarting takes 30-60 s to answer, and to let watches of custom resources in."""
MAX_BACKOFF_SECONDS = 30.0
BACKOFF_RESET_SECONDS = 30.0
"""A watch that worked this long before it failed starts the back-off again from its least."""
REFUSED_LOG_SECONDS = 600.0
"""A scope refused (403) again and again is logged at WARNING at most this often, at DEBUG in between,
as kopf's refused watches are (handlers/embedded.py): a namespace whose RoleBinding went, or that was
deleted while still listed in watchNamespaces, is a state the operator lives with."""


_RESUMABLE: tuple[type[Exception], ...] = (*client_.ERRORS, client_.WatchCut)
"""What a watch after a cut stream may fail with and be watched again from its version (see _may_resume)."""


class ShortWatch(Exception):
    """The server ended a watch at once without an event: failing like a refusal, backed off."""


class GoneAtOnce(Exception):
    """A watch from the version a list has just given was answered 410 Gone at once (a caching proxy,
    a lagging watch cache): listing again at once would loop, so it fails as a refusal does."""

ObjectKey = tuple[str, str]
OnUpsert = Callable[[dict[str, Any]], None]
OnDelete = Callable[[ObjectKey, dict[str, Any] | None], None]


def object_key(obj: dict[str, Any]) -> ObjectKey:
    meta = obj.get("metadata", {})
    return (meta.get("namespace", ""), meta["name"])


class Informer:
    def __init__(
        self,
        client: client_.KubeClient,
        path: str,
        *,
        on_upsert: OnUpsert,
        on_delete: OnDelete,
        name: str,
        on_synced: Callable[[], None] | None = None,
        hold: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        params: Mapping[str, str] | None = None,
        page_size: int = 500,
        watch_seconds: int = 300,
        idle_seconds: float = IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._path = path
        self._params = dict(params or {})  # selectors, for the list and the watch alike
        self._on_upsert = on_upsert
        self._on_delete = on_delete
        self._page_size = page_size
        self._watch_seconds = watch_seconds
        self._idle_seconds = idle_seconds
        self.name = name
        self.synced = asyncio.Event()
        self._on_synced = on_synced
        self._hold = hold  # entered around each (re)list: the consumer may wait for its end
        self._known: set[ObjectKey] = set()
        self._clock = clock
        self.failures = 0
        """Times the list or watch failed since start (a watch the server ends in time is no failure)."""
        self.callback_failures = 0
        """Objects a callback failed on (a bug of ours: see the log)."""
        self.idle_restarts = 0
        """Watches ended after `idle_seconds` without a byte and watched again (see the module doc)."""
        self.cut_restarts = 0
        """Watches whose connection was cut mid-stream and that were watched again from their version."""
        self._refusal_told: float | None = None
        """`clock()` of the last refusal (403) logged at WARNING since a watch last worked (a scope whose
        lists are let in and watches refused is refused all the same)."""
        self._resume_since: float | None = None
        """`clock()` of the last cut stream, whose version failing watches resume from; None: no cut
        since the last working watch."""
        self.listing = False
        """A (re)list is under way: objects made since the last event may not be known yet."""
        self.down_since: float | None = None
        """`clock()` of the first failure since a watch last worked (STABLE_SECONDS); None while healthy."""
        self.refused = False
        """A list or watch was refused with 403, and no watch has worked since, nor has anything but a 403
        failed after a list accepted since."""
        self._listed_since_refusal = False
        self.settled = asyncio.Event()
        """Listed once, or refused: what is known of the scope is all that will be for now."""
        self._backoff = 0.5
        self._up_since: float | None = None
        """`clock()` of the first watch that worked since the last failure (see BACKOFF_RESET_SECONDS)."""

    def knows(self, key: ObjectKey) -> bool:
        """Whether the object was in the last list, or came by the watch since (and is not deleted)."""
        return key in self._known

    def down_for(self) -> float:
        """Seconds the informer has been failing without a successful list since; 0 when healthy."""
        return 0.0 if self.down_since is None else self._clock() - self.down_since

    async def run(self) -> None:
        while True:
            try:
                self.listing = True
                try:
                    version: str | None = await self._relist()
                finally:
                    self.listing = False
                self._listed_since_refusal = True
                if not self.synced.is_set():
                    self.synced.set()
                    self.settled.set()
                    if self._on_synced is not None:
                        self._on_synced()
                listed = True
                self._resume_since = None
                while version is not None:
                    since = version
                    try:
                        version = await self._watch(since, listed=listed)
                    except _RESUMABLE as exc:
                        if not await self._may_resume(since, exc):
                            raise
                        continue
                    listed = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever it is, the Store must not silently stop being fed
                self.failures += 1
                if self.down_since is None:
                    self.down_since = self._clock()
                level = logging.WARNING
                self._judge_refusal(exc)
                if isinstance(exc, client_.ApiError) and exc.status == 403:
                    self.settled.set()
                    now = self._clock()
                    if self._refusal_told is not None and now - self._refusal_told < REFUSED_LOG_SECONDS:
                        level = logging.DEBUG
                    else:
                        self._refusal_told = now
                delay = self._delay(exc, relisting=True)
                logger.log(level, "watch %s failed (%s: %s); relisting in %.1fs", self.name, type(exc).__name__,
                           str(exc)[:300] or "no message", delay)
                await asyncio.sleep(delay)

    async def _may_resume(self, version: str, exc: Exception) -> bool:
        """After a watch failed: whether to watch again from `version` (after the back-off) rather than
        relist, as when the API server restarts after it cut the stream (see the module doc)."""
        if self._resume_since is None or self._clock() - self._resume_since > RESUME_SECONDS:
            return False
        # A 403 is a refusal for now at least (an API server just restarted may refuse until its
        # caches fill): said at once, for readiness to leave the scope out, and still resumed from.
        self._judge_refusal(exc)
        if isinstance(exc, client_.ApiError) and exc.status == 403:
            self.settled.set()
        self.failures += 1
        if self.down_since is None:
            self.down_since = self._clock()
        delay = self._delay(exc)
        logger.warning("watch %s failed (%s: %s); watching again from version %s in %.1fs", self.name,
                       type(exc).__name__, str(exc)[:300] or "no message", version, delay)
        await asyncio.sleep(delay)
        return True

    def _delay(self, exc: Exception, *, relisting: bool = False) -> float:
        """Seconds until the next try: the back-off, doubled for the next failure. A watch resumed
        from its version (for RESUME_SECONDS at most) is tried again when the API server said, its
        back-off kept as it is. A relist, a full listing of the scope, never comes sooner than the
        back-off (a watch cache starting answers lists and refuses watches: a relist a second)."""
        if self._up_since is not None and self._clock() - self._up_since >= BACKOFF_RESET_SECONDS:
            self._backoff = 0.5
        self._up_since = None
        told = exc.retry_after if isinstance(exc, client_.ApiError) else None
        if told is not None and not relisting:
            return min(told, MAX_BACKOFF_SECONDS)
        delay = max(self._backoff, min(told or 0.0, MAX_BACKOFF_SECONDS))
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_SECONDS)
        return delay

    def _judge_refusal(self, exc: Exception) -> None:
        """Whether the scope is refused, after a failure: a 403 says so; anything else after a list
        accepted since the last 403 says it is not (an outage, a broken watch: readiness counts it)."""
        if isinstance(exc, client_.ApiError) and exc.status == 403:
            self.refused, self._listed_since_refusal = True, False
        elif self._listed_since_refusal:
            self.refused = False

    def _working(self) -> None:
        if self._up_since is None:
            self._up_since = self._clock()
        self._resume_since = None
        self._refusal_told = None
        self.refused = False
        if self.down_since is not None:
            logger.info("watch %s recovered after %.0fs", self.name, self.down_for())
            self.down_since = None

    def _deliver(self, key: ObjectKey, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            self.callback_failures += 1
            logger.exception("watch %s: handling %s/%s failed; it is skipped until it changes",
                             self.name, key[0], key[1])

    async def _relist(self) -> str:
        with self._hold():
            return await self._list_all()

    async def _list_all(self) -> str:
        seen: set[ObjectKey] = set()
        params = {**self._params, "limit": str(self._page_size)}
        while True:
            page = await self._client.get(self._path, params)
            for item in page.get("items", []):
                key = object_key(item)
                seen.add(key)
                self._deliver(key, self._on_upsert, item)
            token = page.get("metadata", {}).get("continue")
            if not token:
                break
            params = {**self._params, "limit": str(self._page_size), "continue": str(token)}
        for gone in self._known - seen:
            self._deliver(gone, self._on_delete, gone, None)
        self._known = seen
        return str(page["metadata"]["resourceVersion"])

    async def _watch(self, version: str, *, listed: bool = False) -> str | None:
        """Watches from `version` (`listed`: the version of the list just made); returns the version to
        continue from, or None to relist."""
        params = {
            **self._params,
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._watch_seconds),
        }
        loop = asyncio.get_running_loop()
        working: list[asyncio.TimerHandle] = []
        started = loop.time()
        events_seen = 0

        def opened() -> None:  # counted from the API server's answer, not from the request
            working.append(loop.call_later(STABLE_SECONDS, self._working))

        def gone(message: str) -> None:
            if listed and loop.time() - started < STABLE_SECONDS:
                raise GoneAtOnce(f"410 Gone for the version just listed: {message or 'no message'}")

        try:
            # Closed on the spot however the loop ends (a return, an error, a cancel): left to the
            # collector, the watch's connection would stay open until it ran.
            stream = self._client.watch(self._path, params, timeout=self._watch_seconds, idle=self._idle_seconds,
                                        on_open=opened)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    events_seen += 1
                    kind, obj = event.get("type"), event.get("object", {})
                    if kind == "ERROR":
                        if obj.get("code") == 410:  # Gone: the version is too old, list again
                            gone(str(obj.get("message", ""))[:300])
                            logger.debug("watch %s: %s; relisting", self.name, obj.get("message"))
                            return None
                        raise client_.status_error(int(obj.get("code") or 500), obj)
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if kind == "BOOKMARK":
                        continue
                    key = object_key(obj)
                    if kind == "DELETED":
                        self._known.discard(key)
                        self._deliver(key, self._on_delete, key, obj)
                    else:
                        self._known.add(key)
                        self._deliver(key, self._on_upsert, obj)
        except client_.ApiError as exc:
            if exc.status == 410:
                gone(exc.message)
                return None
            raise
        except client_.WatchIdle as exc:
            self.idle_restarts += 1
            logger.info("watch %s: %s; watching again", self.name, exc)
        except client_.WatchCut as exc:
            if not events_seen and loop.time() - started < STABLE_SECONDS:
                raise  # cut at once, as every watch is while the API server is away: a failure, backed off
            # Relisting instead, every replica would list everything at once as the API server comes
            # back, and a Lease deleted meanwhile would come as a deletion without its last state.
            self.cut_restarts += 1
            self._resume_since = self._clock()
            logger.info("watch %s: %s; watching again from version %s", self.name, exc, version)
        finally:
            for timer in working:
                timer.cancel()
        if not events_seen and loop.time() - started < STABLE_SECONDS:
            raise ShortWatch("the API server ended the watch at once, without an event")
        return version
