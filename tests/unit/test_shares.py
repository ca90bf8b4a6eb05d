"""core.shares: a namespace's share of a bounded resource, and turns taken by namespace at a full gate."""

from __future__ import annotations

import asyncio

from workerqueue_operator.core.shares import FairGate, Shares


async def test_a_key_takes_its_share_and_waits_for_one_of_its_own_not_for_others():
    shares = Shares(2)
    assert await shares.take("team-a", 0) and await shares.take("team-a", 0)
    assert not await shares.take("team-a", 0)  # its share is held: refused at once
    assert await shares.take("team-b", 0)  # another key's share is its own
    late = asyncio.create_task(shares.take("team-a", 1.0))
    await asyncio.sleep(0.05)
    shares.give_back("team-a")
    assert await late  # one of its own ended within the wait
    assert not await shares.take("team-a", 0.05)  # and none within this one


async def test_a_wait_given_up_or_cancelled_leaves_nothing_held():
    shares = Shares(1)
    assert await shares.take("team-a", 0)
    waiting = asyncio.create_task(shares.take("team-a", 60.0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not await shares.take("team-a", 0.01)
    shares.give_back("team-a")
    assert shares._held == {}  # nothing kept for a key nobody holds
    assert await shares.take("team-a", 0)


async def hold(gate: FairGate, key: str, order: list[str], release: asyncio.Event) -> None:
    async with gate.turn(key):
        order.append(key)
        await release.wait()


async def test_a_full_gate_lets_keys_in_by_turns_so_one_with_many_waiters_cannot_starve_another():
    gate, order, release = FairGate(2), [], asyncio.Event()
    busy = [asyncio.create_task(hold(gate, "hostile", order, release)) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert order == ["hostile", "hostile"] and gate.waiting == 8
    done = asyncio.Event()
    good = asyncio.create_task(hold(gate, "team-b", order, done))
    await asyncio.sleep(0.01)
    release.set()  # every holder of the hostile key lets go in turn
    await asyncio.sleep(0.05)
    # In before the hostile key's eight waiters, at the first place given back.
    assert order.index("team-b") <= 3
    done.set()
    await asyncio.gather(good, *busy)
    assert gate.waiting == 0


async def test_one_key_alone_takes_every_place_and_a_cancelled_waiter_loses_none():
    gate, order, release = FairGate(3), [], asyncio.Event()
    holders = [asyncio.create_task(hold(gate, "team-a", order, release)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert len(order) == 3  # nobody else wants one: all three go to it
    cancelled = asyncio.create_task(hold(gate, "team-a", order, release))
    after = asyncio.create_task(hold(gate, "team-b", order, release))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert list(gate._lines) == ["team-b"]  # gone from its line at once, not when its turn comes
    release.set()
    await asyncio.gather(*holders, after)
    assert order == ["team-a"] * 3 + ["team-b"]
    # Every place is free again: three holders at once, without a wait.
    again, release2 = [], asyncio.Event()
    tasks = [asyncio.create_task(hold(gate, k, again, release2)) for k in ("x", "y", "z")]
    await asyncio.sleep(0.01)
    assert len(again) == 3
    release2.set()
    await asyncio.gather(*tasks)


async def test_a_bounded_take_waits_its_turn_gives_up_in_time_and_leaves_no_line_behind():
    gate = FairGate(1)
    assert await gate.take("a", 0)  # free: taken without a wait
    assert not await gate.take("b", 0)  # full, and no wait asked
    assert not await gate.take("b", 0.01)  # full for longer than it waits
    assert gate.waiting == 0 and not gate._lines  # a pool full for minutes is no pile of given-up waiters
    waiting = asyncio.create_task(gate.take("b", 5))
    cancelled = asyncio.create_task(gate.take("c", 5))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert gate.waiting == 1 and list(gate._lines) == ["b"]
    gate.give_back()
    assert await waiting  # the place given back is the waiter's
    assert not await gate.take("a", 0)
    gate.give_back()
    assert await gate.take("a", 0)
