"""The watch stream's line reader: events of any size the API server can send, bounded memory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from workerqueue_operator.k8s import client


class Stream:
    """What `watch_lines` reads: chunks as the network delivers them."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


async def lines(chunks: list[bytes], **kwargs: int) -> list[bytes]:
    return [line async for line in client.watch_lines(Stream(chunks), **kwargs)]  # type: ignore[arg-type]


async def test_an_event_of_a_full_one_mebibyte_secret_is_read_whole():
    secret = {"type": "ADDED", "object": {"metadata": {"name": "big"}, "data": {"k": "A" * 1_400_000}}}
    first = json.dumps(secret).encode()
    data = first + b"\n" + b'{"type":"BOOKMARK"}\n'
    for size in (1, 7, 65_536, len(data)):
        if size == 1 and len(data) > 100_000:
            size = 4093  # byte by byte takes too long; odd chunk sizes split lines anywhere
        assert await lines(chunked(data, size)) == [first, b'{"type":"BOOKMARK"}']


async def test_blank_lines_are_skipped_and_a_cut_last_line_is_dropped():
    assert await lines([b'{"a":1}\n\n', b'  \n{"b":', b"2}\n", b'{"c":']) == [b'{"a":1}', b'{"b":2}']


async def test_a_line_over_the_cap_fails_loudly():
    with pytest.raises(client.LineTooLong):
        await lines(chunked(b"x" * 5000, 1000), max_line=4096)

