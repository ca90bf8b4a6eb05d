"""List-then-watch, the informer pattern: keeps a consumer in step with one kind of object.

After every (re)list the consumer gets the full set, so objects deleted while the watch was down
are reported as deleted too. `synced` is set after the first complete list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from workerqueue_operator.k8s import client as client_

logger = logging.getLogger(__name__)

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
        page_size: int = 500,
        watch_seconds: int = 300,
        label_selector: str | None = None,
    ) -> None:
        self._client = client
        self._path = path
        self._on_upsert = on_upsert
        self._on_delete = on_delete
        self._page_size = page_size
        self._watch_seconds = watch_seconds
        self.name = name
        self.synced = asyncio.Event()
        self._on_synced = on_synced
        self._known: set[ObjectKey] = set()
        self._selector = {"labelSelector": label_selector} if label_selector else {}

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                version: str | None = await self._relist()
                if not self.synced.is_set():
                    self.synced.set()
                    if self._on_synced is not None:
                        self._on_synced()
                backoff = 0.5
                while version is not None:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except (client_.ApiError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                logger.warning("informer %s: %s; relisting in %.1fs", self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _relist(self) -> str:
        seen: set[ObjectKey] = set()
        params = {"limit": str(self._page_size), **self._selector}
        while True:
            page = await self._client.get(self._path, params)
            for item in page.get("items", []):
                key = object_key(item)
                seen.add(key)
                self._on_upsert(item)
            token = page.get("metadata", {}).get("continue")
            if not token:
                break
            params = {"limit": str(self._page_size), "continue": str(token), **self._selector}
        for gone in self._known - seen:
            self._on_delete(gone, None)
        self._known = seen
        return str(page["metadata"]["resourceVersion"])

    async def _watch(self, version: str) -> str | None:
        """Watches from `version`; returns the version to continue from, or None to relist."""
        params = {
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._watch_seconds),
            **self._selector,
        }
        try:
            async for event in self._client.watch(self._path, params, timeout=self._watch_seconds):
                kind, obj = event.get("type"), event.get("object", {})
                if kind == "ERROR":
                    # 410 Gone: the version is too old; anything else: start over as well.
                    logger.info("informer %s: watch error %s; relisting", self.name, obj.get("message"))
                    return None
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                key = object_key(obj)
                if kind == "DELETED":
                    self._known.discard(key)
                    self._on_delete(key, obj)
                else:
                    self._known.add(key)
                    self._on_upsert(obj)
        except client_.ApiError as exc:
            if exc.status == 410:
                return None
            raise
        return version
