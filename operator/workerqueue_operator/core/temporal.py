"""The operator's access to Temporal: the executions of a task queue, in the worker's terms.

A queue's executions are the workflows of its task queue (the workflow id is the execution id). A
pool of single-execution workers polls `/executions` every 2 s each, so listings of the same task
queue are coalesced (one visibility query per second at most, however many workers ask) and the
worker that took each workflow (its Temporal identity, from the first WorkflowTaskStarted event of
its history) is read once per run and cached: it never changes.

Every call is bounded by `timeout` and fails with `TemporalUnavailable`, whose message is safe to
show to a caller: it names the endpoint and the cause, never the API key.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import functools
import hashlib
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from temporalio.api.common.v1 import WorkflowExecution as ProtoExecution
from temporalio.api.enums.v1 import (
    ContinueAsNewInitiator,
    EventType,
    PendingActivityState,
    TaskQueueKind,
    TaskQueueType,
    WorkflowTaskFailedCause,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    DescribeWorkflowExecutionRequest,
    GetWorkflowExecutionHistoryRequest,
    ListWorkflowExecutionsRequest,
)
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from workerqueue_operator.models import times

logger = logging.getLogger(__name__)

T = TypeVar("T")

COALESCE_SECONDS = 1.0
"""A listing younger than this is shared: a pool of workers polls every 2 s each."""
DOWN_SECONDS = 2.0
"""After a connection to an endpoint could not be made, calls to it fail at once for this long."""
SCAN_LIMIT = 1000
"""Most workflows read per listing. SQL visibility has no ORDER BY, so the newest by start time are
picked client-side from what the server lists first: running ones, then closed ones by close time."""
CLIENT_IDLE_SECONDS = 600.0
"""A client no call has used for this long is let go: an API key rotated, a queue deleted, would
otherwise leave its connection open, with the old key, for the life of the process."""
MAX_CLIENTS = 256
"""Clients kept at most; the one used least recently goes first. Each is a connection (one fd) and
~150-180 KiB of memory (measured, plain TCP): queues each on its own Temporal namespace and API key,
checked every few minutes, would otherwise keep one each (10,000 of them ~1.7 GiB)."""
HOLDER_CACHE_SIZE = 10_000
"""Workflow runs whose holder is remembered (LRU) at least; a run's first worker never changes."""
HOLDERS_PER_TASK_QUEUE = 150
"""...and this many per task queue listed in the last HOLDER_QUEUES_SECONDS: a worker listing shows a
queue's ~100 latest closed runs and its running ones, and listings of many queues taking turns would
otherwise push each other's out (an LRU a little smaller than their sum keeps none)."""
CLOSED_SHOWN_SECONDS = 60.0
"""How long a worker's closed execution stays in the workers' listing past the `limit` closed last:
its worker needs it on two polls 2 s apart (a failed poll retried meanwhile)."""
HOLDER_QUEUES_SECONDS = 600.0
UNTAKEN_REUSE_SECONDS = 10.0
"""A running run read as untaken is not read again for this long by the listings workers poll: a
backlog of hundreds of runs nobody took yet was read again at every listing (each second), and
while some were unread no worker was shown its execution. A worker may have taken one since; a
listing that could tell a worker its execution is over reads them again first (`recheck`)."""
HOLDER_CACHE_MOST = 200_000
"""...and never more than this many (~640 B each, ~125 MiB): 10,000 polled task queues would otherwise
keep 1.5 million (~1 GiB). Past ~1,300 polled task queues, holders are read again more often instead."""
CHAIN_LIMIT = 50
"""Earlier runs of a workflow listed to find a worker's run in (continued as new more than this often,
the first ones are left out)."""
CHAINED_RUNS_KEPT = 50_000
"""Earlier runs remembered over all workflows (LRU by workflow; ~60 MiB): they never change. A workflow
with none listed (its predecessor past retention) counts one: such entries are memory too."""
CONTINUING_KEPT = 100_000
"""Runs remembered to continue an earlier one as new (LRU, ~200 B each): past this, a workflow whose
entry went is not listed by id again (its run's holder stays cached, its history is not read again)."""
CHAIN_SETTLE_SECONDS = 60.0
"""A run this old whose predecessor the visibility store does not list (past retention) is listed no more."""
_CHAIN_LISTINGS = 8
"""Chain listings under way at once per Temporal namespace: a visibility store is rate-limited (10 a
second by default), and every worker's listing needs it."""
_HISTORY_PAGE = 32  # the first WorkflowTaskStarted is normally event 3
_HISTORY_READS = 8
"""Concurrent history reads per task queue, those a listing left running included."""
_HISTORY_READS_PER_NAMESPACE = 32
"""Concurrent history reads of the task queues of one Temporal namespace (host and namespace): after
a restart every polled queue's runs are unread at once (1,000 queues with ~110 runs each listed),
and 8 for each at once is more than a Temporal should take. Per namespace, not over all: a Temporal
that never answers a history read would otherwise hold every turn, everyone else's holders unread.
Each run waits its turn as an entry in its task queue's line, not as a task of its own (~5.6 KiB
each: 110,000 of them were ~600 MiB)."""
_READ_SECONDS = 3.0
"""A history read may take this many times the timeout once it has its turn: a listing shows what
is not read within its time without a holder, and the read goes on for the next listings to use
(cut at each listing's end, a history slower than that was started over at every poll, never read)."""
_DESCRIBES = 32  # concurrent DescribeWorkflowExecution calls of activity_workers (only before a scale-down)
_RUNNING_ACTIVITY = (PendingActivityState.PENDING_ACTIVITY_STATE_STARTED,
                     PendingActivityState.PENDING_ACTIVITY_STATE_CANCEL_REQUESTED)
"""Pending activity states in which a worker (its last_worker_identity) runs the activity."""

# Continued-as-new: the execution (= workflow id) goes on in a new run, so it is not over. The
# listing keeps the newest run of each workflow id (a continued-as-new run shows only until its
# successor is visible); what workers are shown keeps earlier ones too (see Temporal._workers_runs).
_STATUS = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "running",
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.TERMINATED: "cancelled",
}


class _Run(NamedTuple):
    """A workflow run as a visibility listing gives it: what is used of it."""

    id: str
    run_id: str
    status: WorkflowExecutionStatus | None
    workflow_type: str
    start_time: datetime.datetime | None
    close_time: datetime.datetime | None


def status_of(status: WorkflowExecutionStatus | None) -> str:
    """Temporal's execution status in the worker's lowercase terms (unknown: running, it is not over)."""
    return _STATUS.get(status, "running") if status is not None else "running"


def rfc3339(moment: datetime.datetime | None) -> str | None:
    return times.milli_rfc3339(moment) if moment is not None else None


@dataclass(frozen=True)
class Endpoint:
    """One Temporal endpoint and its credential. The API key shows in no repr, str or log."""

    host: str
    namespace: str
    api_key: str = field(default="", repr=False)
    tls: bool = False

    @property
    def key(self) -> tuple[str, str, bool, str]:
        """Identifies the client for this endpoint; the API key only as a digest."""
        return (self.host, self.namespace, self.tls, hashlib.sha256(self.api_key.encode()).hexdigest())

    def __str__(self) -> str:
        # Credentials written into the host (`user:password@host:7233`, which only the CRD refuses) too.
        return f"{self.host.rpartition('@')[2]}/{self.namespace}"


def host_of(identity: str | None) -> str | None:
    """The host (pod) of a worker's Temporal identity, `<pid>@<hostname>` (worker-protocol.md); None
    for an identity of any other shape."""
    pid, at, host = (identity or "").partition("@")
    return host if at and pid and host else None


@dataclass(frozen=True)
class Execution:
    """One workflow of a task queue, as the worker sees an execution."""

    id: str  # workflow id (= the execution id)
    run_id: str
    status: str  # running | completed | failed | cancelled
    workflow_type: str
    created_at: str | None  # RFC 3339: the workflow was started (queued for a worker)
    started_at: str | None  # a worker took its first workflow task
    completed_at: str | None
    holder: str | None  # Temporal identity ("<pid>@<hostname>") of that worker; None until one took it
    holder_unread: bool = False
    """Its history was not read in time this listing: `holder` None says nothing (see Temporal._list)."""
    untaken_at: float | None = None
    """Nobody had taken it at this time (epoch seconds; its history, read just after, said so): a
    worker may have taken it since, and before another one it took after that."""
    delayed: bool = False
    """Nobody can take it yet: its first workflow task waits for its time (cron, a start delay, a
    retry's back-off). It waits for no worker meanwhile."""
    due_at: float | None = None
    """Of a delayed run: when it may be taken (epoch seconds); nobody took it before then."""
    continued: bool = False
    """This run continued as new: its worker's part is over; `status` is the run its chain ends in."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "temporal_workflow_id": self.id,
            "temporal_run_id": self.run_id,
            "workflow_type": self.workflow_type,
            "worker_identity": self.holder,
        }


class Listing(list[Execution]):
    """A listing's executions. `cut`: running workflows may have been left out (more ran than a scan
    reads, see SCAN_LIMIT), so nobody can be told from it which executions a worker holds. `reused`:
    see below."""

    def __init__(self, executions: Iterable[Execution] = (), *, cut: bool = False, reused: bool = False) -> None:
        super().__init__(executions)
        self.cut = cut
        self.reused = reused
        """Some running run is shown untaken as an earlier listing read it (UNTAKEN_REUSE_SECONDS)."""


@dataclass(frozen=True)
class Poller:
    identity: str
    last_access_time: str | None


@dataclass(frozen=True)
class TaskQueueInfo:
    """Who polls a task queue for workflow tasks, and how many wait (None: the server does not say)."""

    pollers: tuple[Poller, ...]
    backlog: int | None


class TemporalUnavailable(Exception):
    """Temporal could not answer in time, or refused. The message is safe to show (no key)."""


@dataclass(frozen=True)
class _Holder:
    identity: str | None
    started_at: str | None
    untaken_at: float | None = None
    """Of a run nobody had taken: when (epoch seconds, at the latest) its history said so."""
    asked: float | None = None
    """The same moment on the monotonic clock: how long ago, whatever the wall clock did since."""
    scheduled: bool = True
    """False for a run whose first workflow task is not scheduled yet (a cron run waiting for its
    time, a start delay, a retry's back-off): nothing for a worker to take until then."""
    due_at: float | None = None
    """Of such a run: when its first workflow task is scheduled (epoch seconds, by its history)."""


_ListingKey = tuple[tuple[str, str, bool, str], str, int, bool, bool, bool]


class _Waiting(NamedTuple):
    """A run whose holder is to be read, in its task queue's line."""

    client: Client
    endpoint: Endpoint
    run: _Run
    holder: asyncio.Future[_Holder]
    turn_by: float
    """Loop time by which its read must have begun, else it is given up (TimeoutError)."""


@dataclass
class _Line:
    """A task queue's runs waiting for a history read, and the readers (at most _HISTORY_READS) taking them."""

    turns: asyncio.Semaphore
    """Its Temporal namespace's (_HISTORY_READS_PER_NAMESPACE), shared by that namespace's lines."""
    waiting: collections.deque[_Waiting] = field(default_factory=collections.deque)
    readers: int = 0


class Temporal:
    """Temporal clients (one per endpoint and credential, connected lazily) and coalesced listings."""

    def __init__(self, *, timeout: float = 4.0, coalesce: float = COALESCE_SECONDS, scan_limit: int = SCAN_LIMIT,
                 holder_cache_size: int = HOLDER_CACHE_SIZE, down_seconds: float = DOWN_SECONDS,
                 client_idle_seconds: float = CLIENT_IDLE_SECONDS, max_clients: int = MAX_CLIENTS) -> None:
        self._timeout = timeout
        self._down_seconds = down_seconds
        self._down: dict[tuple[str, str, bool, str], tuple[float, str]] = {}
        """Endpoints no connection could be made to: until when calls fail at once, and why."""
        self._coalesce = coalesce
        self._scan_limit = scan_limit
        self._clients: collections.OrderedDict[tuple[str, str, bool, str], asyncio.Task[Client]] = (
            collections.OrderedDict())
        """By last use, the least recent first."""
        self._max_clients = max_clients
        self._using: dict[Client, int] = {}
        """Clients in use (a call, a history read waiting or under way) and by how many."""
        self._retiring: set[Client] = set()
        """Clients let go while in use: closed when the last use ends."""
        self._used: dict[tuple[str, str, bool, str], float] = {}
        """When each client was last asked for (loop time)."""
        self._client_idle_seconds = client_idle_seconds
        self._swept = 0.0
        self._listings: dict[_ListingKey, tuple[asyncio.Task[Listing], list[float], float]] = {}
        """Listings under way or done lately: the task, when it finished (once it has), when it began."""
        self._holders: collections.OrderedDict[tuple[str, str, str, str], _Holder] = collections.OrderedDict()
        self._holder_cache_size = holder_cache_size
        self._untaken: collections.OrderedDict[tuple[str, str, str, str], _Holder] = collections.OrderedDict()
        """Running runs whose last read found nobody had taken them, as read (by when read, oldest first)."""
        self._not_due: collections.OrderedDict[tuple[str, str, str, str], _Holder] = collections.OrderedDict()
        """Runs read untaken whose first workflow task is not due yet (a start delay, a cron run), until then."""
        self._listed_task_queues: dict[tuple[str, str, str], float] = {}
        """(host, namespace, task queue) -> when its executions were last listed (loop time)."""
        self._listed_pruned = 0.0
        self._reads: dict[tuple[str, str, str, str], asyncio.Future[_Holder]] = {}
        """History reads waiting or under way, by run: a listing joins one a listing before it left."""
        self._begun: set[asyncio.Future[_Holder]] = set()
        """Those of the reads whose history has been asked for: a fresh listing joins none of them."""
        self._continuing: collections.OrderedDict[tuple[str, str, str, str], str] = collections.OrderedDict()
        """Runs whose history says they continue an earlier run as new -> its run id (LRU, used ones kept)."""
        self._chains: collections.OrderedDict[tuple[str, str, str], tuple[str, tuple[_Run, ...]]] = (
            collections.OrderedDict())
        """(host, namespace, workflow id) -> (the run listed for, the closed runs before it)."""
        self._chained_runs = 0
        self._chain_listings: dict[tuple[str, str, str, str], asyncio.Task[None]] = {}
        """Chain listings under way, by newest run: a listing joins one that a listing before it left."""
        self._lines: dict[tuple[str, str, str], _Line] = {}
        """(host, namespace, task queue) -> its runs waiting for a read, while any wait or are read."""
        self._readers: set[asyncio.Task[None]] = set()
        self._turns: weakref.WeakValueDictionary[tuple[str, str], asyncio.Semaphore] = weakref.WeakValueDictionary()
        """(host, namespace) -> its history reads' turns, while a line of it is read."""

    @property
    def timeout(self) -> float:
        """Each call's bound (seconds)."""
        return self._timeout

    async def executions(self, endpoint: Endpoint, task_queue: str, *, limit: int = 100,
                         running: bool = False, taken_first: bool = False, fresh: bool = False,
                         recheck: bool = False) -> Listing:
        """The workflows of `task_queue`, newest first by start time, at most `limit`, holders resolved;
        with `running`, only those still running (what waits for a worker and what workers hold).

        With `taken_first` (what workers are shown): every running one the scan finds, oldest first,
        then the `limit` closed last (earlier runs of a workflow too), then older closed ones whose
        holder is known, and continued-as-new runs while the run their chain ends in runs or ended
        lately, with that run's status. A worker's own
        execution is listed however many newer ones wait behind it (cut to the newest, a burst of
        more than `limit` hid it: its worker never saw it end, nor exited), and so is a second one it
        runs however many older ones run.

        With `fresh`, no listing begun before this call is joined: what the caller makes of it is as of
        now (a scaling probe's reading, on which pods and ephemeral queues are deleted). In what
        workers are shown, a run read untaken within UNTAKEN_REUSE_SECONDS is shown as then read,
        and the listing says so (`reused`), unless `recheck` (or `fresh`): every run shown untaken
        was read, its history asked for, within the coalescing window, or during this listing."""
        key = (endpoint.key, task_queue, limit, running, taken_first, recheck or fresh)
        loop = asyncio.get_running_loop()
        entry = None if fresh else self._listings.get(key)
        if entry is not None:
            task, finished, begun = entry
            # A recheck joins only one begun within the window: what a slower one read may be older.
            if (not recheck or loop.time() - begun < self._coalesce) and (
                    not task.done() or (finished and loop.time() - finished[0] < self._coalesce)):
                return await asyncio.shield(task)
        finished_at: list[float] = []
        deadline = loop.time() + self._timeout
        task = loop.create_task(self._bounded(endpoint, lambda c: self._list(c, endpoint, task_queue, limit, running,
                                                                             taken_first, deadline=deadline,
                                                                             fresh=fresh, recheck=recheck)))
        task.add_done_callback(lambda t: _finished(t, finished_at, loop.time()))
        self._listings[key] = (task, finished_at, loop.time())
        self._forget_old_listings(loop.time())
        # Shielded: a caller that gives up must not cancel the listing that others wait for.
        return await asyncio.shield(task)

    async def describe_task_queue(self, endpoint: Endpoint, task_queue: str) -> TaskQueueInfo:
        """The identities polling `task_queue` for workflow tasks and its approximate backlog."""

        async def describe(client: Client) -> TaskQueueInfo:
            request = DescribeTaskQueueRequest(
                namespace=endpoint.namespace,
                task_queue=TaskQueue(name=task_queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                report_stats=True,
            )
            response = await client.workflow_service.describe_task_queue(
                request, timeout=datetime.timedelta(seconds=self._timeout))
            pollers = tuple(
                Poller(p.identity, rfc3339(p.last_access_time.ToDatetime(datetime.UTC))
                       if p.HasField("last_access_time") else None)
                for p in response.pollers
            )
            backlog = int(response.stats.approximate_backlog_count) if response.HasField("stats") else None
            return TaskQueueInfo(pollers, backlog)

        return await self._bounded(endpoint, describe)

    async def activity_workers(self, endpoint: Endpoint, task_queue: str) -> frozenset[str] | None:
        """The identities of the workers running an activity of a workflow of `task_queue` now;
        None when not every running workflow could be described in time (half the timeout).

        A worker polling a task queue takes any workflow's activities from it, not only those of the
        workflow it holds: a worker that holds none may be running another's activity (the real
        worker's LLM step is one). One DescribeWorkflowExecution per running workflow, so this is
        asked before a worker is deleted as idle, not at every probe."""

        async def find(client: Client) -> frozenset[str] | None:
            query = f'TaskQueue="{_quote(task_queue)}" AND ExecutionStatus="Running"'
            runs = [(wf.id, wf.run_id) async for wf in self._scan(client, endpoint, query)]
            if len(runs) >= self._scan_limit:
                return None  # maybe cut: a worker running an activity of one left out would look idle
            gate = asyncio.Semaphore(_DESCRIBES)

            async def running(workflow_id: str, run_id: str) -> list[str]:
                async with gate:
                    try:
                        found = await client.workflow_service.describe_workflow_execution(
                            DescribeWorkflowExecutionRequest(
                                namespace=endpoint.namespace,
                                execution=ProtoExecution(workflow_id=workflow_id, run_id=run_id)),
                            timeout=datetime.timedelta(seconds=self._timeout))
                    except RPCError as e:
                        if e.status != RPCStatusCode.NOT_FOUND:
                            raise
                        return []  # gone since it was listed (retention)
                return [a.last_worker_identity for a in found.pending_activities
                        if a.state in _RUNNING_ACTIVITY and a.last_worker_identity]

            # Not all in time (very many running): unknown, and no worker is taken for idle; a
            # failure of the shared client's calls is not what happened, so it is not dropped.
            reads = [asyncio.ensure_future(running(*run)) for run in runs]
            if not reads:
                return frozenset()
            try:
                _, pending = await asyncio.wait(reads, timeout=self._timeout / 2)
            finally:  # also when this call is cancelled (its timeout): no read may outlive it
                for read in reads:
                    read.cancel()
                await asyncio.gather(*reads, return_exceptions=True)
            if pending or any(r.exception() is not None for r in reads):
                return None
            return frozenset(identity for r in reads for identity in r.result())

        return await self._bounded(endpoint, find)

    async def close(self) -> None:
        """Cancel what runs, then close and drop every client."""
        clients = list(self._clients.values())
        tasks: list[asyncio.Future[Any]] = [t for t, _, _ in self._listings.values()] + list(clients)
        tasks += [*self._readers, *self._reads.values(), *self._chain_listings.values()]
        self._chain_listings.clear()
        self._reads.clear()
        self._lines.clear()
        self._listings.clear()
        self._clients.clear()
        self._used.clear()
        self._down.clear()
        for future in tasks:
            future.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # theirs taken; close()'s own cancel not
        for task in clients:
            _close_client(task)
        for client in self._retiring:
            _close_client(client)
        self._using.clear()
        self._retiring.clear()

    # -- internals ----------------------------------------------------------------------------

    async def _bounded(self, endpoint: Endpoint, call: Callable[[Client], Awaitable[T]]) -> T:
        """`call` with the endpoint's client, within `timeout`; every failure as TemporalUnavailable."""
        down = self._down.get(endpoint.key)
        if down is not None:
            if asyncio.get_running_loop().time() < down[0]:
                raise TemporalUnavailable(down[1])
            del self._down[endpoint.key]
        client_task: asyncio.Task[Client] | None = None
        answered = False  # Temporal answered over the connection: nothing wrong with the client
        connecting = timed_out = False  # connecting: the connection is made within this call's bound
        try:
            async with asyncio.timeout(self._timeout):
                client_task = self._client(endpoint)
                connecting = not client_task.done()
                client = await asyncio.shield(client_task)
                self._hold(client)
                try:
                    return await call(client)
                finally:
                    self._release(client)
        except TimeoutError:
            reason = f"Temporal at {endpoint} did not answer within {self._timeout:g}s"
            timed_out = True
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this call itself is cancelled
            # The connection it waited for was given up by another call sharing it, at that call's
            # timeout: a failure like the timeout. Let through, it ended the caller as if cancelled
            # (a probe so ended was never run again: its queue's Temporal was not looked at again).
            reason = f"Temporal at {endpoint} did not answer within {self._timeout:g}s"
        except RPCError as e:
            reason = _rpc_reason(endpoint, e)
            answered = e.status != RPCStatusCode.UNAVAILABLE
        except (RuntimeError, OSError) as e:
            # The SDK reports a failed connection as a RuntimeError naming the address and the cause.
            reason = f"Temporal at {endpoint} is unreachable: {_first_line(e)}{_tls_hint(endpoint, e)}"
        except Exception as e:  # e.g. a malformed host: still an answer for the caller, not a crash
            logger.debug("Temporal call to %s failed", endpoint, exc_info=True)
            reason = f"Temporal at {endpoint} failed: {_first_line(e)}"
        connected = (client_task is not None and client_task.done() and not client_task.cancelled()
                     and client_task.exception() is None)
        if connected and timed_out and connecting:
            # Connected meanwhile, the call had only what the connection left of the bound: no sign
            # the connection is bad. Dropped, a Temporal whose connection and first answer take more
            # than the bound together (a distant one) was connected anew, and failed so, at every call.
            # Kept, it is dropped when a call made over it times out: one strike.
            answered = True
        if not answered:
            # Connected anew by the next call. Not for a refusal (a namespace not found, a key without
            # the permission): every such call would cost a new connection, and others share this one.
            self._drop(endpoint, client_task)
        if not connected and self._down_seconds > 0:
            # Calls right behind this one would each wait for a connection of their own: a thousand
            # queues on one unreachable Temporal, probed 16 at a time, took minutes to show it, and
            # held up the probes of every other endpoint meanwhile.
            self._down[endpoint.key] = (asyncio.get_running_loop().time() + self._down_seconds, reason)
        raise TemporalUnavailable(reason)

    def _client(self, endpoint: Endpoint) -> asyncio.Task[Client]:
        now = asyncio.get_running_loop().time()
        self._let_go_idle(now)
        task = self._clients.pop(endpoint.key, None)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            self._make_room()
            task = asyncio.get_running_loop().create_task(Client.connect(
                endpoint.host,
                namespace=endpoint.namespace,
                api_key=endpoint.api_key or None,
                tls=endpoint.tls,
                identity="workerqueue-operator",
            ))
            task.add_done_callback(_retrieve)
        self._clients[endpoint.key] = task  # the most recently used, last
        self._used[endpoint.key] = now
        return task

    @property
    def clients(self) -> int:
        """Clients kept (connected or connecting)."""
        return len(self._clients)

    def _make_room(self) -> None:
        """Let go of the least recently used clients down to one less than the most kept. A call using
        one goes on with it (the connection closes when the last call lets go of the client); a
        connection still being made is not cancelled: a call waits for it."""
        while self._clients and len(self._clients) >= self._max_clients:
            key, task = self._clients.popitem(last=False)
            self._used.pop(key, None)
            self._retire(task)

    def _let_go_idle(self, now: float) -> None:
        """Clients unused for CLIENT_IDLE_SECONDS, and endpoints no longer down (looked at now and then)."""
        if now - self._swept < min(self._client_idle_seconds, 60.0):
            return
        self._swept = now
        for key in [k for k, used in self._used.items() if now - used >= self._client_idle_seconds]:
            del self._used[key]
            task = self._clients.pop(key, None)
            if task is not None and not task.done():
                task.cancel()
            elif task is not None:
                self._retire(task)
        for key in [k for k, (until, _) in self._down.items() if until <= now]:
            del self._down[key]

    def _drop(self, endpoint: Endpoint, task: asyncio.Task[Client] | None) -> None:
        """Forget a client that failed: the next call connects anew."""
        if task is not None and self._clients.get(endpoint.key) is task:
            del self._clients[endpoint.key]
            if not task.done():
                task.cancel()
            else:
                self._retire(task)
            logger.debug("dropped the Temporal client of %s", endpoint)

    def _hold(self, client: Client) -> None:
        self._using[client] = self._using.get(client, 0) + 1

    def _release(self, client: Client) -> None:
        left = self._using.get(client, 0) - 1
        if left > 0:
            self._using[client] = left
            return
        self._using.pop(client, None)
        if client in self._retiring:
            self._retiring.discard(client)
            _close_client(client)

    def _retire(self, task: asyncio.Task[Client]) -> None:
        """A client let go: its connection is closed now, or once the calls and reads using it end.
        (One still connecting is left to the collector: let go only with more than max_clients
        connecting at once.)"""
        if not task.done() or task.cancelled() or task.exception() is not None:
            return
        client = task.result()
        if client in self._using:
            self._retiring.add(client)
        else:
            _close_client(client)

    def _forget_old_listings(self, now: float) -> None:
        stale = [k for k, (t, done, _) in self._listings.items() if t.done() and done and now - done[0] > 60]
        for k in stale:
            del self._listings[k]

    async def _list(self, client: Client, endpoint: Endpoint, task_queue: str, limit: int,
                    running: bool, taken_first: bool = False, *, deadline: float | None = None,
                    fresh: bool = False, recheck: bool = False) -> Listing:
        """`deadline` (loop time): when the caller gives up on the listing; what is not read by then
        shows without a holder rather than the whole listing fail. `fresh`, `recheck`: see executions."""
        query = f'TaskQueue="{_quote(task_queue)}"'
        if running:
            query += ' AND ExecutionStatus="Running"'
        newest: dict[str, _Run] = {}  # workflow id -> its newest run
        runs_of: dict[str, dict[str, _Run]] = collections.defaultdict(dict)  # workflow id -> its runs by id
        scanned, last_running = 0, False
        async for wf in self._scan(client, endpoint, query):
            scanned += 1
            last_running = wf.status in _RUNNING
            runs_of[wf.id][wf.run_id] = wf
            seen = newest.get(wf.id)
            if seen is None or _start_key(wf) > _start_key(seen):
                newest[wf.id] = wf
        goes_on: dict[tuple[str, str], _Run] = {}
        if taken_first:
            await self._add_chains(client, endpoint, newest, runs_of, deadline=deadline)
            runs, untouched, goes_on = self._workers_runs(endpoint, newest, runs_of, limit)
        else:
            runs = sorted(newest.values(), key=_start_key, reverse=True)[: max(limit, 0)]
            untouched = set()
        self._listed(endpoint, task_queue)
        holders: list[_Holder | None] = []
        reads: dict[int, asyncio.Future[_Holder]] = {}
        # A recheck shares what another read within the coalescing window (workers finishing together
        # share one read of the backlog), as a listing joined then would.
        reuse_since = (None if fresh or not taken_first else
                       time.monotonic() - (self._coalesce if recheck else UNTAKEN_REUSE_SECONDS))
        reused = False
        for i, wf in enumerate(runs):
            if (wf.id, wf.run_id) in untouched:
                holders.append(self._holders.get((endpoint.host, endpoint.namespace, wf.id, wf.run_id)))
                continue
            # Known ones are not behind the reads: a slow backlog must not hide what is known.
            holders.append(self._known_holder(endpoint, wf.id, wf.run_id))
            if holders[-1] is not None:
                continue
            run_key = (endpoint.host, endpoint.namespace, wf.id, wf.run_id)
            not_due = self._not_due.get(run_key)
            if not (recheck or fresh) and not_due is not None and _not_due(not_due) and wf.close_time is None:
                # Not read again until it may be taken: hundreds of cron runs and start delays read
                # every few seconds held every worker's "finished" up. A signal may have it taken
                # early, though: read afresh before a worker is told its execution is over (reused).
                holders[-1], reused = not_due, True
                continue
            untaken = self._untaken.get(run_key) or not_due
            if (reuse_since is not None and untaken is not None and untaken.asked is not None
                    and untaken.asked >= reuse_since and wf.close_time is None):
                holders[-1], reused = untaken, not recheck
            else:
                # Not one begun earlier for a recheck either: it may have begun before a worker took the run.
                reads[i] = self._read(client, endpoint, task_queue, wf, join=not (fresh or recheck))
        # Reading many new histories at once (a first listing) may take long: what is not read within
        # half the timeout, nor before the caller gives up, shows without a holder this time.
        loop = asyncio.get_running_loop()
        wait = self._timeout / 2
        if deadline is not None:
            wait = min(wait, deadline - loop.time() - self._timeout / 10)
        if reads and wait > 0:
            # Waits only: a read goes on, bounded, for the next listing (see _READ_SECONDS).
            await asyncio.wait(reads.values(), timeout=wait)
        for i, future in reads.items():
            holders[i] = _read_holder(future, runs[i])
        # Running ones are listed first: a scan that ends at its limit on a running one may have left
        # others out (the oldest: those workers took first).
        return Listing((
            Execution(
                id=wf.id,
                run_id=wf.run_id,
                status=status_of(ended.status),
                workflow_type=wf.workflow_type,
                created_at=rfc3339(wf.start_time),
                started_at=h.started_at if h is not None else None,
                completed_at=rfc3339(ended.close_time)
                if ended.status != WorkflowExecutionStatus.CONTINUED_AS_NEW else None,
                holder=h.identity if h is not None else None,
                holder_unread=h is None,
                untaken_at=h.untaken_at if h is not None else None,
                delayed=h is not None and not h.scheduled,
                due_at=h.due_at if h is not None and not h.scheduled else None,
                continued=wf.status == WorkflowExecutionStatus.CONTINUED_AS_NEW,
            )
            for wf, h in zip(runs, holders, strict=True)
            for ended in (goes_on.get((wf.id, wf.run_id), wf),)
        ), cut=scanned >= self._scan_limit and last_running, reused=reused)

    def _workers_runs(self, endpoint: Endpoint, newest: dict[str, _Run], runs_of: dict[str, dict[str, _Run]],
                      limit: int) -> tuple[list[_Run], set[tuple[str, str]], dict[tuple[str, str], _Run]]:
        """What workers are shown (see executions, `taken_first`): the runs, those of them not to keep
        cached by being shown, and the continued-as-new ones among them -> the run their chain ends in.

        Every running one the scan found (a worker holding a closed one and a running one left out
        would be told it finished), and the `limit` closed last, a workflow's earlier runs among them
        (the worker that took one holds that execution, though another worker took the next run).
        Past those, a closed run is shown
        - continued as new, while the run its chain ends in runs or ended lately: its worker waits for
          the execution to end (its holder read if not known: another replica read it running);
        - of a worker that runs another one, or closed one lately: its first execution is what it
          waits for, and its later ones must not take that one's place in its view;
        - closed lately, its holder known: more than `limit` closing between a worker's two
          confirming polls took its own out of its view, and it waited until its give-up."""
        # A status this SDK does not know (a paused run, Temporal 1.28's PAUSED) is running, as status_of
        # says: sorted among the closed ones, it left its worker's view and the worker was told its
        # first execution was all it had.
        going = sorted((wf for wf in newest.values() if wf.status in _RUNNING), key=_start_key)
        closed = sorted((wf for runs in runs_of.values() for wf in runs.values()
                         if wf.status not in _RUNNING or wf is not newest[wf.id]),
                        key=_close_key, reverse=True)
        recent = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=CLOSED_SHOWN_SECONDS)
        ends = _chain_ends(runs_of)

        def lately(wf: _Run) -> bool:
            return _close_key(wf)[0] >= recent

        def goes_on(wf: _Run) -> bool:
            end = ends.get((wf.id, wf.run_id))
            return end is not None and (end.status in _NOT_OVER or lately(end))

        def host(wf: _Run) -> str | None:
            held = self._cached_holder(endpoint, wf)
            return host_of(held.identity) if held is not None else None

        tail = closed[max(limit, 0):]
        busy = {host(wf) for wf in itertools.chain(going, itertools.takewhile(lately, closed), filter(goes_on, tail))}
        shown: list[_Run] = []
        untouched = set()
        for wf in tail:
            if goes_on(wf):
                shown.append(wf)
            elif (held_by := host(wf)) is None:
                continue
            elif held_by in busy:
                shown.append(wf)  # kept cached while its worker works: few, needed until it exits
            elif lately(wf):
                shown.append(wf)
                # Shown, never kept cached by being shown: else each listing kept them all, up to the scan.
                untouched.add((wf.id, wf.run_id))
        runs = going + closed[: max(limit, 0)] + shown
        return runs, untouched, {key: ends[key] for wf in runs if (key := (wf.id, wf.run_id)) in ends}

    async def _add_chains(self, client: Client, endpoint: Endpoint, newest: dict[str, _Run],
                          runs_of: dict[str, dict[str, _Run]], *, deadline: float | None) -> None:
        """Adds to `runs_of` the earlier runs of each workflow known to go on from one (its newest run
        continued an earlier one as new, its history read says so): the run a worker took may have
        left the scan since (a busy task queue closes more than a scan reads), and its holder with it.
        Listed by workflow id once per run that continues one, a few at a time per namespace; one not
        listed within a quarter of the timeout goes on for the next listing. Kept, they are added
        while the workflow is in the scan: `_workers_runs` decides what is shown."""
        listings = []
        for wf in newest.values():
            run_key = (endpoint.host, endpoint.namespace, wf.id, wf.run_id)
            predecessor = self._continuing.get(run_key)
            if predecessor is None:
                continue
            self._continuing.move_to_end(run_key)
            kept = self._chains.get(run_key[:3])
            if kept is not None and kept[0] == wf.run_id:
                continue  # listed since this run began
            listing = self._chain_listings.get(run_key)
            if listing is None and sum(1 for k in self._chain_listings if k[:2] == run_key[:2]) < _CHAIN_LISTINGS:
                self._hold(client)  # its connection stays open for the listing, though the client be let go
                listing = self._chain_listings[run_key] = asyncio.get_running_loop().create_task(
                    self._chain(client, endpoint, wf, predecessor))
                listing.add_done_callback(functools.partial(self._chain_listed, run_key, client))
            if listing is not None:
                listings.append(listing)
        if listings:
            loop = asyncio.get_running_loop()
            wait = self._timeout / 4 if deadline is None else min(self._timeout / 4, deadline - loop.time())
            if wait > 0:
                await asyncio.wait(listings, timeout=wait)  # waits only: they go on
        for workflow_id in runs_of:
            kept = self._chains.get((endpoint.host, endpoint.namespace, workflow_id))
            if kept is not None:
                self._chains.move_to_end((endpoint.host, endpoint.namespace, workflow_id))
                for run in kept[1]:
                    runs_of[workflow_id].setdefault(run.run_id, run)

    def _chain_listed(self, key: tuple[str, str, str, str], client: Client, listing: asyncio.Task[None]) -> None:
        self._release(client)
        if self._chain_listings.get(key) is listing:
            del self._chain_listings[key]

    async def _chain(self, client: Client, endpoint: Endpoint, wf: _Run, predecessor: str) -> None:
        """Lists the runs of `wf`'s workflow id before it (closed for good), at most CHAIN_LIMIT, and
        keeps them once the visibility store has recorded `predecessor` (the run it continues) closed,
        or once the run is older than CHAIN_SETTLE_SECONDS (its predecessor past retention, say)."""
        query = f'WorkflowId="{_quote(wf.id)}"'
        try:
            async with asyncio.timeout(self._timeout):
                earlier = [run async for run in self._scan(client, endpoint, query, limit=CHAIN_LIMIT)
                           if run.run_id != wf.run_id and _start_key(run) < _start_key(wf)]
        except Exception as e:  # one chain not listed is one worker's view a listing later, not a failure
            logger.debug("listing the runs of %s failed: %s", wf.id, type(e).__name__)
            return
        behind = predecessor not in {run.run_id for run in earlier} or any(
            run.status in _RUNNING for run in earlier)
        age = datetime.datetime.now(datetime.UTC) - _start_key(wf)[0]
        if behind and age.total_seconds() < CHAIN_SETTLE_SECONDS:
            return  # the visibility store behind (a close not recorded yet): listed again next time
        key = (endpoint.host, endpoint.namespace, wf.id)
        old = self._chains.pop(key, None)
        runs = tuple(run for run in earlier if run.status not in _RUNNING)
        self._chained_runs += _weight(runs) - (_weight(old[1]) if old is not None else 0)
        self._chains[key] = (wf.run_id, runs)
        while self._chained_runs > CHAINED_RUNS_KEPT and len(self._chains) > 1:
            _, (_, dropped) = self._chains.popitem(last=False)
            self._chained_runs -= _weight(dropped)

    def _read(self, client: Client, endpoint: Endpoint, task_queue: str, wf: _Run, *,
              join: bool = True) -> asyncio.Future[_Holder]:
        """The run's holder as its read (waiting or under way) will tell; a new read if none is, or if
        not `join` and the one there has begun: it may tell a run untaken that a worker has taken since."""
        key = (endpoint.host, endpoint.namespace, wf.id, wf.run_id)
        holder = self._reads.get(key)
        if holder is None or (not join and holder in self._begun):
            loop = asyncio.get_running_loop()
            holder = self._reads[key] = loop.create_future()
            holder.add_done_callback(lambda f: self._read_done(key, f))
            line_key = (endpoint.host, endpoint.namespace, task_queue)
            line = self._lines.get(line_key)
            if line is None:
                turns = self._turns.get(line_key[:2])
                if turns is None:
                    turns = self._turns[line_key[:2]] = asyncio.Semaphore(_HISTORY_READS_PER_NAMESPACE)
                line = self._lines[line_key] = _Line(turns)
            line.waiting.append(_Waiting(client, endpoint, wf, holder, loop.time() + self._timeout))
            self._hold(client)  # its connection stays open for the read, though the client be let go
            if line.readers < _HISTORY_READS:
                line.readers += 1
                reader = loop.create_task(self._take_reads(line_key, line))
                self._readers.add(reader)
                reader.add_done_callback(self._readers.discard)
        return holder

    async def _take_reads(self, line_key: tuple[str, str, str], line: _Line) -> None:
        """Reads the holders of a task queue's line, one at a time, until none waits. A run whose turn
        has not come within the timeout is given up: reads of a task queue nobody lists any more do
        not wait behind a slow Temporal for ever."""
        try:
            while line.waiting:
                waiting = line.waiting.popleft()
                try:
                    await self._read_one(line, waiting)
                finally:
                    self._release(waiting.client)
        finally:
            line.readers -= 1
            if not line.readers and self._lines.get(line_key) is line:
                del self._lines[line_key]
                for waiting in line.waiting:  # only when cancelled (close): none is left to read them
                    waiting.holder.cancel()
                    self._release(waiting.client)

    async def _read_one(self, line: _Line, waiting: _Waiting) -> None:
        """Reads the holder of one run of the line, if its turn comes in time; settles its future."""
        if waiting.holder.done():
            return  # cancelled (close)
        try:
            if asyncio.get_running_loop().time() >= waiting.turn_by:
                raise TimeoutError  # a free slot is taken without a wait, so no timeout would come
            async with asyncio.timeout_at(waiting.turn_by):
                await line.turns.acquire()
        except TimeoutError as e:
            _settle(waiting.holder, exception=e)
            return
        self._begun.add(waiting.holder)
        try:
            async with asyncio.timeout(self._timeout * _READ_SECONDS):
                found = await self._holder(waiting.client, waiting.endpoint, waiting.run.id,
                                           waiting.run.run_id, closed=waiting.run.close_time is not None)
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                _settle(waiting.holder, exception=e)
                return
            found = _Holder(None, None)  # gone since it was listed (retention)
        except asyncio.CancelledError:
            waiting.holder.cancel()
            raise
        except Exception as e:
            _settle(waiting.holder, exception=e)
            return
        finally:
            line.turns.release()
        self._note_untaken(waiting.endpoint, waiting.run, found)
        _settle(waiting.holder, found)

    def _note_untaken(self, endpoint: Endpoint, run: _Run, found: _Holder) -> None:
        """Keeps what a read found of a run nobody had taken (for UNTAKEN_REUSE_SECONDS), or forgets it."""
        key = (endpoint.host, endpoint.namespace, run.id, run.run_id)
        self._untaken.pop(key, None)
        self._not_due.pop(key, None)
        if found.identity is not None or found.untaken_at is None:
            return
        capacity = self._holder_capacity()
        if _not_due(found):  # kept until it is due: not read again before then (see _list)
            self._not_due[key] = found
            while len(self._not_due) > capacity:
                self._not_due.popitem(last=False)
            return
        self._untaken[key] = found
        # Read in turn, the oldest come first: those past reuse go, and the most kept is the holders'.
        oldest = time.monotonic() - UNTAKEN_REUSE_SECONDS
        while self._untaken:
            first = next(iter(self._untaken.values()))
            if len(self._untaken) <= capacity and first.asked is not None and first.asked >= oldest:
                break
            self._untaken.popitem(last=False)

    def _read_done(self, key: tuple[str, str, str, str], read: asyncio.Future[_Holder]) -> None:
        self._begun.discard(read)
        if self._reads.get(key) is read:
            del self._reads[key]
        _retrieve(read)

    async def _scan(self, client: Client, endpoint: Endpoint, query: str, *,
                    limit: int | None = None) -> AsyncIterator[_Run]:
        """What the visibility query lists, at most `limit` (the scan limit), read off the wire as it
        comes: the SDK's list_workflows decodes each run's memo and search attributes too, ~4x the CPU,
        and a polled task queue with a long history is 1,000 runs a second on the event loop."""
        token, left = b"", self._scan_limit if limit is None else limit
        while left > 0:
            page = await client.workflow_service.list_workflow_executions(
                ListWorkflowExecutionsRequest(namespace=endpoint.namespace, query=query,
                                              page_size=min(left, 1000), next_page_token=token),
                timeout=datetime.timedelta(seconds=self._timeout))
            for info in page.executions[:left]:
                try:
                    status: WorkflowExecutionStatus | None = WorkflowExecutionStatus(info.status)
                except ValueError:  # unspecified, or newer than this SDK: running, as status_of says
                    status = None
                yield _Run(id=info.execution.workflow_id, run_id=info.execution.run_id, status=status,
                           workflow_type=info.type.name,
                           start_time=info.start_time.ToDatetime(datetime.UTC) if info.HasField("start_time") else None,
                           close_time=info.close_time.ToDatetime(datetime.UTC) if info.HasField("close_time") else None)
            left -= len(page.executions)
            token = page.next_page_token
            if not token:
                break

    def _listed(self, endpoint: Endpoint, task_queue: str) -> None:
        """Notes a listing of the task queue; the holder cache is sized by how many are listed."""
        now = asyncio.get_running_loop().time()
        self._listed_task_queues[(endpoint.host, endpoint.namespace, task_queue)] = now
        if now - self._listed_pruned > 60.0:  # once a minute: 10,000 queues cost no scan per listing
            self._listed_pruned = now
            for listed, when in list(self._listed_task_queues.items()):
                if now - when > HOLDER_QUEUES_SECONDS:
                    del self._listed_task_queues[listed]

    def _holder_capacity(self) -> int:
        wanted = max(self._holder_cache_size, HOLDERS_PER_TASK_QUEUE * len(self._listed_task_queues))
        return min(wanted, max(HOLDER_CACHE_MOST, self._holder_cache_size))

    def _cached_holder(self, endpoint: Endpoint, wf: Any) -> _Holder | None:
        """The run's holder if cached, not touched: no use keeps it cached."""
        return self._holders.get((endpoint.host, endpoint.namespace, wf.id, wf.run_id))

    def _known_holder(self, endpoint: Endpoint, workflow_id: str, run_id: str) -> _Holder | None:
        key = (endpoint.host, endpoint.namespace, workflow_id, run_id)
        cached = self._holders.get(key)
        if cached is not None:
            self._holders.move_to_end(key)
        return cached

    async def _holder(self, client: Client, endpoint: Endpoint, workflow_id: str, run_id: str, *,
                      closed: bool) -> _Holder:
        """The identity and time of the run's first WorkflowTaskStarted (a reset run's first after the
        reset); cached once known for good."""
        key = (endpoint.host, endpoint.namespace, workflow_id, run_id)
        # Asked again: a listing alongside may have read it while this one waited at the gate.
        cached = self._known_holder(endpoint, workflow_id, run_id)
        if cached is not None:
            return cached
        asked_at, asked = time.time(), time.monotonic()  # what the history tells held then at the latest
        found = _Holder(None, None)
        scheduled = False
        due_at: float | None = None
        reset = False
        continues = ""  # the run it continues as new, if it does
        token = b""
        while True:
            page = await client.workflow_service.get_workflow_execution_history(
                GetWorkflowExecutionHistoryRequest(
                    namespace=endpoint.namespace,
                    execution=ProtoExecution(workflow_id=workflow_id, run_id=run_id),
                    maximum_page_size=_HISTORY_PAGE,
                    next_page_token=token,
                ),
                timeout=datetime.timedelta(seconds=self._timeout),
            )
            event = None
            for e in page.history.events:
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                    started = e.workflow_execution_started_event_attributes
                    backoff = started.first_workflow_task_backoff
                    due_at = e.event_time.ToDatetime(datetime.UTC).timestamp() + backoff.ToTimedelta().total_seconds()
                    if started.initiator == ContinueAsNewInitiator.CONTINUE_AS_NEW_INITIATOR_WORKFLOW:
                        continues = continues or started.continued_execution_run_id
                    # A reset run's history up to the reset is the earlier run's, copied, its first
                    # task taken by that run's worker (long gone, maybe): this run's is taken after.
                    reset = started.original_execution_run_id not in ("", run_id)
                elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
                    scheduled = True
                elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED and reset and (
                        (failed := e.workflow_task_failed_event_attributes).cause
                        == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_WORKFLOW
                        and failed.new_run_id == run_id):
                    reset = False  # what follows is this run's own (not a reset of an earlier run, copied too)
                elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and not reset:
                    event = e
                    break
            if event is not None:
                found = _Holder(event.workflow_task_started_event_attributes.identity or None,
                                rfc3339(event.event_time.ToDatetime(datetime.UTC)))
                break
            token = page.next_page_token
            if not token:
                break
        if continues:  # its earlier runs are listed (see _add_chains); not a retry's, nor a cron's
            self._continuing[key] = continues
            while len(self._continuing) > CONTINUING_KEPT:
                self._continuing.popitem(last=False)
        # A run nobody took yet may still be taken; a closed one, or one with a holder, is settled.
        if found.identity is not None or closed:
            self._holders[key] = found
            capacity = self._holder_capacity()
            while len(self._holders) > capacity:
                self._holders.popitem(last=False)
            return found
        return _Holder(None, None, untaken_at=asked_at, asked=asked, scheduled=scheduled,
                       due_at=None if scheduled else due_at)


def _not_due(holder: _Holder) -> bool:
    """Whether the run was read untaken and not due yet, with the clocks' margin to spare."""
    return not holder.scheduled and holder.due_at is not None and holder.due_at > time.time() + UNTAKEN_MARGIN_SECONDS


UNTAKEN_MARGIN_SECONDS = 5.0
"""How far the operator's clock and the Temporal server's may differ (see executions._unsettled)."""
_RUNNING = (WorkflowExecutionStatus.RUNNING, None)
"""Statuses of a run that goes on: None for one this SDK does not know (see status_of)."""
_NOT_OVER = (*_RUNNING, WorkflowExecutionStatus.CONTINUED_AS_NEW)


def _chain_ends(runs_of: dict[str, dict[str, _Run]]) -> dict[tuple[str, str], _Run]:
    """Each continued-as-new run -> the run its chain ends in (or has got to so far). Runs of one
    workflow id never overlap, so each one's successor is the next by start time: one walk back."""
    ends: dict[tuple[str, str], _Run] = {}
    for runs in runs_of.values():
        goes_to: _Run | None = None
        for run in sorted(runs.values(), key=_start_key, reverse=True):
            if run.status == WorkflowExecutionStatus.CONTINUED_AS_NEW:
                goes_to = ends[(run.id, run.run_id)] = goes_to or run
            else:
                goes_to = run
    return ends


def _start_key(wf: Any) -> tuple[datetime.datetime, str]:
    start = wf.start_time or datetime.datetime.min.replace(tzinfo=datetime.UTC)
    return (start, wf.run_id)


def _close_key(wf: Any) -> tuple[datetime.datetime, str]:
    close = wf.close_time or datetime.datetime.min.replace(tzinfo=datetime.UTC)
    return (close, wf.run_id)


def _quote(value: str) -> str:
    """A string literal of Temporal's visibility query language."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _rpc_reason(endpoint: Endpoint, e: RPCError) -> str:
    if e.status in (RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
        return f"Temporal at {endpoint} refused the credentials: {_first_line(e)}"
    if e.status == RPCStatusCode.NOT_FOUND:
        return f"Temporal at {endpoint}: {_first_line(e)}"
    return f"Temporal at {endpoint} failed ({e.status.name if e.status else 'unknown'}): {_first_line(e)}"


_PLAINTEXT_ANSWERS = ("InvalidContentType", "wrong version number", "CorruptMessage")
"""What the SDK's TLS (rustls) says of a server that answers in plaintext: no word of TLS in it."""


def _tls_hint(endpoint: Endpoint, e: BaseException) -> str:
    """A word on TLS when the server answered a TLS handshake in plaintext: TLS is on by default with
    an API key, and a self-hosted server without TLS needs it off."""
    if endpoint.tls and any(marker in str(e) for marker in _PLAINTEXT_ANSWERS):
        return " (its answer is no TLS: set spec.temporal.tls to false for a server without TLS)"
    return ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _finished(task: asyncio.Task[Any], finished: list[float], now: float) -> None:
    finished.append(now)
    _retrieve(task)


def _settle(future: asyncio.Future[_Holder], holder: _Holder | None = None, *,
            exception: BaseException | None = None) -> None:
    if future.done():
        return
    if holder is not None:
        future.set_result(holder)
    else:
        future.set_exception(exception or RuntimeError("no holder"))


def _read_holder(read: asyncio.Future[_Holder], wf: _Run) -> _Holder | None:
    """The read's holder; None if not read (yet) or failed: one read refused, rate-limited say, is one
    holder unknown, not a listing lost."""
    if not read.done() or read.cancelled():
        return None
    exception = read.exception()
    if exception is not None:
        logger.debug("reading the history of %s failed: %s", wf.id,
                     exception.status if isinstance(exception, RPCError) else type(exception).__name__)
        return None
    return read.result()


def _close_client(task_or_client: asyncio.Task[Client] | Client) -> None:
    """Closes a client's connection now. The SDK has no close, and a client and its service client
    refer to each other, so a client let go kept its connection (one fd, ~170 KiB) until a full
    collection of the garbage collector, which may be rare: dropping its bridge client closes it."""
    client = task_or_client
    if isinstance(client, asyncio.Task):
        if not client.done() or client.cancelled() or client.exception() is not None:
            return
        client = client.result()
    service = getattr(getattr(client, "service_client", None), "__dict__", {})
    if service.get("_bridge_client") is not None:
        service["_bridge_client"] = None


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Marks a shared task's exception as seen: its waiters may all have gone."""
    if not task.cancelled():
        task.exception()


__all__ = ["Endpoint", "Execution", "Listing", "Poller", "TaskQueueInfo", "Temporal", "TemporalUnavailable",
           "status_of"]


def _weight(runs: tuple[_Run, ...]) -> int:
    """What a workflow's entry of earlier runs counts towards CHAINED_RUNS_KEPT: one at least (an entry
    of none counted nothing, and one a workflow past retention was kept for good)."""
    return max(len(runs), 1)
