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


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init: gone
    except FileNotFoundError:
        return True


def test_a_child_is_stopped_with_everything_it_started_in_its_group():
    """The child exits on SIGTERM; what it started ignores SIGTERM. Only the child went, and the rest
    lived on, reparented, after the tests or `dev` had stopped."""
    import subprocess
    import time

    # The grandchild says its pid once SIGTERM is ignored (inherited through exec), then sleeps.
    child = subprocess.Popen(["sh", "-c", "(trap '' TERM; exec sh -c 'echo $$; exec sleep 60') & wait"],
                             stdout=subprocess.PIPE, start_new_session=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    child.stdout.close()
    procs.terminate(child, grace=10)
    assert child.returncode is not None
    for _ in range(100):
        if _gone(grandchild):
            break
        time.sleep(0.05)
    assert _gone(grandchild)
    procs.terminate(child)  # once more: nothing to do, nothing signalled
