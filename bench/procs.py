"""Child processes of the benchmark: each in its own process group, stopped by PID, never orphaned.

Every child gets SIGKILL from the kernel if the benchmark itself dies (PR_SET_PDEATHSIG), and
`Children.stop_all()` (run in `finally`) stops whatever still runs: SIGTERM to the group, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from workerqueue_operator.devcluster import procs as devcluster_procs

STOP_GRACE_SECONDS = 20.0


def free_port() -> int:
    """A loopback port the kernel deems free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(popen: subprocess.Popen[bytes], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to the child's process group, SIGKILL to the whole group once the child has exited or
    after `grace` seconds; reaps it (see devcluster.procs.terminate)."""
    devcluster_procs.terminate(popen, grace)


@contextlib.contextmanager
def paused(popen: subprocess.Popen[bytes]) -> Iterator[None]:
    """The child's process group is stopped (SIGSTOP) inside, so that it uses no CPU meanwhile."""
    if popen.poll() is None:
        os.killpg(popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGCONT)


class Children:
    """The processes this run started; `stop_all()` stops the ones still running, newest first."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd,
                start_new_session=True,  # own process group: Ctrl-C reaches only us, we stop it
                preexec_fn=devcluster_procs.die_with_parent(os.getpid()),
            )
        self._running.append(popen)
        return popen

    def running(self) -> list[subprocess.Popen[bytes]]:
        return list(self._running)

    def stop(self, popen: subprocess.Popen[bytes]) -> None:
        terminate(popen)
        if popen in self._running:
            self._running.remove(popen)

    def stop_all(self) -> None:
        while self._running:
            # Removed only once gone, so that a stop_all() cut short can be redone.
            terminate(self._running[-1])
            self._running.pop()


# --- /proc readings ------------------------------------------------------------------------------

def rss_kib(pid: int) -> int | None:
    """VmRSS of a live process, in KiB."""
    return _status_field(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (the peak resident set) of a live process, in KiB."""
    return _status_field(pid, "VmHWM")


def _status_field(pid: int, name: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process has used so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# --- signals -------------------------------------------------------------------------------------

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwinds whatever runs so that `finally` clauses stop the children.
    A KeyboardInterrupt, as asyncio passes only those out of a task: any other stays in the task."""


def ignore_interrupts() -> None:
    """From here on SIGINT/SIGTERM are ignored: call it before a clean-up that must not be cut short."""
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside, the first SIGINT/SIGTERM raises `Interrupted` and later ones are ignored. Main thread only."""

    def handler(signum: int, frame: FrameType | None) -> None:
        ignore_interrupts()  # a second Ctrl-C must not cut the clean-up short
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
