"""The Event backlog: identical Events coalesce, routine ones make way for Warnings, drops are counted."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from workerqueue_operator.core.events import EventPoster


def involved(name: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": f"uid-{name}"}}


def drain(poster: EventPoster) -> list[tuple[str, str, int]]:
    out = []
    while (event := poster._next()) is not None:
        out.append((event.involved["metadata"]["name"], event.reason, event.count))
    return out


def test_identical_events_waiting_become_one_with_a_count():
    poster = EventPoster(client=None, backlog=10)  # type: ignore[arg-type]
    for _ in range(3):
        poster.post(involved=involved("a"), reason="BackOff", message="m", warning=True)
    poster.post(involved=involved("a"), reason="BackOff", message="other", warning=True)
    assert poster.waiting == 2 and poster.coalesced == 2
    assert drain(poster) == [("a", "BackOff", 3), ("a", "BackOff", 1)]


def test_a_full_backlog_drops_routine_events_first_and_counts():
    poster = EventPoster(client=None, backlog=2)  # type: ignore[arg-type]
    poster.post(involved=involved("a"), reason="TokenSecretCreated", message="m")
    poster.post(involved=involved("b"), reason="TokenSecretCreated", message="m")
    poster.post(involved=involved("c"), reason="SecretNotFound", message="m", warning=True)  # evicts a
    poster.post(involved=involved("d"), reason="TokenSecretCreated", message="m")  # dropped
    poster.post(involved=involved("e"), reason="SecretNotFound", message="m", warning=True)  # evicts b
    poster.post(involved=involved("f"), reason="SecretNotFound", message="m", warning=True)  # dropped
    assert poster.dropped == 4
    assert drain(poster) == [("c", "SecretNotFound", 1), ("e", "SecretNotFound", 1)]


def test_routine_events_wait_while_the_work_is_behind_but_not_for_ever_and_warnings_never():
    now = [0.0]
    behind = [True]
    poster = EventPoster(client=None, backlog=10, clock=lambda: now[0])  # type: ignore[arg-type]
    poster.defer_routine(lambda: behind[0], at_most=60)
    poster.post(involved=involved("a"), reason="TokenSecretCreated", message="m")
    poster.post(involved=involved("b"), reason="SecretNotFound", message="m", warning=True)
    assert drain(poster) == [("b", "SecretNotFound", 1)]  # the routine one waits
    now[0] = 59.0
    assert poster._next() is None
    now[0] = 60.0  # waited long enough, though still behind
    assert drain(poster) == [("a", "TokenSecretCreated", 1)]

    behind[0] = False
    poster.post(involved=involved("c"), reason="TokenSecretCreated", message="m")
    assert drain(poster) == [("c", "TokenSecretCreated", 1)]
    behind[0] = True  # behind again: the wait starts anew
    poster.post(involved=involved("d"), reason="TokenSecretCreated", message="m")
    assert drain(poster) == []
    behind[0] = False
    assert drain(poster) == [("d", "TokenSecretCreated", 1)]


def test_routine_events_wait_no_longer_once_the_backlog_is_nine_tenths_full():
    poster = EventPoster(client=None, backlog=10, clock=lambda: 0.0)  # type: ignore[arg-type]
    poster.defer_routine(lambda: True, at_most=60)
    for name in "abcdefgh":
        poster.post(involved=involved(name), reason="TokenSecretCreated", message="m")
    assert poster._next() is None
    poster.post(involved=involved("i"), reason="TokenSecretCreated", message="m")
    assert drain(poster) == [("a", "TokenSecretCreated", 1)]  # then eight wait again
    assert poster.dropped == 0


def test_each_object_gets_a_burst_of_events_then_its_pace():
    now = [0.0]
    poster = EventPoster(client=None, backlog=100, burst=3, rate=0.5, clock=lambda: now[0])  # type: ignore[arg-type]
    for i in range(5):
        poster.post(involved=involved("busy"), reason="WorkerDisconnected", message=f"worker w{i}")
    poster.post(involved=involved("busy"), reason="WorkerDisconnected", message="worker w0")  # coalesced: free
    poster.post(involved=involved("calm"), reason="WorkerDisconnected", message="worker v0")  # its own pace
    assert poster.limited == 2 and poster.dropped == 0 and poster.coalesced == 1
    now[0] = 2.0  # one more a 2 s
    poster.post(involved=involved("busy"), reason="WorkerDisconnected", message="worker w5")
    poster.post(involved=involved("busy"), reason="WorkerDisconnected", message="worker w6")
    assert poster.limited == 3
    assert [name for name, *_ in drain(poster)] == ["busy"] * 3 + ["calm", "busy"]


def test_a_flood_of_routine_events_leaves_warnings_their_own_pace():
    now = [0.0]
    poster = EventPoster(client=None, backlog=100, burst=3, rate=0.5, clock=lambda: now[0])  # type: ignore[arg-type]
    for i in range(10):
        poster.post(involved=involved("q"), reason="WorkerDisconnected", message=f"worker w{i}")
    poster.post(involved=involved("q"), reason="SecretNotFound", message="secret s", warning=True)
    assert poster._warnings and poster.limited == 7
    for i in range(5):  # Warnings too are paced
        poster.post(involved=involved("q"), reason="WorkerExpired", message=f"worker v{i}", warning=True)
    assert poster.limited == 10
    assert [reason for _, reason, _ in drain(poster)][:3] == ["SecretNotFound", "WorkerExpired", "WorkerExpired"]


def of(namespace: str, name: str) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}"}}


def test_namespaces_are_posted_for_in_turn_so_one_teams_flood_does_not_delay_anothers():
    poster = EventPoster(client=None, backlog=100)  # type: ignore[arg-type]
    for i in range(5):
        poster.post(involved=of("team-a", f"q{i}"), reason="WorkerDisconnected", message="m")
    poster.post(involved=of("team-b", "q"), reason="WorkerDisconnected", message="m")
    poster.post(involved=of("team-a", "q0"), reason="CrashLooping", message="m", warning=True)
    assert [(e.involved["metadata"]["namespace"], e.reason) for e in iter(poster._next, None)] == [
        ("team-a", "CrashLooping"), ("team-a", "WorkerDisconnected"), ("team-b", "WorkerDisconnected"),
        *[("team-a", "WorkerDisconnected")] * 4]


def test_a_full_backlog_makes_room_at_the_cost_of_the_namespace_with_the_most_waiting():
    # One team's Warnings filled the backlog: another team's next Warning (PodCreationFailed, say) was dropped.
    poster = EventPoster(client=None, backlog=4)  # type: ignore[arg-type]
    for i in range(3):
        poster.post(involved=of("team-a", f"q{i}"), reason="WorkerFailed", message="m", warning=True)
    poster.post(involved=of("team-a", "q0"), reason="WorkerDisconnected", message="m")
    poster.post(involved=of("team-b", "q"), reason="TokenSecretCreated", message="m")  # team-a's routine one goes
    poster.post(involved=of("team-b", "q"), reason="PodCreationFailed", message="m", warning=True)  # a routine one goes
    poster.post(involved=of("team-a", "q9"), reason="WorkerFailed", message="m", warning=True)  # its own pays
    poster.post(involved=of("team-c", "q"), reason="PodCreationFailed", message="m", warning=True)  # a's oldest
    assert poster.dropped == 4 and poster.waiting == 4
    assert [(e.involved["metadata"]["name"], e.reason) for e in iter(poster._next, None)] == [
        ("q1", "WorkerFailed"), ("q", "PodCreationFailed"), ("q", "PodCreationFailed"), ("q2", "WorkerFailed")]


def test_a_warning_takes_a_routine_events_place_anywhere_before_a_warnings():
    poster = EventPoster(client=None, backlog=6)  # type: ignore[arg-type]
    for i in range(4):
        poster.post(involved=of("team-a", f"q{i}"), reason="WorkerFailed", message="m", warning=True)
    for i in range(2):
        poster.post(involved=of("team-b", f"q{i}"), reason="WorkerDisconnected", message="m")
    poster.post(involved=of("team-c", "q"), reason="PodCreationFailed", message="m", warning=True)
    poster.post(involved=of("team-a", "q9"), reason="WorkerFailed", message="m", warning=True)  # the busiest's too
    poster.post(involved=of("team-c", "q"), reason="WorkerDisconnected", message="m")  # a routine one: no room
    assert poster.dropped == 3
    assert sorted((e.involved["metadata"]["namespace"], e.reason) for e in iter(poster._next, None)) == [
        *[("team-a", "WorkerFailed")] * 5, ("team-c", "PodCreationFailed")]


async def test_events_the_api_server_does_not_take_are_counted_and_logged_a_line_at_a_time(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """In an outage every Event waiting fails: a WARNING each was thousands of lines."""
    from tests.unit.apps import unreachable
    from workerqueue_operator.core import events as events_

    monkeypatch.setattr(events_, "_SETTLE_SECONDS", 0.05)
    with unreachable() as kube:
        poster = EventPoster(kube, backlog=100)
        now = [0.0]
        poster._log._clock = lambda: now[0]
        for i in range(20):
            poster.post(involved=involved(f"q{i}"), reason="BackOff", message="m", warning=True)
        with caplog.at_level(logging.DEBUG, logger=events_.__name__):
            running = asyncio.create_task(poster.run())
            try:
                assert await poster.flush(30) == 0
                lines = [r for r in caplog.records if "posting Event" in r.getMessage()]
                assert poster.failed == 20 and len(lines) == 1 and lines[0].levelno == logging.WARNING
                now[0] = 11.0  # its pace allows a line again: the rest is told, idle as the poster is
                await asyncio.sleep(0.3)
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
        lines = [r.getMessage() for r in caplog.records if "posting Event" in r.getMessage()]
        assert len(lines) == 2 and "(and 18 more like it" in lines[1]
        await kube.close()


async def test_a_poster_cancelled_right_after_a_flush_woke_it_stops():
    """The operator's stop flushes the Events, then cancels the poster: a wait that swallowed that
    cancellation (asyncio.wait_for on Python 3.11, its event set at the same moment) kept the poster,
    and the whole operator, from ever stopping."""
    poster = EventPoster(client=None)  # type: ignore[arg-type]
    running = asyncio.create_task(poster.run())
    await asyncio.sleep(0.05)  # idle: each worker waits for news
    assert await poster.flush(1) == 0
    running.cancel()
    done, _ = await asyncio.wait({running}, timeout=5)
    assert running in done and running.cancelled()


async def test_a_poster_that_fails_stops_all_its_workers():
    """A worker of the poster that meets a bug ends run(), and the operator stops on it: the other
    workers must not go on posting with no owner to cancel them."""
    poster = EventPoster(client=None, workers=4)  # type: ignore[arg-type]  # posting fails: a bug
    poster.post(involved=involved("q"), reason="Started", message="m")
    with pytest.raises(AttributeError):
        await asyncio.wait_for(poster.run(), 5)
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "EventPoster._work"]
    assert left == []
