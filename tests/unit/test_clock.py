"""This replica's clock against the API server's: peering and Leases take them to agree."""

from __future__ import annotations

from workerqueue_operator import runner


def test_a_clock_within_the_tolerance_is_no_news():
    assert runner.clock_doubt(0.0) is None
    assert runner.clock_doubt(-runner.CLOCK_TOLERANCE_SECONDS) is None


def test_a_clock_seconds_off_says_which_way_and_what_it_risks():
    behind = runner.clock_doubt(8.0)
    assert behind is not None and "8s behind the API server's" in behind and "NTP" in behind
    ahead = runner.clock_doubt(-61.0)
    assert ahead is not None and "61s ahead of the API server's" in ahead and "both act" in ahead
