"""FairSlots: review slots taken in turns by caller address, with a bounded waiting room."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from workerqueue_operator.core.reviews import FairSlots, Full


async def waiter(slots: FairSlots, key: str, served: list[str]) -> None:
    await slots.acquire(key)
    served.append(key)


async def test_waiters_take_turns_by_key_so_a_flood_holds_another_back_by_one_each():
    slots, served = FairSlots(1, room=100), []
    await slots.acquire("holder")
    tasks = [asyncio.create_task(waiter(slots, "flood", served)) for _ in range(5)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(waiter(slots, "caller", served)))
    await asyncio.sleep(0)
    for _ in range(3):
        slots.release()
        await asyncio.sleep(0)
    assert served == ["flood", "caller", "flood"]  # not behind all five
    for _ in range(3):
        slots.release()
    await asyncio.gather(*tasks)
    assert served.count("flood") == 5 and slots.waiting == 0


async def test_a_full_room_turns_away_the_newest_waiter_of_the_key_with_most_not_a_newcomer():
    slots, served = FairSlots(1, room=3), []
    await slots.acquire("holder")
    flood = [asyncio.create_task(waiter(slots, "flood", served)) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(Full):
        await slots.acquire("flood")  # its own key has the most: the newcomer goes
    caller = asyncio.create_task(waiter(slots, "caller", served))
    await asyncio.sleep(0)
    assert slots.waiting == 3
    (turned_away,) = await asyncio.gather(flood[2], return_exceptions=True)  # the newest of "flood"
    assert isinstance(turned_away, Full)
    slots.release()
    slots.release()
    await asyncio.sleep(0)
    assert served == ["flood", "caller"]
    slots.release()
    await asyncio.gather(caller, *flood[:2])
    assert slots.waiting == 0


async def test_a_waiter_that_gives_up_leaves_no_slot_taken():
    slots, served = FairSlots(1, room=10), []
    await slots.acquire("holder")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await slots.acquire("late")
    assert slots.waiting == 0
    slots.release()
    await asyncio.wait_for(waiter(slots, "next", served), 1)  # the slot is free again
    # Given the slot as it is cancelled: the slot passes on, it is not lost.
    other = asyncio.create_task(waiter(slots, "other", served))
    given = asyncio.create_task(slots.acquire("given"))
    await asyncio.sleep(0)
    slots.release()  # to "other" (first in turn)
    await asyncio.sleep(0)
    slots.release()  # to "given", whose task is cancelled before it runs again
    given.cancel()
    await asyncio.gather(given, return_exceptions=True)
    await asyncio.wait_for(waiter(slots, "last", served), 1)
    assert served == ["next", "other", "last"] and not other.exception()


async def test_a_waiter_cancelled_just_before_it_is_turned_away_leaves_the_count_right():
    """Its deadline cancels its future at once; its task takes it out only when it runs next. Turned
    away in between, set_exception raised InvalidStateError (a 500), and `waiting` stayed one too
    high for good: no caller took a free slot directly again, every review waited its full timeout."""
    slots = FairSlots(1, room=1)
    await slots.acquire("holder")
    flood = asyncio.create_task(slots.acquire("flood"))
    await asyncio.sleep(0)

    async def after_flood_gives_up() -> None:
        flood.cancel()  # its future cancelled now, its task not run yet
        await slots.acquire("caller")  # in the same step: the room is full, "flood" is turned away

    caller = asyncio.create_task(after_flood_gives_up())
    await asyncio.sleep(0)
    await asyncio.gather(flood, return_exceptions=True)
    assert slots.waiting == 1  # "caller" alone
    slots.release()
    await asyncio.wait_for(caller, 1)
    assert slots.waiting == 0
    slots.release()
    await asyncio.wait_for(slots.acquire("next"), 1)  # a free slot taken directly, not waited for


async def test_a_refused_review_is_said_by_status_and_reason_never_by_the_servers_text():
    # An admission webhook on TokenReviews is given the token under review, and may quote it in its
    # refusal: logged as the reason of a 503, the caller's token was in the operator's log.
    from workerqueue_operator.core.reviews import Reviewer, Unavailable
    from workerqueue_operator.k8s import client as client_

    class Refusing:
        async def request(self, *args: object, **kwargs: object) -> dict[str, object]:
            raise client_.ApiError(403, "Forbidden", 'admission webhook denied: spec.token "the-callers-token"')

    reviewer = Reviewer(Refusing(), audiences=(), ttl=60.0)  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as caught:
        await reviewer.authenticate("the-callers-token", b"digest")
    assert caught.value.reason == "ApiError: 403 Forbidden"
    assert "the-callers-token" not in str(caught.value) and caught.value.__suppress_context__


async def test_a_lookup_whose_caller_is_cancelled_leaves_the_others_waiting_on_it_to_look_up_themselves():
    # Its CancelledError was handed to every caller sharing the lookup: they ended as if cancelled
    # themselves, past every handler's `except Exception`, and their connections closed unanswered.
    from workerqueue_operator.core.reviews import TTLCache

    cache: TTLCache[str] = TTLCache(ttl=60.0)
    loads: list[int] = []

    async def load() -> str:
        loads.append(1)
        await asyncio.sleep(0.1 if len(loads) == 1 else 0)
        return "identity"

    first = asyncio.create_task(cache.get("token", load))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(cache.get("token", load))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == "identity" and len(loads) == 2
    with pytest.raises(asyncio.CancelledError):
        await first


def jwt(claims: object) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


async def test_an_identity_is_not_cached_past_its_tokens_end():
    """Cached for the cache's 10 s whatever the token said, a token that ran out a moment after its
    review went on opening the queue for up to 10 s."""
    from workerqueue_operator.core.reviews import Reviewer

    class Vouching:
        reviews = 0

        async def request(self, *args: object, **kwargs: object) -> dict[str, object]:
            self.reviews += 1
            return {"status": {"authenticated": True, "user": {"username": "system:serviceaccount:a:b"}}}

    client = Vouching()
    reviewer = Reviewer(client, audiences=(), ttl=60.0)  # type: ignore[arg-type]
    ending = jwt({"exp": time.time() + 0.3})
    assert await reviewer.authenticate(ending, b"ending") is not None
    assert await reviewer.authenticate(ending, b"ending") is not None and client.reviews == 1  # cached
    await asyncio.sleep(0.4)
    await reviewer.authenticate(ending, b"ending")
    assert client.reviews == 2  # asked again once the token has ended, not 60 s after
    lasting = jwt({"exp": time.time() + 3600})
    for _ in range(2):
        await reviewer.authenticate(lasting, b"lasting")
    assert client.reviews == 3
    # What a token says of its end is only read, never a reason to fail: none, or nonsense, is no limit.
    for n, odd in enumerate((jwt({}), jwt({"exp": "soon"}), jwt({"exp": 10**400}), jwt([1]), "not.a-jwt!.x",
                             "a." + "W" * 40 + ".b", jwt({"exp": True}))):
        for _ in range(2):
            await reviewer.authenticate(odd, f"odd-{n}".encode())
    assert client.reviews == 3 + 7
