"""Slots: starts spread at a bounded rate, none refused."""

from __future__ import annotations

import pytest

from workerqueue_operator.core.slots import Slots


def test_a_seconds_worth_starts_at_once_then_one_every_interval():
    slots = Slots(rate=4)
    starts = [slots.take(100.0) for _ in range(8)]
    assert starts == [100.0, 100.0, 100.0, 100.0, 100.25, 100.5, 100.75, 101.0]


def test_over_any_span_no_more_than_its_rate_plus_one_seconds_worth_start():
    slots = Slots(rate=20)
    starts = [slots.take(100.0 + i * 0.001) for i in range(10_000)]  # 10,000 due within 10 s
    assert starts == sorted(starts)
    for begin in (100.0, 150.0, 400.0):
        within = [s for s in starts if begin <= s < begin + 10.0]
        assert len(within) <= 20 * 10 + 20
    assert starts[-1] == pytest.approx(100.0 + (10_000 - 20) / 20)  # none dropped: all within N / rate


def test_after_a_quiet_spell_a_start_is_at_once_and_no_credit_piles_up():
    slots = Slots(rate=2)
    assert slots.take(0.0) == 0.0
    assert slots.take(1000.0) == 1000.0
    assert [slots.take(1000.0) for _ in range(3)] == [1000.0, 1000.5, 1001.0]


def test_a_rate_below_one_a_second_starts_one_at_a_time():
    slots = Slots(rate=0.1)
    assert [slots.take(0.0) for _ in range(3)] == [0.0, 10.0, 20.0]


def test_a_rate_must_be_positive():
    with pytest.raises(ValueError):
        Slots(rate=0)
