"""The dev cluster's and the tests' process helpers that need no process."""

from __future__ import annotations

import os
import signal
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


def test_a_child_that_exits_by_itself_is_reaped_with_what_it_left_in_its_group():
    """A worker that exits by itself was reaped by the kubelet's loop first; `terminate` then had no
    group it could still signal safely, and what the worker had started lived on."""
    import subprocess
    import time

    child = subprocess.Popen(["sh", "-c", "(exec sh -c 'echo $$; exec sleep 60') & read -r _; exit 0"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    assert child.stdout is not None and child.stdin is not None
    grandchild = int(child.stdout.readline())
    child.stdout.close()
    try:
        assert procs.reap(child) is None  # running: nothing done
        child.stdin.close()  # its `read` ends, and it exits, leaving the sleeper behind
        deadline = time.monotonic() + 10
        while (code := procs.reap(child)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert code == 0
        for _ in range(100):
            if _gone(grandchild):
                break
            time.sleep(0.05)
        assert _gone(grandchild)
    finally:
        if not _gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)  # the test's own leftover, by its pid
        procs.terminate(child)


def test_an_interrupt_in_an_asyncio_task_unwinds_the_run():
    """Raised as a plain BaseException in a task the code was not awaiting, asyncio kept it in the
    task: the run went on, and every later Ctrl-C was ignored (the handler ignores the next ones).
    In a process of its own: asyncio.run there, not in the test's own loop."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import asyncio, signal
        from bench import procs

        async def run():
            async def background():
                signal.raise_signal(signal.SIGINT)  # the handler raises in this task
                await asyncio.sleep(30)
            task = asyncio.create_task(background())
            try:
                await asyncio.wait_for(asyncio.Event().wait(), timeout=10)  # never awaits the task
            finally:
                task.cancel()

        try:
            with procs.interruptible():
                asyncio.run(run())
        except procs.Interrupted:
            print("interrupted")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.stdout.strip() == "interrupted", done.stderr


def test_a_sigterm_to_pytest_runs_the_fixtures_teardown(tmp_path):
    """By default SIGTERM (a cancelled CI run) killed pytest at once: no teardown ran, and what the
    fixtures had started that is no child of pytest's lived on."""
    import subprocess
    import sys
    import textwrap
    import time

    marker, started = tmp_path / "torn-down", tmp_path / "started"
    (tmp_path / "test_slow.py").write_text(textwrap.dedent(f"""
        import pathlib, time
        import pytest

        @pytest.fixture
        def held():
            yield
            pathlib.Path({str(marker)!r}).write_text("yes")

        def test_slow(held):
            pathlib.Path({str(started)!r}).write_text("yes")
            time.sleep(60)
    """))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                            "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_slow.py")],
                           cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        assert started.exists()
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=30)
        assert marker.read_text() == "yes"
    finally:
        procs.terminate(run)


def test_a_script_given_up_on_stops_with_everything_it_started(tmp_path):
    """A build script past its timeout was killed alone: its `go build` lived on, holding the cache's
    lock, and the next run waited for it."""
    import subprocess

    pid_file = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        procs.run_script(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=1)
    builder = int(pid_file.read_text())
    try:
        assert _gone(builder)
    finally:
        if not _gone(builder):
            os.kill(builder, signal.SIGKILL)  # the test's own leftover, by its pid
    assert procs.run_script(["sh", "-c", "echo out; echo progress >&2"]) == (0, "out\n")
