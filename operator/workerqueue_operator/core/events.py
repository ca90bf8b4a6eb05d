"""Kubernetes Events, posted in the background so that reporting never delays the work it reports."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources

logger = logging.getLogger(__name__)


class EventPoster:
    def __init__(self, client: client_.KubeClient, *, workers: int = 4, backlog: int = 10_000) -> None:
        self._client = client
        self._workers = workers
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=backlog)

    def post(self, *, involved: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        """Queues an Event; messages never hold secret values (callers build them from names only)."""
        try:
            self._queue.put_nowait({"involved": involved, "reason": reason, "message": message, "warning": warning})
        except asyncio.QueueFull:
            logger.warning("dropping Event %s: %d Events are waiting to be posted", reason, self._queue.qsize())

    async def run(self) -> None:
        await asyncio.gather(*(self._work() for _ in range(self._workers)))

    async def _work(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await resources.post_event(self._client, **event)
            except (client_.ApiError, aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("posting Event %s failed: %s", event["reason"], exc)
