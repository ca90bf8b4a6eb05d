"""A stand-in for the real Kubiya worker, behaving as shared/spec/worker-protocol.md describes.

    python -m workerqueue_operator.devcluster.worker

Same environment as the real one (`KUBIYA_API_KEY`, `CONTROL_PLANE_URL`, `QUEUE_ID` required;
`HEARTBEAT_INTERVAL`, `SINGLE_EXECUTION`, `TEMPORAL_HOST`, `HOSTNAME`), same calls, cadence, exit
rule and Temporal identity; its workflows (devcluster/workflows.py) need no LLM. Two additions for
tests: `EXECUTIONS_GIVE_UP_SECONDS` (default 1800) shortens how long executions polls go on;
`WORKFLOWS_PER_WORKER=N` makes its Temporal worker take at most N workflow tasks in its life, one
at a time (default: no cap, like the real worker, which may take several workflows at once): with
workflows that run in one task (input `local_activity: true`), N workflows, for scenarios where
each pod must turn over after one workflow.

Where the real worker's behaviour is not pinned down by the protocol, this one:
- sends its first heartbeat as soon as its Temporal worker runs, then every HEARTBEAT_INTERVAL s;
  `status` is "busy" while an activity runs, else "active";
- gives up after 900 executions polls 2 s apart (1,800 s counted as the real worker's monitor counts
  them, 2 s a poll whatever the call took), whatever they answered, and shuts down as after its task
  (stop the Temporal worker, disconnect `shutdown`, exit 0);
- exits 0 on SIGINT (no disconnect) and dies of SIGTERM at once (the default action, no disconnect).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from temporalio.client import Client
from temporalio.worker import Worker

from workerqueue_operator.devcluster import workflows

logger = logging.getLogger("worker")

SDK_VERSION = "workerqueue-operator-devcluster-worker"
POLL_SECONDS = 2.0
"""The executions poll's period (single-execution mode)."""
FIRST_POLL_DELAY = 1.0
"""Before the polls begin (the real worker's monitor waits so for its worker to start)."""
CALL_TIMEOUT = aiohttp.ClientTimeout(total=10)
"""The real worker's for its heartbeats, executions polls and disconnect (60 s for /start)."""
SYSTEM_INFO_SECONDS = 300.0
"""`system_info` and `logs` ride along with a heartbeat at most this often."""
LATCH_STATUSES = frozenset({"running", "completed", "failed", "waiting_for_input"})
DONE_STATUSES = frozenset({"completed", "failed", "cancelled"})
_TRUE = ("true", "1", "yes")


class ConfigError(Exception):
    """The environment lacks something the worker needs."""


@dataclass(frozen=True)
class Config:
    api_key: str
    control_plane_url: str
    queue_id: str
    heartbeat_interval: float
    single_execution: bool
    temporal_plaintext: bool
    hostname: str
    give_up_seconds: float
    workflows_per_worker: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        missing = [name for name in ("KUBIYA_API_KEY", "CONTROL_PLANE_URL", "QUEUE_ID") if not env.get(name)]
        if missing:
            raise ConfigError(f"missing environment: {', '.join(missing)}")
        temporal_host = env.get("TEMPORAL_HOST", "")
        return cls(
            api_key=env["KUBIYA_API_KEY"],
            control_plane_url=env["CONTROL_PLANE_URL"].rstrip("/"),
            queue_id=env["QUEUE_ID"],
            heartbeat_interval=float(env.get("HEARTBEAT_INTERVAL") or 60),
            single_execution=env.get("SINGLE_EXECUTION", "").strip().lower() in _TRUE,
            temporal_plaintext=temporal_host.startswith(("temporal:", "host.docker.internal")),
            hostname=env.get("HOSTNAME") or socket.gethostname(),
            give_up_seconds=float(env.get("EXECUTIONS_GIVE_UP_SECONDS") or 1800),
            workflows_per_worker=_positive(env, "WORKFLOWS_PER_WORKER"),
        )


def _positive(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


class Latch:
    """The single-execution exit rule, fed one executions list per poll (None: the poll failed).

    The first execution listed as running/completed/failed/waiting_for_input becomes the worker's
    own, once for its life; `feed` answers True once that one read completed/failed/cancelled on
    two polls in a row. As the real worker counts them: a poll where it is not listed leaves the
    count as it is; one where it reads otherwise, or a failed poll (not 200, an error), resets it.
    """

    def __init__(self) -> None:
        self.execution_id: str | None = None
        self._done_polls = 0

    def feed(self, executions: list[Any] | None) -> bool:
        if executions is None:
            self._done_polls = 0
            return False
        listed = [e for e in executions if isinstance(e, dict)]
        if self.execution_id is None:
            first = next((e for e in listed if _status(e) in LATCH_STATUSES), None)
            if first is None:
                return False
            self.execution_id = str(first.get("id"))
            logger.info("latched onto execution %s (%s)", self.execution_id, _status(first))
        mine = next((e for e in listed if str(e.get("id")) == self.execution_id), None)
        if mine is not None:
            self._done_polls = self._done_polls + 1 if _status(mine) in DONE_STATUSES else 0
        return self._done_polls >= 2


def _status(execution: dict[str, Any]) -> str:
    return str(execution.get("status") or "").lower()


class _RecentLogs(logging.Handler):
    """The log lines since the last heartbeat that carried `logs` (bounded)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=200)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def take(self) -> list[str]:
        taken = list(self.lines)
        self.lines.clear()
        return taken


class WorkerProcess:
    def __init__(self, config: Config, http: aiohttp.ClientSession, recent_logs: _RecentLogs) -> None:
        self.config = config
        self.http = http
        self.recent_logs = recent_logs
        self.identity = f"{os.getpid()}@{config.hostname}"
        self.progress = workflows.Progress()
        self.answer: dict[str, Any] = {}
        self._auth = {"Authorization": f"Bearer {config.api_key}"}

    async def start(self) -> bool:
        url = f"{self.config.control_plane_url}/api/v1/worker-queues/{self.config.queue_id}/start"
        body = {"worker_sdk_version": SDK_VERSION, "system_info": self.system_info()}
        try:
            async with self.http.post(url, json=body, headers=self._auth,
                                      timeout=aiohttp.ClientTimeout(total=60)) as r:
                text = await r.text()
                if r.status != 200:
                    logger.error("start: %s answered %d: %s", url, r.status, text[:500])
                    return False
                self.answer = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            logger.error("start: %s failed: %s", url, e)
            return False
        logger.info("started as worker %s on task queue %s", self.answer.get("worker_id"),
                    self.answer.get("task_queue_name"))
        return True

    async def run(self, stop: asyncio.Event) -> str:
        """Runs the Temporal worker and the loops until the task is over ("done") or `stop` ("stopped")."""
        plaintext = self.config.temporal_plaintext
        client = await Client.connect(
            self.answer["temporal_host"], namespace=self.answer["temporal_namespace"],
            api_key=None if plaintext else (self.answer.get("temporal_api_key") or None), tls=not plaintext,
            identity=self.identity)
        activities = workflows.Activities(control_plane_url=self.answer["control_plane_url"],
                                          api_key=self.config.api_key, progress=self.progress, log=logger.info)
        temporal_worker = Worker(client, task_queue=self.answer["task_queue_name"],
                                 workflows=list(workflows.WORKFLOWS), activities=[activities.run_execution],
                                 identity=self.identity, tuner=workflows.tuner(self.config.workflows_per_worker),
                                 # capped: no sticky queue, so each workflow task is one take
                                 max_cached_workflows=1000 if self.config.workflows_per_worker is None else 0)
        logger.info("Temporal worker %s polls %s in %s (%s)", self.identity, self.answer["task_queue_name"],
                    self.answer["temporal_namespace"], "plaintext" if plaintext else "TLS")
        running = asyncio.create_task(temporal_worker.run())
        heartbeats = asyncio.create_task(self.heartbeats())
        polling = asyncio.create_task(self.poll_executions()) if self.config.single_execution else None
        stopping = asyncio.create_task(stop.wait())
        try:
            watched = {t for t in (running, heartbeats, polling, stopping) if t is not None}
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if running in done:
                error = running.exception()
                raise RuntimeError(f"the Temporal worker stopped: {error or 'without an error'}")
            if heartbeats in done:
                heartbeats.result()  # raises what ended the loop
            outcome = "done" if polling is not None and polling in done else "stopped"
            if outcome == "done":
                await asyncio.sleep(2)  # as the real worker: a short grace before stopping
        finally:
            for task in (heartbeats, polling, stopping):
                if task is not None:
                    task.cancel()
            if not running.done():
                logger.info("stopping the Temporal worker")
                await temporal_worker.shutdown()
            await asyncio.gather(*(t for t in (running, heartbeats, polling, stopping) if t is not None),
                                 return_exceptions=True)
        return outcome

    async def heartbeats(self) -> None:
        url = f"{self.answer['control_plane_url'].rstrip('/')}/api/v1/workers/{self.answer['worker_id']}/heartbeat"
        last_info = -SYSTEM_INFO_SECONDS
        while True:
            body: dict[str, Any] = {
                "status": "busy" if self.progress.running else "active",
                "tasks_processed": self.progress.tasks_processed,
                "current_task_id": self.progress.current_task_id,
                "worker_metadata": {"identity": self.identity, "hostname": self.config.hostname},
            }
            if time.monotonic() - last_info >= SYSTEM_INFO_SECONDS:
                body["system_info"] = self.system_info()
                body["logs"] = self.recent_logs.take()
                last_info = time.monotonic()
            try:
                async with self.http.post(url, json=body, headers=self._auth,
                                          timeout=CALL_TIMEOUT) as r:
                    if r.status in (200, 204):
                        logger.info("heartbeat sent (%d)", r.status)
                    else:
                        logger.warning("heartbeat answered %d: %s", r.status, (await r.text())[:300])
            except (aiohttp.ClientError, TimeoutError) as e:
                logger.warning("heartbeat failed: %s", e)
            await asyncio.sleep(self.config.heartbeat_interval)

    async def poll_executions(self) -> None:
        """Returns once the latched execution is over, or after `give_up_seconds` / POLL_SECONDS polls
        (the real worker counts 2 s a poll, whatever the call took: 1,800 s is the least it waits)."""
        url = (f"{self.config.control_plane_url}/api/v1/worker-queues/{self.config.queue_id}/executions"
               "?limit=5&status=all")
        latch = Latch()
        elapsed = 0.0
        await asyncio.sleep(FIRST_POLL_DELAY)
        while elapsed < self.config.give_up_seconds:
            await asyncio.sleep(POLL_SECONDS)
            elapsed += POLL_SECONDS
            executions: list[Any] | None = None
            try:
                async with self.http.get(url, headers=self._auth, timeout=CALL_TIMEOUT) as r:
                    if r.status == 200:
                        answer = await r.json(content_type=None)
                        executions = answer if isinstance(answer, list) else None
                    if executions is None:
                        logger.warning("executions poll answered %d: %s", r.status, (await r.text())[:300])
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                logger.warning("executions poll failed: %s", e)
            if latch.feed(executions):
                logger.info("execution %s is over", latch.execution_id)
                return
        logger.warning("no execution over within %.0fs: giving up", self.config.give_up_seconds)

    async def disconnect(self, reason: str, exit_code: int, error_message: str | None) -> None:
        url = f"{self.answer['control_plane_url'].rstrip('/')}/api/v1/workers/{self.answer['worker_id']}/disconnect"
        body = {"reason": reason, "exit_code": exit_code, "error_message": error_message}
        try:
            async with self.http.post(url, json=body, headers=self._auth,
                                      timeout=CALL_TIMEOUT) as r:
                if r.status in (200, 204):
                    logger.info("disconnected (%s, exit code %d)", reason, exit_code)
                else:
                    logger.warning("disconnect answered %d: %s", r.status, (await r.text())[:300])
        except (aiohttp.ClientError, TimeoutError) as e:
            logger.warning("disconnect failed: %s", e)

    def system_info(self) -> dict[str, Any]:
        return {
            "hostname": self.config.hostname, "platform": platform.platform(), "os_name": platform.system(),
            "os_version": platform.release(), "python_version": platform.python_version(),
            "sdk_version": SDK_VERSION, "pid": os.getpid(), "cwd": os.getcwd(), "cpu_count": os.cpu_count(),
        }


async def main_async(config: Config, recent_logs: _RecentLogs) -> int:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)  # SIGTERM: default, instant death
    async with aiohttp.ClientSession() as http:
        worker = WorkerProcess(config, http, recent_logs)
        if not await worker.start():
            return 1
        try:
            outcome = await worker.run(stop)
        except Exception as e:
            logger.error("worker failed: %s", e)
            await worker.disconnect("error", 1, str(e)[:1000])
            return 1
        if outcome == "done":
            await worker.disconnect("shutdown", 0, None)
        logger.info("exiting (%s)", outcome)
        return 0


def main() -> int:
    recent_logs = _RecentLogs()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(recent_logs)
    for noisy in ("temporalio", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = Config.from_env(os.environ)
    except (ConfigError, ValueError) as e:
        logger.error("%s", e)
        return 1
    with contextlib.suppress(KeyboardInterrupt):  # a SIGINT before the loop's handler is installed
        return asyncio.run(main_async(config, recent_logs))
    return 0


def exit_now(code: int) -> None:
    """Leaves without interpreter finalization: the Temporal core's threads may still call into
    Python while it finalizes, which aborts the process (a fatal PyGILState_Release, seen in tests)
    and would turn a clean exit into SIGABRT. Everything worth keeping is flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
