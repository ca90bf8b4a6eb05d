"""RFC 3339 times as Kubernetes and Temporal write them, in one place: written in UTC with "Z",
read with or without fractions and offsets (a time without an offset is UTC)."""

from __future__ import annotations

import datetime


def rfc3339(moment: float) -> str:
    """A Kubernetes Time: whole seconds."""
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_rfc3339(moment: float) -> str:
    """A Kubernetes MicroTime: microseconds."""
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def milli_rfc3339(moment: datetime.datetime) -> str:
    """A datetime (naive: UTC) in milliseconds, as the control plane's API writes its times."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_datetime(text: str) -> datetime.datetime:
    """An aware datetime; ValueError if the text is no time."""
    parsed = datetime.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


def parse(text: str) -> float:
    """Epoch seconds; ValueError if the text is no time."""
    return parse_datetime(text).timestamp()


def parse_or_none(text: object) -> float | None:
    """Epoch seconds, or None for anything that is no time (a field a person may have edited)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return parse(text)
    except ValueError:
        return None
