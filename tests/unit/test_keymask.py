"""api.keymask: the organization's key, wherever an answer says it, becomes the worker's own token."""

from __future__ import annotations

import json

import pytest

from workerqueue_operator.api.keymask import KeyMask

KEY, TOKEN = "org/key-\"42\"", "worker-token"


def test_every_spelling_of_the_key_in_a_whole_answer_is_the_workers_token():
    body = json.dumps({"env": {"KUBIYA_API_KEY": KEY}, "again": f"Bearer {KEY}"}).encode()
    slashed = body.replace(b"/", b"\\/")  # as encoders that escape `/` write it
    for answer in (body, slashed, KEY.encode()):
        masked = KeyMask(KEY, TOKEN).whole(answer)
        assert KEY.encode() not in masked and json.dumps(KEY)[1:-1].encode() not in masked
        assert b"org" not in masked and TOKEN.encode() in masked
    assert json.loads(KeyMask(KEY, TOKEN).whole(body)) == {"env": {"KUBIYA_API_KEY": TOKEN}, "again": f"Bearer {TOKEN}"}
    assert KeyMask(KEY, TOKEN).header(f"key={KEY}; again={KEY}") == f"key={TOKEN}; again={TOKEN}"
    assert json.loads(KeyMask(KEY, TOKEN).message(json.dumps({"k": KEY}))) == {"k": TOKEN}


@pytest.mark.parametrize("token", ['to"k\\en', "plain-token"])
def test_in_a_body_the_token_is_written_as_a_json_string_holds_it(token: str):
    # A token may hold `"` or `\` (any visible ASCII): written raw into JSON, the answer no longer parsed.
    body = json.dumps({"KUBIYA_API_KEY": "kb_orgkey123", "events": ["kb_orgkey123"]}).encode()
    mask = KeyMask("kb_orgkey123", token)
    assert json.loads(mask.whole(body)) == {"KUBIYA_API_KEY": token, "events": [token]}
    streamed = b"".join(mask.feed(body[i:i + 5]) for i in range(0, len(body), 5)) + mask.end()
    assert json.loads(streamed)["KUBIYA_API_KEY"] == token
    assert json.loads(mask.message(body.decode()))["events"] == [token]
    assert mask.header("Bearer kb_orgkey123") == f"Bearer {token}"  # a header holds it as it is


@pytest.mark.parametrize("split", range(1, 40))
def test_a_key_split_across_a_streams_chunks_is_replaced(split: int):
    stream = f'data: {{"k": "{KEY}"}}\n\ndata: {KEY}{KEY}\n\n'.encode()
    mask = KeyMask(KEY, TOKEN)
    out = b"".join(mask.feed(stream[i:i + split]) for i in range(0, len(stream), split)) + mask.end()
    assert out == stream.replace(json.dumps(KEY)[1:-1].encode(), TOKEN.encode()).replace(KEY.encode(), TOKEN.encode())


def test_only_what_may_begin_the_key_is_held_back():
    mask = KeyMask("secret-key", TOKEN)
    assert mask.feed(b"data: event 1\n\n") == b"data: event 1\n\n"  # an event is not delayed
    assert mask.feed(b"data: sec") == b"data: "
    assert mask.feed(b"ond\n\n") == b"second\n\n"  # not the key after all: passed on whole
    assert mask.feed(b"x secret-k") == b"x "
    assert mask.end() == b"secret-k"  # the stream ended on part of it: never the whole key


def test_no_key_changes_nothing():
    mask = KeyMask("", TOKEN)
    assert mask.whole(b"anything") == b"anything" and mask.feed(b"a") == b"a" and mask.end() == b""
    assert mask.header("anything") == "anything" and mask.message("anything") == "anything"


def test_the_compiled_mask_never_prints_the_key_or_the_token():
    # Every field holds one of them: a traceback reporter printing locals would show both.
    from workerqueue_operator.api import keymask

    mask = KeyMask("org-secret-key", "worker-secret-token")
    for shown in (repr(mask._c), str(mask._c), repr(keymask._compiled("org-secret-key", "worker-secret-token"))):
        assert "secret" not in shown
