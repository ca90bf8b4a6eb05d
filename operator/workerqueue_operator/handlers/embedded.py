"""kopf inside a process that does more than kopf: kopf's stop must not take the rest with it.

When it stops, kopf waits 5 s for every asyncio task created since it started, taking them all for
its own, then cancels them. Here most of those are not kopf's: the HTTP API's requests and
connections (a request in flight, a worker's keep-alive connection, a pass-through stream) and the
informers' requests, which must outlive kopf by the HTTP API's drain (api/serving.Drain). So kopf is
told to leave alone every task whose coroutine is not kopf's own code: decided once, at the stop,
so that nothing is added to the creation of each task (aiohttp makes one per request).
SIGTERM and SIGINT stop kopf through its stop flag rather than through kopf's own handlers, whose
signal leaves kopf's waiter of that flag pending: one task of its own that would hang for the 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterator, Mapping
from typing import Any, cast

import kopf
from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.clients import watching as kopf_watching

logger = logging.getLogger(__name__)

_KOPF_SOURCES = os.path.dirname(kopf.__file__) + os.sep


class _NotKopfs:
    """kopf's `ignored`, of which it asks only `task in ignored`: every task not running kopf's code."""

    def __contains__(self, task: object) -> bool:
        coro = task.get_coro() if isinstance(task, asyncio.Task) else None
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        return code is None or not code.co_filename.startswith(_KOPF_SOURCES)


REFUSED_WATCH_RETRY_SECONDS = 30.0
"""After kopf's watch of a scope was refused through all of kopf's back-offs, it begins again this later."""
REFUSED_WATCH_LOG_SECONDS = 600.0
"""A scope's refused watch is logged at WARNING at most this often (at DEBUG in between): a namespace whose
admins took the operator's RoleBinding away is a state the operator lives with, not an error a minute."""


def _watches_outlive_refusals() -> None:
    """kopf ends a watch that is refused (403) through its back-offs (about a minute), and with it the
    operator: a watched namespace whose admins deleted the operator's RoleBinding (or a namespace
    deleted) would stop it for every other one. Each of kopf's watch streams is begun again instead,
    for as long as the refusal lasts. kopf's other requests keep their bounded retries (its peering
    keep-alives, its last one at the stop)."""
    original = kopf_watching.infinite_watch
    if getattr(original, "outlives_refusals", False):
        return

    async def infinite_watch(**kwargs: Any) -> AsyncIterator[Any]:
        logged_at: float | None = None
        while True:
            try:
                # Closed with the stream it feeds (kopf's watch closes its connection then).
                async with contextlib.aclosing(cast(AsyncGenerator[Any, None], original(**kwargs))) as stream:
                    async for event in stream:
                        yield event
                return
            except kopf_errors.APIForbiddenError as exc:
                now = asyncio.get_running_loop().time()
                due = logged_at is None or now - logged_at >= REFUSED_WATCH_LOG_SECONDS
                logged_at = now if due else logged_at
                resource = kwargs.get("resource")
                plural = str(getattr(resource, "plural", resource))
                # The status and reason, not the whole Status kopf's error prints.
                refused = f"{getattr(exc, 'status', 403)} {getattr(exc, 'reason', None) or 'Forbidden'}"
                what = ("the worker pods there are not supervised until the operator's RoleBinding there is back "
                        "(docs/helm.md, \"Only some namespaces\")" if plural == "pods" else
                        "what it tells is not handled until the operator's RBAC allows it")
                logger.log(logging.WARNING if due else logging.DEBUG,
                           "kopf's watch of %s in %s is refused (%s): %s; watching again every %gs",
                           plural, kwargs.get("namespace") or "the cluster", refused,
                           what, REFUSED_WATCH_RETRY_SECONDS, extra={"kind": "kopf_watch_refused"})
                await asyncio.sleep(REFUSED_WATCH_RETRY_SECONDS)

    setattr(infinite_watch, "outlives_refusals", True)  # noqa: B010 - a mark on a function
    setattr(kopf_watching, "infinite_watch", infinite_watch)  # noqa: B010 - kopf's module, looked up per watch


async def operator(*, stop_flag: asyncio.Event, **kwargs: Any) -> None:
    """`kopf.operator(stop_flag=stop_flag, **kwargs)`, whose stop waits for and cancels kopf's own
    tasks only, and whose watches outlive a refused scope; SIGTERM and SIGINT set `stop_flag`."""
    _watches_outlive_refusals()
    before = handlers()  # kopf's spawn_tasks sets handlers of its own: what to put back is what was before
    tasks = await kopf.spawn_tasks(stop_flag=stop_flag, **kwargs)
    with stop_signals(lambda sig: _stop(sig, stop_flag), restore=before):  # in place of kopf's
        await kopf.run_tasks(tasks, ignored=cast(Collection[asyncio.Task[Any]], _NotKopfs()))


def handlers() -> dict[signal.Signals, Any]:
    """The SIGTERM and SIGINT handlers now (none outside the main thread: signals are not another thread's)."""
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    return {sig: signal.getsignal(sig) for sig in signals}


@contextlib.contextmanager
def stop_signals(callback: Callable[[signal.Signals], None], *,
                 restore: Mapping[signal.Signals, Any] | None = None) -> Iterator[None]:
    """SIGTERM and SIGINT call `callback` within the block; after it, they do what they did before it,
    or as `restore` says (terminate and KeyboardInterrupt, or the handlers `dev` had set to stop what
    it started, which the loop's removal alone would not put back). In the main thread only."""
    loop = asyncio.get_running_loop()
    before = dict(restore) if restore is not None else handlers()
    signals = tuple(before)
    for sig in signals:
        loop.add_signal_handler(sig, callback, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
            if before[sig] is not None:
                signal.signal(sig, before[sig])


def _stop(sig: signal.Signals, flag: asyncio.Event) -> None:
    logger.info("%s received: stopping", sig.name)
    flag.set()
