from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from typing import Any

import pytest

from tests.unit.factories import UID, queue, queue_body, secret_body
from workerqueue_operator import cli
from workerqueue_operator.core import queues, temporal
from workerqueue_operator.core.store import Store
from workerqueue_operator.models import spec as spec_
from workerqueue_operator.models.settings import NamespacedSecretKeyRef, Settings

SETTINGS = Settings()
TOKEN = {("team-a", "q1-worker-token"): {"token": "t0k"}}


def resolve(q: queues.QueueObject, secrets: dict | None = None, settings: Settings = SETTINGS) -> queues.Resolution:
    return queues.resolve(q, secrets={**TOKEN, **(secrets or {})}, settings=settings)


def test_defaults_follow_the_reference():
    r = resolve(queue())
    assert r.ready and r.config is not None
    f = r.config.fields
    assert f["queue_id"] == "5d0a0f8e-2b1c-4c8e-9a51-3a2f4b6c7d8e"  # metadata.uid
    assert f["task_queue_name"] == f["queue_id"]
    assert f["environment_name"] == "team-a"
    assert f["organization_id"] == "default"
    assert f["heartbeat_interval"] == 60
    assert f["temporal_api_key"] == "" and f["litellm_api_key"] == ""
    assert f["redis_enabled"] is False and f["redis_url"] is None
    assert f["nats_config"] is None
    assert f["websocket_features"] == ["events", "control", "heartbeat", "config_update"]
    assert r.config.websocket_enabled is False
    assert f["control_plane_sdk_version"] == "0.6.0"  # the real worker's SDK: no mismatch warning
    assert r.token_digests == (queues.digest("t0k"),)


def test_queues_share_their_default_blocks_and_keep_given_ones_apart():
    # Memory at 10,000 queues: an omitted block is one shared (frozen) instance, not a copy each.
    first, second = spec_.parse_spec({}), spec_.parse_spec({"litellm": {"url": "http://llm:4000"}})
    assert first.websocket is second.websocket and first.worker is second.worker and first.auth is second.auth
    assert second.litellm is not first.litellm and second.litellm.url == "http://llm:4000"
    assert first.litellm.url is None and spec_.parse_spec({}).temporal is first.temporal


def test_spec_fields_win_over_operator_defaults():
    settings = Settings(organization_id="org-default", temporal_host="default:7233", temporal_namespace="dflt",
                        litellm_url="http://llm-default")
    r = resolve(queue(queueId="q-123", taskQueueName="tq", environmentName="prod", organizationId="org-1",
                      heartbeatIntervalSeconds=30, litellm={"url": "http://llm"}), settings=settings)
    f = r.config.fields
    assert (f["queue_id"], f["task_queue_name"], f["environment_name"], f["organization_id"]) == (
        "q-123", "tq", "prod", "org-1")
    assert f["temporal_host"] == "temporal.example:7233" and f["temporal_namespace"] == "agents"
    assert f["litellm_api_url"] == "http://llm" and f["heartbeat_interval"] == 30


def test_operator_default_secret_is_used_when_the_queue_names_none_and_uses_the_operators_host():
    settings = Settings(temporal_host="temporal.example:7233",
                        temporal_api_key_secret=NamespacedSecretKeyRef.parse("ops/temporal:key"),
                        litellm_url="https://llm.example/", litellm_api_key_secret=NamespacedSecretKeyRef.parse(
                            "ops/litellm:key"))
    secrets = {("ops", "temporal"): {"key": "tk\n"}, ("ops", "litellm"): {"key": "lk"}}
    for q in (queue(), queue(temporal={"namespace": "agents"}, litellm={"url": "https://llm.example"})):
        assert {("ops", "temporal"), ("ops", "litellm")} <= q.secret_names(settings)
        r = resolve(q, secrets, settings=settings)
        assert r.config.fields["temporal_api_key"] == "tk"  # the trailing newline of --from-file is dropped
        assert r.config.fields["litellm_api_key"] == "lk" and r.config.temporal_tls


def test_a_queues_own_temporal_host_or_litellm_url_never_gets_the_operators_key():
    """Whoever may write a WorkerQueue could otherwise send the organization's keys anywhere: the
    operator's own reachability check would send the Temporal one within seconds."""
    settings = Settings(temporal_host="temporal.example:7233",
                        temporal_api_key_secret=NamespacedSecretKeyRef.parse("ops/temporal:key"),
                        litellm_url="https://llm.example", litellm_api_key_secret=NamespacedSecretKeyRef.parse(
                            "ops/litellm:key"))
    q = queue(temporal={"host": "attacker.example:7233", "namespace": "x"}, litellm={"url": "https://attacker.example"})
    assert not {("ops", "temporal"), ("ops", "litellm")} & q.secret_names(settings)
    r = resolve(q, {("ops", "temporal"): {"key": "tk"}, ("ops", "litellm"): {"key": "lk"}}, settings=settings)
    assert r.ready
    assert (r.config.fields["temporal_api_key"], r.config.fields["litellm_api_key"]) == ("", "")
    assert not r.config.temporal_tls  # no key: plaintext unless the queue says otherwise
    assert queues.default_temporal_key_withheld(q.spec, settings)  # TemporalReachable=False says so
    assert not queues.default_temporal_key_withheld(queue().spec, settings)
    assert not queues.default_temporal_key_withheld(q.spec, Settings())


def test_a_queue_that_turns_tls_off_never_gets_the_operators_temporal_key():
    # The operator's reachability check sent it within seconds, in clear: the request's headers go
    # before the server can refuse plaintext.
    settings = Settings(temporal_host="temporal.example:7233",
                        temporal_api_key_secret=NamespacedSecretKeyRef.parse("ops/temporal:key"))
    plain = queue(temporal={"namespace": "agents", "tls": False})
    assert ("ops", "temporal") not in plain.secret_names(settings)
    r = resolve(plain, {("ops", "temporal"): {"key": "tk"}}, settings=settings)
    assert r.ready and r.config.fields["temporal_api_key"] == "" and not r.config.temporal_tls
    assert queues.default_temporal_key_withheld(plain.spec, settings)
    with_tls = queue(temporal={"namespace": "agents", "tls": True})
    assert resolve(with_tls, {("ops", "temporal"): {"key": "tk"}}, settings=settings).config.fields[
        "temporal_api_key"] == "tk"


@pytest.mark.parametrize(("secrets", "reason", "message"), [
    ({}, "SecretPending", "secret creds has not been read yet"),
    ({("team-a", "creds"): None}, "SecretNotFound", "secret creds not found in namespace team-a"),
    ({("team-a", "creds"): {"other": "x"}}, "SecretKeyNotFound", "secret creds has no key api-key"),
])
def test_missing_secret_is_a_problem_naming_secret_and_key_only(secrets, reason, message):
    q = queue(temporal={"host": "h:1", "namespace": "n", "apiKeySecretRef": {"name": "creds", "key": "api-key"}})
    r = resolve(q, secrets)
    assert not r.ready and r.config is None
    assert (r.problem.reason, r.problem.message) == (reason, message)
    assert r.token_digests  # the queue token still resolves, so its holder gets 503, not 401


@pytest.mark.parametrize(("secrets", "message"), [
    ({("team-a", "tok"): {"a": ""}}, "secret tok key a is empty"),
    ({("team-a", "tok"): {"a": " \n"}}, "secret tok key a is empty"),
    ({("team-a", "tok"): {"a": "two words"}}, "secret tok key a is not a usable token (visible ASCII, no spaces)"),
    ({("team-a", "tok"): {"a": "caf\u00e9"}}, "secret tok key a is not a usable token (visible ASCII, no spaces)"),
])
def test_a_token_no_caller_could_present_keeps_the_queue_from_being_ready(secrets, message):
    # /start takes only visible ASCII bearer tokens: a queue Ready on such a token admits nobody.
    r = queues.resolve(queue(auth={"tokenSecretRefs": [{"name": "tok", "key": "a"}]}), secrets=secrets,
                       settings=SETTINGS)
    assert not r.ready and (r.problem.reason, r.problem.message) == ("SecretKeyInvalid", message)
    assert r.secrets_problem == r.problem and r.token_digests == ()


@pytest.mark.parametrize(("value", "problem"), [
    ("rediss://:pw@cache:6380/0", None),
    ("cache:6379", "secret r key url is not a redis:// or rediss:// URL"),
    ("", "secret r key url is empty"),
    ("redis://:pw@[bad", "secret r key url is not a redis:// or rediss:// URL"),  # no client could parse it
    ("redis://:pw@cache:99999/0", "secret r key url is not a redis:// or rediss:// URL"),
    ("redis://:pw@cache:6379/0\nX", "secret r key url is not a redis:// or rediss:// URL"),
])
def test_a_redis_url_from_a_secret_is_held_to_what_spec_redis_url_must_be(value, problem):
    r = resolve(queue(redis={"urlSecretRef": {"name": "r", "key": "url"}}), {("team-a", "r"): {"url": value}})
    if problem is None:
        assert r.ready and r.config.fields["redis_enabled"] and r.config.fields["redis_password"] == "pw"
    else:
        assert not r.ready and (r.problem.reason, r.problem.message) == ("SecretKeyInvalid", problem)


@pytest.mark.parametrize(("url", "usable"), [
    ("redis://cache:6379/0", True), ("redis://cache:99999/0", False), ("redis://cache:6379/0\x7f", False),
    ("redis://cache:6379/a b", False),
])
def test_spec_redis_url_is_held_to_what_a_url_from_a_secret_is(url: str, usable: bool):
    """The CRD checks the scheme only: a port out of range was served to every worker."""
    r = resolve(queue(redis={"url": url}))
    assert r.ready is usable
    if not usable:
        assert r.problem is not None and r.problem.reason == "RedisInvalid" and url not in r.problem.message


def test_the_litellm_url_is_matched_as_the_api_server_matches_it():
    """Go's \\s is ASCII only; Python's took a vertical tab or a no-break space the CRD let in as a
    space, and the queue was refused as if stored before the rule."""
    import re

    from workerqueue_operator.models import spec as models

    for url in ("https://a\x0bb", "https://a\u00a0b/v1", "https://llm\u2028x"):
        assert re.fullmatch(models.LITELLM_URL_PATTERN, url), repr(url)
        assert resolve(queue(litellm={"url": url})).ready
    for url in ("https://a b", "https://a\tb", "https:///x", "https://a\nb"):
        assert not re.fullmatch(models.LITELLM_URL_PATTERN, url), repr(url)


@pytest.mark.parametrize("block", ["temporal", "litellm"])
def test_an_api_key_that_cannot_go_into_a_header_keeps_the_queue_from_being_ready(block):
    spec = {"temporal": {"host": "t.example:7233", "namespace": "n"}, "litellm": {"url": "http://llm:4000"}}
    spec[block]["apiKeySecretRef"] = {"name": "keys", "key": "k"}
    for bad in ["tk\nX-Injected: 1", "tk\x00", "t\rk"]:  # around it, whitespace is stripped
        r = resolve(queue(**spec), {("team-a", "keys"): {"k": bad}})
        assert not r.ready and (r.problem.reason, r.problem.message) == (
            "SecretKeyInvalid", "secret keys key k is not a usable API key")
        assert r.secrets_problem == r.problem
    assert resolve(queue(**spec), {("team-a", "keys"): {"k": "tk-1.2_3=="}}).ready


def test_a_litellm_url_the_crd_now_refuses_is_reported_on_a_queue_stored_before_not_dropped():
    # The API server keeps a queue stored before the rule: the operator still parses it, and says why
    # it does not serve it (never quoting the URL, which may hold a password).
    q = queues.QueueObject.from_body(queue_body(litellm={"url": "litellm.internal:4000"}))
    r = resolve(q)
    assert not r.ready and (r.problem.reason, r.problem.message) == (
        "LiteLLMInvalid", "spec.litellm.url is not an http:// or https:// URL")
    assert resolve(queue(litellm={"url": "HTTPS://LLM.example/v1"})).ready is False
    assert resolve(queue(litellm={"url": "https://llm.example:4000/v1"})).ready
    # Within the pattern, but no client can dial it.
    problem = resolve(queue(litellm={"url": "https://llm.example:99999/v1"})).problem
    assert (problem.reason, problem.message) == ("LiteLLMInvalid", "spec.litellm.url has a port out of range (0-65535)")


@pytest.mark.parametrize("url", ["ws://ws.example:99999/x", "wss://ws.example/a\x00b", "wss://ws.example/a b"])
def test_a_websocket_url_the_crd_now_refuses_is_reported_on_a_queue_stored_before(url: str):
    """Handed to every worker as it was, it failed each of them with the queue Ready."""
    r = resolve(queue(websocket={"url": url}))
    assert not r.ready and r.problem.reason == "WebsocketInvalid" and url not in r.problem.message
    assert resolve(queue(websocket={"url": "wss://ws.example:8443/x"})).ready


def test_a_missing_generated_token_is_told_apart_from_other_problems():
    q = queue()
    pending = queues.resolve(q, secrets={}, settings=SETTINGS)
    assert pending.problem.reason == "SecretPending" and pending.awaiting_generated_token
    broken = queues.resolve(queue(temporal={}), secrets={}, settings=SETTINGS)
    assert not broken.awaiting_generated_token
    own = queue(auth={"tokenSecretRefs": [{"name": "tok", "key": "a"}]})
    assert not queues.resolve(own, secrets={}, settings=SETTINGS).awaiting_generated_token
    # There but unusable (made beforehand with another key, or a token edited to hold a space): the
    # user's to fix, not one being made. Taken so, the queue went on starting pods, and its Temporal
    # was never checked again.
    for data in ({"other": "x"}, {"token": "has space"}):
        there = queues.resolve(q, secrets={("team-a", "q1-worker-token"): data}, settings=SETTINGS)
        assert there.problem.reason in ("SecretKeyNotFound", "SecretKeyInvalid")
        assert not there.awaiting_generated_token and not there.starts_workers
        assert there.probe_target is not None


def test_a_missing_token_secret_leaves_the_other_tokens_and_the_upstream_to_live_workers():
    """Mid-rotation (a second token Secret listed before it exists, or the old one deleted before it
    is unlisted), or while the generated token Secret is recreated: the queue starts no worker, but
    the tokens that still resolve keep opening it and its upstream stays reachable, so that running
    workers keep heartbeating and their executions' calls keep reaching the control plane."""
    org = {("team-a", "org"): {"api-key": "k-1"}}
    refs = [{"name": "old", "key": "token"}, {"name": "new", "key": "token"}]
    for present in ({("team-a", "old"): {"token": "old-token"}}, {("team-a", "old"): {"token": "old-token"},
                                                                   ("team-a", "new"): None}):
        r = queues.resolve(queue(upstream=UPSTREAM, auth={"tokenSecretRefs": refs}), secrets={**present, **org},
                           settings=SETTINGS)
        assert not r.ready and r.problem.reason in ("SecretPending", "SecretNotFound")
        assert r.temporal is not None  # running workers' executions are still listed from it
        assert r.probe_target is r.temporal  # ...and its conditions keep telling of its task queue
        assert r.token_digests == (queues.digest("old-token"),)
        assert r.upstream == queues.Upstream(url="https://cp.example/base", api_key="k-1")
    generated = queues.resolve(queue(upstream=UPSTREAM), secrets=org, settings=SETTINGS)
    assert generated.awaiting_generated_token and generated.token_digests == ()
    assert generated.probe_target is None  # a new queue's first status waits for its token
    assert generated.upstream is not None  # per-worker tokens of its pods still reach it


def test_a_missing_secret_that_is_not_temporals_leaves_the_task_queue_to_live_workers():
    """A LiteLLM key's Secret deleted: the queue is not Ready, but its running single-execution
    workers must still see their executions (503 on every poll, they never saw theirs end)."""
    r = queues.resolve(queue(litellm={"apiKeySecretRef": {"name": "llm", "key": "k"}},
                             temporal={"host": "t:7233", "namespace": "agents",
                                       "apiKeySecretRef": {"name": "tk", "key": "k"}}),
                       secrets={("team-a", "tk"): {"k": "temporal-key"}, ("team-a", "llm"): None,
                                ("team-a", "q1-worker-token"): {"token": "t"}}, settings=SETTINGS)
    assert r.config is None and r.problem is not None and r.problem.reason == "SecretNotFound"
    assert r.temporal is not None and r.probe_target is r.temporal
    assert (r.temporal.endpoint, r.temporal.task_queue) == (
        temporal.Endpoint(host="t:7233", namespace="agents", api_key="temporal-key", tls=True), r.queue.queue_id)
    without_key = queues.resolve(queue(temporal={"host": "t:7233", "namespace": "agents",
                                                 "apiKeySecretRef": {"name": "tk", "key": "k"}}),
                                 secrets={("team-a", "tk"): None}, settings=SETTINGS)
    assert without_key.temporal is None  # nothing to list executions with


def test_temporal_must_be_configured_somewhere():
    r = resolve(queue(temporal={}))
    assert r.problem.reason == "TemporalNotConfigured"


def test_redis_password_comes_from_url_userinfo_unless_a_secret_is_named():
    r = resolve(queue(redis={"url": "redis://:s3cret@redis:6379/0"}))
    assert r.config.fields["redis_enabled"] is True
    assert r.config.fields["redis_password"] == "s3cret"
    redis = {"urlSecretRef": {"name": "r", "key": "url"}, "passwordSecretRef": {"name": "r", "key": "pw"}}
    r = resolve(queue(redis=redis),
                {("team-a", "r"): {"url": "rediss://redis:6380", "pw": "other"}})
    assert r.config.fields["redis_url"] == "rediss://redis:6380"
    assert r.config.fields["redis_password"] == "other"
    assert "other" not in repr(r)  # a resolution that reaches a log line or an exception carries no secret


def test_nats_config_is_every_key_of_the_secret():
    r = resolve(queue(nats={"configSecretRef": {"name": "nats"}}),
                {("team-a", "nats"): {"url": "nats://n:4222", "creds": "x"}})
    assert r.config.fields["nats_config"] == {"url": "nats://n:4222", "creds": "x"}


def test_websocket_enabled_by_url_or_explicitly():
    assert resolve(queue(websocket={"url": "wss://ws.example/x"})).config.websocket_enabled is True
    upstream = {"url": "https://cp.example", "apiKeySecretRef": {"name": "org", "key": "k"}}
    explicit = resolve(queue(websocket={"enabled": True}, upstream=upstream), {("team-a", "org"): {"k": "key"}}).config
    assert explicit.websocket_enabled is True and explicit.websocket_url is None
    # The operator's route goes to an upstream: with none, it would be a 404 the worker retries all its life.
    assert resolve(queue(websocket={"enabled": True})).config.websocket_enabled is False
    by_default = Settings(upstream_url="https://cp.example",
                          upstream_api_key_secret=NamespacedSecretKeyRef(namespace="ops", name="org", key="k"))
    assert resolve(queue(websocket={"enabled": True}), {("ops", "org"): {"k": "key"}},
                   settings=by_default).config.websocket_enabled is True
    assert queues.websocket_url_for("https://cp.example", "w1") == "wss://cp.example/api/v1/ws/workers/w1"
    assert queues.websocket_url_for("http://cp:80", "w1") == "ws://cp:80/api/v1/ws/workers/w1"


def test_a_caller_not_given_a_websocket_goes_without_on_the_operators_route_too():
    # The operator's route passes through queue and pod tokens only: a Kubernetes identity given it
    # was refused at the handshake (401) and reconnected for the rest of its worker's life.
    upstream = {"url": "https://cp.example", "apiKeySecretRef": {"name": "org", "key": "k"}}
    for websocket in ({"enabled": True}, {"url": "wss://ws.example/x"}):
        config = resolve(queue(websocket=websocket, upstream=upstream), {("team-a", "org"): {"k": "key"}}).config
        given = json.loads(config.response_body(worker_id="w1", control_plane_url="http://op:8080"))
        assert given["websocket_enabled"] is True and given["websocket_url"] is not None
        withheld = json.loads(config.response_body(worker_id="w1", control_plane_url="http://op:8080",
                                                    own_websocket=False))
        assert (withheld["websocket_enabled"], withheld["websocket_url"]) == (False, None)
        assert {k: v for k, v in withheld.items() if not k.startswith("websocket")} == {
            k: v for k, v in given.items() if not k.startswith("websocket")}


def test_suspended_queue_keeps_its_config_but_is_not_ready():
    r = resolve(queue(suspend=True))
    assert r.config is not None and r.config.suspended
    assert r.problem.reason == "Suspended"


def test_own_token_secrets_replace_the_generated_one():
    q = queue(auth={"tokenSecretRefs": [{"name": "tok", "key": "a"}, {"name": "tok", "key": "b"}]})
    assert ("team-a", "q1-worker-token") not in q.secret_names(SETTINGS)
    r = resolve(q, {("team-a", "tok"): {"a": "one", "b": "two"}})
    assert set(r.token_digests) == {queues.digest("one"), queues.digest("two")}


def test_decode_secret_data_keeps_a_binary_value_as_not_text():
    body = secret_body("s", text="hello")
    body["data"]["bin"] = "//79"  # 0xff 0xfe 0xfd: not UTF-8
    assert queues.decode_secret_data(body) == {"text": "hello", "bin": queues.NOT_TEXT}


def binary_secret(name: str, key: str) -> dict:
    body = secret_body(name, other="x")
    body["data"][key] = "//79"  # 0xff 0xfe 0xfd: not UTF-8
    return queues.decode_secret_data(body)


@pytest.mark.parametrize("spec", [
    {"temporal": {"host": "h:1", "namespace": "n", "apiKeySecretRef": {"name": "bin", "key": "k"}}},
    {"auth": {"tokenSecretRefs": [{"name": "bin", "key": "k"}]}},
    {"nats": {"configSecretRef": {"name": "bin"}}},
])
def test_a_value_that_is_not_text_is_invalid_not_missing(spec):
    # The key is there: "has no key" would send its owner looking for a typo.
    r = resolve(queue(**spec), {("team-a", "bin"): binary_secret("bin", "k")})
    assert not r.ready
    assert (r.problem.reason, r.problem.message) == ("SecretKeyInvalid", "secret bin key k is not UTF-8 text")
    assert r.secrets_problem == r.problem


UPSTREAM = {"url": "https://cp.example/base/", "apiKeySecretRef": {"name": "org", "key": "api-key"}}


def test_own_upstream_with_its_key_and_no_default():
    settings = Settings(upstream_url="https://default.example",
                        upstream_api_key_secret=NamespacedSecretKeyRef.parse("ops/org:key"))
    q = queue(upstream=UPSTREAM)
    assert ("team-a", "org") in q.secret_names(settings) and ("ops", "org") not in q.secret_names(settings)
    r = resolve(q, {("team-a", "org"): {"api-key": "k-1\n"}}, settings=settings)
    assert r.ready and r.upstream == queues.Upstream(url="https://cp.example/base", api_key="k-1")
    assert "k-1" not in repr(r.upstream)
    assert r.upstream.origin == "https://cp.example"


def test_default_upstream_for_queues_that_name_none():
    settings = Settings(upstream_url="http://default.example:8000",
                        upstream_api_key_secret=NamespacedSecretKeyRef.parse("ops/org:key"))
    q = queue()
    assert ("ops", "org") in q.secret_names(settings)
    r = resolve(q, {("ops", "org"): {"key": "dk"}}, settings=settings)
    assert r.upstream == queues.Upstream(url="http://default.example:8000", api_key="dk")
    assert resolve(queue()).upstream is None  # no default, no own upstream


def test_the_default_upstream_serves_only_the_namespaces_it_is_given_to():
    # Whoever may write a queue anywhere could leave spec.upstream out and call the upstream with the
    # organization's key through their own queue's token.
    settings = Settings(upstream_url="http://default.example:8000",
                        upstream_api_key_secret=NamespacedSecretKeyRef.parse("ops/org:key"),
                        upstream_namespaces=("team-b",))
    secrets = {("ops", "org"): {"key": "dk"}, ("team-a", "org"): {"api-key": "own"}}
    elsewhere = queue()  # of team-a
    assert ("ops", "org") not in elsewhere.secret_names(settings)
    r = resolve(elsewhere, secrets, settings=settings)
    assert r.ready and r.upstream is None
    trusted = queue(namespace="team-b")
    assert ("ops", "org") in trusted.secret_names(settings)
    assert resolve(trusted, secrets, settings=settings).upstream == queues.Upstream(
        url="http://default.example:8000", api_key="dk")
    assert resolve(queue(upstream=UPSTREAM), secrets, settings=settings).upstream == queues.Upstream(
        url="https://cp.example/base", api_key="own")  # its own, wherever it is
    assert Settings.load({"WQ_UPSTREAM_NAMESPACES": "team-b, team-c"}).upstream_namespaces == ("team-b", "team-c")


@pytest.mark.parametrize(("data", "reason"), [(None, "SecretNotFound"), ({"api-key": "a\nb"}, "SecretKeyInvalid"),
                                              ({"api-key": " "}, "SecretKeyInvalid")])
def test_an_unusable_upstream_key_makes_the_queue_not_ready(data, reason):
    r = resolve(queue(upstream=UPSTREAM), {("team-a", "org"): data})
    assert not r.ready and r.problem.reason == reason and r.upstream is None
    assert "a\nb" not in r.problem.message


@pytest.mark.parametrize("url", ["https://cp.example:99999", "http://[::1]:70000", "http://[:]", "http://[:::]/v1",
                                 "http://cp.example/a b", "http://cp.example/a\x01b"])
def test_an_upstream_url_no_call_could_use_makes_the_queue_not_ready(url: str):
    # Each pass-through call would raise (a 500 with a traceback) while the queue showed Ready; an
    # IPv6 host urlsplit refuses ([:]) made every scrape of /metrics a 500 too (its label).
    r = resolve(queue(upstream={**UPSTREAM, "url": url}), {("team-a", "org"): {"api-key": "k"}})
    assert not r.ready and r.problem.reason == "UpstreamInvalid" and r.upstream is None


def test_a_missing_operator_wide_key_is_named_as_the_operators_not_the_queues():
    """Every queue said `secret missing not found in namespace ops`, which its owner cannot fix, and the
    operator's log said nothing."""
    settings = Settings(temporal_host="temporal.example:7233", temporal_namespace="agents",
                        temporal_api_key_secret="ops/missing:apikey", litellm_api_key_secret="ops/llm:key",
                        litellm_url="https://llm.example")
    r = resolve(queue(), {("ops", "missing"): None, ("ops", "llm"): {"key": "k"}}, settings=settings)
    assert r.problem.reason == "SecretNotFound" and r.problem.message == (
        "secret missing not found in namespace ops (the operator's default: WQ_TEMPORAL_API_KEY_SECRET, Helm's "
        "temporal.apiKeySecret)")
    unusable = resolve(queue(), {("ops", "missing"): {"apikey": "a\x07b"}, ("ops", "llm"): {"key": "k"}},
                       settings=settings)
    assert unusable.problem.message == ("secret missing key apikey is not a usable API key (the operator's default: "
                                        "WQ_TEMPORAL_API_KEY_SECRET, Helm's temporal.apiKeySecret)")
    own = queue(temporal={"host": "temporal.example:7233", "namespace": "agents",
                          "apiKeySecretRef": {"name": "mine", "key": "k"}})
    assert resolve(own, {("team-a", "mine"): None, ("ops", "llm"): {"key": "k"}},
                   settings=settings).problem.message == "secret mine not found in namespace team-a"


def test_no_worker_starts_while_the_upstream_key_is_missing():
    """/start answers such a queue 503, on which a worker exits: it must not be started."""
    r = resolve(queue(upstream=UPSTREAM, singleExecution=True), {("team-a", "org"): None})
    assert r.config is not None and not r.starts_workers
    assert resolve(queue(upstream=UPSTREAM, singleExecution=True), {("team-a", "org"): {"api-key": "k"}}).starts_workers


def test_the_upstream_is_resolved_even_when_something_else_is_missing():
    """Running workers keep reaching their upstream while, e.g., a Temporal key is missing."""
    q = queue(upstream=UPSTREAM, temporal={"host": "t:1", "namespace": "n",
                                           "apiKeySecretRef": {"name": "temporal", "key": "k"}})
    r = resolve(q, {("team-a", "org"): {"api-key": "k-1"}, ("team-a", "temporal"): None})
    assert r.problem.reason == "SecretNotFound" and r.upstream is not None and r.upstream_problem is None
    r = resolve(q, {("team-a", "org"): None, ("team-a", "temporal"): None})
    assert r.problem.message == "secret temporal not found in namespace team-a"
    assert r.upstream_problem.message == "secret org not found in namespace team-a"  # told apart for the 503


def test_workers_start_only_where_they_would_get_through_start():
    assert resolve(queue()).starts_workers
    assert queues.resolve(queue(), secrets={}, settings=SETTINGS).starts_workers  # the token being made
    for broken in (resolve(queue(upstream=UPSTREAM), {("team-a", "org"): None}),  # /start answers 503
                   queues.resolve(queue(upstream=UPSTREAM), secrets={("team-a", "org"): None}, settings=SETTINGS),
                   resolve(queue(temporal={})), resolve(queue(suspend=True))):
        assert not broken.starts_workers, broken.problem


def test_default_upstream_needs_its_key():
    with pytest.raises(ValueError, match="upstream_api_key_secret"):
        Settings(upstream_url="https://cp.example")
    with pytest.raises(ValueError, match="pattern"):
        Settings(upstream_url="ftp://cp.example", upstream_api_key_secret="ops/org:key")
    assert Settings.load({"WQ_UPSTREAM_URL": ""}).upstream_url is None


def test_a_mistyped_setting_in_the_environment_is_named():
    env = {"WQ_HTTP_PROT": "9090", "WQ_HTTP_PORT": "8080", "WQ_CONFIG_FILE": "", "WQ_SERVICE_HOST": "10.0.0.1",
           "HOME": "/root"}
    assert Settings.unknown_env(env) == ["WQ_HTTP_PROT", "WQ_SERVICE_HOST"]
    assert Settings.load(env).http_port == 8080


@pytest.mark.parametrize(("raw", "namespaces"), [
    ("123", ("123",)),  # a valid namespace name, not a number
    ("123,team-a", ("123", "team-a")),
    ('["123", "team-a"]', ("123", "team-a")),
    ("", ()),
])
def test_list_settings_from_the_environment_are_text_or_a_json_list(raw, namespaces):
    assert Settings.load({"WQ_NAMESPACES": raw}).namespaces == namespaces
    assert Settings.load({"WQ_TOKEN_REVIEW_AUDIENCES": raw}).token_review_audiences == namespaces


def test_a_namespace_named_twice_is_watched_once():
    assert Settings.load({"WQ_NAMESPACES": "team-a,team-b,team-a"}).namespaces == ("team-a", "team-b")


def test_worker_ids_are_version_4_uuids_and_show_the_queue_key_that_issued_them():
    import uuid

    key, other = queues.digest("queue-token"), queues.digest("another-token")
    issued = queues.new_worker_id(key)
    plain = queues.new_worker_id()
    for worker_id in (issued, plain):
        parsed = uuid.UUID(worker_id)
        assert str(parsed) == worker_id and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert queues.issued_worker_id(issued, [key])
    assert queues.issued_worker_id(issued, [other, key])  # a token being rotated: either key
    assert not queues.issued_worker_id(issued, [other])
    assert not queues.issued_worker_id(issued, [])
    assert not queues.issued_worker_id(plain, [key])
    flipped = issued[:-1] + ("0" if issued[-1] != "0" else "1")
    assert not queues.issued_worker_id(flipped, [key])
    # Only the canonical text of an id it gave: not another spelling of the same bytes.
    for spelling in (issued.upper(), issued.replace("-", ""), "{" + issued + "}", f" {issued}", "", "not-an-id"):
        assert not queues.issued_worker_id(spelling, [key]), spelling
    assert len({queues.new_worker_id(key) for _ in range(1000)}) == 1000
    # One issued to a pod shows that pod, and no other (nor none).
    mine = queues.new_worker_id(key, pod="q1-w1")
    assert queues.issued_worker_id(mine, [key], pod="q1-w1")
    assert not queues.issued_worker_id(mine, [key], pod="q1-w2")
    assert not queues.issued_worker_id(mine, [key])
    assert not queues.issued_worker_id(issued, [key], pod="q1-w1")


@pytest.mark.parametrize("text", ["ops/../victim:key", "ops/Upper:key", "../x/y:key", "ops/a/b:key"])
def test_an_operator_secret_reference_names_a_secret_as_kubernetes_spells_it(text: str):
    with pytest.raises(ValueError, match="as Kubernetes spells them"):
        NamespacedSecretKeyRef.parse(text)
    assert NamespacedSecretKeyRef.parse("ops/temporal.creds:api-key").name == "temporal.creds"


def test_a_secret_reference_names_a_secret_as_kubernetes_spells_it():
    from pydantic import ValidationError

    for name in ("../../victim/secrets/x", "a/b", "..", "Upper", "-a"):
        with pytest.raises(ValidationError):
            spec_.SecretKeyRef(name=name, key="k")
        with pytest.raises(ValidationError):
            spec_.SecretRef(name=name)
    assert spec_.SecretKeyRef(name="temporal.creds-1", key="k").name == "temporal.creds-1"


def test_a_forked_child_mints_worker_ids_of_its_own():
    """Random bytes are read a block at a time: a child must not hand out the rest of its parent's."""
    import os
    import warnings

    queues.new_worker_id()  # a block read, most of it not handed out yet
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns of a fork with threads running: none run here
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent, then out at once whatever happens
        try:
            os.write(write, queues.new_worker_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    assert len(child) == 36 and child != queues.new_worker_id()


def test_a_name_past_the_limit_is_no_queue():
    """The CRD refuses it; one made under an older CRD must not reach the Store (its token Secret's
    name would fail validation halfway through taking it in)."""
    assert queues.QueueObject.from_body(queue_body("q" * 230)).name == "q" * 230
    with pytest.raises(ValueError, match="longer than 230"):
        queues.QueueObject.from_body(queue_body("q" * 231))


def test_bad_settings_stop_the_operator_naming_the_setting_never_its_value(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WQ_UPSTREAM_URL", "https://org:SUPERSECRET@cp.example")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "invalid setting upstream_url (WQ_UPSTREAM_URL): expected an http:// or https:// URL with a host" in err
    assert "SUPERSECRET" not in err and "Traceback" not in err
    monkeypatch.delenv("WQ_UPSTREAM_URL")
    monkeypatch.setenv("WQ_LITELLM_URL", "litellm.internal:4000")  # no scheme: no worker could call it
    assert cli.main(["run"]) == 2
    assert "invalid setting litellm_url (WQ_LITELLM_URL): expected an http:// or https:// URL with a host" in (
        capsys.readouterr().err)
    monkeypatch.delenv("WQ_LITELLM_URL")
    monkeypatch.setenv("WQ_TEMPORAL_API_KEY_SECRET", "tmprl-SUPERSECRET")  # the key, not its reference
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "invalid setting temporal_api_key_secret (WQ_TEMPORAL_API_KEY_SECRET)" in err and "expected namespace" in err
    assert "SUPERSECRET" not in err
    monkeypatch.delenv("WQ_TEMPORAL_API_KEY_SECRET")
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text("upstreamApiKey: [\n  password: hunter2\n")  # YAML's own error quotes the line
    monkeypatch.setenv("WQ_CONFIG_FILE", str(settings_file))
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert f"WQ_CONFIG_FILE {settings_file}: not valid YAML (line 3)" in err and "hunter2" not in err
    settings_file.write_text("temporalHost: temporal:7233\n")  # camelCase, as the chart's values are
    assert cli.main(["run"]) == 2
    assert "no such setting: temporalHost (a key is a setting's WQ_* name in lower case" in capsys.readouterr().err
    settings_file.write_bytes(b"upstreamApiKey: \xff\xfe")
    assert cli.main(["run"]) == 2
    assert f"WQ_CONFIG_FILE {settings_file}: not UTF-8 text" in capsys.readouterr().err
    monkeypatch.delenv("WQ_CONFIG_FILE")
    monkeypatch.setenv("WQ_UPSTREAM_URL", "https://cp.example")  # without the key it goes with
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invalid settings: ") and "Traceback" not in err


@pytest.mark.parametrize(("env", "named"), [
    # Infinite durations: the timeouts failed every request with a 500 (OverflowError) or bounded nothing.
    ({"WQ_AUTH_REVIEW_TIMEOUT_SECONDS": "inf"}, "auth_review_timeout_seconds"),
    ({"WQ_UPSTREAM_CONNECT_TIMEOUT_SECONDS": "Infinity"}, "upstream_connect_timeout_seconds"),
    ({"WQ_HTTP_IDLE_TIMEOUT_SECONDS": "1e400"}, "http_idle_timeout_seconds"),
    ({"WQ_HTTP_PORT": "true"}, "http_port"),  # was port 1
    ({"WQ_AUTH_MAX_CONCURRENT_REVIEWS": "true"}, "auth_max_concurrent_reviews"),
    # Namespaces went into the watches' URLs as given: the operator was ready and served nothing.
    ({"WQ_NAMESPACES": "def*"}, "namespaces"),
    ({"WQ_NAMESPACES": "Team_A"}, "namespaces"),
    ({"WQ_NAMESPACES": "[team-a, team-b"}, "namespaces"),  # was split at its commas: "[team-a"
    ({"WQ_WORKER_COMMAND": '["kubiya", "worker", "start"'}, "worker_command"),
    # Empty: every worker pod refused, or run with the image's entrypoint, or told to call itself.
    ({"WQ_WORKER_IMAGE": ""}, "worker_image"),
    ({"WQ_WORKER_IMAGE": "reg/worker: 2"}, "worker_image"),
    ({"WQ_WORKER_COMMAND": '["kubiya", ""]'}, "worker_command"),
    ({"WQ_PUBLIC_URL": "cp.example"}, "public_url"),
    ({"WQ_PUBLIC_URL": "https://cp.example:80x/"}, "public_url"),
    # Ports past 65535: every queue Ready=False, or workers handed a URL no client can dial.
    ({"WQ_LITELLM_URL": "https://llm:99999"}, "litellm_url"),
    ({"WQ_PUBLIC_URL": "https://cp.example:070000/x"}, "public_url"),
    ({"WQ_WORKER_CONTROL_PLANE_URL": "http://wq.ops:65536"}, "worker_control_plane_url"),
    ({"WQ_UPSTREAM_URL": "http://127.0.0.1:99999", "WQ_UPSTREAM_API_KEY_SECRET": "ops/org:key"}, "upstream_url"),
    # A loop of every queue's pods or statuses spun at once.
    ({"WQ_WORKER_RESYNC_SECONDS": "0.000001"}, "worker_resync_seconds"),
    ({"WQ_STATUS_RESYNC_SECONDS": "0.5"}, "status_resync_seconds"),
    ({"WQ_REGISTRY_MAX_PENDING": str(2 ** 63)}, "registry_max_pending"),
    ({"WQ_ORGANIZATION_ID": ""}, "organization_id"),
    ({"WQ_TEMPORAL_HOST": "  "}, "temporal_host"),
    ({"WQ_TEMPORAL_API_KEY_SECRET": "ops/creds:key with space"}, "temporal_api_key_secret"),
    # A type the field selector cannot name (every Secret watch refused, for good), or the workers' own
    # token Secrets' (Opaque: never seen, every worker pod turned away at /start).
    ({"WQ_IGNORED_SECRET_TYPES": "helm.sh/release.v1,bad=type"}, "ignored_secret_types"),
    ({"WQ_IGNORED_SECRET_TYPES": "Opaque"}, "ignored_secret_types"),
])
def test_a_setting_the_operator_cannot_run_with_is_refused_at_start_by_name(monkeypatch, capsys, env, named):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"invalid setting {named}(\.\w+)? \(WQ_{named.upper()}\)", err), err
    assert "Traceback" not in err


def test_settings_likely_not_meant_are_taken_with_a_warning():
    """Each has a meaning (the code caps one by the other), and a configuration that ran must still run."""
    doubtful = Settings.load({"WQ_WORKER_BACKOFF_SECONDS": "600", "WQ_BACKLOG_POLL_SECONDS": "5",
                              "WQ_PUBLIC_URL": "", "WQ_WORKER_CONTROL_PLANE_URL": "",
                              "WQ_REGISTRY_MAX_PENDING": "60000", "WQ_REGISTRY_MAX_PENDING_PER_QUEUE": "70000",
                              "WQ_REGISTRY_MAX_WORKERS_PER_QUEUE": "50001",
                              "WQ_REGISTRY_MAX_PENDING_PER_NAMESPACE": "60001",
                              "WQ_REGISTRY_MAX_WORKERS_PER_NAMESPACE": "50001",
                              "WQ_UPSTREAM_MAX_CONNECTIONS_PER_NAMESPACE": "101",
                              "WQ_UPSTREAM_MAX_WEBSOCKETS_PER_NAMESPACE": "1001"})
    assert doubtful.public_url is None and doubtful.worker_control_plane_url is None  # empty: unset, as before
    said = doubtful.doubts(in_cluster=True)
    assert [line.split(":")[0] for line in said] == [
        "worker_backoff_seconds is above worker_backoff_max_seconds",
        "backlog_poll_seconds is above backlog_idle_poll_seconds",
        "registry_max_pending_per_queue is above registry_max_pending",
        "registry_max_workers_per_queue is above registry_max_workers",
        "registry_max_pending_per_queue is above registry_max_pending_per_namespace",
        "registry_max_pending_per_namespace is above registry_max_pending",
        "registry_max_workers_per_namespace is above registry_max_workers",
        "upstream_max_connections_per_namespace is above upstream_max_connections",
        "upstream_max_websockets_per_namespace is above upstream_max_websockets",
        "registry_max_pending is above registry_max_workers",
        "neither worker_control_plane_url nor public_url is set"]
    assert "CONTROL_PLANE_URL=http://127.0.0.1:8080" in said[-1]
    assert doubtful.doubts(in_cluster=False)[10:] == []  # `dev`: its workers do run beside it
    assert Settings().doubts(in_cluster=False) == []  # the defaults are what is meant
    assert Settings(worker_control_plane_url="http://wq.ops:8080").doubts(in_cluster=True) == []
    # An upstream's namespaces that name no upstream, or none of the namespaces served: no queue uses it.
    assert Settings(upstream_namespaces=("team-a",)).doubts(in_cluster=False) == [
        "upstream_namespaces is set without upstream_url: it names who may use an upstream there is none of"]
    upstream = {"upstream_url": "https://cp.example", "upstream_api_key_secret": "ops/org:key"}
    assert Settings(**upstream, upstream_namespaces=("team-a",), namespaces=("team-b",)).doubts(in_cluster=False) == [
        "upstream_namespaces names none of the watched namespaces: no queue uses upstream_url"]
    assert Settings(**upstream, upstream_namespaces=("team-a",), namespaces=("team-a", "team-b")).doubts(
        in_cluster=False) == []


def test_settings_at_their_bounds_are_taken():
    settings = Settings.load({"WQ_NAMESPACES": "team-a,123", "WQ_WORKER_RESYNC_SECONDS": "1",
                              "WQ_LITELLM_URL": "https://llm:65535/v1", "WQ_PUBLIC_URL": "http://[::1]:8080",
                              "WQ_REGISTRY_MAX_PENDING": "1000000000", "WQ_WORKER_COMMAND": "kubiya,worker",
                              "WQ_WORKER_BACKOFF_SECONDS": "300", "WQ_AUTH_CACHE_SECONDS": "0"})
    assert settings.namespaces == ("team-a", "123") and settings.worker_command == ("kubiya", "worker")
    assert settings.public_url == "http://[::1]:8080" and settings.worker_backoff_seconds == 300


def _start(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`workerqueue-operator run` against an API server it never reaches: it stops before it would."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WQ_")}
    return subprocess.run([sys.executable, "-m", "workerqueue_operator.cli", "run", "--kubeconfig", str(kubeconfig)],
                          env={**clean, "WQ_HTTP_HOST": "127.0.0.1", **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def test_a_port_taken_stops_the_operator_with_one_line_naming_the_settings(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _start(tmp_path, {"WQ_HTTP_PORT": str(port)})
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert json.loads(line)["message"] == (
        f"cannot start: cannot listen on 127.0.0.1:{port} (WQ_HTTP_HOST, and --port or WQ_HTTP_PORT): "
        "Address already in use")


def test_a_certificate_that_does_not_load_stops_the_operator_with_one_line_naming_the_files(tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nU1VQRVJTRUNSRVQ=\n-----END PRIVATE KEY-----\n")
    for missing in (False, True):
        done = _start(tmp_path, {"WQ_HTTP_PORT": "0", "WQ_TLS_CERT_FILE": str(cert),
                                 "WQ_TLS_KEY_FILE": str(tmp_path / "gone.key" if missing else key)})
        assert done.returncode == 1
        (line,) = done.stderr.splitlines()
        message = json.loads(line)["message"]
        assert message.startswith(f"cannot start: the TLS certificate {cert} and key ")
        assert "(WQ_TLS_CERT_FILE, WQ_TLS_KEY_FILE) cannot be loaded: " in message
        assert ("No such file or directory" in message) == missing, message
        assert "U1VQRVJTRUNSRVQ" not in done.stderr


# --- Guards a mutation pass found untested ----------------------------------------------------------

READY = {"type": "Ready", "status": "True", "reason": "Ready"}


def store() -> Store:
    return Store(settings=Settings())


def _with_status(body: dict[str, Any], **status: Any) -> queues.QueueObject:
    body["status"] = status
    return queues.QueueObject.from_body(body)


# --- which queue holds a queue id ------------------------------------------------------------------


def test_a_queue_that_lost_the_id_takes_it_not_back_when_the_queues_are_read_again():
    """An earlier queue that lost the id (it came
    into view after the other took it, or its spec claimed the id later) says so in its status. When
    the operator reads both again (a restart, a relist, another replica leading), the serving queue
    keeps the id: taken by creation time, the serving queue's workers were refused, its pool drained."""
    for loser_first in (True, False):
        s = store()
        serving = _with_status(queue_body("b", queueId="same", created="2026-02-01T00:00:00Z"),
                               queueId="same", conditions=[READY])
        lost = _with_status(queue_body("a", queueId="same", created="2026-01-01T00:00:00Z", uid="uid-a"),
                            queueId="same", conditions=[{"type": "Ready", "status": "False",
                                                         "reason": "QueueIdConflict"}])
        for q in ((lost, serving) if loser_first else (serving, lost)):
            s.upsert_queue(q)
        assert s.serving("same").queue.name == "b"
        assert s.resolution(("team-a", "a")).problem.reason == "QueueIdConflict"


def test_an_earlier_queue_moved_onto_a_served_id_takes_it_not_from_the_queue_serving_it():
    """An earlier queue, Ready on another id,
    has its spec.queueId changed to an id a later queue serves: its status still speaks of its old
    id, so it holds none of the new one. Else it won on creation time at once, cutting the serving
    queue's workers off (401) and draining its pool."""
    s = store()
    serving = _with_status(queue_body("b", queueId="same", created="2026-02-01T00:00:00Z"),
                           queueId="same", conditions=[READY])
    s.upsert_queue(serving)
    moved = _with_status(queue_body("a", queueId="same", created="2026-01-01T00:00:00Z", uid="uid-a"),
                         queueId="its-old-id", conditions=[READY])
    assert not moved.holds_queue_id and serving.holds_queue_id
    s.upsert_queue(moved)
    assert s.serving("same").queue.name == "b"
    assert s.resolution(("team-a", "a")).problem.reason == "QueueIdConflict"


def test_a_status_without_ready_holds_no_id():
    """A status that names the id but no Ready
    condition (not one the operator writes) claims nothing."""
    assert not _with_status(queue_body(queueId="same"), queueId="same").holds_queue_id
    assert not _with_status(queue_body(queueId="same"), queueId="same",
                            conditions=[{"type": "SecretsResolved", "status": "True", "reason": "Resolved"}]
                            ).holds_queue_id


# --- Temporal TLS -----------------------------------------------------------------------------------


def test_tls_turned_off_stays_off_with_the_queues_own_temporal_key():
    """A queue on a plaintext Temporal that still takes an API key
    (in-cluster, behind an auth proxy) says tls: false: its workers and the operator's probe must not
    speak TLS to it, or no handshake ever succeeds and no execution is picked up."""
    q = queue(temporal={"host": "temporal.internal:7233", "namespace": "agents", "tls": False,
                        "apiKeySecretRef": {"name": "tk", "key": "k"}})
    r = resolve(q, {("team-a", "tk"): {"k": "temporal-key"}})
    assert r.ready
    assert queues.temporal_tls(q, SETTINGS) is False
    assert r.config.temporal_tls is False and r.config.fields["temporal_api_key"] == "temporal-key"
    assert r.temporal.endpoint.tls is False and r.temporal.endpoint.api_key == "temporal-key"


# --- ownership -----------------------------------------------------------------------------------


def test_only_a_workerqueue_owner_makes_an_object_a_queues():
    """An object owned by something else named like a queue
    (a ReplicaSet, an ExternalSecret) is no queue's; one that also names the queue among its owners is
    that queue's, whichever comes first."""
    other = {"kind": "ExternalSecret", "name": "q1", "uid": "not-a-queue"}
    mine = {"kind": "WorkerQueue", "name": "q1", "uid": UID}
    assert queues.queue_owner({"metadata": {"namespace": "team-a", "ownerReferences": [other]}}) is None
    both = {"metadata": {"namespace": "team-a", "ownerReferences": [other, mine],
                         "labels": {"app.kubernetes.io/component": queues.TOKEN_COMPONENT}}}
    assert queues.queue_owner(both) == (("team-a", "q1"), UID)
    # ...so the queue's own generated token Secret with an extra owner is not taken for a namesake's.
    assert not queues.namesakes_token(both, queue())


# --- what /start answers -----------------------------------------------------------------------------


def test_a_websocket_switched_off_stays_off_though_its_url_is_kept():
    """`enabled: false` is the off switch for a configured
    websocket URL (its server down, say): /start must answer websocket_enabled false and no URL, or
    every worker keeps connecting to it."""
    config = resolve(queue(websocket={"enabled": False, "url": "wss://ws.example/x"})).config
    assert config.websocket_enabled is False
    given = json.loads(config.response_body(worker_id="w1", control_plane_url="http://op:8080"))
    assert (given["websocket_enabled"], given["websocket_url"]) == (False, None)


def test_the_task_queue_is_the_queue_id_the_spec_names():
    """With spec.queueId and no taskQueueName, workers
    poll the task queue named by the queue id, which is where the control plane starts executions."""
    r = resolve(queue(queueId="q-123"))
    assert r.config.fields["task_queue_name"] == "q-123" == r.temporal.task_queue


def test_temporal_needs_both_a_host_and_a_namespace():
    """A host without a namespace (none in the spec, no operator default), or a
    namespace without a host, is no Temporal: Ready says TemporalNotConfigured rather than workers
    being handed an empty namespace (or host) that every poll fails on."""
    for half in ({"host": "temporal.example:7233"}, {"namespace": "agents"}):
        r = resolve(queue(temporal=half))
        assert r.problem is not None and r.problem.reason == "TemporalNotConfigured", half
        assert r.temporal is None and r.temporal_problem.reason == "TemporalNotConfigured"


# --- a queue's tokens -----------------------------------------------------------------------------------


def test_the_first_token_secret_that_fails_is_the_one_told():
    """Of several token Secrets that fail, Ready and
    SecretsResolved tell the first listed: a Secret not found (False), not a later one still being
    read (Unknown), which would make the queue look as if it were about to be Ready."""
    refs = [{"name": "gone", "key": "token"}, {"name": "later", "key": "token"}]
    r = queues.resolve(queue(auth={"tokenSecretRefs": refs}), secrets={("team-a", "gone"): None},
                       settings=SETTINGS)
    assert r.problem.reason == "SecretNotFound" and "gone" in r.problem.message
    assert r.secrets_problem.reason == "SecretNotFound"


def test_ready_names_the_first_short_token_secret():
    """Of two short tokens, the first listed is named."""
    refs = [{"name": "first", "key": "token"}, {"name": "second", "key": "token"}]
    r = queues.resolve(queue(auth={"tokenSecretRefs": refs}),
                       secrets={("team-a", "first"): {"token": "short-1"}, ("team-a", "second"): {"token": "short-2"}},
                       settings=SETTINGS)
    assert r.ready and r.short_token == "first"


# --- operator-wide defaults ---------------------------------------------------------------------


def test_an_upstream_key_without_an_upstream_url_is_no_queues_dependency():
    """The operator's upstream key set without its URL (the upstream switched
    off) gives no queue an upstream, so no queue depends on that Secret: it is not read into memory
    (the organization's key), nor does its rotation change every worker pod's secrets digest."""
    settings = Settings(upstream_api_key_secret=NamespacedSecretKeyRef.parse("ops/org:key"))
    assert queues.default_upstream_key("team-a", settings) is None
    assert ("ops", "org") not in queue().secret_names(settings)
    assert resolve(queue(), {("ops", "org"): {"key": "k"}}, settings=settings).upstream is None


def test_an_earlier_queue_that_came_into_view_takes_no_id_once_its_lost_status_is_written():
    """An earlier queue that
    comes into view loses to the serving queue (test_store's test_an_earlier_queue_that_comes_into_view_...);
    the echo of the status the operator then writes on it (QueueIdConflict, with its queueId) must not
    hand it the id, or the protection lasts one status write and the serving queue's workers are cut off."""
    s = store()
    serving = _with_status(queue_body("b", "team-b", queueId="same", created="2026-02-01T00:00:00Z"),
                           queueId="same", conditions=[READY])
    s.upsert_queue(serving)
    s.upsert_secret(("team-b", "b-worker-token"), {"token": "tb"})
    earlier = queue_body("a", "team-a", queueId="same", created="2026-01-01T00:00:00Z", uid="uid-a")
    s.upsert_queue(queues.QueueObject.from_body(earlier))
    assert s.serving("same").queue.name == "b"
    lost = _with_status(earlier, queueId="same", conditions=[{"type": "Ready", "status": "False",
                                                              "reason": "QueueIdConflict"}])
    s.refresh_queue(lost)
    assert s.serving("same").queue.name == "b" and s.is_queue_token(queues.digest("tb"))
    assert s.resolution(("team-a", "a")).problem.reason == "QueueIdConflict"
