import time

import pytest

from workerqueue_operator.models import times

T0 = 1_800_000_000.25


@pytest.fixture
def far_from_utc(monkeypatch):
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_kubernetes_and_temporal_forms_read_as_the_same_moment(far_from_utc):
    assert times.parse("2027-01-15T08:00:00Z") == 1_800_000_000.0
    assert times.parse("2027-01-15T08:00:00.250000Z") == T0  # a MicroTime
    assert times.parse("2027-01-15T08:00:00.250Z") == T0  # Temporal's milliseconds
    assert times.parse("2027-01-15T09:00:00.25+01:00") == T0
    assert times.parse("2027-01-15T08:00:00.25") == T0  # no offset: UTC, whatever the machine's zone


def test_written_times_read_back():
    assert times.rfc3339(T0) == "2027-01-15T08:00:00Z"
    assert times.parse(times.rfc3339(T0)) == 1_800_000_000.0
    assert times.parse(times.micro_rfc3339(T0)) == T0


@pytest.mark.parametrize("text", ["", "yesterday", "2027-13-01T00:00:00Z", None, 1_800_000_000])
def test_what_is_no_time_reads_as_none(text):
    assert times.parse_or_none(text) is None


def test_what_is_no_time_raises_where_a_time_is_required():
    with pytest.raises(ValueError):
        times.parse("yesterday")
