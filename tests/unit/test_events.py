"""The Event backlog: identical Events coalesce, routine ones make way for Warnings, drops are counted."""

from __future__ import annotations

from typing import Any

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
