"""What `GET /api/v1/worker-queues/{queue_id}/executions` shows each caller: pure, for unit tests.

The real worker latches onto the FIRST listed execution whose status is running, completed, failed or
waiting_for_input, and exits once that one reads completed, failed or cancelled on two polls in a row
(worker-protocol.md). So a queue-wide list would drain a pool: every worker would latch onto the
first execution anyone ran. A worker therefore sees only the executions it holds (those whose first
workflow task its Temporal identity, `<pid>@<its pod's hostname>`, took), folded into one entry:

- nothing held yet: an empty list, so it keeps waiting for work; so too while an execution made
  before its first was taken may be an earlier one of its own: its holder not read yet, or read as
  nobody before that first was taken;
- otherwise its first execution, whose status stays `running` while ANY execution it holds runs (its
  Temporal worker keeps polling and may take a second workflow before the first ends: it must not be
  led to exit then), or while a running one's holder is not known yet, and is that execution's own
  final status once all are closed (`failed` for `cancelled`, which the worker does not latch onto).

And nothing while the listing may have left running executions out (more run than a scan reads, the
oldest, which workers took first, left out): its first could be among them, or one it still runs.
It waits, and its Temporal worker takes work meanwhile, until the backlog is below the scan again.

Only executions taken since its pod was made count: a queue deleted and made again under the same
queueId names its pods from -w0 again, on a task queue that still lists what the old pods ran.

A worker is told its execution is over only from a listing that read again the runs it shows nobody
has taken (`for_worker`): it may have taken one since an earlier read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from workerqueue_operator.core import temporal
from workerqueue_operator.core.temporal import Endpoint, Execution
from workerqueue_operator.models import times

STATUSES = ("running", "completed", "failed", "cancelled", "waiting_for_input")
FINISHED = ("completed", "failed", "cancelled")
"""What a worker exits on, read on two polls in a row."""


def held_by(execution: Execution, hostname: str, pid: int | None = None) -> bool:
    """Whether the execution's first workflow task was taken by a worker on this host (pod); by that
    process of it when `pid` is known (two workers on one host, outside pods)."""
    if execution.holder is None:
        return False
    if pid is not None:
        return execution.holder == f"{pid}@{hostname}"
    return temporal.host_of(execution.holder) == hostname


def taken_before(execution: Execution, moment: float) -> bool:
    """Whether a worker took the execution before `moment` (epoch seconds): then no pod made since did."""
    if execution.started_at is None:
        return False
    taken = times.parse_or_none(execution.started_at)
    return taken is not None and taken < moment


UNTAKEN_MARGIN_SECONDS = temporal.UNTAKEN_MARGIN_SECONDS
"""How far the operator's clock and the Temporal server's may differ (see _unsettled)."""


def _unsettled(execution: Execution, taken: float) -> bool:
    """Whether the execution, made before `taken` (when a worker took what would be its first), may be
    an earlier one of that worker's though not known as such: its history not read, or read when
    nobody had taken it yet, before `taken` (a worker takes several at once, reads are concurrent).
    Not one that could not be taken before `taken` (its start delayed, a cron run's time to come)."""
    if (times.parse_or_none(execution.created_at) or 0.0) > taken:
        return False
    if execution.holder_unread:
        return True
    if execution.holder is None and execution.due_at is not None and execution.due_at > taken + UNTAKEN_MARGIN_SECONDS:
        return False
    return (execution.holder is None and execution.status == "running" and execution.untaken_at is not None
            and execution.untaken_at <= taken + UNTAKEN_MARGIN_SECONDS)


def queue_view(executions: Sequence[Execution], *, status: str, limit: int) -> list[dict[str, Any]]:
    """Every execution of the queue, newest first, for people and tools (not for workers)."""
    chosen = [e for e in executions if status == "all" or e.status == status]
    return [e.to_json() for e in chosen[:limit]]


def worker_view(executions: Sequence[Execution], *, hostname: str, since: float | None = None,
                pid: int | None = None, cut: bool = False) -> list[dict[str, Any]]:
    """The one entry a worker on `hostname` (its process `pid`, if known) may latch onto (see the
    module's docstring); `since`: when its pod was made (epoch seconds), if known; `cut`: running
    executions may be missing from `executions` (temporal.Listing.cut)."""
    if cut:
        return []
    held = [e for e in executions if held_by(e, hostname, pid) and (since is None or not taken_before(e, since))]
    if not held:
        return []
    first = min(held, key=lambda e: (e.started_at or e.created_at or "", e.id))
    taken = times.parse_or_none(first.started_at or first.created_at)
    if taken is not None and any(_unsettled(e, taken) for e in executions):
        # One not read yet may be an earlier one of its own: shown this one now and that one once read,
        # the worker would wait for the first it saw, which it never sees again.
        return []
    entry = first.to_json()
    # A running execution whose history was not read in time (a burst, a cold cache) may be this
    # worker's: until it is read, what the worker holds is not told finished, or it would exit with
    # that one still running.
    unread = any(e.holder_unread and e.status == "running" for e in executions)
    # One it took that continued as new runs on (its status), but on whichever worker took the next
    # run: as its first, it is what this worker waits for; as a later one, its part of it is over.
    if unread or any(e.status == "running" and (e is first or not e.continued) for e in held):
        entry["status"] = "running"
        entry["completed_at"] = None
    elif entry["status"] == "cancelled":
        # The worker exits on cancelled only once it has latched onto the execution, which cancelled
        # does not do: one cancelled (or terminated) before the worker's first poll saw it run would
        # never end the worker (it waits out its 1,800-s give-up). failed ends it either way.
        entry["status"] = "failed"
    entry["held_executions"] = len({e.id for e in held})  # an execution's earlier run and its newest alike
    return [entry]


async def for_worker(access: temporal.Temporal, endpoint: Endpoint, task_queue: str, *, limit: int, hostname: str,
                     since: float | None = None, pid: int | None = None) -> list[dict[str, Any]]:
    """`worker_view` of the task queue's listing. One that would tell the worker its execution is over
    while it shows a run untaken as an earlier listing read it is listed again, every such run read
    anew: the worker may have taken it since, and would exit with it running. Within one timeout of
    `access` in all: not listed again by then, the execution is told running this time."""
    loop = asyncio.get_running_loop()
    until = loop.time() + access.timeout
    found = await access.executions(endpoint, task_queue, limit=limit, taken_first=True)
    view = worker_view(found, hostname=hostname, since=since, pid=pid, cut=found.cut)
    if found.reused and view and view[0]["status"] in FINISHED:
        try:
            async with asyncio.timeout_at(until):
                found = await access.executions(endpoint, task_queue, limit=limit, taken_first=True, recheck=True)
        except (TimeoutError, temporal.TemporalUnavailable):
            # The listing goes on (shared) for its next poll, two seconds on.
            return [{**view[0], "status": "running", "completed_at": None}]
        view = worker_view(found, hostname=hostname, since=since, pid=pid, cut=found.cut)
    return view
