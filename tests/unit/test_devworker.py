"""The test worker's pure parts: its environment and the single-execution latch-and-exit rule."""

from __future__ import annotations

import pytest

from workerqueue_operator.devcluster.worker import Config, ConfigError, Latch


def test_the_latch_waits_for_the_first_latchable_execution_to_read_done_twice():
    latch = Latch()
    assert not latch.feed([])
    assert not latch.feed([{"id": "a", "status": "pending"}, {"id": "b", "status": "queued"}])
    assert latch.execution_id is None
    assert not latch.feed([{"id": "a", "status": "pending"}, {"id": "b", "status": "running"},
                           {"id": "c", "status": "completed"}])
    assert latch.execution_id == "b"
    assert not latch.feed([{"id": "c", "status": "completed"}, {"id": "b", "status": "completed"}])
    assert not latch.feed([{"id": "b", "status": "running"}])  # not twice in a row
    assert not latch.feed([{"id": "b", "status": "failed"}])
    assert not latch.feed(None)  # a failed poll (not 200, an error) begins the count again
    assert not latch.feed([{"id": "b", "status": "cancelled"}])
    assert latch.feed([{"id": "b", "status": "Completed"}])
    assert latch.execution_id == "b"


def test_a_poll_that_does_not_list_the_execution_leaves_the_count_as_it_is():
    # As the real worker's monitor counts: only a reading of its own execution, or a failed poll, resets it.
    latch = Latch()
    assert not latch.feed([{"id": "b", "status": "completed"}])
    assert not latch.feed([])
    assert not latch.feed([{"id": "x", "status": "running"}])
    assert latch.feed([{"id": "b", "status": "completed"}])


@pytest.mark.parametrize("status", ["running", "completed", "failed", "waiting_for_input"])
def test_latchable_statuses(status: str):
    latch = Latch()
    latch.feed([{"id": "e", "status": status}])
    assert latch.execution_id == "e"


def test_a_finished_execution_listed_first_ends_a_fresh_worker():
    latch = Latch()
    assert not latch.feed([{"id": "old", "status": "completed"}])
    assert latch.feed([{"id": "old", "status": "completed"}])


def test_config_from_env():
    base = {"KUBIYA_API_KEY": "k", "CONTROL_PLANE_URL": "http://cp/", "QUEUE_ID": "q"}
    config = Config.from_env({**base, "HOSTNAME": "pod-1"})
    assert (config.control_plane_url, config.heartbeat_interval, config.single_execution) == ("http://cp", 60, False)
    assert not config.temporal_plaintext and config.hostname == "pod-1" and config.give_up_seconds == 1800
    for value, expected in [("true", True), ("1", True), ("YES", True), ("false", False), ("on", False)]:
        assert Config.from_env({**base, "SINGLE_EXECUTION": value}).single_execution is expected
    for host, plaintext in [("temporal:7233", True), ("host.docker.internal:7233", True),
                            ("ns.tmprl.cloud:7233", False), ("127.0.0.1:7233", False)]:
        assert Config.from_env({**base, "TEMPORAL_HOST": host}).temporal_plaintext is plaintext
    with pytest.raises(ConfigError, match="QUEUE_ID"):
        Config.from_env({"KUBIYA_API_KEY": "k", "CONTROL_PLANE_URL": "u"})
