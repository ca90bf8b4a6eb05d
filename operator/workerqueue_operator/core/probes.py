"""Watches each queue's Temporal task queue, on the active replica: TemporalReachable and
`status.temporal` for every queue, and the demand (backlog, busy pods) that sizes the pods of
scaling queues. The backlog of a scaling queue is read every `backlog_poll_seconds` while it has
work or workers, the interval doubling up to `backlog_idle_poll_seconds` while it has neither; a
changed demand reconciles the queue at once. A suspended single-execution queue's demand (which of
its workers are idle) is read at its reachability checks instead. Status is written only on change
and at most every `temporal_status_seconds` per queue (a reachability change at once).

The worker supervisor (core/supervisor.py) owns a `TemporalProbes` and feeds it what it hears of
queues and of this replica's activity; it asks for a scaling queue's demand when it plans its pods,
is told (`on_demand`) when that demand changed, and tells the number of alive workers of a queue
(`alive`), which keeps a scaling queue's backlog read often.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from workerqueue_operator.core import pace, pacedlog, queues, workers
from workerqueue_operator.core import status as status_
from workerqueue_operator.core import temporal as temporal_
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.pace import Pace
from workerqueue_operator.core.queues import QueueKey, QueueObject
from workerqueue_operator.core.reconciler import queue_ref_body
from workerqueue_operator.core.shares import FairGate
from workerqueue_operator.core.store import Store
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models import spec as spec_

logger = logging.getLogger(__name__)

TEMPORAL_REACHABLE = "TemporalReachable"
_TICK = 0.1
_PROBES = 16  # concurrent Temporal probes: a thousand queues must not dial a thousand connections at once


@dataclass
class _Probe:
    """What this replica knows of one queue's Temporal task queue."""

    target: tuple[object, ...] = ()
    """Endpoint and task queue last probed: a change probes again at once."""
    generation: int = 0
    due: float = 0.0
    interval: float = 0.0
    running: bool = False
    reachable: bool | None = None
    read_generation: int = 0
    """The queue's generation when the check that found `reachable` began: what the condition says."""
    reason: str = ""
    message: str = ""
    endpoint: str = ""
    """The endpoint of the check that found `reachable`, as its message names it."""
    shown: spec_.TemporalStatus | None = None
    """status.temporal as last written here, or as the watch showed it when `shown_known` was unset."""
    shown_known: bool = False
    wanted: spec_.TemporalStatus | None = None
    shown_at: float = float("-inf")
    write_failures: int = 0
    write_after: float = 0.0
    """No status write of the probe's before this (time.monotonic()): the last ones failed, and their
    retries back off rather than follow the probes (every second, for a scaling queue)."""
    flipped_at: float = float("-inf")
    """When this replica last wrote the condition's status changed (time.monotonic()): see FLIP_SECONDS."""
    unresolved_over: tuple[str, str] | None = None
    """The queue's resourceVersion the last Unknown (unresolved) was written over, or refused on, and its
    message: not written again before the watch brings a newer version, or the message changes (with
    the watch down, it was written once a second)."""


def _names(message: str, endpoint: str) -> bool:
    """Whether a TemporalReachable message names `endpoint` ("at host:port/namespace", then a space, a
    colon, a semicolon or its end), not one it is part of (prod-temporal:7233/agents-staging)."""
    return not endpoint or re.search(rf"\bat {re.escape(endpoint)}(?![\w.-])", message) is not None


def _condition_ops(queue: QueueObject, index: int | None, condition: dict[str, Any]) -> list[dict[str, Any]]:
    """JSON-patch ops writing TemporalReachable as `condition`: added, when the queue shows none, only
    onto the queue as seen here (a second probe before the watch brings the first add would add it
    twice: the list is not a map to the API server), tested on its version rather than the list, which
    the API server compares as its own JSON spells it; replaced, since conditions are written by
    others too, only if it is still where it was."""
    if index is None:
        return [{"op": "test", "path": "/metadata/resourceVersion", "value": queue.resource_version},
                {"op": "add", "path": "/status/conditions/-", "value": condition}]
    return [{"op": "test", "path": f"/status/conditions/{index}/type", "value": TEMPORAL_REACHABLE},
            {"op": "replace", "path": f"/status/conditions/{index}", "value": condition}]


def _unresolved_message(resolution: queues.Resolution | None) -> str:
    """TemporalReachable's message while the queue's Temporal cannot be resolved: its own reason, not
    the queue's first (a missing token Secret, which says nothing of its Temporal)."""
    problem = resolution and (resolution.temporal_problem or resolution.problem)
    return f"not checked: the queue's Temporal cannot be resolved ({problem.message if problem else 'not resolved'})"


FLIP_SECONDS = 15.0
"""The least time between two changes of TemporalReachable's status written by a replica: a Temporal
failing every other call (rate limits, a slow scan) made each probe, every second on a scaling queue,
a status write and an Event; and with the watch behind the write, the change was written again at
each probe, its lastTransitionTime moved. The first change after a quiet spell is written at once."""

_LISTED = temporal_.SCAN_LIMIT
"""Running workflows of a scaling queue's task queue listed at each reading: as many as a scan reads."""


def reading(found: Sequence[temporal_.Execution], *, listed: int, read_at: float) -> workers.Demand:
    """A scaling queue's work from its running workflows as listed (at most `listed` of them): those
    no worker has taken yet wait (not one whose first task is not due yet: a cron run, a start delay,
    a retry's back-off, which is counted apart); the hosts of the others' holders are busy."""
    running = [e for e in found if e.status == "running"]
    busy = frozenset(host for e in running if (host := temporal_.host_of(e.holder)) is not None)
    # One whose holder was not read in time may wait too: counted so, not to hold a burst's scale-up
    # back; and it keeps every running pod from going meanwhile.
    waiting = sum(1 for e in running if e.holder is None and not e.delayed)
    delayed = sum(1 for e in running if e.holder is None and e.delayed)
    unread = sum(1 for e in running if e.holder_unread)
    if len(found) >= listed:
        unread += 1  # maybe cut: those left out may be held by any running pod
    return workers.Demand(backlog=waiting, busy=busy, unread=unread, delayed=delayed, read_at=read_at)


STATUS_RETRY_MAX_SECONDS = 60.0
"""The longest wait between tries of a probe's status write that keeps failing."""


def timeline_step(probe: _Probe | None, when: float, *, show: bool) -> Literal["run", "later", "drop"]:
    """What becomes of an entry of the probe timeline that came up at `when`: "drop" when its queue
    is gone or its probe was moved to another time; "later" (the next tick) when it is the probe's
    and the probe, or a write of what it found, is under way: dropped, no probe would come due again
    and the queue's backlog would never be read again (under API-server load a status write takes
    longer than a scaling queue's 1-s interval); a show entry meeting a probe under way is dropped,
    the probe shows what it finds. Else "run"."""
    if probe is None or (not show and when != probe.due):
        return "drop"
    if probe.running:
        return "drop" if show else "later"
    return "run"


def watched_temporal(status: Mapping[str, Any]) -> spec_.TemporalStatus | None:
    """status.temporal as a queue shows it, if any and valid."""
    try:
        return spec_.TemporalStatus.model_validate(status["temporal"])
    except (KeyError, pydantic.ValidationError):
        return None


class TemporalProbes:
    """Each queue's Temporal task queue described on a timeline (see the module's docstring)."""

    def __init__(
        self,
        *,
        store: Store,
        client: client_.KubeClient,
        settings: settings_.Settings,
        events: EventPoster,
        activity: Activity,
        temporal: temporal_.Temporal | None,
        clock: Callable[[], float],
        statuses_behind: Callable[[], bool],
        alive: Callable[[QueueKey], int],
        on_demand: Callable[[QueueKey], None],
    ) -> None:
        self._store = store
        self._statuses_behind = statuses_behind
        self._activity = activity
        self._client = client
        self._events = events
        self._temporal = temporal
        self._alive = alive
        """A queue's pods alive or being made, as the supervisor counted them at its last pass: a
        scaling queue that has some has its backlog read often."""
        self._on_demand = on_demand
        """Told a scaling queue's demand changed (or is no longer fresh): its pods are planned again."""
        self._probes: dict[QueueKey, _Probe] = {}
        self._timeline: list[tuple[float, int, QueueKey, bool]] = []  # a heap: (when, seq, queue, show)
        self._log = pacedlog.PacedLog(logger)
        self._seq = 0
        self._demand: dict[QueueKey, workers.Demand] = {}
        self._epoch = 0
        """Counts the changes of this replica's activity: a reading begun before one is not kept."""
        # Two gates: the reachability checks of many queues (an unreachable Temporal takes the whole
        # timeout) must never hold up the backlog reads that size a scaling queue's pods.
        # Namespaces take turns at each when they are full: 200 scaling queues of one team on a Temporal
        # that never answers held all 16 places for its 4-s timeout, again and again, and other teams'
        # queues read their backlog a minute late.
        self._probe_gate = FairGate(_PROBES)
        self._scaling_gate = FairGate(_PROBES)
        # Reachability checks at a bounded rate, so that Temporal is not asked more with every queue
        # made (10,000 queues every 30 s were 333 calls a second); scaling reads are not held to it.
        # Those due wait their turn in two lines, in order: a queue not checked yet for its spec first
        # (made, its Temporal changed), then the rest.
        self._check_pace = Pace(settings.temporal_checks_per_second)
        self._checks_first: dict[QueueKey, None] = {}
        self._checks_due: dict[QueueKey, None] = {}
        self.reads = {"check": 0, "scaling": 0}
        """Temporal read for a queue, by kind (a metric): a reachability check, a scaling queue's reading."""
        self._settings = settings
        self._clock = clock

    # --- told by the supervisor -----------------------------------------------------------------

    def queue_changed(self, queue: QueueObject) -> None:
        key = queue.key
        probe = self._probes.get(key)
        if probe is not None and probe.generation != queue.generation:
            probe.generation = queue.generation
            # A reading of the spec before (another suspension, scaling since turned off) is not acted on.
            self._demand.pop(key, None)
            self._at(key, probe, 0.0)  # the spec changed (maybe its Temporal)
        elif probe is None:
            self._at(key, self._probes.setdefault(key, _Probe(generation=queue.generation)), 0.0)

    def queue_deleted(self, key: QueueKey) -> None:
        self._probes.pop(key, None)
        self._demand.pop(key, None)

    def store_changed(self, key: QueueKey) -> None:
        probe = self._probes.get(key)
        if probe is not None and probe.target and self._probed_otherwise(key, probe):
            # The Temporal it was probed for is no longer what it resolves to (its key's Secret deleted
            # or changed): looked at now, not at the next check, temporal_check_seconds later, with what
            # that probe found shown meanwhile. One under way (or writing) looks again when it is done.
            self._at(key, probe, 0.0)

    def activity_changed(self, active: bool) -> None:
        # Temporal as read before: the other replica may have run the work since (a scale-up for work
        # done), or work may have come (an ephemeral queue deleted on an old "nothing waits"). Probes
        # under way now store nothing (their epoch is over).
        self._demand.clear()
        self._epoch += 1
        for probe in self._probes.values():
            probe.shown_known = False
        # Made anew: a standby adds nothing to it (it would grow with every queue made meanwhile).
        self._timeline.clear()
        self._checks_first.clear()
        self._checks_due.clear()
        if active:
            for key, probe in self._probes.items():
                self._at(key, probe, probe.due)

    def workers_came(self, key: QueueKey) -> None:
        """The queue has workers again, where it had none: its Temporal is probed now."""
        probe = self._probes.get(key)
        if probe is not None:
            self._at(key, probe, 0.0)

    def demand(self, key: QueueKey) -> workers.Demand | None:
        """A scaling queue's demand as last read, since this replica last became active."""
        return self._demand.get(key)

    # --- Temporal: reachability, status.temporal and the demand of scaling queues ----------------

    def _at(self, key: QueueKey, probe: _Probe, when: float, *, show: bool = False) -> None:
        """Probe the queue's Temporal (or, with `show`, write what the last probe found) at `when`
        (time.monotonic()). Earlier requests stay in the heap and are dropped when they come up."""
        if not show:
            probe.due = when
        if not self._activity.is_active():
            return  # a standby probes nothing: the timeline is made from the probes when it becomes active
        self._seq += 1
        heapq.heappush(self._timeline, (when, self._seq, key, show))

    async def run(self) -> None:
        """Probes what comes due on the timeline, while this replica is the active one."""
        # A heap of what is due when, not a scan of every queue each tick: 10,000 queues cost nothing
        # between their probes.
        tasks: set[asyncio.Task[None]] = set()
        held: list[tuple[float, int, QueueKey, bool]] = []

        def spawn(key: QueueKey, probe: _Probe, work: Coroutine[Any, Any, None]) -> None:
            """Runs a probe's work (a probe, a write of what it found) in the background, the probe
            under way until the work is done."""
            probe.running = True
            task = asyncio.create_task(self._under_way(key, probe, work))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def probe_now(key: QueueKey, probe: _Probe, target: tuple[tuple[object, ...], temporal_.Endpoint, str],
                      *, scaling: bool) -> None:
            if target[0] != probe.target:
                probe.target, probe.interval = target[0], 0.0
            self.reads["scaling" if scaling else "check"] += 1
            spawn(key, probe, self._probe(key, probe, target[1], target[2]))

        try:
            while True:
                await asyncio.sleep(_TICK)
                self._log.settle()
                if not self._activity.is_active():
                    continue  # status and scaling are the active replica's
                # While queues wait for their Ready status (10,000 at start-up), reachability and its
                # writes wait too: only scaling queues, whose pods depend on their backlog, go on.
                hold = self._statuses_behind()
                if not hold:
                    for entry in held:
                        heapq.heappush(self._timeline, entry)
                    held.clear()
                loop_now = time.monotonic()
                timeline = self._timeline
                while timeline and timeline[0][0] <= loop_now:
                    entry = heapq.heappop(timeline)
                    _, _, key, show = entry
                    probe = self._probes.get(key)
                    step = timeline_step(probe, entry[0], show=show)
                    if probe is None or step == "drop":
                        continue
                    if step == "later":
                        self._at(key, probe, loop_now + _TICK)  # after this tick's loop: not spun on now
                        continue
                    scaling = self._scaling(key)
                    if hold and not scaling:
                        held.append(entry)
                        continue
                    if show:
                        if probe.wanted != probe.shown:
                            spawn(key, probe, self._show(key, probe))
                        continue
                    target = self.target(key)
                    if target is None:
                        self._at(key, probe, loop_now + 1.0)  # not resolved yet (e.g. a Secret missing)
                        # What was found of the Temporal the queue named before is no longer so.
                        probe.reachable, probe.target = None, ()
                        if not probe.running and loop_now >= probe.write_after and \
                                self._unresolved_shown_otherwise(key, probe):
                            spawn(key, probe, self._show_unresolved(key, probe))
                        continue
                    if scaling:
                        probe_now(key, probe, target, scaling=True)
                    elif (target[0] != probe.target or probe.interval == 0.0
                          or probe.read_generation != probe.generation):  # not checked yet for what it is
                        self._checks_first[key] = None
                    else:
                        self._checks_due[key] = None
                if not hold:  # those waiting their turn when the hold began wait on too
                    for key, probe, target in self._checks_to_start(loop_now):
                        probe_now(key, probe, target, scaling=False)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _checks_to_start(self, now: float) -> Iterator[tuple[QueueKey, _Probe, tuple[tuple[object, ...],
                                                                                     temporal_.Endpoint, str]]]:
        """The reachability checks waiting their turn that the pace lets start now, first ones first."""
        for waiting in (self._checks_first, self._checks_due):
            while waiting:
                key = next(iter(waiting))
                probe = self._probes.get(key)
                target = self.target(key) if probe is not None else None
                if probe is None or probe.due > now or probe.running or target is None:
                    # Gone; checked since (its next check is on the timeline); a write of what it found
                    # under way; its Temporal no longer resolved: back to the timeline, nothing taken.
                    del waiting[key]
                    if probe is not None and probe.due <= now:
                        self._at(key, probe, now + _TICK)
                    continue
                if not self._check_pace.take(now):
                    return
                del waiting[key]
                yield key, probe, target

    def _probed_otherwise(self, key: QueueKey, probe: _Probe) -> bool:
        """Whether the queue's Temporal resolves to another target than the one last probed (or to none)."""
        target = self.target(key)
        return (target[0] if target is not None else ()) != probe.target

    def _unresolved_shown_otherwise(self, key: QueueKey, probe: _Probe) -> bool:
        """Whether the queue, its Temporal not resolved, shows TemporalReachable as anything but Unknown
        for its generation (or not at all, once the queue's other conditions are written)."""
        queue = self._store.queue(key)
        resolution = self._store.resolution(key)
        if queue is None or resolution is None or resolution.awaiting_generated_token or (
                resolution.problem is not None and resolution.problem.reason == "SecretPending"):
            return False  # for a moment only (a Secret not read yet, a token being made): no flap
        message = _unresolved_message(resolution)
        if probe.unresolved_over == (queue.resource_version, message):
            return False  # written over this version, or refused on it: what came of it is not seen yet
        conditions = queue.status.get("conditions") or []
        current = next((c for c in conditions if c.get("type") == TEMPORAL_REACHABLE), None)
        if current is None:
            return bool(conditions)  # after the queue's first status (its Ready says why), not before
        return bool(current.get("status") != "Unknown" or current.get("observedGeneration") != queue.generation
                    or current.get("message") != message)

    async def _show_unresolved(self, key: QueueKey, probe: _Probe) -> None:
        """TemporalReachable turns Unknown while the queue's Temporal cannot be resolved (its key's
        Secret gone, its host taken out of the spec): `True Reachable` of the Temporal it named before
        would stay for as long, under an older generation. Ready says why. A new queue whose Temporal
        never resolved shows it Unknown too, rather than not at all."""
        try:
            queue = self._store.queue(key)
            resolution = self._store.resolution(key)
            if queue is None or not self._activity.is_active():
                return
            conditions: list[dict[str, Any]] = list(queue.status.get("conditions") or [])
            index = next((i for i, c in enumerate(conditions) if c.get("type") == TEMPORAL_REACHABLE), None)
            if index is None and not conditions:
                return
            condition = status_.set_condition(
                [conditions[index]] if index is not None else [], type=TEMPORAL_REACHABLE, status="Unknown",
                reason="TemporalNotResolved", message=_unresolved_message(resolution),
                generation=queue.generation, now=resources.now_rfc3339())[0]
            try:
                await self._client.patch(f"{resources.queue_path(queue.namespace, queue.name)}/status",
                                         _condition_ops(queue, index, condition),
                                         content_type=client_.JSON_PATCH)
            except client_.ApiError as exc:
                if not (exc.not_found or exc.status == 422):
                    raise  # gone, or the conditions moved: looked at again once the watch brings it
            probe.unresolved_over = (queue.resource_version, condition["message"])
            probe.write_failures, probe.write_after = 0, 0.0
        except client_.ERRORS as exc:
            self._status_write_failed(key, probe, exc)

    def _status_write_failed(self, key: QueueKey, probe: _Probe, exc: Exception) -> None:
        """A status write of the probe's failed: the next waits, doubling from 2 s to a minute."""
        probe.write_failures += 1
        wait = pace.doubling(probe.write_failures, 2.0, STATUS_RETRY_MAX_SECONDS)
        probe.write_after = time.monotonic() + wait
        self._log.warning("temporal_status_failed", "writing the Temporal status of %s/%s failed, again in %.0fs: %s",
                          key[0], key[1], wait, exc)

    def _scaling(self, key: QueueKey) -> bool:
        queue = self._store.queue(key)
        return queue is not None and workers.scales(queue.spec)

    def target(self, key: QueueKey) -> tuple[tuple[object, ...], temporal_.Endpoint, str] | None:
        resolution = self._store.resolution(key)
        target = resolution.probe_target if resolution is not None else None
        if self._temporal is None or target is None:
            return None
        return (target.endpoint.key, target.task_queue), target.endpoint, target.task_queue

    async def _probe(self, key: QueueKey, probe: _Probe, endpoint: temporal_.Endpoint, task_queue: str) -> None:
        assert self._temporal is not None
        generation, epoch = probe.generation, self._epoch
        queue = self._store.queue(key)
        scaling = queue is not None and workers.scales(queue.spec)
        # A suspended single-execution queue's busy workers are read too (its idle ones go), at the
        # pace of the reachability checks: a backlog piling up while it is suspended is no reason to
        # read it every second, for as long as the suspension lasts.
        reads = queue is not None and workers.reads_demand(queue.spec)
        demand: workers.Demand
        try:
            async with (self._scaling_gate if scaling else self._probe_gate).turn(key[0]):
                # As of when Temporal is asked, not when it has answered: a workflow that came in
                # between may be missing from what it tells.
                read_at = self._clock()
                info = await self._temporal.describe_task_queue(endpoint, task_queue)
                if reads:
                    # Temporal's backlog statistic is cached by the server for seconds (a scale-up would
                    # wait ~5 s for it); the running workflows that no worker has taken yet are known
                    # at once, and so is who holds the others.
                    found = await self._temporal.executions(endpoint, task_queue, limit=_LISTED, running=True,
                                                            fresh=True)
                    demand = reading(found, listed=_LISTED, read_at=read_at)
                else:  # status shows the server's statistic, as `temporal task-queue describe` would
                    demand = workers.Demand(backlog=info.backlog or 0, read_at=read_at)
            probe.reachable, probe.reason, probe.read_generation = True, "Reachable", generation
            probe.message, probe.endpoint = f"the task queue {task_queue} was described at {endpoint}", str(endpoint)
            probe.wanted = spec_.TemporalStatus(pollers=len(info.pollers), backlog=info.backlog,
                                                busy=len(demand.busy) if reads else None)
        except temporal_.TemporalUnavailable as exc:
            demand = workers.Demand(backlog=None)
            probe.reachable, probe.reason, probe.message = False, "TemporalUnavailable", str(exc)
            probe.read_generation, probe.endpoint = generation, str(endpoint)
            queue = self._store.queue(key)
            if queue is not None and queues.default_temporal_key_withheld(queue.spec, self._settings):
                probe.message += ("; the operator's default Temporal API key is not sent to a queue's own host, "
                                  "nor without TLS: name one in spec.temporal.apiKeySecretRef")
        except Exception:
            logger.exception("probing the Temporal of %s/%s failed", *key)
            demand = workers.Demand(backlog=None)
        s = self._settings
        if not scaling:
            probe.interval = s.temporal_check_seconds
        elif (demand.backlog or 0) > 0 or self._alive(key):
            probe.interval = s.backlog_poll_seconds
        else:
            probe.interval = min(max(probe.interval * 2, s.backlog_poll_seconds), s.backlog_idle_poll_seconds)
        # The spec changed while this check ran (its Temporal key, say), or its Temporal resolves
        # otherwise now (its key's Secret deleted): the check that change asked for (queue_changed,
        # _store_changed) is this one's next, made now rather than an interval later.
        moved = probe.generation != generation or self._probed_otherwise(key, probe)
        self._at(key, probe, time.monotonic() + (0.0 if moved else probe.interval))
        # Nor for a queue deleted meanwhile, nor of a spec changed meanwhile (read again at once: moved).
        if reads and self._probes.get(key) is probe and self._epoch == epoch and probe.generation == generation:
            before = self._demand.get(key)
            self._demand[key] = demand  # kept fresh even when unchanged: the plan acts on fresh readings only
            if before is None or before != demand or not before.fresh(self._clock()):
                self._on_demand(key)
        await self._show(key, probe)

    async def _under_way(self, key: QueueKey, probe: _Probe, work: Coroutine[Any, Any, None]) -> None:
        """A probe's work, the probe under way until it ends, however it ends: left under way, its
        queue would never be probed again."""
        try:
            await work
        except Exception:  # a bug: told, and the queue probed again later rather than never
            logger.exception("the Temporal probe of %s/%s failed", *key)
            if self._probes.get(key) is probe:
                self._at(key, probe, time.monotonic() + max(probe.interval, 1.0))
        finally:
            probe.running = False

    async def _show(self, key: QueueKey, probe: _Probe) -> None:
        """Writes the condition when it differs from what the queue shows, and status.temporal when
        it changed and the last write is old enough."""
        try:
            queue = self._store.queue(key)
            if queue is None or probe.reachable is None or not self._activity.is_active():
                return  # a probe begun before a stand-down writes nothing, nor takes the watch's copy as ours
            if self._probes.get(key) is not probe:
                return  # its queue deleted (and maybe made again) meanwhile: what it found is not this one's
            if time.monotonic() < probe.write_after:  # the last writes failed: not at every probe
                self._at(key, probe, probe.write_after, show=True)
                return
            shown = queue.status
            if not probe.shown_known:
                # At start and after a standby spell the queue shows what another replica wrote: kept
                # as ours, a reading equal to ours no longer written, one differing from it never was.
                probe.shown, probe.shown_known = watched_temporal(shown), True
            conditions: list[dict[str, Any]] = list(shown.get("conditions") or [])
            status = "True" if probe.reachable else "False"
            index = next((i for i, c in enumerate(conditions) if c.get("type") == TEMPORAL_REACHABLE), None)
            current = conditions[index] if index is not None else None
            generation = probe.read_generation or queue.generation  # what the check was made for
            ops: list[dict[str, Any]] = []
            loop_now = time.monotonic()
            flips = current is not None and current.get("status") != status
            held = flips and loop_now - probe.flipped_at < FLIP_SECONDS
            if held:
                self._at(key, probe, probe.flipped_at + FLIP_SECONDS, show=True)  # what is found then
            # Another endpoint than the condition names (the operator's default host changed, which no
            # generation tells): its message would name a host no longer asked.
            elsewhere = current is not None and not _names(str(current.get("message") or ""), probe.endpoint)
            if conditions and not held and (
                    current is None or flips or current.get("reason") != probe.reason or elsewhere
                    or current.get("observedGeneration") != generation):
                condition = status_.set_condition(
                    [current] if current else [], type=TEMPORAL_REACHABLE, status=status, reason=probe.reason,
                    message=probe.message, generation=generation, now=resources.now_rfc3339())[0]
                ops += _condition_ops(queue, index, condition)
            writes_condition = bool(ops)  # the numbers come next
            wanted = probe.wanted if probe.reachable else probe.shown
            show_numbers = wanted is not None and wanted != probe.shown and (
                loop_now - probe.shown_at >= self._settings.temporal_status_seconds)
            if wanted is not None and wanted != probe.shown and not show_numbers:
                self._at(key, probe, probe.shown_at + self._settings.temporal_status_seconds, show=True)
            if show_numbers and wanted is not None:
                ops.append({"op": "add", "path": "/status/temporal",
                            "value": wanted.model_dump(by_alias=True, mode="json", exclude_none=True)})
            if not ops:
                return
            try:
                await self._client.patch(f"{resources.queue_path(queue.namespace, queue.name)}/status", ops,
                                         content_type=client_.JSON_PATCH)
            except client_.ApiError as exc:
                if not (exc.not_found or exc.status == 422):
                    raise
                return  # gone, or the conditions moved: the next probe tries again
            probe.write_failures, probe.write_after = 0, 0.0
            if writes_condition and flips:
                probe.flipped_at = loop_now
            if show_numbers:
                probe.shown, probe.shown_at = wanted, loop_now
            if writes_condition and ((current is None and not probe.reachable) or flips):
                self._events.post(involved=queue_ref_body(queue), reason=probe.reason,
                                  message=probe.message if not probe.reachable else "Temporal is reachable",
                                  warning=not probe.reachable)
        except client_.ERRORS as exc:
            self._status_write_failed(key, probe, exc)
