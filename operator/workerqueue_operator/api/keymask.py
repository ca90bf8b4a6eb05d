"""The organization's API key, sent upstream in the worker's place, never handed back to the worker.

An upstream may answer with the key it was called with: the Agent Control Plane puts it in an
agent's resolved environment (`KUBIYA_API_KEY`), as the key the worker itself called with. Through
the operator that is the organization's key, which workers must never hold; they get their own
token in its place, which is what the upstream would have answered them directly. In bodies and
websocket messages (JSON, as a rule) the token is written as a JSON string's content would hold
it; in headers, as it is.
"""

from __future__ import annotations

import functools
import json
import re
from typing import NamedTuple


def _spellings(text: str) -> list[str]:
    """How `text` may appear in an answer: as is, and inside a JSON string (escaped as Python's json
    escapes it, and with `/` escaped as some encoders do)."""
    escaped = json.dumps(text)[1:-1]
    return [text, escaped, escaped.replace("/", "\\/")]


class _Compiled(NamedTuple):
    to: bytes
    pattern: re.Pattern[bytes]
    text_to: str
    text_pattern: re.Pattern[str]
    key: str
    token: str
    spellings: tuple[bytes, ...]
    longest: int
    firsts: frozenset[bytes]

    def __repr__(self) -> str:  # the key and the token in every field: never printed (a traceback's locals)
        return "_Compiled(...)"


@functools.lru_cache(maxsize=1024)  # a worker's calls share one: compiled once, not per request
def _compiled(key: str, token: str) -> _Compiled:
    texts = sorted(set(_spellings(key)), key=len, reverse=True)  # the longest first, where one begins another
    spellings = tuple(t.encode() for t in texts)
    escaped = json.dumps(token)[1:-1]
    return _Compiled(escaped.encode(), re.compile(b"|".join(re.escape(p) for p in spellings)), escaped,
                     re.compile("|".join(re.escape(t) for t in texts)), key, token, spellings,
                     len(spellings[0]), frozenset(p[:1] for p in spellings))


class KeyMask:
    """Replaces the key by the token in what is relayed: whole answers (`whole`), websocket messages
    (`message`), headers (`header`), or a stream fed chunk by chunk (`feed`, then `end`), where a key
    split across chunks is replaced too. Only the bytes that may begin the key are held back from a
    chunk: a stream of events is not delayed."""

    def __init__(self, key: str, token: str) -> None:
        self._c = _compiled(key, token) if key else None
        self._held = b""

    @property
    def active(self) -> bool:
        """Whether there is a key to replace (what is relayed may change length)."""
        return self._c is not None

    def whole(self, data: bytes) -> bytes:
        c = self._c
        return c.pattern.sub(lambda _: c.to, data) if c is not None and data else data

    def message(self, data: str) -> str:
        """A websocket's text message."""
        c = self._c
        return c.text_pattern.sub(lambda _: c.text_to, data) if c is not None and data else data

    def header(self, data: str) -> str:
        """A header value, or a status line's reason."""
        c = self._c
        return c.text_pattern.sub(lambda _: c.token, data) if c is not None and data else data

    def feed(self, chunk: bytes) -> bytes:
        c = self._c
        if c is None:
            return chunk
        data = self._held + chunk
        out: list[bytes] = []
        position = 0
        for match in c.pattern.finditer(data):
            out.append(data[position:match.start()])
            out.append(c.to)
            position = match.end()
        rest = data[position:]
        kept = _partial(c, rest)
        out.append(rest[:len(rest) - kept])
        self._held = rest[len(rest) - kept:]
        return b"".join(out)

    def end(self) -> bytes:
        """What was held back at the stream's end: never the whole key."""
        held, self._held = self._held, b""
        return held


def _partial(c: _Compiled, data: bytes) -> int:
    """The length of the longest end of `data` that begins a spelling of the key (not all of one)."""
    start = max(0, len(data) - c.longest + 1)
    longest = 0
    for first in c.firsts:
        at = data.find(first, start)
        while at != -1:
            if any(spelt.startswith(data[at:]) for spelt in c.spellings):
                longest = max(longest, len(data) - at)
                break  # the earliest such start is the longest end
            at = data.find(first, at + 1)
    return longest
