"""Backlog-driven scaling (spec.scaling) in the pure planner: explicit times and demand, no sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.unit.factories import queue, queue_body
from workerqueue_operator.core import probes, queues, supervisor, temporal, workers
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.store import Store
from workerqueue_operator.core.workers import Demand, Pod
from workerqueue_operator.models import times
from workerqueue_operator.models.settings import Settings
from workerqueue_operator.models.spec import WorkersStatus

T0 = 1_800_000_000.0
SETTINGS = Settings(scale_down_grace_seconds=30)


def pod(index: int, phase: str = "Running", **kwargs: Any) -> Pod:
    kwargs.setdefault("ended", phase in ("Succeeded", "Failed"))
    return Pod(name=f"q1-w{index}", phase=phase, deleting=False, index=index, **kwargs)


def plan(pods: list[Pod], demand: Demand | None, previous: WorkersStatus | None = None, now: float = T0,
         min_idle: int = 0, max_: int = 5, **spec: Any) -> workers.Plan:
    spec = {"singleExecution": True, "scaling": {"minIdle": min_idle, "max": max_}, **spec}
    return workers.plan(queue(**spec), pods, previous=previous or WorkersStatus(), now=now, created=T0 - 100,
                        settings=SETTINGS, demand=demand)


def busy(*indices: int) -> frozenset[str]:
    return frozenset(f"q1-w{i}" for i in indices)


def test_an_idle_queue_with_min_idle_0_runs_nothing():
    p = plan([], Demand(backlog=0))
    assert (p.workers.desired, p.create, p.delete, p.events) == (0, (), (), ())


def test_backlog_scales_up_capped_by_max_with_an_event_giving_the_numbers():
    p = plan([], Demand(backlog=10))
    assert p.workers.desired == 5 and p.create == (0, 1, 2, 3, 4)
    (event,) = [e for e in p.events if e.reason == "ScaledUp"]
    assert event.message.startswith("desired workers 0 -> 5: backlog 10, busy 0, minIdle 0 (max 5")


def test_max_workers_caps_scaling_too():
    assert plan([], Demand(backlog=10), maxWorkers=3).workers.desired == 3


def test_desired_is_busy_plus_min_idle_plus_backlog():
    p = plan([pod(0), pod(1), pod(2)], Demand(backlog=1, busy=busy(0, 1)), min_idle=1, max_=10)
    assert p.workers.desired == 4 and p.create == (3,)


def test_pending_pods_are_capacity_that_is_coming_no_double_creation():
    previous = WorkersStatus(desired=3, next_index=3)
    p = plan([pod(0, "Pending"), pod(1, "Pending"), pod(2, "")], Demand(backlog=3), previous)
    assert p.create == () and p.workers.desired == 3 and p.workers.pending == 3
    assert not p.events  # the same decision again is no news


def test_failed_pods_are_never_capacity_no_stuck_scale_up():
    previous = WorkersStatus(desired=2, next_index=2)
    p = plan([pod(0, "Failed", exit_code=1), pod(1)], Demand(backlog=2), previous)
    assert p.kept == "q1-w0"  # the failed pod is kept for its logs, and is not counted as a worker
    assert p.workers.desired == 2
    # Its replacement waits for the back-off, like any failed worker's; then it comes.
    later = plan([pod(0, "Failed", exit_code=1), pod(1)], Demand(backlog=2), p.workers, now=T0 + 11)
    assert later.create == (2,)


def test_busy_workers_are_never_deleted_even_after_the_grace_period():
    previous = WorkersStatus(desired=3, next_index=3, surplus_since=times.rfc3339(T0 - 60))
    p = plan([pod(0), pod(1), pod(2)], Demand(backlog=0, busy=busy(0, 1, 2)), previous)
    assert p.delete == () and p.workers.desired == 3


@pytest.mark.parametrize("text", ["yesterday", "", "2026-01-01T00:00:60Z"])
def test_a_surplus_since_that_is_no_time_begins_the_grace_now(text: str):
    """The schema takes any string there (a hand edit): read strictly, every pass of the queue failed."""
    previous = WorkersStatus(desired=3, next_index=3, surplus_since=text)
    p = plan([pod(0), pod(1), pod(2)], Demand(backlog=0, busy=busy(0)), previous)
    assert p.delete == () and p.workers.surplus_since == times.rfc3339(T0)
    assert p.requeue_after == SETTINGS.scale_down_grace_seconds
    later = plan([pod(0), pod(1), pod(2)], Demand(backlog=0, busy=busy(0)), p.workers,
                 now=T0 + SETTINGS.scale_down_grace_seconds)
    assert later.delete == ("q1-w2", "q1-w1")


def test_a_busy_worker_is_known_by_its_pods_hostname_also_when_that_is_not_the_pods_name():
    name = "long-" + "q" * 57
    pods = [Pod(name=workers.pod_name(name, i), phase="Running", deleting=False, index=i) for i in (0, 1)]
    previous = WorkersStatus(desired=2, next_index=2, surplus_since=times.rfc3339(T0 - 60))
    demand = Demand(backlog=0, busy=frozenset({workers.pod_hostname(pods[0].name)}))
    p = workers.plan(queue(name=name, singleExecution=True, scaling={"minIdle": 0, "max": 5}), pods,
                     previous=previous, now=T0, created=T0 - 100, settings=SETTINGS, demand=demand)
    assert p.delete == (pods[1].name,) and p.workers.desired == 1


def test_a_busy_worker_is_known_by_the_hostname_its_pod_was_given():
    # A queue on a named task queue gives its pods hostnames of their own (workers.worker_hostname).
    pods = [pod(0, hostname="q1-w0-0123456789"), pod(1, hostname="q1-w1-9876543210")]
    previous = WorkersStatus(desired=2, next_index=2, surplus_since=times.rfc3339(T0 - 60))
    p = plan(pods, Demand(backlog=0, busy=frozenset({"q1-w0-0123456789"})), previous)
    assert p.delete == ("q1-w1",) and p.workers.desired == 1


def test_an_execution_whose_worker_pod_is_gone_keeps_a_worker_and_no_running_pod_is_taken_for_idle():
    # q1-w0 took it and is gone (OOM-killed, evicted, deleted) while it ran: Temporal hands it on to
    # another worker, which shows as idle (it did not take it first). Counted neither busy nor
    # backlog, it got no replacement worker at all, and the pod that took it on was deleted as idle.
    orphan = Demand(backlog=0, busy=busy(0))
    alone = plan([], orphan, WorkersStatus(desired=1, next_index=1))
    assert alone.workers.desired == 1 and alone.create == (1,)
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=times.rfc3339(T0 - 60))
    p = plan([pod(1), pod(2)], orphan, previous)
    assert p.workers.desired == 1 and p.delete == ()
    starting = plan([pod(1), pod(2, "Pending")], orphan, previous)
    assert starting.delete == ("q1-w2",)  # one not started yet cannot have taken it on
    gone = plan([pod(1), pod(2)], Demand(backlog=0), p.workers, now=T0 + 60)  # it ended: idle from now on
    assert gone.workers.desired == 0 and gone.delete == () and gone.workers.surplus_since is not None


def test_while_a_running_executions_holder_is_unknown_no_running_pod_is_taken_for_idle():
    """Temporal did not tell in time who holds a running execution: any running pod may, so none
    goes, however long the surplus has lasted; a pod not started yet may."""
    unread = Demand(backlog=0, unread=1)
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=times.rfc3339(T0 - 600))
    assert plan([pod(1), pod(2)], unread, previous, min_idle=1).delete == ()
    assert plan([pod(1), pod(2, "Pending")], unread, previous, min_idle=1).delete == ("q1-w2",)
    assert plan([pod(1), pod(2)], Demand(backlog=0), previous, min_idle=1).delete == ("q1-w2",)  # all read: idle


def test_an_unanswered_activity_check_at_the_end_of_the_grace_keeps_the_grace_and_tries_again_soon():
    """Temporal did not tell which pods run an activity when the grace ended: none goes that time,
    and the next try comes seconds later, not after a whole grace begun again."""
    since = times.rfc3339(T0 - 30)  # the grace (30 s here) ends now
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=since)
    unknown = plan([pod(1), pod(2)], Demand(backlog=0, activities_unknown=True), previous)
    assert unknown.delete == () and unknown.workers.surplus_since == since
    assert unknown.requeue_after is not None and unknown.requeue_after <= workers.UNSURE_RETRY_SECONDS
    told = plan([pod(1), pod(2)], Demand(backlog=0), unknown.workers, now=T0 + workers.UNSURE_RETRY_SECONDS)
    assert told.delete == ("q1-w2", "q1-w1")


def test_activity_checks_that_go_on_unanswered_are_tried_less_and_less_often():
    """Each is a call per running workflow, and goes unanswered when Temporal is slow: every 5 s
    for as long as that lasted, they added to its load."""
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=times.rfc3339(T0 - 30))
    waits = []
    now = T0
    for _ in range(6):
        p = plan([pod(1), pod(2)], Demand(backlog=0, activities_unknown=True, read_at=now), previous, now=now)
        assert p.delete == () and p.requeue_after is not None
        waits.append(p.requeue_after)
        now += p.requeue_after
    assert waits == [5, 5, 10, 20, 30, 30]  # doubling, up to the grace


def test_a_reading_aged_by_a_long_activity_check_keeps_the_grace():
    """The plan after the check judges the reading's age anew: past 5 s, no running pod goes, and
    the grace that had passed was begun again, with no retry but the 30-s resync."""
    since = times.rfc3339(T0 - 30)
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=since)
    aged = plan([pod(1), pod(2)], Demand(backlog=0, read_at=T0 - 6), previous)
    assert aged.delete == () and aged.workers.surplus_since == since
    assert aged.requeue_after == workers.UNSURE_RETRY_SECONDS
    assert plan([pod(1), pod(2)], Demand(backlog=0, read_at=T0 + 5), aged.workers, now=T0 + 5).delete == (
        "q1-w2", "q1-w1")


def test_no_running_pod_is_taken_for_idle_on_a_reading_seconds_old():
    """A reading still fresh enough to size the queue (under 30 s) may predate a workflow a pod took:
    only a recent one (5 s) lets a running pod go."""
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=times.rfc3339(T0 - 600))
    old = Demand(backlog=0, read_at=T0 - 10)
    assert plan([pod(1), pod(2)], old, previous, min_idle=1).delete == ()
    assert plan([pod(1), pod(2, "Pending")], old, previous, min_idle=1).delete == ("q1-w2",)
    assert plan([pod(1), pod(2)], Demand(backlog=0, read_at=T0 - 4), previous, min_idle=1).delete == ("q1-w2",)


def test_a_pod_running_an_activity_is_not_taken_for_idle_nor_counted_in_the_desired_workers():
    """Activities run on any worker: one running on a pod keeps that pod, and only it; the desired
    count follows the workflows, so an identity of a pod long gone scales nothing up."""
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=times.rfc3339(T0 - 600))
    active = Demand(backlog=0, active=frozenset({"q1-w2", "q1-w9"}))
    p = plan([pod(1), pod(2)], active, previous)
    assert p.delete == ("q1-w1",) and p.workers.desired == 0 and p.create == ()
    assert plan([pod(1), pod(2)], Demand(backlog=0), previous).delete == ("q1-w2", "q1-w1")


def test_idle_workers_above_min_idle_go_only_after_the_grace_period():
    pods = [pod(0), pod(1), pod(2), pod(3)]
    demand = Demand(backlog=0, busy=busy(0))
    first = plan(pods, demand, WorkersStatus(desired=4, next_index=4), min_idle=1)
    assert first.workers.desired == 2 and first.delete == ()
    assert first.workers.surplus_since == times.rfc3339(T0)
    assert first.requeue_after == 30
    assert [e.reason for e in first.events] == ["ScaledDown"]
    assert "busy 1, minIdle 1" in first.events[0].message

    still = plan(pods, demand, first.workers, now=T0 + 29, min_idle=1)
    assert still.delete == () and still.requeue_after == 1

    due = plan(pods, demand, first.workers, now=T0 + 30, min_idle=1)
    assert set(due.delete) == {"q1-w3", "q1-w2"}  # two idle ones; the busy q1-w0 and one idle stay
    assert due.workers.surplus_since is None


def test_the_grace_period_starts_again_when_work_comes_back():
    pods = [pod(0), pod(1)]
    first = plan(pods, Demand(backlog=0), WorkersStatus(desired=2, next_index=2))
    assert first.workers.surplus_since is not None
    busy_again = plan(pods, Demand(backlog=0, busy=busy(0, 1)), first.workers, now=T0 + 10)
    assert busy_again.workers.surplus_since is None and busy_again.delete == ()
    idle_again = plan(pods, Demand(backlog=0), busy_again.workers, now=T0 + 35)
    assert idle_again.delete == () and idle_again.workers.surplus_since == times.rfc3339(T0 + 35)


def test_pending_idle_pods_go_before_running_ones():
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=times.rfc3339(T0 - 30))
    p = plan([pod(0), pod(1), pod(2, "Pending")], Demand(backlog=0), previous, min_idle=2)
    assert p.delete == ("q1-w2",)


def test_min_idle_keeps_idle_workers():
    p = plan([pod(0), pod(1)], Demand(backlog=0), WorkersStatus(desired=2, next_index=2),
             now=T0 + 3600, min_idle=2)
    assert p.workers.desired == 2 and p.delete == () and p.create == ()


def test_unknown_backlog_changes_nothing():
    previous = WorkersStatus(desired=3, next_index=3, surplus_since=times.rfc3339(T0 - 60))
    p = plan([pod(0)], Demand(backlog=None), previous)
    assert p.workers.desired == 3 and p.delete == () and not [e for e in p.events if e.reason.startswith("Scaled")]
    assert p.create == (3, 4)  # workers that ended are still replaced up to the last known count
    assert p.workers.surplus_since is None
    assert plan([], None).workers.desired == 0  # nothing known yet: nothing started


def test_scaling_takes_precedence_over_replicas():
    assert plan([], Demand(backlog=0), replicas=4).workers.desired == 0


def test_an_ephemeral_scaling_queue_lives_until_it_has_worked_then_keeps_its_ttl():
    idle = plan([], Demand(backlog=0), ephemeral=True, ttlSecondsAfterFinished=10)
    assert idle.delete_queue is None and idle.workers.finished_time is None
    worked = WorkersStatus(succeeded=3, next_index=3)
    done = plan([], Demand(backlog=0), worked, ephemeral=True, ttlSecondsAfterFinished=10)
    assert done.workers.finished_time == times.rfc3339(T0) and done.requeue_after == 10
    gone = plan([], Demand(backlog=0), done.workers, now=T0 + 10, ephemeral=True, ttlSecondsAfterFinished=10)
    assert gone.delete_queue is not None and gone.delete_queue.reason == "QueueFinished"


def test_an_ephemeral_scaling_queue_whose_workers_never_exit_finishes_once_its_work_is_done():
    """Workers that take several workflows (no singleExecution) never exit by themselves: once the
    work is done they leave as idle, which is no success. Counted on successes alone, the queue never
    finished, and lived on for good."""
    spec = {"ephemeral": True, "singleExecution": False, "ttlSecondsAfterFinished": 10}
    started = plan([], Demand(backlog=1), **spec)
    assert started.create == (0,)
    working = plan([pod(0)], Demand(backlog=0, busy=busy(0)), started.workers, now=T0 + 1, **spec)
    assert working.delete == () and working.workers.finished_time is None
    idle = plan([pod(0)], Demand(backlog=0), working.workers, now=T0 + 2, **spec)
    gone = plan([pod(0)], Demand(backlog=0), idle.workers, now=T0 + 2 + SETTINGS.scale_down_grace_seconds, **spec)
    assert gone.delete == ("q1-w0",)
    finished = plan([], Demand(backlog=0), gone.workers, now=T0 + 40, **spec)
    assert finished.workers.succeeded == 0 and finished.workers.finished_time == times.rfc3339(T0 + 40)
    assert plan([], Demand(backlog=0), finished.workers, now=T0 + 50, **spec).delete_queue is not None


def test_an_ephemeral_scaling_queue_scales_up_to_its_max_and_keeps_its_deadline():
    p = plan([], Demand(backlog=8), ephemeral=True, max_=3)
    assert p.create == (0, 1, 2)
    late = plan([pod(0)], Demand(backlog=8), p.workers, now=T0 + 1000, ephemeral=True, max_=3,
                activeDeadlineSeconds=100)
    assert late.delete_queue is not None and late.delete_queue.reason == "DeadlineExceeded" and late.create == ()


def test_a_probe_that_comes_due_while_it_is_under_way_is_tried_again_never_lost():
    """A status write slower than the probe's interval (a loaded API server) used to drop the probe's
    only timeline entry: that queue's backlog was never read again."""
    probe = probes._Probe(due=10.0)
    assert probes.timeline_step(probe, 10.0, show=False) == "run"
    probe.running = True
    assert probes.timeline_step(probe, 10.0, show=False) == "later"
    assert probes.timeline_step(probe, 10.0, show=True) == "drop"  # the probe shows what it finds
    assert probes.timeline_step(probe, 9.0, show=False) == "drop"  # moved to another time since
    assert probes.timeline_step(None, 10.0, show=False) == "drop"  # its queue is gone


def test_a_stale_reading_scales_neither_way():
    # Read 31 s ago (Temporal not read since: a Secret gone, a standby, scaling off): a worker that
    # took a workflow meanwhile would look idle, and be deleted.
    previous = WorkersStatus(desired=1, next_index=2, surplus_since=times.rfc3339(T0 - 60))
    stale = Demand(backlog=1, read_at=T0 - workers.DEMAND_STALE_SECONDS - 1)
    p = plan([pod(0), pod(1)], stale, previous)
    assert p.delete == () and p.workers.desired == 1 and p.workers.surplus_since is None
    fresh = Demand(backlog=1, read_at=T0 - 1)
    assert plan([pod(0), pod(1)], fresh, previous).delete == ("q1-w1",)
    assert stale == fresh  # the same reading: when it was made is no change


def test_a_grace_begun_before_scaling_was_turned_off_does_not_count_when_it_is_back():
    previous = WorkersStatus(desired=1, next_index=2, surplus_since=times.rfc3339(T0 - 600))
    off = workers.plan(queue(singleExecution=True, replicas=2), [pod(0), pod(1)], previous=previous, now=T0,
                       created=T0 - 1000, settings=SETTINGS)
    assert off.workers.surplus_since is None
    back = plan([pod(0), pod(1)], Demand(backlog=0), off.workers, now=T0 + 1)
    assert back.delete == () and back.workers.surplus_since is not None


def test_an_ephemeral_scaling_queue_that_works_again_counts_its_ttl_from_its_next_finish():
    finished = WorkersStatus(succeeded=1, next_index=1, finished_time=times.rfc3339(T0 - 500))
    again = plan([], Demand(backlog=1), finished, ephemeral=True, ttlSecondsAfterFinished=600)
    assert again.create == (1,) and again.workers.finished_time is None
    done = plan([pod(1, "Succeeded")], Demand(backlog=0), again.workers, now=T0 + 200, ephemeral=True,
                ttlSecondsAfterFinished=600)
    assert done.delete_queue is None and done.workers.finished_time == times.rfc3339(T0 + 200)


def test_a_finished_queue_is_not_deleted_at_its_ttl_while_temporal_cannot_say_what_waits():
    """Work may have come back during the TTL: with Temporal unreachable, or not read yet since a
    restart or a handover, the queue was deleted at its TTL and the workflow waited with no worker."""
    finished = WorkersStatus(succeeded=1, next_index=1, finished_time=times.rfc3339(T0 - 600))
    # Nor on a reading of 25 s ago, fresh enough to size the queue: not to delete it for good.
    for unknown in (None, Demand(backlog=None), Demand(backlog=0, read_at=T0 - 3600)):
        held = plan([], unknown, finished, ephemeral=True, ttlSecondsAfterFinished=300)
        assert held.delete_queue is None and held.requeue_after is None  # the next reading plans it again
    # Readings come, alike (the probe requeues a queue on a change only): planned again soon.
    held = plan([], Demand(backlog=0, read_at=T0 - 25), finished, ephemeral=True, ttlSecondsAfterFinished=300)
    assert held.delete_queue is None and held.requeue_after == SETTINGS.backlog_idle_poll_seconds
    known = plan([], Demand(backlog=0, read_at=T0 - 1), finished, ephemeral=True, ttlSecondsAfterFinished=300)
    assert known.delete_queue is not None and known.delete_queue.reason == "QueueFinished"


def execution(id_: str, status: str = "running", holder: str | None = None, unread: bool = False,
              delayed: bool = False):
    from workerqueue_operator.core.temporal import Execution

    return Execution(id=id_, run_id="r", status=status, workflow_type="AgentExecutionWorkflow", created_at=None,
                     started_at=None, completed_at=None, holder=holder, holder_unread=unread, delayed=delayed)


def test_a_reading_counts_what_waits_and_who_is_busy():
    found = [execution("a", holder="7@q1-w0"), execution("b"), execution("c", unread=True), execution("d", "completed"),
             execution("e", delayed=True)]  # a cron run not due yet: no worker can take it
    demand = probes.reading(found, listed=1000, read_at=T0)
    assert (demand.backlog, demand.busy, demand.unread, demand.read_at) == (2, frozenset({"q1-w0"}), 1, T0)


def test_a_listing_that_may_be_cut_leaves_no_running_pod_idle_for_sure():
    """Past the listing's bound, the workflows left out (the oldest, the longest held) may be held by
    any running pod: those pods looked idle and were deleted, their workflows' activities with them."""
    found = [execution("e0", holder="7@q1-w1")]
    whole, cut = (probes.reading(found, listed=listed, read_at=T0) for listed in (2, 1))
    assert (whole.unread, cut.unread) == (0, 1)
    previous = WorkersStatus(desired=2, next_index=3, surplus_since=times.rfc3339(T0 - 600))
    assert plan([pod(1), pod(2)], whole, previous).delete == ("q1-w2",)
    assert plan([pod(1), pod(2)], cut, previous).delete == ()


def test_queues_sharing_a_task_queue_take_none_of_the_others_workers_for_their_own():
    """A task queue the spec names may be another queue's too: the other queue's busy workers were
    counted as this one's pods gone mid-run, each wanting a worker here, and keeping every running
    pod here from going."""
    spec = {"singleExecution": True, "scaling": {"minIdle": 0, "max": 5}, "taskQueueName": "shared"}
    mine = queue("q1", uid="uid-1", **spec)
    theirs = queue("q2", uid="uid-2", **spec)
    namesake = queue("q1", "team-b", uid="uid-3", **spec)  # same pod names, another namespace
    other_hosts = frozenset({workers.worker_hostname(theirs, f"q2-w{i}") for i in range(3)} |
                            {workers.worker_hostname(namesake, "q1-w0")})
    alive = [Pod(name="q1-w1", phase="Running", deleting=False, index=1,
                 hostname=workers.worker_hostname(mine, "q1-w1"))]
    previous = WorkersStatus(desired=1, next_index=2, surplus_since=times.rfc3339(T0 - 600))
    p = workers.plan(mine, alive, previous=previous, now=T0, created=T0 - 100, settings=SETTINGS,
                     demand=Demand(backlog=0, busy=other_hosts))
    assert p.workers.desired == 0 and p.create == () and p.delete == ("q1-w1",)
    # Its own pod gone mid-run still counts: a worker for its workflow, and no running pod goes.
    gone = workers.worker_hostname(mine, "q1-w0")
    p = workers.plan(mine, alive, previous=previous, now=T0, created=T0 - 100, settings=SETTINGS,
                     demand=Demand(backlog=0, busy=other_hosts | {gone}))
    assert p.workers.desired == 1 and p.delete == ()


def test_a_long_named_queues_own_hosts_are_known_though_their_index_was_cut():
    long = queue("q" * 60, uid="uid-1", singleExecution=True, taskQueueName="shared")
    hosts = [workers.worker_hostname(long, workers.pod_name(long.name, i)) for i in range(3)]
    assert all(workers.own_host(long, host, 3) for host in hosts)
    # Another queue's: unless its name begins as this one's (then taken for one's own: kept, never lost).
    other = queue("p" * 60, "team-b", uid="uid-2", singleExecution=True, taskQueueName="shared")
    assert not workers.own_host(long, workers.worker_hostname(other, workers.pod_name(other.name, 0)), 3)
    for length in range(1, 64):  # every length, names with dots too, on a named task queue or its own
        for name in ("a" * length, ("a." * length)[:length].rstrip(".")):
            for named in ({"taskQueueName": "shared"}, {}):
                mine = queue(name, uid="uid-1", singleExecution=True, **named)
                assert all(workers.own_host(mine, workers.worker_hostname(mine, workers.pod_name(name, i)), 12)
                           for i in (0, 11)), name
                if length < 40:  # a longer name's hostname may cut the index: then taken for one's own
                    assert not workers.own_host(mine, workers.worker_hostname(mine, workers.pod_name(name, 12)), 12)


def test_a_queue_on_its_own_task_queue_takes_no_other_queues_workers_on_it_for_its_own():
    """Another queue may name this one's task queue (its queue id) as its taskQueueName: its busy
    workers were counted as this queue's pods gone mid-run, each wanting a worker here."""
    spec = {"singleExecution": True, "scaling": {"minIdle": 0, "max": 5}}
    mine = queue("q1", uid="uid-1", queueId="shared", **spec)
    theirs = queue("q2", uid="uid-2", taskQueueName="shared", **spec)
    their_hosts = frozenset(workers.worker_hostname(theirs, f"q2-w{i}") for i in range(3))
    by_hand = frozenset({"build-box-7"})  # `kubiya worker start` on a machine: it runs what it took
    alive = [Pod(name="q1-w1", phase="Running", deleting=False, index=1)]
    previous = WorkersStatus(desired=1, next_index=2, surplus_since=times.rfc3339(T0 - 600))
    p = workers.plan(mine, alive, previous=previous, now=T0, created=T0 - 100, settings=SETTINGS,
                     demand=Demand(backlog=0, busy=their_hosts | by_hand))
    assert p.workers.desired == 0 and p.create == () and p.delete == ("q1-w1",)
    # Its own pod gone mid-run still counts: a worker for its workflow, and no running pod goes.
    p = workers.plan(mine, alive, previous=previous, now=T0, created=T0 - 100, settings=SETTINGS,
                     demand=Demand(backlog=0, busy=their_hosts | {"q1-w0"}))
    assert p.workers.desired == 1 and p.delete == ()


def test_a_finished_scaling_queue_is_deleted_only_on_a_reading_asked_after_its_finish():
    """The reading taken as its last worker ended (up to 5 s old, recent enough) may miss a workflow
    started just then: the queue was deleted at once (ttlSecondsAfterFinished 0) and it never ran."""
    worked = WorkersStatus(succeeded=0, next_index=1)
    done = plan([pod(0, "Succeeded")], Demand(backlog=0, read_at=T0 - 0.1), worked, ephemeral=True)
    assert done.workers.finished_time == times.rfc3339(T0) and done.delete_queue is None
    assert done.requeue_after == SETTINGS.backlog_idle_poll_seconds  # for the next reading
    early = plan([], Demand(backlog=0, read_at=T0 + 1), done.workers, now=T0 + 1.5, ephemeral=True)
    assert early.delete_queue is None  # within a second of the finish: maybe before it
    waits = plan([], Demand(backlog=1, read_at=T0 + 3), done.workers, now=T0 + 3.5, ephemeral=True)
    assert waits.create == (1,) and waits.delete_queue is None and waits.workers.finished_time is None
    after = plan([], Demand(backlog=0, read_at=T0 + 3), done.workers, now=T0 + 3.5, ephemeral=True)
    assert after.delete_queue is not None and after.delete_queue.reason == "QueueFinished"


def test_a_reading_made_before_the_clock_stepped_back_deletes_no_finished_queue():
    """Made "after" the finish by the clock's say, it was made before it: the queue was deleted on a
    reading that could not have seen a workflow started as its last worker ended."""
    worked = WorkersStatus(succeeded=0, next_index=1)
    done = plan([pod(0, "Succeeded")], Demand(backlog=0, read_at=T0 - 0.1), worked, ephemeral=True)
    stepped = T0 - 300  # the clock stepped back 5 minutes since the reading
    redone = plan([], Demand(backlog=0, read_at=T0 - 0.1), WorkersStatus(succeeded=1, next_index=1),
                  now=stepped, ephemeral=True)
    assert redone.delete_queue is None
    assert plan([], Demand(backlog=0, read_at=T0 + 3), done.workers, now=T0 - 200, ephemeral=True).delete_queue is None


def test_a_workflow_not_due_yet_keeps_an_ephemeral_scaling_queue_without_a_worker_for_it():
    """A retry's back-off (over a minute after a few attempts), a start delay, a cron run: no worker
    can take it yet, and none is kept idle for it, but the queue was deleted meanwhile and the
    workflow found no queue when it came due."""
    found = [execution("retry", delayed=True)]
    demand = probes.reading(found, listed=1000, read_at=T0)
    assert (demand.backlog, demand.delayed) == (0, 1)
    worked = WorkersStatus(succeeded=1, next_index=1)
    held = plan([], demand, worked, ephemeral=True)
    assert held.create == () and held.workers.desired == 0
    assert held.delete_queue is None and held.workers.finished_time is None
    due = plan([], Demand(backlog=1, read_at=T0 + 70), held.workers, now=T0 + 70, ephemeral=True)
    assert due.create == (1,)


class NoEvents:
    def post(self, **_: Any) -> None:
        pass


def queue_with_a_temporal_key(store: Store, *, reachable: tuple[str, str] | None,
                              key: dict[str, str] | None) -> queues.QueueObject:
    """A queue whose Temporal key is Secret `tkey` (`key`: its data, None: gone), showing
    TemporalReachable as `reachable` (status, reason; None: not at all, as a new queue), put in `store`
    with its token Secret."""
    body = queue_body(auth={"tokenSecretRefs": [{"name": "tok", "key": "token"}]},
                      temporal={"host": "temporal.example:7233", "namespace": "agents",
                                "apiKeySecretRef": {"name": "tkey", "key": "k"}})
    body["status"] = {"conditions": [{"type": "Ready", "status": "True"}, {
        "type": "TemporalReachable", "status": reachable[0], "reason": reachable[1], "observedGeneration": 1}]
        if reachable is not None else [{"type": "Ready", "status": "False", "reason": "SecretNotFound"}]}
    q = queues.QueueObject.from_body(body)
    store.upsert_queue(q)
    store.upsert_secret(("team-a", "tok"), {"token": "t"})
    store.upsert_secret(("team-a", "tkey"), key)
    return q


@contextlib.asynccontextmanager
async def probing(store: Store, api: Any, q: queues.QueueObject,
                  temporal_: Any = None) -> AsyncIterator[supervisor.Supervisor]:
    """The Temporal probes of an active replica's supervisor on `store`, writing to `api`, run while in
    the block, `q` known to them."""
    s = supervisor.Supervisor(store=store, client=api, settings=SETTINGS, events=NoEvents(),  # type: ignore[arg-type]
                              activity=Activity(identity="me", priority=0), temporal=temporal_ or temporal.Temporal())
    s.queue_changed(q)
    poll = asyncio.create_task(s.prober.run())
    try:
        yield s
    finally:
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)


async def test_a_failing_temporal_status_write_backs_off_rather_than_follow_the_probes(
        caplog: pytest.LogCaptureFixture):
    """A queue whose Temporal key's Secret is gone while its status still says Reachable: with the
    API server answering 503, the Unknown it must show was written (and a WARNING logged) every
    second, one PATCH a second for each such queue, for as long as the outage lasted."""
    import asyncio
    import logging

    from workerqueue_operator.core.store import Store
    from workerqueue_operator.k8s import client as client_

    class Unavailable:
        patches = 0

        async def patch(self, *_: Any, **__: Any) -> Any:
            self.patches += 1
            raise client_.ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request")

    caplog.set_level(logging.WARNING, logger=probes.__name__)
    store = Store(settings=SETTINGS)
    q = queue_with_a_temporal_key(store, reachable=("True", "Reachable"), key=None)  # its Secret deleted
    api = Unavailable()
    async with probing(store, api, q):
        await asyncio.sleep(7)
    assert 2 <= api.patches <= 3  # at 0, 2 and 6 s, where it was one a second
    assert len([r for r in caplog.records if "writing the Temporal status" in r.getMessage()]) == 1


async def test_an_unresolved_temporal_is_written_once_while_the_watch_brings_nothing_new():
    """A queue whose Temporal key's Secret is missing, its queue watch down: the Unknown was written
    (or refused, 422) once a second, as the queue seen here never showed it. Written again only when
    what it says changes."""
    class Writes:
        def __init__(self) -> None:
            self.ops: list[list[dict[str, Any]]] = []

        async def patch(self, _path: str, ops: list[dict[str, Any]], **__: Any) -> dict[str, Any]:
            self.ops.append(ops)
            return {}

    store = Store(settings=SETTINGS)
    q = queue_with_a_temporal_key(store, reachable=None, key=None)
    api = Writes()
    async with probing(store, api, q):
        await asyncio.sleep(2.5)  # looked at every second (the probes' clock is time.monotonic)
        assert len(api.ops) == 1 and api.ops[0][-1]["op"] == "add"
        store.upsert_secret(("team-a", "tkey"), {"other": "x"})  # there now, without its key
        await asyncio.sleep(2.5)
    messages = [ops[-1]["value"]["message"] for ops in api.ops]
    assert len(messages) == 2 and "tkey" in messages[0] and "key k" in messages[1], messages


@pytest.mark.parametrize("told", ["unavailable", "not in time"])
async def test_when_temporal_cannot_tell_which_workers_run_an_activity_none_is_taken_for_idle(told: str):
    """Taken as "none runs one", every running pod was idle to the planner, and went after its grace."""
    class Untold:
        async def activity_workers(self, *_: Any) -> frozenset[str] | None:
            if told == "unavailable":
                raise temporal.TemporalUnavailable("connection refused")
            return None

    store = Store(settings=SETTINGS)
    q = queue_with_a_temporal_key(store, reachable=("True", "Reachable"), key={"k": "key"})
    s = supervisor.Supervisor(store=store, client=None, settings=SETTINGS, events=NoEvents(),  # type: ignore[arg-type]
                              activity=Activity(identity="me", priority=0), temporal=Untold())  # type: ignore[arg-type]
    s.queue_changed(q)
    demand = await s._with_activities(q.key, Demand(backlog=0))
    assert demand.activities_unknown and demand.backlog == 0


async def test_a_scaling_probe_reads_a_listing_of_its_own_not_one_begun_before_it():
    """Its reading is stamped with when it asked: joined to another's listing begun earlier (a queue
    sharing the task queue, a worker's poll), it was older than it said (see Temporal.executions)."""
    from tests.unit.factories import queue_body
    from workerqueue_operator.core import queues, temporal
    from workerqueue_operator.core.activity import Activity
    from workerqueue_operator.core.store import Store

    class Listing:
        asked: list[dict[str, Any]] = []

        async def describe_task_queue(self, *_: Any) -> temporal.TaskQueueInfo:
            return temporal.TaskQueueInfo(pollers=(), backlog=0)

        async def executions(self, *_: Any, **kwargs: Any) -> list[temporal.Execution]:
            self.asked.append(kwargs)
            return []

    class NoEvents:
        def post(self, **_: Any) -> None:
            pass

    store = Store(settings=SETTINGS)
    q = queues.QueueObject.from_body(queue_body(singleExecution=True, scaling={"minIdle": 0, "max": 2},
                                                temporal={"host": "t:7233", "namespace": "n"}))
    store.upsert_queue(q)
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    class Writes:
        async def patch(self, *_: Any, **__: Any) -> dict[str, Any]:
            return {}

    source = Listing()
    s = supervisor.Supervisor(store=store, client=Writes(), settings=SETTINGS, events=NoEvents(),  # type: ignore[arg-type]
                              activity=Activity(identity="me", priority=0), temporal=source)  # type: ignore[arg-type]
    s.queue_changed(q)
    target = s.prober.target(q.key)
    assert target is not None
    await s.prober._probe(q.key, s.prober._probes[q.key], target[1], target[2])
    assert source.asked and all(kwargs.get("fresh") for kwargs in source.asked)


@pytest.mark.looptime
@pytest.mark.parametrize("during_probe", [False, True], ids=["after-its-probe", "during-its-probe"])
async def test_temporal_reachable_turns_unknown_as_soon_as_the_temporal_key_secret_goes(during_probe: bool):
    """Its Temporal key's Secret deleted just after a check (or while one ran): the Unknown waited for
    the next check, temporal_check_seconds (30 s) later, and the integration test waiting 30 s for it
    failed whenever that check came a little late."""
    release = asyncio.Event()

    class Refusing:
        async def describe_task_queue(self, *_: Any) -> temporal.TaskQueueInfo:
            if during_probe:
                await release.wait()
            raise temporal.TemporalUnavailable("connection refused")

    class Writes:
        ops: list[list[dict[str, Any]]] = []

        async def patch(self, _path: str, ops: list[dict[str, Any]], **__: Any) -> dict[str, Any]:
            self.ops.append(ops)
            return {}

    store = Store(settings=SETTINGS)
    q = queue_with_a_temporal_key(store, reachable=("False", "TemporalUnavailable"), key={"k": "key"})
    api = Writes()
    async with probing(store, api, q, Refusing()) as s:
        await asyncio.sleep(0.5)  # checked (or being checked)
        assert s.prober._probes[q.key].target
        store.upsert_secret(("team-a", "tkey"), None)  # the Temporal key's Secret deleted
        release.set()
        await asyncio.sleep(1.5)
    written = [op["value"] for ops in api.ops for op in ops if op["op"] == "replace"]
    assert [(c["status"], c["reason"]) for c in written][-1:] == [("Unknown", "TemporalNotResolved")]


def test_an_ephemeral_queue_paused_with_max_0_is_not_finished_while_work_waits():
    """scaling.max lowered to 0 wants no worker, but three workflows wait: deleting the queue as
    finished would drop them, for good."""
    previous = WorkersStatus(observed_generation=1, desired=3, succeeded=1, next_index=1)
    first = plan([], Demand(backlog=3, read_at=T0), previous, max_=0, ephemeral=True)
    assert first.workers.desired == 0 and first.workers.finished_time is None
    assert "WorkersFinished" not in [e.reason for e in first.events]
    later = plan([], Demand(backlog=3, read_at=T0 + 60), first.workers, now=T0 + 60, max_=0, ephemeral=True)
    assert later.delete_queue is None
    # Once nothing waits, it has finished (its TTL 0): deleted after a reading that says so.
    done = plan([], Demand(backlog=0, read_at=T0 + 70), later.workers, now=T0 + 70, max_=0, ephemeral=True)
    assert "WorkersFinished" in [e.reason for e in done.events]


def test_a_suspended_scaling_queue_keeps_no_idle_worker():
    """Its idle workers would go on taking workflows off the task queue of a queue that says it is
    suspended; a busy one finishes its execution."""
    previous = WorkersStatus(observed_generation=1, desired=2, next_index=3)
    pods = [pod(0), pod(1), pod(2)]
    first = plan(pods, Demand(backlog=4, busy=busy(0), read_at=T0), previous, min_idle=2, suspend=True)
    assert first.workers.desired == 1 and first.delete == ()  # the grace first, as for any idle surplus
    after = plan(pods, Demand(backlog=4, busy=busy(0), read_at=T0 + 31), first.workers, now=T0 + 31, min_idle=2,
                 suspend=True)
    assert sorted(after.delete) == ["q1-w1", "q1-w2"]


def test_a_crash_loop_with_no_worker_alive_for_an_hour_ends():
    """A scaling pool whose work went elsewhere tries no worker: its CrashLooping, and its one-at-a-time
    tries for the next burst, would outlive a fault nobody has met since."""
    failed = times.rfc3339(T0)
    looping = WorkersStatus(observed_generation=1, desired=0, next_index=2, consecutive_failures=2,
                            failure_index=2, failures_generation=1, crash_loop_generation=1, last_failure_time=failed)
    spec: dict[str, Any] = {"max_": 10, "worker": {"backoffLimit": 2}}
    soon = plan([], Demand(backlog=0, read_at=T0 + 600), looping, now=T0 + 600, **spec)
    assert soon.workers.consecutive_failures == 2  # ten minutes: still the same fault, maybe
    later = plan([], Demand(backlog=0, read_at=T0 + 3600), soon.workers, now=T0 + 3600, **spec)
    assert later.workers.consecutive_failures == 0 and later.workers.crash_loop_generation is None
    assert "BackOffReset" in [e.reason for e in later.events]
    burst = plan([], Demand(backlog=10, read_at=T0 + 3601), later.workers, now=T0 + 3601, **spec)
    assert burst.create == tuple(range(2, 12))


async def test_a_probe_that_meets_a_bug_is_probed_again_not_left_under_way_for_ever(caplog: pytest.LogCaptureFixture):
    """A probe's work raising what nothing expects (a bug) after Temporal answered once left it
    "under way": its queue was never probed again, a scaling queue never scaled again, nothing said."""

    class Listing:
        described = 0

        async def describe_task_queue(self, *_: Any) -> temporal.TaskQueueInfo:
            self.described += 1
            return temporal.TaskQueueInfo(pollers=(), backlog=0)

        async def executions(self, *_: Any, **__: Any) -> list[temporal.Execution]:
            return []

    class Writes:
        async def patch(self, *_: Any, **__: Any) -> dict[str, Any]:
            return {}

    store = Store(settings=SETTINGS)
    q = queues.QueueObject.from_body(queue_body(singleExecution=True, scaling={"minIdle": 0, "max": 2},
                                                temporal={"host": "t:7233", "namespace": "n"}))
    store.upsert_queue(q)
    store.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    source = Listing()
    s = supervisor.Supervisor(store=store, client=Writes(), settings=SETTINGS, events=NoEvents(),  # type: ignore[arg-type]
                              activity=Activity(identity="me", priority=0), temporal=source)  # type: ignore[arg-type]
    bugs = [RuntimeError("a bug")]

    def alive(_: Any) -> int:
        if bugs:
            raise bugs.pop()
        return 0

    s.prober._alive = alive
    s.queue_changed(q)
    poll = asyncio.create_task(s.prober.run())
    try:
        deadline = time.monotonic() + 30  # probed again a second after (the timeline is on time.monotonic)
        while source.described < 2:
            assert time.monotonic() < deadline, "not probed again"
            await asyncio.sleep(0.05)
    finally:
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
    assert not bugs
    assert "a bug" in caplog.text


def test_a_temporal_reachable_message_names_an_endpoint_only_whole():
    """Another endpoint than the message names is written again; one the message names in part
    (prod-temporal:7233/agents-staging for temporal:7233/agents) is another endpoint."""
    names = probes._names
    assert names("Temporal at t:7233/agents is unreachable: refused", "t:7233/agents")
    assert names("Temporal at t:7233/agents: PERMISSION_DENIED", "t:7233/agents")
    assert names("the task queue q was described at t:7233/agents", "t:7233/agents")
    assert names("Temporal at [::1]:7233/agents did not answer within 4s", "[::1]:7233/agents")
    assert not names("Temporal at prod-temporal:7233/agents is unreachable", "temporal:7233/agents")
    assert not names("Temporal at t:7233/agents-staging is unreachable", "t:7233/agents")
    assert not names("Temporal at t:7233/agents.x is unreachable", "t:7233/agents")
    assert names("anything", "")  # a check not made since a restart names nothing to compare
