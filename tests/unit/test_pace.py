"""Pace: starts at a bounded rate, a second's worth at once after a quiet spell."""

from __future__ import annotations

import pytest

from workerqueue_operator.core import pace as pace_
from workerqueue_operator.core.pace import Pace


def starts(pace: Pace, times: list[float]) -> list[float]:
    return [t for t in times if pace.take(t)]


def test_a_seconds_worth_at_once_then_its_rate():
    pace = Pace(rate=4)
    assert [pace.take(100.0) for _ in range(5)] == [True] * 4 + [False]
    assert starts(pace, [100.1, 100.2, 100.25, 100.3, 100.5]) == [100.25, 100.5]


def test_over_any_span_no_more_than_its_rate_plus_a_seconds_worth():
    pace = Pace(rate=20)
    ticks = [100.0 + i * 0.1 for i in range(1000)]  # asked 10 times a tick, every tick, for 100 s
    made = [t for t in ticks for _ in range(10) if pace.take(t)]
    for begin in (100.0, 130.0, 170.0):
        assert len([t for t in made if begin <= t < begin + 10.0]) <= 20 * 10 + 20
    assert len(made) >= 20 * 99  # and as many as it allows


def test_no_credit_piles_up_in_a_quiet_spell_and_a_clock_going_back_gives_none():
    pace = Pace(rate=2)
    assert pace.take(0.0) and pace.take(0.0) and not pace.take(0.0)
    assert [pace.take(1000.0) for _ in range(3)] == [True, True, False]
    assert not pace.take(999.0)


def test_below_one_a_second_one_at_a_time():
    pace = Pace(rate=0.1)
    assert starts(pace, [0.0, 0.0, 5.0, 10.0, 10.0, 20.0]) == [0.0, 10.0, 20.0]


def test_a_rate_must_be_positive():
    with pytest.raises(ValueError):
        Pace(rate=0)


def test_a_new_rate_holds_from_the_next_take_and_keeps_no_more_than_its_seconds_worth():
    pace = Pace(rate=10)
    assert pace.take(0.0)  # 9 left
    pace.rate = 2  # what is saved up shrinks to the new second's worth
    assert [pace.take(0.0) for _ in range(3)] == [True, True, False]
    assert starts(pace, [0.25, 0.5, 1.0]) == [0.5, 1.0]
    pace.rate = 100
    assert sum(pace.take(2.0) for _ in range(150)) == 100
    with pytest.raises(ValueError):
        pace.rate = 0


def test_doubling_waits_double_up_to_the_most_and_never_overflow():
    assert [pace_.doubling(n, 2.0, 60.0) for n in (0, 1, 2, 3, 5, 6)] == [2.0, 2.0, 4.0, 8.0, 32.0, 60.0]
    # Failing every second for an hour or a month: a float power of 2 overflows past 1,024.
    assert pace_.doubling(5_000, 2.0, 60.0) == pace_.doubling(3_000_000, 0.5, 60.0) == 60.0
