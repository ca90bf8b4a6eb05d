"""kopf inside a process that does more than kopf: kopf's stop must not take the rest with it.

When it stops, kopf waits 5 s for every asyncio task created since it started, taking them all for
its own, then cancels them. Here most of those are not kopf's: the HTTP API's connections (a request
in flight, a worker's keep-alive connection, a pass-through stream) and the informers' requests,
which must outlive kopf by the HTTP API's drain (api/serving.Drain). So kopf is told to leave alone
every task but those created within it: a task factory notes the tasks created while a context
variable says "within kopf", set around kopf's spawning and inherited by every task kopf makes.
SIGTERM and SIGINT stop kopf through its stop flag rather than through kopf's own handlers, whose
signal leaves kopf's waiter of that flag pending: one task of its own that would hang for the 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import threading
import weakref
from collections.abc import Callable, Collection, Coroutine, Generator, Iterator
from typing import Any, cast

import kopf

logger = logging.getLogger(__name__)

_WITHIN_KOPF = contextvars.ContextVar("within_kopf", default=False)


class _NotKopfs:
    """kopf's `ignored`, of which it asks only `task in ignored`: every task not made within kopf."""

    def __init__(self, kopfs: weakref.WeakSet[asyncio.Task[Any]]) -> None:
        self._kopfs = kopfs

    def __contains__(self, task: object) -> bool:
        return task not in self._kopfs


async def operator(*, stop_flag: asyncio.Event, **kwargs: Any) -> None:
    """`kopf.operator(stop_flag=stop_flag, **kwargs)`, whose stop waits for and cancels kopf's own
    tasks only; SIGTERM and SIGINT set `stop_flag`."""
    loop = asyncio.get_running_loop()
    kopfs: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
                **options: Any) -> asyncio.Future[Any]:
        task = previous(loop, coro, **options) if previous is not None else asyncio.Task(coro, loop=loop, **options)
        if _WITHIN_KOPF.get() and isinstance(task, asyncio.Task):
            kopfs.add(task)
        return task

    loop.set_task_factory(factory)
    try:
        within = _WITHIN_KOPF.set(True)
        try:
            tasks = await kopf.spawn_tasks(stop_flag=stop_flag, **kwargs)
        finally:
            _WITHIN_KOPF.reset(within)
        with stop_signals(lambda sig: _stop(sig, stop_flag)):  # in place of kopf's
            await kopf.run_tasks(tasks, ignored=cast(Collection[asyncio.Task[Any]], _NotKopfs(kopfs)))
    finally:
        loop.set_task_factory(previous)


@contextlib.contextmanager
def stop_signals(callback: Callable[[signal.Signals], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call `callback` within the block; after it, they do what they did before
    kopf (terminate; KeyboardInterrupt). In the main thread only: signals are not another thread's."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    for sig in signals:
        loop.add_signal_handler(sig, callback, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _stop(sig: signal.Signals, flag: asyncio.Event) -> None:
    logger.info("%s received: stopping", sig.name)
    flag.set()
