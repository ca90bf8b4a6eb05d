"""Many queues on one Temporal that hangs (it takes connections and never answers) all show it, from
one connection. Two defects were behind it: a check that waited for a connection attempt shared with
another check ended cancelled when that one's timeout gave the attempt up, and was never run again
(its queue never showed TemporalReachable; a scaling queue's backlog would never have been read
again); and each round of 16 checks dialled and waited out the timeout anew."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.integration.conftest import GROUP, PLURAL, VERSION, Kube, wait_for

pytestmark = pytest.mark.usefixtures("operator")

QUEUES = 40
"""Checks run 16 at a time: three rounds of them, were each round to dial."""


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[str, list[socket.socket]]]:
    """A loopback address that takes connections and never answers; and the connections it took."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=QUEUES)
    listener.settimeout(0.2)
    taken: list[socket.socket] = []
    stop = threading.Event()

    def take() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            taken.append(connection)

    thread = threading.Thread(target=take, name="black hole")
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", taken
    finally:
        stop.set()
        thread.join()
        for connection in taken:
            connection.close()
        listener.close()


def unreachable(kube: Kube, namespace: str) -> int:
    """How many queues of the namespace show TemporalReachable=False."""
    items = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    return sum(1 for q in items for c in (q.get("status") or {}).get("conditions", [])
               if c["type"] == "TemporalReachable" and c["status"] == "False")


def test_queues_on_a_temporal_that_hangs_all_show_it_from_one_connection(kube: Kube, namespace: str):
    with black_hole() as (address, taken):
        for i in range(QUEUES):
            kube.create_queue(namespace, f"hung-{i}", queueId=f"hung-{i}-{namespace}",
                              temporal={"host": address, "namespace": "agents"})
        wait_for(lambda: unreachable(kube, namespace) == QUEUES, timeout=60, interval=1,
                 what=f"{QUEUES} queues TemporalReachable=False")
        condition = kube.condition(namespace, "hung-0", "TemporalReachable")
        assert condition is not None and condition["reason"] == "TemporalUnavailable"
        assert f"Temporal at {address}/agents did not answer" in condition["message"]
        # One connection tried; its failure answered the checks behind it (a second one only if the
        # first round outlasted the 2-s window). Dialling per round of 16 takes three or more.
        assert 1 <= len(taken) <= 2, len(taken)
