"""The keyed work queue says when keys wait for a free slot (routine Events then wait too)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

from workerqueue_operator.core import workqueue
from workerqueue_operator.core.workqueue import WorkQueue, together


async def test_behind_while_keys_wait_for_a_slot_and_not_once_they_are_done():
    release, all_done = asyncio.Event(), asyncio.Event()
    done: list[int] = []

    async def process(key: int) -> None:
        await release.wait()
        done.append(key)
        if len(done) == 3:
            all_done.set()

    queue: WorkQueue[int] = WorkQueue(process, name="test", concurrency=2)
    runner = asyncio.create_task(queue.run())
    try:
        queue.add(1)
        queue.add(2)
        await asyncio.sleep(0)
        assert not queue.behind  # two keys, two slots
        queue.add(3)
        await asyncio.sleep(0)
        assert queue.behind
        release.set()
        await asyncio.wait_for(all_done.wait(), 5)
        await asyncio.sleep(0)  # the last key's slot is given back after it returns
        assert not queue.behind and sorted(done) == [1, 2, 3]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


@pytest.mark.looptime
async def test_an_api_server_outage_backs_off_each_key_and_logs_a_line_now_and_then(caplog: pytest.LogCaptureFixture):
    """1,000 queues failing for a minute (the API server is away): each key is retried ever less often,
    not every 2 s, and the log gets a counted line every 10 s, not one per failure."""
    caplog.set_level(logging.WARNING, logger=workqueue.__name__)
    calls: Counter[int] = Counter()
    healthy = asyncio.Event()

    async def process(key: int) -> None:
        calls[key] += 1
        if not healthy.is_set():
            raise ConnectionError("Cannot connect to host kubernetes.default.svc:443")

    queue: WorkQueue[int] = WorkQueue(process, name="workers", concurrency=8)
    runner = asyncio.create_task(queue.run())
    try:
        for key in range(1000):
            queue.add(key)
        await asyncio.sleep(60)
        assert max(calls.values()) <= 6, "retried at 2, 6, 14, 30 and 62 s at most (back-off doubling)"
        lines = [r.getMessage() for r in caplog.records]
        assert 1 <= len(lines) <= 7, lines[:10]
        assert "more failures" in lines[-1]
        healthy.set()
        before = dict(calls)
        queue.add(0)
        await asyncio.sleep(1)
        assert calls[0] == before[0] + 1
        # A success forgets the key's failures: its next failure is retried after 2 s again.
        healthy.clear()
        queue.add(0)
        await asyncio.sleep(2.5)
        assert calls[0] == before[0] + 3
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_loops_run_together_end_with_the_first_that_dies_and_say_why():
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.append(name)

    async def dies() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("resync broke")

    with pytest.raises(RuntimeError, match="resync broke"):
        await asyncio.wait_for(together(forever("queue"), dies(), forever("poll")), timeout=5)
    assert sorted(cancelled) == ["poll", "queue"]


async def test_a_failure_of_ours_is_an_error_with_its_traceback_and_the_api_servers_a_warning(
        caplog: pytest.LogCaptureFixture):
    """A bug in a pass logged `processing ('ns', 'q') failed, retrying in 2s: 'spec'` at WARNING, forever:
    no type, no traceback (an exception without a message said nothing at all)."""
    from workerqueue_operator.k8s import client as client_

    tried: list[int] = []

    async def process(key: int) -> None:
        tried.append(key)
        if key < 4:
            raise client_.ApiError(503, "ServiceUnavailable", "the API server is starting")
        raise KeyError("spec")

    # Paced apart: the outage's first warning must not fold the bug's error away.
    queue: WorkQueue[int] = WorkQueue(process, name="test", concurrency=1, retry_seconds=60, log_every_seconds=60)
    runner = asyncio.create_task(queue.run())
    try:
        with caplog.at_level(logging.WARNING, logger=workqueue.__name__):
            for key in (1, 2, 3, 4):
                queue.add(key)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if queue.failed == 4:
                    break
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    api, ours = sorted(caplog.records, key=lambda r: r.levelno)
    assert (api.levelno, api.exc_info) == (logging.WARNING, None) and "ApiError" in api.getMessage()
    assert ours.levelno == logging.ERROR and ours.exc_info is not None and "KeyError: 'spec'" in ours.getMessage()
    assert queue.failed == 4


async def test_a_failure_without_words_is_logged_by_its_type_alone(caplog: pytest.LogCaptureFixture):
    """A timeout has no text: the line ended `failed, retrying in 2s: TimeoutError: `."""
    async def process(key: int) -> None:
        raise TimeoutError

    queue: WorkQueue[int] = WorkQueue(process, name="test", concurrency=1, retry_seconds=60)
    runner = asyncio.create_task(queue.run())
    try:
        with caplog.at_level(logging.WARNING, logger=workqueue.__name__):
            queue.add(1)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if queue.failed:
                    break
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "test: processing 1 failed, retrying in 60s: TimeoutError"
