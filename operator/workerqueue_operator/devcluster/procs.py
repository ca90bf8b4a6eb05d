"""Child processes of the dev cluster and the tests: own process group, stopped by PID, never orphaned."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

STOP_GRACE_SECONDS = 10.0
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_PR_SET_PDEATHSIG = 1
_CLONE_NEWUTS = 0x04000000


class PortCollision(Exception):
    """A port picked as free was taken by someone else before the child bound it."""


class Service:
    """Something started and stopped as a whole; a context manager that stops it on the way out."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:  # a failed or interrupted start (Ctrl-C) stops what it had started
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_once_more_on_collision(attempt: Callable[[], None], stop: Callable[[], None], say: Callable[[str], None],
                                 *, retry: bool = True) -> None:
    """Runs `attempt`, and once more (if `retry`) after a PortCollision; `stop` after any failure."""
    for tries in (1, 2):
        try:
            attempt()
            return
        except PortCollision as e:
            stop()
            if not retry or tries == 2:
                raise
            say(f"retrying after a port collision: {e}")
        except BaseException:
            stop()
            raise


def free_ports(count: int) -> list[int]:
    """Loopback ports the kernel deems free right now; all sockets are held open together so they differ."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn making the child receive SIGKILL when its parent dies, even by SIGKILL.

    Linux ties this to the parent *thread*: start children from a thread that outlives them.
    """
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

    def preexec() -> None:
        if libc is None:
            return
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def terminate(popen: subprocess.Popen[bytes], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to the child's process group; SIGKILL to the whole group once the child has exited, or
    after `grace` seconds; reaps it. Idempotent.

    The group goes as a whole: what the child started in it (a shell's command, a worker's own
    children) would outlive a child that exits on SIGTERM, and PR_SET_PDEATHSIG reaches the child only."""
    # Only an unreaped child is signalled: until it is reaped, its pid (= the group's id) cannot be reused.
    if popen.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGTERM)
        os.killpg(popen.pid, signal.SIGCONT)  # a paused process would not act on SIGTERM
    deadline = time.monotonic() + grace
    while (state := _exited(popen.pid)) is False and time.monotonic() < deadline:
        time.sleep(0.05)
    if state is not None:  # None: reaped elsewhere meanwhile, and its pid no longer ours to signal
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


def run_script(args: Sequence[str], *, timeout: float | None = None) -> tuple[int, str]:
    """Runs a build or install script in a process group of its own: its exit code and stdout (its
    stderr shows as it runs: the build's progress). On a timeout, an exception or Ctrl-C the whole
    group is stopped: killed alone, the shell left its `go build` or `pip` running, holding the
    cache's lock, and the next run waited for them, then built everything again."""
    with subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=None, start_new_session=True,
                          preexec_fn=die_with_parent(os.getpid())) as popen:
        try:
            out, _ = popen.communicate(timeout=timeout)
        except BaseException:
            terminate(popen)
            raise
    return popen.returncode, out.decode(errors="replace")


def reap(popen: subprocess.Popen[bytes]) -> int | None:
    """The child's exit code once it has exited, None while it runs. What it left in its process group
    is killed first, as a container's processes go with its main one: signalled while the child is
    not reaped yet, so that its pid (= the group's id) cannot have been reused by then."""
    if popen.returncode is None and _exited(popen.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
    return popen.poll()


def _exited(pid: int) -> bool | None:
    """Whether the child has exited, without reaping it (its pid stays reserved); None if it was reaped."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return None


def own_hostname(name: str) -> Callable[[], None]:
    """A preexec_fn giving the child a UTS namespace of its own named `name`, as a container gets its
    pod's name: what it reads from gethostname() (the real worker's Temporal identity is
    `<pid>@<hostname>`). Needs CAP_SYS_ADMIN; without it the child is not started (OSError)."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded here, not after fork
    raw = name.encode()

    def preexec() -> None:
        if libc is None or libc.unshare(_CLONE_NEWUTS) != 0 or libc.sethostname(raw, len(raw)) != 0:
            errno = ctypes.get_errno() if libc is not None else 0
            raise OSError(errno, f"cannot set the hostname: {os.strerror(errno)}")

    return preexec


@functools.cache
def can_own_hostname() -> bool:
    """Whether children may be given a hostname of their own here (see own_hostname); probed once a
    process, not at every kubelet's start (each test starts one)."""
    try:
        subprocess.run(["true"], preexec_fn=own_hostname("probe"), check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def bypass_proxies_for_loopback() -> None:
    """Names loopback in NO_PROXY/no_proxy, for this process and its children: Python's urllib and
    the kubernetes client send even 127.0.0.1 through an HTTPS_PROXY the environment names, and a
    CI host's proxy cannot reach this machine's loopback."""
    # One list in both spellings: where both are set, urllib reads only the lower-case one.
    listed: list[str] = []
    for name in ("NO_PROXY", "no_proxy"):
        listed += [h.strip() for h in os.environ.get(name, "").split(",") if h.strip() and h.strip() not in listed]
    value = ",".join(listed + [host for host in LOOPBACK_NAMES if host not in listed])
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = value


def chain(*preexecs: Callable[[], None]) -> Callable[[], None]:
    """One preexec_fn running several in order."""
    def preexec() -> None:
        for each in preexecs:
            each()
    return preexec


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])
