"""docs/operations.md against the code: every Event reason the code posts is in its table, and none
that the code no longer posts (the metrics table is checked against a running operator's /metrics:
tests/integration/test_start.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "operator" / "workerqueue_operator"
CONDITIONS_ONLY = {
    "Resolved",  # SecretsResolved=True
    "SecretPending",  # Ready=Unknown while a Secret is read: an Event only once reads fail (SecretUnreadable)
    "TemporalNotResolved",  # TemporalReachable=Unknown while the queue's Temporal is not resolved
}


def _posted_reasons() -> set[str]:
    found: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'\bEvent\(\s*"([A-Z]\w+)"', text))
        found |= set(re.findall(r'\breason="([A-Z]\w+)"', text))
        found |= set(re.findall(r'\bProblem\(\s*"([A-Z]\w+)"', text))
        found |= set(re.findall(r'probe\.reason[^\n]*?"([A-Z]\w+)"', text))
    return found - CONDITIONS_ONLY


def documented(section: str) -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}


def test_every_event_reason_the_code_posts_is_documented_and_no_other():
    posted = _posted_reasons()
    assert len(posted) > 30  # the search finds them: a pattern that matched nothing would pass below
    events = documented("Events")
    assert posted - events == set(), "posted, not in docs/operations.md"
    assert events - posted == set(), "in docs/operations.md, no longer posted"


def test_the_event_pace_is_the_one_documented():
    """The integration test of the pace reads it from the code: a pace ten times looser passed it."""
    from workerqueue_operator.core import events

    text = (ROOT / "docs" / "operations.md").read_text()
    burst, every = re.search(r"paced per object \((\d+) at once,\s+then one every (\d+) s", text).groups()  # type: ignore[union-attr]
    assert (int(burst), 1 / int(every)) == (events.BURST, events.RATE)

