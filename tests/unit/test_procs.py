"""The dev cluster's and the tests' process helpers that need no process."""

from __future__ import annotations

import os
import urllib.request

import pytest

from workerqueue_operator.devcluster import procs


def test_loopback_is_never_sent_through_a_proxy_the_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "example.com")
    monkeypatch.delenv("no_proxy", raising=False)
    assert not urllib.request.proxy_bypass_environment("127.0.0.1")  # what urllib does by itself

    procs.bypass_proxies_for_loopback()
    procs.bypass_proxies_for_loopback()  # once more changes nothing

    for host in ("127.0.0.1", "localhost"):
        assert urllib.request.proxy_bypass_environment(host)
    assert not urllib.request.proxy_bypass_environment("proxy-me.example.org")
    assert os.environ["NO_PROXY"] == os.environ["no_proxy"] == "example.com,127.0.0.1,localhost,::1"
