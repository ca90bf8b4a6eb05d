"""The keyed work queue says when keys wait for a free slot (routine Events then wait too)."""

from __future__ import annotations

import asyncio

from workerqueue_operator.core.workqueue import WorkQueue


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
