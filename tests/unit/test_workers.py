"""The worker-pod planner, with explicit times: back-off, CrashLooping, TTL and deadlines, no sleeping."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Any

import pytest

from tests.unit.factories import queue
from workerqueue_operator.core import workers
from workerqueue_operator.core.supervisor import CreateRefusal
from workerqueue_operator.core.workers import Pod
from workerqueue_operator.models import times
from workerqueue_operator.models.settings import Settings
from workerqueue_operator.models.spec import WorkersStatus

T0 = 1_800_000_000.0
SETTINGS = Settings()


def pod(index: int, phase: str = "Running", **kwargs: Any) -> Pod:
    kwargs.setdefault("ended", phase in ("Succeeded", "Failed"))
    return Pod(name=f"q1-w{index}", phase=phase, deleting=False, index=index, **kwargs)


def plan(pods: list[Pod], previous: WorkersStatus | None = None, now: float = T0, generation: int = 1,
         **spec: Any) -> workers.Plan:
    return workers.plan(queue(generation=generation, **spec), pods, previous=previous or WorkersStatus(), now=now,
                        created=T0 - 100, settings=SETTINGS)


def test_plain_queue_runs_no_pods():
    p = plan([])
    assert p.create == () and p.workers.desired == 0


def test_single_execution_keeps_replicas_alive():
    p = plan([pod(0)], singleExecution=True, replicas=3)
    assert p.create == (1, 2)
    assert (p.workers.desired, p.workers.running, p.workers.next_index) == (3, 1, 3)


def test_the_counts_say_which_generation_they_were_planned_for():
    first = plan([pod(0)], singleExecution=True, replicas=1, generation=1).workers
    assert first.observed_generation == 1
    assert plan([pod(0)], first, singleExecution=True, replicas=2, generation=2).workers.observed_generation == 2


def test_pending_counts_as_in_flight_and_max_workers_caps():
    p = plan([pod(0, "Pending"), pod(1)], singleExecution=True, replicas=5, maxWorkers=2)
    assert p.create == () and (p.workers.pending, p.workers.running, p.workers.desired) == (1, 1, 2)


def test_names_are_never_reused():
    p = plan([pod(7)], WorkersStatus(next_index=3), singleExecution=True, replicas=2)
    assert p.create == (8,)


def test_a_pod_named_with_an_index_pod_name_never_writes_is_no_index():
    # Made by someone with the queue's label, `-w99999999999999999999` made nextIndex too big for the
    # status schema: every pass of the queue failed until the pod was deleted.
    huge = Pod.from_body({"metadata": {"name": "q1-w99999999999999999999"}, "status": {"phase": "Running"}})
    assert huge.index is None and Pod.from_body({"metadata": {"name": "q1-w007"}}).index is None
    assert workers.pod_index("q1-w999999999") == 999_999_999 and workers.pod_index("q1-w1000000000") is None
    p = plan([pod(0), huge], WorkersStatus(next_index=1), singleExecution=True, replicas=3)
    assert p.workers.next_index < 10**9 and p.create == (1,)


def test_succeeded_worker_is_deleted_counted_once_and_replaced():
    first = plan([pod(0, "Succeeded")], singleExecution=True)
    assert first.delete == ("q1-w0",) and first.create == (1,)
    assert first.workers.succeeded == 1 and first.workers.counted == ["q1-w0"]
    again = plan([pod(0, "Succeeded"), pod(1)], first.workers, singleExecution=True)
    assert again.workers.succeeded == 1 and again.delete == ("q1-w0",) and again.create == ()
    gone = plan([pod(1)], again.workers, singleExecution=True)
    assert gone.workers.counted == []


def test_failed_worker_waits_for_exponential_backoff():
    p = plan([pod(0, "Failed", exit_code=3, reason="Error")], singleExecution=True)
    assert p.create == () and p.requeue_after == pytest.approx(10)
    assert p.workers.consecutive_failures == 1
    failed = next(e for e in p.events if e.reason == "WorkerFailed")
    assert "exit code 3" in failed.message and "reason Error" in failed.message and failed.warning
    assert plan([], p.workers, now=T0 + 9.9, singleExecution=True).create == ()
    assert plan([], p.workers, now=T0 + 10, singleExecution=True).create == (1,)


@pytest.mark.parametrize(("failures", "delay"), [(1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (30, 300)])
def test_backoff_doubles_up_to_five_minutes(failures: int, delay: float):
    assert workers.backoff(failures, SETTINGS) == delay


def test_success_resets_the_backoff():
    failing = WorkersStatus(consecutive_failures=3, last_failure_time=times.rfc3339(T0))
    p = plan([pod(4, "Succeeded")], failing, singleExecution=True, replicas=2)
    assert p.workers.consecutive_failures == 0 and len(p.create) == 2


def test_the_newest_failed_pod_is_kept_for_its_logs_while_failures_go_on_in_a_row():
    """Every failed pod was deleted at once: a crash loop left nothing to `kubectl logs`."""
    spec = {"singleExecution": True, "replicas": 2}
    first = plan([pod(0, "Failed", exit_code=1), pod(1)], WorkersStatus(next_index=2), **spec)
    assert first.kept == "q1-w0" and first.delete == ()
    again = plan([pod(0, "Failed", exit_code=1), pod(1)], first.workers, now=T0 + 1, **spec)
    assert again.kept == "q1-w0" and again.delete == () and again.workers.consecutive_failures == 1
    newer = plan([pod(0, "Failed", exit_code=1), pod(1, "Failed", exit_code=2), pod(2)], again.workers,
                 now=T0 + 20, **spec)
    assert newer.kept == "q1-w1" and newer.delete == ("q1-w0",)
    # A success ends the row: no failure is kept any more.
    worked = plan([pod(1, "Failed", exit_code=2), pod(2, "Succeeded")], newer.workers, now=T0 + 30, **spec)
    assert worked.kept is None and sorted(worked.delete) == ["q1-w1", "q1-w2"]
    # So does a change of spec (its failures say nothing of the new one).
    changed = plan([pod(1, "Failed", exit_code=2), pod(2)], newer.workers, now=T0 + 30, generation=2, **spec)
    assert changed.kept is None and changed.delete == ("q1-w1",)


def test_no_pod_is_kept_that_failed_from_outside_or_runs_on():
    spec = {"singleExecution": True}
    for gone in (pod(0, "Failed", reason="Evicted"), pod(0, "Failed", exit_code=1, refused="409: full"),
                 pod(0, "Failed", exit_code=1, disrupted=True),
                 pod(0, "Failed", exit_code=1, ended=False)):  # its sidecar runs on: it would, for good
        p = plan([gone], WorkersStatus(next_index=1), **spec)
        assert p.kept is None and p.delete == ("q1-w0",), gone


def test_an_ephemeral_queue_crash_loops_after_backoff_limit_until_the_spec_changes():
    spec = {"ephemeral": True, "singleExecution": True, "worker": {"backoffLimit": 3}}
    status = WorkersStatus(consecutive_failures=2, last_failure_time=times.rfc3339(T0 - 1000), next_index=3)
    p = plan([pod(2, "Failed", exit_code=1)], status, **spec)
    assert p.create == () and p.workers.crash_loop_generation == 1
    assert [e.reason for e in p.events] == ["WorkerFailed", "CrashLooping"]
    assert "no more start until the spec changes" in p.events[-1].message
    still = plan([], p.workers, now=T0 + 10_000, **spec)
    assert still.create == () and not still.events
    changed = plan([], p.workers, now=T0 + 10_000, generation=2, **spec)
    assert changed.create == (3,) and changed.workers.crash_loop_generation is None


def test_a_crash_looping_pool_tries_one_worker_at_a_time_after_the_longest_back_off():
    """What failed its workers may pass (Temporal out of reach for minutes): given up on for good,
    the pool stayed drained until someone changed its spec."""
    spec = {"singleExecution": True, "replicas": 2, "worker": {"backoffLimit": 3}}
    status = WorkersStatus(consecutive_failures=2, last_failure_time=times.rfc3339(T0 - 1000), next_index=3)
    p = plan([pod(2, "Failed", exit_code=1)], status, **spec)
    assert p.create == () and p.workers.crash_loop_generation == 1
    assert p.requeue_after == pytest.approx(SETTINGS.worker_backoff_max_seconds)
    assert "one worker at a time is tried every 300s" in p.events[-1].message
    assert plan([], p.workers, now=T0 + 299, **spec).create == ()
    tried = plan([], p.workers, now=T0 + 300, **spec)
    assert tried.create == (3,) and tried.workers.crash_loop_generation == 1  # one, though two are missing
    for phase in ("Pending", "Running"):  # the try is under way: no other beside it, however long it takes
        assert plan([pod(3, phase)], tried.workers, now=T0 + 10_000, **spec).create == ()
    failed_again = plan([pod(3, "Failed", exit_code=1)], tried.workers, now=T0 + 320, **spec)
    assert failed_again.create == () and failed_again.requeue_after == pytest.approx(300)
    worked = plan([pod(3, "Succeeded")], tried.workers, now=T0 + 400, **spec)
    assert worked.workers.crash_loop_generation is None and worked.create == (4, 5)
    assert plan([], p.workers, now=T0 + 10_000, suspend=True, **spec).create == ()


def test_a_crash_looping_pools_tries_turned_away_again_and_again_back_off():
    """A try that /start turns away (the queue full, say), or that is evicted, is no failure: tried
    again at once each time, that made a pod every few seconds for as long as it lasted."""
    spec = {"singleExecution": True, "worker": {"backoffLimit": 1}}
    status = WorkersStatus(consecutive_failures=1, crash_loop_generation=1, next_index=3,
                           last_failure_time=times.rfc3339(T0 - 1000))
    now, made, pods = T0, [], []
    while len(made) < 5:
        p = plan(pods, status, now=now, **spec)
        status, pods = p.workers, []
        if p.create:
            (index,) = p.create
            made.append(now)
            # Its worker is turned away; the pod is seen failed 5 s later.
            pods = [Pod(name=f"q1-w{index}", phase="Failed", deleting=False, index=index, exit_code=1,
                        refused="409: full")]
            now += 5
        else:
            assert p.requeue_after is not None
            now += p.requeue_after
    # The first replaced at once, then as displaced pods are: 10 s doubling.
    assert [round(b - a) for a, b in itertools.pairwise(made)] == [5, 15, 25, 45]


def test_a_crash_looping_pool_without_a_failure_time_is_tried():
    status = WorkersStatus(consecutive_failures=2, crash_loop_generation=1, next_index=3)  # written by an older version
    assert plan([], status, singleExecution=True, worker={"backoffLimit": 2}).create == (3,)


def test_a_success_ends_a_crash_loop_in_status_too():
    looping = WorkersStatus(consecutive_failures=3, crash_loop_generation=1, next_index=3,
                            last_failure_time=times.rfc3339(T0 - 1000))
    p = plan([pod(2, "Succeeded")], looping, singleExecution=True, worker={"backoffLimit": 3})
    assert p.workers.crash_loop_generation is None and p.create == (3,)


def test_a_crash_looping_pool_is_tried_though_a_worker_from_before_the_failures_runs():
    """A worker running since before the failures (waiting for an execution, up to 1,800 s) is no try:
    taken for one, it held every try back, and the pool stayed at one worker for as long as it ran."""
    spec = {"singleExecution": True, "replicas": 3, "worker": {"backoffLimit": 3}}
    looping = WorkersStatus(consecutive_failures=3, crash_loop_generation=1, failures_generation=1, next_index=8,
                            failure_index=8, last_failure_time=times.rfc3339(T0 - 1000))
    older = pod(0, "Running", running_since=T0 - 5000)
    tried = plan([older], looping, **spec)
    assert tried.create == (8,)
    assert plan([older, pod(8, "Pending")], tried.workers, now=T0 + 10, **spec).create == ()  # the try, under way


def test_a_success_ends_failures_only_from_a_worker_of_this_spec_started_after_them():
    """A bad template rolled out while the old workers drain: an old worker's success ended the crash
    loop, and the pool was started again at full size, to fail again."""
    spec = {"singleExecution": True, "replicas": 3, "worker": {"backoffLimit": 3}}
    looping = WorkersStatus(observed_generation=2, consecutive_failures=3, crash_loop_generation=2,
                            failures_generation=2, next_index=20, failure_index=20,
                            last_failure_time=times.rfc3339(T0 - 5))
    for earlier in (pod(0, "Succeeded", generation=1), pod(12, "Succeeded", generation=2)):
        p = plan([earlier], looping, generation=2, **spec)
        assert p.workers.crash_loop_generation == 2 and p.workers.consecutive_failures == 3 and p.create == ()
        assert p.workers.succeeded == 1
    worked = plan([pod(20, "Succeeded", generation=2)], looping, generation=2, **spec)
    assert worked.workers.crash_loop_generation is None and worked.create == (21, 22, 23)


def test_an_ephemeral_queues_crash_loop_outlasts_any_success():
    # As a Job that reached its backoffLimit: no more workers until the spec changes.
    spec = {"ephemeral": True, "singleExecution": True, "replicas": 2, "worker": {"backoffLimit": 3}}
    looping = WorkersStatus(consecutive_failures=3, crash_loop_generation=1, failures_generation=1, next_index=8,
                            failure_index=8, last_failure_time=times.rfc3339(T0 - 1000))
    p = plan([pod(9, "Succeeded")], looping, **spec)
    assert p.workers.crash_loop_generation == 1 and p.create == ()


def test_a_worker_that_has_run_a_while_ends_a_pools_crash_loop():
    """Only a success ended a crash loop, and a pool's one try may wait long for its execution: the
    pool stayed at one worker all that while. One that has run for the longest back-off shows the
    fault gone, as the kubelet forgets a container's back-off once it has run a while."""
    spec = {"singleExecution": True, "replicas": 3, "worker": {"backoffLimit": 1}}
    looping = WorkersStatus(consecutive_failures=1, crash_loop_generation=1, next_index=3,
                            last_failure_time=times.rfc3339(T0 - 1000))
    started = T0 - SETTINGS.worker_backoff_max_seconds + 10
    trying = [pod(3, "Running", running_since=started)]
    p = plan(trying, looping, **spec)
    assert p.create == () and p.workers.crash_loop_generation == 1  # not run long enough yet
    assert p.requeue_after == pytest.approx(10)
    p = plan(trying, looping, now=T0 + 10, **spec)
    assert p.create == (4, 5) and p.workers.consecutive_failures == 0 and p.workers.crash_loop_generation is None
    assert [e.reason for e in p.events] == ["BackOffReset"]
    # Nor does one that has run long ago and then failed: its failure counts afresh.
    ran = plan([pod(3, "Failed", exit_code=1, running_since=T0 - 5000)], looping, now=T0 + 10, **spec)
    assert ran.workers.consecutive_failures == 2 and ran.create == ()
    # A pod still Pending (its image pulling) has run nothing.
    assert plan([pod(3, "Pending")], looping, now=T0 + 10, **spec).create == ()
    # One running since before the failures says nothing of them: it reset each one, and the
    # failing pods came back at once, one a second.
    pool = {"singleExecution": True, "replicas": 2}
    veteran = pod(0, "Running", running_since=T0 - 3600)
    failing = plan([veteran, pod(3, "Failed", exit_code=1)], WorkersStatus(next_index=4), **pool)
    assert failing.workers.consecutive_failures == 1 and failing.create == ()
    again = plan([veteran], failing.workers, now=T0 + 1, **pool)
    assert again.create == () and again.workers.consecutive_failures == 1
    assert again.requeue_after == pytest.approx(SETTINGS.worker_backoff_seconds - 1)
    # An ephemeral queue keeps a Job's rule: a crash loop until the spec changes.
    job = plan(trying, looping, now=T0 + 10, ephemeral=True, replicas=3, worker={"backoffLimit": 1})
    assert job.create == () and job.workers.crash_loop_generation == 1


def test_a_pod_tells_since_when_its_worker_runs():
    body = {"metadata": {"name": "q1-w0"}, "status": {"phase": "Running", "containerStatuses": [
        {"name": "worker", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}
    assert Pod.from_body(body).running_since == times.parse("2026-01-01T00:00:00Z")
    assert Pod.from_body({"metadata": {"name": "q1-w0"}, "status": {"phase": "Running"}}).running_since is None


def test_pods_of_an_older_spec_failing_do_not_crash_loop_the_new_one():
    # The spec fixed (generation 2) while three pods of the broken one still run: their failures
    # are counted and reported, but neither back off nor stop the new spec's workers.
    status = WorkersStatus(consecutive_failures=2, failures_generation=1, next_index=3,
                           last_failure_time=times.rfc3339(T0 - 1000))
    old = [pod(i, "Failed", exit_code=1, generation=1) for i in range(3)]
    p = plan(old, status, generation=2, singleExecution=True, replicas=3, worker={"backoffLimit": 3})
    assert p.workers.failed == 3 and p.workers.consecutive_failures == 0
    assert p.workers.crash_loop_generation is None and p.create == (3, 4, 5)
    spec = {"generation": 2, "singleExecution": True, "replicas": 3, "worker": {"backoffLimit": 3}}
    for round_ in (1, 2):  # each time the newest pod fails, and its replacements are made after the back-off
        now = T0 + 1000 * round_
        p = plan([pod(p.workers.next_index - 1, "Failed", exit_code=1, generation=2)], p.workers, now=now, **spec)
        p = plan([], p.workers, now=now + 500, **spec)
    assert p.workers.consecutive_failures == 2 and p.workers.crash_loop_generation is None  # its own count
    p = plan([pod(p.workers.next_index - 1, "Failed", exit_code=1, generation=2)], p.workers, now=T0 + 6000, **spec)
    assert p.workers.consecutive_failures == 3 and p.workers.crash_loop_generation == 2


def test_a_spec_change_ends_the_back_off_of_failures_before_it():
    # Five failures of generation 1 (backoffLimit 6: not crash-looping yet), then the spec is fixed.
    failing = WorkersStatus(consecutive_failures=5, failures_generation=1, next_index=5,
                            last_failure_time=times.rfc3339(T0))
    assert plan([], failing, now=T0 + 1, singleExecution=True).create == ()  # backing off
    fixed = plan([], failing, now=T0 + 1, generation=2, singleExecution=True)
    assert fixed.create == (5,) and fixed.workers.consecutive_failures == 0
    once = plan([pod(5, "Failed", exit_code=1, generation=2)], fixed.workers, now=T0 + 2, generation=2,
                singleExecution=True)
    assert once.workers.consecutive_failures == 1 and once.workers.crash_loop_generation is None


def test_pod_generation_is_read_from_its_annotation():
    body = {"metadata": {"name": "q1-w0", "annotations": {workers.GENERATION_ANNOTATION: "4"}}, "status": {}}
    assert Pod.from_body(body).generation == 4
    assert Pod.from_body({"metadata": {"name": "q1-w0"}}).generation is None


def test_a_refusal_is_no_longer_shown_once_no_pod_is_wanted():
    refused = WorkersStatus(observed_generation=1, desired=3, next_index=3,
                            last_error="pods is forbidden: exceeded quota")
    assert plan([pod(0), pod(1)], refused, singleExecution=True, replicas=3).workers.last_error is not None
    assert plan([pod(0), pod(1)], refused, singleExecution=True, replicas=2).workers.last_error is None


@pytest.mark.parametrize("reason", ["Evicted", "OutOfcpu", "OutOfpods", "NodeAffinity"])
def test_evicted_or_unadmitted_pod_is_replaced_at_once_without_counting_a_failure(reason: str):
    p = plan([pod(0, "Failed", reason=reason)], singleExecution=True)
    assert p.create == (1,) and p.workers.consecutive_failures == 0 and p.workers.failed == 0


@pytest.mark.parametrize("exit_code", [None, 137])
def test_a_pod_failed_as_kubernetes_took_it_away_is_displaced_not_a_crash(exit_code: int | None):
    """Its node deleted (a spot instance reclaimed): the pod garbage collector sets the pod Failed with
    no reason and the condition DisruptionTarget, then deletes it. A pass listing it in between counted
    a crash of the worker, and its replacement waited out a back-off."""
    terminated = [] if exit_code is None else [
        {"name": "worker", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]
    body = {"metadata": {"name": "q1-w0"}, "status": {
        "phase": "Failed", "containerStatuses": terminated,
        "conditions": [{"type": "Ready", "status": "False"},
                       {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"}]}}
    gone = Pod.from_body(body)
    assert gone.disrupted and gone.reason == "DeletionByPodGC"
    p = plan([gone], singleExecution=True)
    assert p.create == (1,) and p.workers.failed == 0 and p.workers.consecutive_failures == 0
    assert [e.reason for e in p.events][:1] == ["WorkerDisplaced"] and "DeletionByPodGC" in p.events[0].message
    body["status"]["conditions"][1]["status"] = "False"
    assert not Pod.from_body(body).disrupted


def test_pods_displaced_again_and_again_are_replaced_after_a_growing_back_off_never_a_crash_loop():
    """A pod evicted for its own ephemeral storage is "Evicted" too, like one of a node under
    pressure: replaced at once each time, they made a tight create-evict loop."""
    spec = {"singleExecution": True, "worker": {"backoffLimit": 2}}
    p = plan([pod(0, "Failed", reason="Evicted")], **spec)
    assert p.create == (1,)
    p = plan([pod(1, "Failed", reason="Evicted")], p.workers, now=T0 + 1, **spec)
    assert p.create == () and p.requeue_after == pytest.approx(SETTINGS.worker_backoff_seconds)
    assert [e.reason for e in p.events] == ["WorkerDisplaced", "BackOff"]
    p = plan([], p.workers, now=T0 + 1 + SETTINGS.worker_backoff_seconds, **spec)
    assert p.create == (2,)
    for index in range(2, 6):  # each longer, up to the longest; never CrashLooping
        p = plan([pod(index, "Failed", reason="Evicted")], p.workers, now=T0 + 1000 * index, **spec)
        assert p.create == () and p.workers.crash_loop_generation is None
        p = plan([], p.workers, now=T0 + 1000 * index + workers.backoff(index, SETTINGS), **spec)
        assert p.create == (index + 1,)
    assert plan([pod(6, "Succeeded")], p.workers, now=T0 + 9000, **spec).workers.consecutive_displaced == 0
    # Several at once (a node under pressure) are one incident; one an hour after the last, a new first.
    pool = {"singleExecution": True, "replicas": 3}
    p = plan([pod(i, "Failed", reason="Evicted") for i in range(3)], **pool)
    assert p.create == (3, 4, 5) and p.workers.consecutive_displaced == 1
    p = plan([pod(3, "Failed", reason="Evicted")], p.workers, now=T0 + 1, **pool)
    assert p.create == () and p.workers.consecutive_displaced == 2
    p = plan([pod(4, "Failed", reason="Evicted")], p.workers, now=T0 + 1 + workers.DISPLACED_FORGOTTEN_SECONDS + 1,
             **pool)
    assert p.create == (6, 7, 8) and p.workers.consecutive_displaced == 1


def test_pods_displaced_seconds_apart_in_one_incident_are_replaced_at_once():
    """A node under pressure evicts its pods one after another, each seen by its own pass: counted
    pass by pass, the second replacement waited 10 s and the third 20 s."""
    pool = {"singleExecution": True, "replicas": 3}
    p = plan([pod(0, "Failed", reason="Evicted"), pod(1), pod(2)], WorkersStatus(next_index=3), **pool)
    assert p.create == (3,) and p.workers.consecutive_displaced == 1
    p = plan([pod(1, "Failed", reason="Evicted"), pod(2), pod(3)], p.workers, now=T0 + 1, **pool)
    assert p.create == (4,) and p.workers.consecutive_displaced == 1
    p = plan([pod(2, "Failed", reason="Evicted"), pod(3), pod(4)], p.workers, now=T0 + 2, **pool)
    assert p.create == (5,) and p.workers.consecutive_displaced == 1
    # A replacement stopped too is a new time: backed off.
    p = plan([pod(3, "Failed", reason="Evicted"), pod(4), pod(5)], p.workers, now=T0 + 3, **pool)
    assert p.create == () and p.workers.consecutive_displaced == 2


def test_a_pod_deleted_by_someone_else_counts_once_while_it_terminates_and_is_replaced():
    spec = {"singleExecution": True, "replicas": 1}
    terminating = Pod(name="q1-w0", phase="Running", deleting=True, index=0)
    p = workers.plan(queue(**spec), [terminating], previous=WorkersStatus(next_index=1), now=T0, created=T0,
                     settings=SETTINGS, deleted_outside={"q1-w0"})
    assert p.create == (1,) and p.workers.consecutive_displaced == 1 and p.workers.counted == ["q1-w0"]
    assert [e.reason for e in p.events] == ["WorkerDisplaced"]
    again = workers.plan(queue(**spec), [terminating, pod(1)], previous=p.workers, now=T0 + 1, created=T0,
                         settings=SETTINGS, deleted_outside={"q1-w0"})
    assert again.events == () and again.workers.consecutive_displaced == 1
    # One gone between two passes (deleted at once) is told by name only; a new time: backed off.
    gone = workers.plan(queue(**spec), [], previous=again.workers, now=T0 + 2, created=T0, settings=SETTINGS,
                        deleted_outside={"q1-w1"})
    assert gone.create == () and gone.workers.consecutive_displaced == 2 and gone.requeue_after is not None


def test_a_spec_change_starts_workers_stopped_from_outside_at_once():
    """Refused again and again as the queue was full (workers outside its pods held its maxWorkers):
    raising maxWorkers still waited out the back-off of the older spec's refusals."""
    spec = {"singleExecution": True, "replicas": 1}
    backed_off = WorkersStatus(next_index=7, consecutive_displaced=6, last_displaced_time=times.rfc3339(T0 - 1),
                               displaced_generation=1, displaced_index=7)
    assert plan([], backed_off, generation=1, **spec).create == ()
    changed = plan([], backed_off, generation=2, **spec)
    assert changed.create == (7,) and changed.workers.consecutive_displaced == 0


def test_a_pod_whose_worker_the_operator_turned_away_is_no_crash_of_the_worker():
    """The worker exits 1 on a refused /start and never retries it: a full queue or an unavailable
    API server failed the pool's pods one after another, and a crash loop stopped the queue until
    someone edited its spec."""
    spec = {"singleExecution": True, "replicas": 1, "worker": {"backoffLimit": 2}}
    why = "409: Worker queue 'q1' is full (maxWorkers=1)"
    p = plan([pod(0, "Failed", exit_code=1, refused=why)], **spec)
    assert p.create == (1,) and p.workers.consecutive_failures == 0 and p.workers.failed == 0
    assert [(e.reason, e.warning) for e in p.events] == [("WorkerRefused", True)] and why in p.events[0].message
    for index in range(1, 6):  # backed off as displaced pods are, never CrashLooping
        p = plan([pod(index, "Failed", exit_code=1, refused=why)], p.workers, now=T0 + 1000 * index, **spec)
        assert p.workers.crash_loop_generation is None and p.workers.consecutive_failures == 0
        assert [e.reason for e in p.events] == ["WorkerRefused", "BackOff"]  # the wait is told
        p = plan([], p.workers, now=T0 + 1000 * index + workers.backoff(index, SETTINGS), **spec)
        assert p.create == (index + 1,)
    # The same exit without a refusal is the worker's own failure.
    assert plan([pod(9, "Failed", exit_code=1)], **spec).workers.consecutive_failures == 1


def test_lowering_replicas_deletes_pods_not_started_yet_never_one_whose_node_went_silent():
    # Unknown: its node stopped reporting; its worker may be running an execution.
    pods = [pod(0), pod(1, "Unknown"), pod(2, "Pending")]
    p = plan(pods, WorkersStatus(desired=3, next_index=3), singleExecution=True, replicas=1)
    assert p.delete == ("q1-w2",)


def test_pods_that_are_there_are_never_deleted_as_surplus_for_pods_only_maybe_coming():
    """Two pods made, and two more maybe coming (tokens left by a replica killed mid-create): the surplus
    is the two that may never come, which the supervisor leaves be; the newest pods were deleted instead,
    and the queue had none for the minute the coming ones were waited for."""
    pods = [pod(2, "Pending"), pod(3, "Pending"), pod(0, "Pending", coming=True), pod(1, "Pending", coming=True)]
    p = plan(pods, WorkersStatus(desired=2, next_index=4), singleExecution=True, replicas=2)
    assert sorted(p.delete) == ["q1-w0", "q1-w1"] and p.create == ()


def test_suspend_stops_creating_but_lets_pods_run():
    p = plan([pod(0)], singleExecution=True, replicas=3, suspend=True)
    assert p.create == () and p.delete == ()


@pytest.mark.parametrize("scaling", [None, {"minIdle": 2, "max": 4}])
def test_suspend_deletes_the_pods_not_started_yet(scaling: dict[str, int] | None):
    """They started all the same: /start turned their workers away (suspended), and each refusal was a
    WorkerRefused Warning saying it would be replaced, and a displacement counted."""
    pods = [pod(0), pod(1, "Pending"), pod(2, "Unknown"), pod(3, "")]
    p = plan(pods, singleExecution=True, replicas=4, suspend=True, scaling=scaling)
    assert p.create == () and sorted(p.delete) == ["q1-w1", "q1-w3"]


@pytest.mark.parametrize("scaling", [None, {"minIdle": 1, "max": 4}])
def test_suspend_stops_a_pools_running_workers_too(scaling: dict[str, int] | None):
    """Not single-execution, a worker never exits by itself: "running ones finish" left a suspended
    pool's workers taking work for good, its status saying they would finish."""
    pods = [pod(0), pod(1, "Pending"), pod(2, "Unknown"), pod(3), pod(4, "", coming=True)]
    p = plan(pods, WorkersStatus(next_index=5), ephemeral=True, replicas=4, suspend=True, scaling=scaling)
    # The pod only maybe coming is named too: the supervisor leaves such be.
    assert p.create == () and sorted(p.delete) == ["q1-w0", "q1-w1", "q1-w2", "q1-w3", "q1-w4"]
    assert [(e.reason, e.message) for e in p.events if e.reason == "Suspending"] == [
        ("Suspending", "the queue is suspended: stopping q1-w0, q1-w2, q1-w3")]
    assert p.delete_queue is None  # stopped, not finished: the queue stays, its work waiting
    # Not the pass after either, its workers gone: a suspended queue is held, not finished.
    gone = plan([], p.workers, ephemeral=True, replicas=0, suspend=True, scaling=scaling)
    assert gone.delete_queue is None
    if scaling is None:  # (a scaling queue's own rules aside) not suspended, the same is finished
        assert plan([], p.workers, ephemeral=True, replicas=0).delete_queue is not None
    # Single-execution workers finish their one execution.
    single = plan(pods, WorkersStatus(next_index=5), singleExecution=True, replicas=4, suspend=True, scaling=scaling)
    assert sorted(single.delete) == ["q1-w1", "q1-w4"] and not [e for e in single.events if e.reason == "Suspending"]


def test_a_suspended_single_execution_pool_stops_its_idle_workers_once_temporal_says_they_are():
    """Without scaling, its idle workers went on polling: each took the next workflow of a queue that
    says it is suspended (and the drain recipe's wait ran until their give-up)."""
    from workerqueue_operator.core.workers import Demand

    def suspended(demand: Demand | None) -> workers.Plan:
        pods = [pod(0), pod(1), pod(2, "Pending"), pod(3)]
        return workers.plan(queue(singleExecution=True, replicas=4, suspend=True), pods,
                            previous=WorkersStatus(next_index=6), now=T0, created=T0 - 100, settings=SETTINGS,
                            demand=demand)

    assert workers.reads_demand(queue(singleExecution=True, suspend=True).spec)  # Temporal is read for it
    assert not workers.reads_demand(queue(singleExecution=True).spec)
    read = Demand(backlog=0, busy=frozenset({"q1-w0"}), active=frozenset({"q1-w3"}), read_at=T0 - 1)
    p = suspended(read)
    assert sorted(p.delete) == ["q1-w1", "q1-w2"]  # w0 holds an execution, w3 runs an activity
    assert [e.message for e in p.events if e.reason == "Suspending"] == ["the queue is suspended: stopping q1-w1"]
    # Nothing known for sure, or workflows waiting (an idle worker may be taking one now): no running worker goes.
    for unsure in (None, Demand(backlog=None), dataclasses.replace(read, backlog=2),
                   dataclasses.replace(read, unread=1),
                   dataclasses.replace(read, activities_unknown=True),
                   dataclasses.replace(read, read_at=T0 - workers.IDLE_STALE_SECONDS - 1),
                   dataclasses.replace(read, busy=frozenset({"q1-w0", "q1-w5"}))):  # q1-w5: gone, its run handed on
        assert sorted(suspended(unsure).delete) == ["q1-w2"], unsure
    # Not suspended: the same reading changes nothing.
    assert workers.plan(queue(singleExecution=True, replicas=4), [pod(0), pod(1)],
                        previous=WorkersStatus(next_index=10), now=T0, created=T0 - 100, settings=SETTINGS,
                        demand=read).delete == ()


def test_ephemeral_runs_replicas_once_then_deletes_after_ttl():
    p = plan([], ephemeral=True, replicas=2)
    assert p.create == (0, 1)
    done = plan([pod(0, "Succeeded"), pod(1, "Succeeded")], p.workers, ephemeral=True, replicas=2,
                ttlSecondsAfterFinished=30)
    assert done.create == () and done.delete_queue is None and done.requeue_after == pytest.approx(30)
    assert "WorkersFinished" in [e.reason for e in done.events]
    later = plan([], done.workers, now=T0 + 30, ephemeral=True, replicas=2, ttlSecondsAfterFinished=30)
    assert later.delete_queue is not None and later.delete_queue.reason == "QueueFinished"


def test_ephemeral_single_execution_is_one_worker_one_task():
    p = plan([], ephemeral=True, singleExecution=True, replicas=5)
    assert p.create == (0,)
    done = plan([pod(0, "Succeeded")], p.workers, ephemeral=True, singleExecution=True, replicas=5)
    assert done.delete_queue is not None and done.create == ()


def test_active_deadline_deletes_an_ephemeral_queue():
    p = plan([pod(0)], ephemeral=True, activeDeadlineSeconds=150)
    assert p.delete_queue is None and p.requeue_after == pytest.approx(50)
    late = plan([pod(0)], now=T0 + 50, ephemeral=True, activeDeadlineSeconds=150)
    assert late.delete_queue is not None and late.delete_queue.reason == "DeadlineExceeded"


def test_pods_being_deleted_do_not_count():
    p = plan([Pod(name="q1-w0", phase="Running", deleting=True, index=0)], singleExecution=True)
    assert p.create == (1,)


def test_the_secrets_digest_moves_with_the_secrets_versions_and_never_reads_their_values():
    q = queue(auth={"tokenSecretRefs": [{"name": "tok", "key": "token"}]},
              litellm={"url": "http://llm", "apiKeySecretRef": {"name": "llm", "key": "key"}})
    versions = {("team-a", "tok"): "10", ("team-a", "llm"): "11"}
    before = workers.secrets_digest(q, versions.__getitem__, SETTINGS)
    assert before == workers.secrets_digest(q, dict(versions).__getitem__, SETTINGS)
    versions[("team-a", "llm")] = "12"  # rotated
    assert re.fullmatch(r"sha256:[0-9a-f]{32}", before) and workers.secrets_digest(q, versions.__getitem__,
                                                                                  SETTINGS) != before


def test_build_pod_has_what_the_worker_needs():
    q = queue(queueId="q-1", singleExecution=True, heartbeatIntervalSeconds=30,
              worker={"template": {"metadata": {"labels": {"team": "a"}}, "spec": {"containers": [
                  {"name": "w", "image": "img:1", "env": [{"name": "QUEUE_ID", "value": "spoofed"},
                                                          {"name": "KEEP", "value": "1"}]}]}}})
    owner = {"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue", "name": "q1", "uid": "u",
             "controller": True, "blockOwnerDeletion": True}
    body = workers.build_pod(q, 4, inputs=workers.PodInputs("http://cp:8080", "sha256:x", owner), settings=SETTINGS)
    assert body["metadata"]["name"] == "q1-w4"
    assert body["metadata"]["ownerReferences"] == [owner]
    assert body["metadata"]["labels"]["agentcontrol.dev/queue"] == "q1"
    assert body["metadata"]["labels"]["team"] == "a"
    assert body["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "workerqueue-operator"
    assert body["metadata"]["annotations"]["agentcontrol.dev/secrets-digest"] == "sha256:x"
    assert body["spec"]["restartPolicy"] == "Never"
    env = {e["name"]: e for e in body["spec"]["containers"][0]["env"]}
    assert env["QUEUE_ID"]["value"] == "q-1" and env["KEEP"]["value"] == "1"
    assert env["CONTROL_PLANE_URL"]["value"] == "http://cp:8080"
    # The default command's CLI reads these: without them it would call Kubiya's public control plane.
    assert env["CONTROL_PLANE_GATEWAY_URL"]["value"] == env["KUBIYA_CONTROL_PLANE_BASE_URL"]["value"] == "http://cp:8080"
    # Its own token, not the queue's: the operator knows which worker asks.
    assert env["KUBIYA_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "q1-w4-token", "key": "token"}}
    assert env["HEARTBEAT_INTERVAL"]["value"] == "30" and env["SINGLE_EXECUTION"]["value"] == "true"
    # No API key and no tls setting: plaintext, which the worker picks from a `temporal:` prefix.
    assert env["TEMPORAL_HOST"]["value"].startswith("temporal:")
    assert body["spec"]["hostname"] == "q1-w4"  # its worker's Temporal identity is <pid>@q1-w4


def test_every_pod_of_a_queue_has_a_hostname_of_its_own_whatever_the_queue_name():
    # Kubernetes would cut these names to the same 63 characters: each worker would take the
    # others' executions for its own. The operator sets spec.hostname, a DNS label per pod.
    long_name = "long-" + "q" * 57
    names = [workers.pod_name(long_name, i) for i in (0, 1, 10)] + ["a.b-w0", "a-b-w0", "q1-w1"]
    hostnames = [workers.pod_hostname(name) for name in names]
    assert len(set(hostnames)) == len(names)
    assert hostnames[-1] == "q1-w1" and hostnames[-2] == "a-b-w0"
    for hostname in hostnames:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", hostname), hostname
    template = {"spec": {"hostname": "shared", "setHostnameAsFQDN": True, "containers": [{"name": "w", "image": "i"}]}}
    body = workers.build_pod(queue(name=long_name, worker={"template": template}), 1,
                             inputs=workers.PodInputs("u", "d", {}), settings=SETTINGS)
    assert body["spec"]["hostname"] == hostnames[1] and "setHostnameAsFQDN" not in body["spec"]


def test_pods_of_namesake_queues_on_a_named_task_queue_get_hostnames_of_their_own():
    # A named task queue may be shared, and a namesake queue in another namespace names its pods the
    # same: the hostname (the Temporal identity's host, by which executions are known) carries the uid.
    inputs = workers.PodInputs("u", "d", {})
    mine = queue(name="twin", namespace="a", uid="u-a", taskQueueName="shared")
    theirs = queue(name="twin", namespace="b", uid="u-b", taskQueueName="shared")
    bodies = [workers.build_pod(q, 0, inputs=inputs, settings=SETTINGS) for q in (mine, theirs)]
    hostnames = [b["spec"]["hostname"] for b in bodies]
    assert hostnames[0] != hostnames[1] and all(h.startswith("twin-w0-") for h in hostnames)
    for hostname in hostnames:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", hostname), hostname
    # The pod's token says which hostname its pod got; the pod itself says so to the planner.
    credential = workers.credential_from_secret(workers.credential_secret_body(mine, "twin-w0", "tok", now=0.0))
    assert credential is not None and credential.hostname == hostnames[0]
    assert workers.Pod.from_body(bodies[0]).host == hostnames[0]
    # A queue on its own task queue (its queue id) keeps its pods' names; so do tokens and pods made
    # before the hostname was written down.
    own = workers.build_pod(queue(name="twin", namespace="a", uid="u-a"), 0, inputs=inputs, settings=SETTINGS)
    assert own["spec"]["hostname"] == "twin-w0"
    del bodies[0]["spec"]["hostname"]
    assert workers.Pod.from_body(bodies[0]).host == "twin-w0"
    older = workers.credential_secret_body(mine, "twin-w0", "tok", now=0.0)
    del older["metadata"]["annotations"][workers.HOSTNAME_ANNOTATION]
    del older["metadata"]["annotations"][workers.INTERVAL_ANNOTATION]
    assert workers.credential_from_secret(older) == (("a", "twin"), "u-a", "twin-w0", "twin-w0", "tok", None)


def test_worker_temporal_mode_follows_the_api_key_or_the_tls_setting():
    keyed = queue(temporal={"host": "ns.tmprl.cloud:7233", "apiKeySecretRef": {"name": "t", "key": "k"}})
    assert workers.worker_temporal_host(keyed, SETTINGS) == "ns.tmprl.cloud:7233"
    forced_off = queue(temporal={"host": "t:7233", "tls": False, "apiKeySecretRef": {"name": "t", "key": "k"}})
    assert workers.worker_temporal_host(forced_off, SETTINGS) == "temporal:t:7233"
    forced_on = queue(temporal={"host": "t:7233", "tls": True})
    assert workers.worker_temporal_host(forced_on, SETTINGS) == "t:7233"
    # A host whose name the worker reads as local still gets TLS and the key.
    for host in ("temporal:7233", "host.docker.internal:7233"):
        assert workers.worker_temporal_host(queue(temporal={"host": host, "tls": True}), SETTINGS) == f"tls:{host}"
    assert workers.worker_temporal_host(queue(temporal={"host": "host.docker.internal:7233", "tls": False}),
                                        SETTINGS) == "host.docker.internal:7233"


def test_credential_secret_round_trips_and_other_secrets_are_not_credentials():
    q = queue(queueId="q-1", heartbeatIntervalSeconds=15)
    body = workers.credential_secret_body(q, "q1-w7", "tok", now=1767225690.25)
    assert body["metadata"]["name"] == "q1-w7-token"
    # The interval its pod is given (HEARTBEAT_INTERVAL), which a later spec change does not change.
    assert workers.credential_from_secret(body) == ((q.namespace, q.name), q.uid, "q1-w7", "q1-w7", "tok", 15.0)
    for unreadable in ("", "soon", "-1", "inf", "nan"):
        body["metadata"]["annotations"][workers.INTERVAL_ANNOTATION] = unreadable
        assert workers.credential_from_secret(body).interval is None, unreadable
    assert workers.credential_from_secret({"metadata": {"name": "q1-worker-token", "labels": {}}}) is None
    assert workers.made_at(body) == 1767225690.25  # to the microsecond
    del body["metadata"]["annotations"][workers.MADE_ANNOTATION]
    assert workers.made_at(body) is None
    body["metadata"]["creationTimestamp"] = "2026-01-01T00:01:30Z"  # made by an earlier version
    assert workers.made_at(body) == 1767225690.0


def test_a_token_secret_of_a_deleted_namesake_is_told_apart_from_this_queues_and_others():
    old, new = queue(uid="uid-old"), queue(uid="uid-new")
    left_behind = workers.credential_secret_body(old, "q1-w0", "tok", now=T0)
    assert workers.namesakes_credential(left_behind, new)
    assert not workers.namesakes_credential(workers.credential_secret_body(new, "q1-w0", "tok", now=T0), new)
    assert not workers.namesakes_credential(left_behind, queue(name="q2", uid="uid-other"))
    assert not workers.namesakes_credential({"metadata": {"name": "q1-w0-token", "labels": {}}}, new)


def test_a_templates_single_execution_is_the_operators_to_set():
    # Kept on a queue that is not single-execution, its workers exited after one task, which the
    # planning of an ephemeral queue never expects; so too from a ConfigMap (`envFrom`), which only
    # an `env` entry of the same name overrides.
    template = {"spec": {"containers": [{"name": "worker", "image": "img",
                                         "env": [{"name": "SINGLE_EXECUTION", "value": "true"}],
                                         "envFrom": [{"configMapRef": {"name": "team-settings"}}]}]}}
    for spec, expected in (({"ephemeral": True}, ["false"]), ({"singleExecution": True}, ["true"])):
        body = workers.build_pod(queue(worker={"template": template}, **spec), 0,
                                 inputs=workers.PodInputs("u", "d", {}), settings=SETTINGS)
        (container,) = body["spec"]["containers"]
        assert [e["value"] for e in container["env"] if e["name"] == "SINGLE_EXECUTION"] == expected


def test_default_pod_uses_the_configured_image_and_command():
    body = workers.build_pod(queue(ephemeral=True), 0, inputs=workers.PodInputs("u", "d", {}), settings=SETTINGS)
    (container,) = body["spec"]["containers"]
    assert container["image"] == SETTINGS.worker_image
    assert container["command"] == list(SETTINGS.worker_command)
    assert {e["name"]: e.get("value") for e in container["env"]}["SINGLE_EXECUTION"] == "false"


RESTRICTED = {
    "metadata": {"labels": {"cost-center": "ml"}},
    "spec": {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "nodeSelector": {"pool": "agents"},
        "containers": [{"name": "worker", "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    },
}


def build_default(settings: Settings, **spec: Any) -> dict[str, Any]:
    return workers.build_pod(queue(ephemeral=True, **spec), 0, inputs=workers.PodInputs("u", "d", {}),
                             settings=settings)


def test_a_worker_pod_gets_no_service_account_token_unless_its_template_names_an_account():
    assert build_default(Settings())["spec"]["automountServiceAccountToken"] is False
    named = {"spec": {"serviceAccountName": "agents", "containers": [{"name": "worker", "image": "w:1"}]}}
    assert "automountServiceAccountToken" not in build_default(Settings(), worker={"template": named})["spec"]
    asked = {"spec": {"automountServiceAccountToken": True, "containers": [{"name": "worker", "image": "w:1"}]}}
    assert build_default(Settings(), worker={"template": asked})["spec"]["automountServiceAccountToken"] is True


def test_the_operator_wide_pod_template_shapes_every_default_pod():
    settings = Settings(worker_pod_template=RESTRICTED)
    body = build_default(settings)
    assert body["metadata"]["labels"]["cost-center"] == "ml"
    assert body["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "workerqueue-operator"
    assert body["spec"]["securityContext"]["runAsNonRoot"] is True
    assert body["spec"]["nodeSelector"] == {"pool": "agents"}
    (container,) = body["spec"]["containers"]
    # The platform team's settings, with the configured worker and what the operator owns.
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "512Mi"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert (container["image"], container["command"]) == (settings.worker_image, list(settings.worker_command))
    assert {"QUEUE_ID", "KUBIYA_API_KEY"} <= {e["name"] for e in container["env"]}
    assert body["spec"]["restartPolicy"] == "Never" and body["spec"]["hostname"] == "q1-w0"
    assert "image" not in settings.worker_pod_template["spec"]["containers"][0]  # each pod its own copy


def test_the_operator_wide_template_adds_the_worker_to_sidecars_and_keeps_an_image_it_names():
    sidecar = {"name": "proxy", "image": "proxy:1"}
    body = build_default(Settings(worker_pod_template={"spec": {"containers": [sidecar]}}))
    assert [(c["name"], c["image"]) for c in body["spec"]["containers"]] == [
        ("worker", Settings().worker_image), ("proxy", "proxy:1")]
    own = {"spec": {"containers": [{"name": "worker", "image": "mirror.example/agent-worker:1.4"}]}}
    (container,) = build_default(Settings(worker_pod_template=own))["spec"]["containers"]
    assert container["image"] == "mirror.example/agent-worker:1.4"
    assert container["command"] == list(Settings().worker_command)


def test_only_the_workers_container_gets_its_token():
    # Every container got KUBIYA_API_KEY: a log shipper or mesh sidecar held a token that passes
    # through to the upstream with the organization's key.
    sidecar = {"name": "shipper", "image": "shipper:1", "env": [{"name": "KUBIYA_API_KEY", "value": "its-own"}]}
    template = {"metadata": {"annotations": {"kubectl.kubernetes.io/default-container": "agent"}},
                "spec": {"containers": [sidecar, {"name": "agent", "image": "w:1"}]}}
    body = build_default(Settings(), worker={"template": template})
    env = {c["name"]: {e["name"]: e for e in c["env"]} for c in body["spec"]["containers"]}
    assert env["agent"]["KUBIYA_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "q1-w0-token", "key": "token"}}
    assert env["shipper"]["KUBIYA_API_KEY"] == {"name": "KUBIYA_API_KEY", "value": "its-own"}
    assert {"QUEUE_ID", "CONTROL_PLANE_URL", "HEARTBEAT_INTERVAL", "TEMPORAL_HOST"} <= set(env["shipper"])


def test_a_queue_template_replaces_the_operator_wide_one():
    template = {"spec": {"containers": [{"name": "w", "image": "img:1"}], "hostNetwork": False}}
    body = build_default(Settings(worker_pod_template=RESTRICTED), worker={"template": template})
    assert "nodeSelector" not in body["spec"] and "securityContext" not in body["spec"]
    assert [c["name"] for c in body["spec"]["containers"]] == ["w"]
    assert body["spec"]["hostNetwork"] is False  # as written: a field the operator types keeps its name


def test_a_queue_template_without_the_workers_image_runs_the_configured_worker():
    """A template for labels or a node selector only could make no pod (no containers): each create
    was refused, and retried with a new name, for good."""
    settings = Settings(worker_image="reg/worker:2", worker_command=["kubiya", "worker", "start"])
    bare = build_default(settings, worker={"template": {"metadata": {"labels": {"team": "a"}},
                                                        "spec": {"nodeSelector": {"disk": "ssd"}}}})
    assert [(c["name"], c["image"], c["command"]) for c in bare["spec"]["containers"]] == [
        ("worker", "reg/worker:2", ["kubiya", "worker", "start"])]
    assert bare["spec"]["nodeSelector"] == {"disk": "ssd"} and bare["metadata"]["labels"]["team"] == "a"
    sidecar = {"name": "proxy", "image": "reg/proxy:1"}
    named = build_default(settings, worker={"template": {"spec": {"containers": [
        {"name": "worker", "args": ["--verbose"]}, sidecar]}}})
    worker, proxy = named["spec"]["containers"]
    assert (worker["image"], worker["command"], worker["args"]) == ("reg/worker:2", ["kubiya", "worker", "start"],
                                                                     ["--verbose"])
    assert "command" not in proxy and proxy["image"] == "reg/proxy:1"
    own = build_default(settings, worker={"template": {"spec": {"containers": [
        {"name": "worker", "command": ["my-worker"]}]}}})
    assert own["spec"]["containers"][0]["command"] == ["my-worker"]
    imaged = build_default(settings, worker={"template": {"spec": {"containers": [
        {"name": "worker", "image": "x:1"}]}}})
    assert "command" not in imaged["spec"]["containers"][0]  # its image's own entrypoint


def test_nulls_the_crd_accepts_in_a_template_are_taken_as_unset():
    """`containers:` left empty in a Helm or kustomize file is stored as null: building the pod
    raised (TypeError), every pass of the queue failed with a traceback, and its status said Ready."""
    settings = Settings(worker_image="reg/worker:2", worker_command=["kubiya", "worker", "start"])
    for template in ({"spec": {"containers": None}}, {"spec": {"containers": [{"name": "worker", "command": None}]}},
                     {"spec": {"containers": [{"name": "worker", "image": None, "command": None}]}}):
        (worker,) = build_default(settings, worker={"template": template})["spec"]["containers"]
        assert (worker["image"], worker["command"]) == ("reg/worker:2", ["kubiya", "worker", "start"]), template
    (worker,) = build_default(Settings(worker_pod_template={"spec": {"containers": None}}))["spec"]["containers"]
    assert worker["name"] == "worker" and worker["image"] == Settings().worker_image


def test_a_templates_hostname_override_gives_way_to_the_workers_hostname():
    """The kubelet names the pod's host by hostnameOverride: every worker of the queue would have one
    Temporal identity, and be taken for each other's (idle ones deleted mid-execution)."""
    template = {"spec": {"hostnameOverride": "same", "containers": [{"name": "worker", "image": "w:1"}]}}
    body = build_default(Settings(), worker={"template": template})
    assert "hostnameOverride" not in body["spec"] and body["spec"]["hostname"] == "q1-w0"


@pytest.mark.parametrize(("template", "words"), [
    ({"spec": {}, "kind": "Pod"}, "metadata and spec only, not kind"),
    ({"spec": ["containers"]}, "spec must be a mapping"),
    ({"spec": {"containers": [{"image": "x"}]}}, "each with a name"),
    ({"spec": {"containers": {"name": "worker"}}}, "must be a list"),
    ({"spec": {"containers": [{"name": "worker", "env": {"A": "1"}}]}}, r"spec.containers.0.env\n.*valid list"),
    ({"metadata": {"labels": ["a"]}}, r"metadata.labels\n.*valid dictionary"),
    ({"metadata": {"annotations": {"a": 1}}}, r"metadata.annotations.a\n.*valid string"),
    ({"spec": {"hostNetwork": True}}, "worker pods cannot use hostNetwork"),
])
def test_a_malformed_operator_wide_template_is_refused_at_start_up(template, words):
    with pytest.raises(ValueError, match=words):
        Settings(worker_pod_template=template)


def test_the_operator_wide_template_reads_from_json_in_the_environment():
    settings = Settings.load({"WQ_WORKER_POD_TEMPLATE": json.dumps(RESTRICTED)})
    assert settings.worker_pod_template == RESTRICTED


def test_long_queue_names_still_make_valid_labels():
    value = workers.label_value("q" * 200)
    assert len(value) <= 63 and value != workers.label_value("q" * 199 + "x")


def test_pod_from_body_reads_exit_code_and_reason():
    body = {"metadata": {"name": "q1-w3"}, "status": {"phase": "Failed", "containerStatuses": [
        {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    p = Pod.from_body(body)
    assert (p.index, p.exit_code, p.reason, p.alive) == (3, 137, "OOMKilled", False)


def sidecar_body(worker: dict[str, Any] | None, *, containers: tuple[str, ...] = ("worker", "istio-proxy"),
                 annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Running pod whose sidecar runs on; its worker container in `worker` state (None: not started)."""
    statuses = [{"name": name, "state": {"running": {}}} for name in containers]
    if worker is not None:
        statuses[0]["state"] = worker
    return {"metadata": {"name": "q1-w2", "annotations": annotations or {}},
            "spec": {"containers": [{"name": name} for name in containers]},
            "status": {"phase": "Running", "containerStatuses": statuses}}


def test_a_pod_whose_worker_ended_while_a_sidecar_runs_on_is_finished():
    """A service mesh's proxy keeps the pod Running after the worker exits: taken as such, a
    single-execution queue kept one dead pod per execution until none served, an ephemeral one was
    never deleted."""
    done = Pod.from_body(sidecar_body({"terminated": {"exitCode": 0, "reason": "Completed"}}))
    assert (done.phase, done.alive, done.exit_code) == ("Succeeded", False, 0)
    crashed = Pod.from_body(sidecar_body({"terminated": {"exitCode": 1, "reason": "Error"}}))
    assert (crashed.phase, crashed.alive, crashed.exit_code, crashed.reason) == ("Failed", False, 1, "Error")
    assert Pod.from_body(sidecar_body({"running": {}})).alive
    assert Pod.from_body(sidecar_body(None)).alive
    # The sidecar's own end is not the worker's.
    ended_sidecar = sidecar_body(None)
    ended_sidecar["status"]["containerStatuses"][1]["state"] = {"terminated": {"exitCode": 0}}
    assert Pod.from_body(ended_sidecar).alive
    # The worker container is the one the pod marks as its default, else `worker`, else the first.
    named = sidecar_body({"running": {}}, containers=("agent", "proxy"),
                         annotations={"kubectl.kubernetes.io/default-container": "proxy"})
    named["status"]["containerStatuses"][1]["state"] = {"terminated": {"exitCode": 0}}
    assert not Pod.from_body(named).alive
    assert Pod.from_body(sidecar_body({"running": {}}, containers=("proxy", "worker"))).alive
    assert not Pod.from_body(sidecar_body({"terminated": {"exitCode": 0}}, containers=("agent", "proxy"))).alive
    # Finished, it is counted and deleted (which stops its sidecar), and a new one made.
    p = plan([done], previous=WorkersStatus(next_index=3), singleExecution=True)
    assert p.delete == ("q1-w2",) and p.create == (3,) and p.workers.succeeded == 1
    # Failed, it is no pod to keep for its logs: its sidecar would run for good.
    crashed = Pod.from_body(sidecar_body({"terminated": {"exitCode": 1, "reason": "Error"}}))
    assert (crashed.phase, crashed.ended) == ("Failed", False)
    p = plan([crashed], previous=WorkersStatus(next_index=3), singleExecution=True)
    assert p.delete == ("q1-w2",) and p.kept is None


def test_a_pod_whose_worker_succeeded_before_its_sidecar_failed_is_a_success():
    # The kubelet reports Failed when a sidecar exits non-zero after the worker exited 0: the worker
    # did its work, and counting a crash would back off and could turn the queue CrashLooping.
    body = sidecar_body({"terminated": {"exitCode": 0, "reason": "Completed"}})
    body["status"]["phase"] = "Failed"
    body["status"]["containerStatuses"][1]["state"] = {"terminated": {"exitCode": 137, "reason": "Error"}}
    p = Pod.from_body(body)
    assert (p.phase, p.exit_code, p.reason) == ("Succeeded", 0, "Completed")
    out = plan([p], previous=WorkersStatus(next_index=3), singleExecution=True)
    assert out.workers.succeeded == 1 and out.workers.consecutive_failures == 0 and out.create == (3,)
    # A worker's own failure stays one, and so does a pod's (an eviction's reason kept).
    body["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 1, "reason": "Error"}}
    assert Pod.from_body(body).phase == "Failed"
    evicted = sidecar_body({"terminated": {"exitCode": 143, "reason": "Error"}})
    evicted["status"].update(phase="Failed", reason="Evicted")
    assert (Pod.from_body(evicted).phase, Pod.from_body(evicted).reason) == ("Failed", "Evicted")


def test_a_pending_pod_whose_worker_runs_is_not_taken_for_one_not_started():
    # A sidecar's image cannot be pulled: the kubelet keeps the pod Pending while the worker runs and
    # may hold an execution. Taken as never started, it went first on a spec change or a scale-down.
    body = sidecar_body({"running": {}}, containers=("worker", "log-shipper"))
    body["metadata"]["annotations"] = {workers.GENERATION_ANNOTATION: "1"}
    body["status"]["phase"] = "Pending"
    body["status"]["containerStatuses"][1]["state"] = {"waiting": {"reason": "ImagePullBackOff"}}
    p = Pod.from_body(body)
    assert (p.phase, p.stuck, p.alive) == ("Running", "", True)
    running = Pod(name="q1-w1", phase="Running", deleting=False, index=1, generation=1)
    assert plan([running, p], previous=WorkersStatus(next_index=3), singleExecution=True, replicas=1).delete == ()
    # Its worker not started yet, the pod is stuck as before.
    body["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ContainerCreating"}}
    waiting = Pod.from_body(body)
    assert (waiting.phase, waiting.stuck) == ("Pending", "ImagePullBackOff")


def failed(index: int) -> Pod:
    return Pod(name=f"q1-w{index}", phase="Failed", deleting=False, index=index, exit_code=1, reason="Error",
               generation=1)


def test_pods_failing_at_once_are_one_failure_in_a_row_not_a_crash_loop():
    # Eight pods made together all exit 1 as they start (the operator restarting, Temporal out of
    # reach): counted as eight failures in a row, the queue went CrashLooping for good at once, with no
    # pod left to succeed and end it.
    out = plan([failed(i) for i in range(6)], previous=WorkersStatus(next_index=6), singleExecution=True, replicas=6)
    assert (out.workers.failed, out.workers.consecutive_failures, out.workers.crash_loop_generation) == (6, 1, None)
    assert out.workers.failure_index == 6
    # Seen over two passes, the same.
    first = plan([failed(0)], previous=WorkersStatus(next_index=6), singleExecution=True, replicas=6)
    rest = plan([failed(i) for i in range(1, 6)], previous=first.workers, now=T0 + 1, singleExecution=True,
                replicas=6)
    assert (rest.workers.failed, rest.workers.consecutive_failures) == (6, 1)
    # The pods made after the back-off failing again: a second failure in a row, and so on to the limit.
    after = rest.workers.model_copy(update={"next_index": 12})
    again = plan([failed(i) for i in range(6, 12)], previous=after, now=T0 + 100, singleExecution=True, replicas=6)
    assert (again.workers.consecutive_failures, again.workers.failure_index) == (2, 12)
    out = plan([failed(12)], previous=again.workers.model_copy(update={"next_index": 13}), now=T0 + 200,
               singleExecution=True, replicas=1, worker={"backoffLimit": 3})
    assert out.workers.consecutive_failures == 3 and out.workers.crash_loop_generation == 1
    # After a success, an old pod's failure starts a new count.
    ok = Pod(name="q1-w13", phase="Succeeded", deleting=False, index=13, exit_code=0, generation=1)
    cleared = plan([ok, failed(5)], previous=again.workers, now=T0 + 300, singleExecution=True, replicas=6)
    assert (cleared.workers.consecutive_failures, cleared.workers.failure_index) == (1, 14)


def test_only_a_status_that_shows_pods_makes_a_queue_one_to_look_after():
    # The API server fills in the CRD's defaults once status.workers.live is written: zeros, no pods.
    filled_in = {"live": 3, "desired": 0, "pending": 0, "running": 0, "succeeded": 0, "failed": 0,
                 "consecutiveFailures": 0, "nextIndex": 0, "counted": []}
    assert not workers.has_pod_history(filled_in)
    assert not workers.has_pod_history(None) and not workers.has_pod_history({"live": 2})
    assert workers.has_pod_history({**filled_in, "nextIndex": 1})
    assert workers.has_pod_history({"live": 0, "lastFailureTime": "2026-01-01T00:00:00Z"})


def pending_body(name: str, *, waiting: str | None = None, unschedulable: bool = False) -> dict[str, Any]:
    """A Pending pod as this version makes it (with the current worker settings' digest)."""
    status: dict[str, Any] = {"phase": "Pending"}
    if waiting is not None:
        status["containerStatuses"] = [{"name": "worker", "state": {"waiting": {
            "reason": waiting, "message": f'{waiting} for "registry.example/worker:nope"'}}}]
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": "0/3 nodes are available: 3 Insufficient memory."}]
    annotations = {workers.TEMPLATE_ANNOTATION: workers.worker_defaults_digest(SETTINGS)}
    return {"metadata": {"name": name, "annotations": annotations}, "status": status}


def test_a_pending_pod_that_will_not_start_by_itself_says_why():
    assert Pod.from_body(pending_body("q1-w1", waiting="ImagePullBackOff")).stuck == "ImagePullBackOff"
    assert Pod.from_body(pending_body("q1-w1", waiting="ErrImagePull")).stuck == "ImagePullBackOff"  # the same
    assert Pod.from_body(pending_body("q1-w1", waiting="CreateContainerConfigError")).stuck == (
        "CreateContainerConfigError")
    unschedulable = Pod.from_body(pending_body("q1-w1", unschedulable=True))
    assert (unschedulable.stuck, unschedulable.stuck_message) == (
        "Unschedulable", "0/3 nodes are available: 3 Insufficient memory.")
    # Starting normally: nothing to say.
    assert Pod.from_body(pending_body("q1-w1", waiting="ContainerCreating")).stuck == ""
    assert Pod.from_body(pending_body("q1-w1")).stuck == ""
    running = pending_body("q1-w1", waiting="ImagePullBackOff")
    running["status"]["phase"] = "Running"
    assert Pod.from_body(running).stuck == ""


def test_workers_that_cannot_start_are_listed_and_told_once_each_never_replaced():
    stuck = Pod.from_body(pending_body("q1-w0", waiting="ImagePullBackOff"))
    first = plan([stuck, pod(1)], singleExecution=True, replicas=2)
    assert first.workers.stuck == ["q1-w0: ImagePullBackOff"] and first.create == () and first.delete == ()
    assert [(e.reason, e.warning) for e in first.events] == [("WorkerNotStarting", True)]
    assert 'q1-w0 cannot start: ImagePullBackOff: ImagePullBackOff for "registry.example/worker:nope"' in (
        first.events[0].message)
    # The kubelet's next try says ErrImagePull: the same trouble, told once.
    again = plan([Pod.from_body(pending_body("q1-w0", waiting="ErrImagePull")), pod(1)], first.workers,
                 singleExecution=True, replicas=2)
    assert again.workers.stuck == first.workers.stuck and not again.events
    fixed = plan([pod(0), pod(1)], again.workers, singleExecution=True, replicas=2)
    assert fixed.workers.stuck == [] and not fixed.events


def test_a_pod_whose_own_token_is_gone_before_it_started_is_replaced_without_a_failure():
    # Its token Secret deleted (by hand, by a cleanup job) before its worker ran: the kubelet waits for
    # it for good, and the queue had one worker less until someone deleted the pod.
    stuck = Pod.from_body(pending_body("q1-w0", waiting="CreateContainerConfigError"))
    kept = plan([stuck, pod(1)], WorkersStatus(next_index=2), singleExecution=True, replicas=2)
    assert kept.delete == () and kept.create == ()  # a Secret of the user's is missing: told, not replaced
    gone = plan([dataclasses.replace(stuck, token_gone=True), pod(1)], WorkersStatus(next_index=2),
                singleExecution=True, replicas=2)
    assert gone.delete == ("q1-w0",) and gone.create == (2,)
    assert gone.workers.failed == 0 and gone.workers.consecutive_failures == 0
    # Running, it is turned away (401) at every call: replaced too, and said.
    running = plan([pod(0, token_gone=True), pod(1)], WorkersStatus(next_index=2), singleExecution=True, replicas=2)
    assert running.delete == ("q1-w0",) and running.create == (2,) and running.workers.failed == 0
    assert [(e.reason, e.warning) for e in running.events] == [("WorkerTokenGone", True)]


def test_a_worker_that_failed_as_its_token_secret_was_deleted_is_no_failure():
    """Its container had the token already; its /start then got 401, and it exited 1: counted as a
    crash, such deletions led to a back-off and CrashLooping."""
    p = plan([pod(0, "Failed", exit_code=1, token_gone=True)], WorkersStatus(next_index=1), singleExecution=True)
    assert p.workers.failed == 0 and p.workers.consecutive_failures == 0 and p.create == (1,)
    assert [(e.reason, e.warning) for e in p.events] == [("WorkerTokenGone", True)]
    # Nor is its pod kept for its logs in place of a crash's: those say why the workers fail.
    crashed = plan([pod(0, "Failed", exit_code=1)], WorkersStatus(next_index=1), singleExecution=True)
    assert crashed.kept == "q1-w0"
    after = plan([pod(0, "Failed", exit_code=1), pod(1, "Failed", exit_code=1, token_gone=True)],
                 crashed.workers.model_copy(update={"next_index": 2}), singleExecution=True, now=T0 + 100)
    assert after.kept == "q1-w0" and after.delete == ("q1-w1",)
    from workerqueue_operator.core.supervisor import _failed_tokenless

    failed = pod(0, "Failed", exit_code=1)
    assert _failed_tokenless(failed, {}, set())
    assert not _failed_tokenless(failed, {}, {"q1-w0"})  # counted, then revoked by the operator
    assert not _failed_tokenless(failed, {"q1-w0": ("team-a", "q1-w0-token")}, set())
    assert not _failed_tokenless(pod(0, "Succeeded"), {}, set())


def test_a_pods_token_is_gone_once_the_kubelet_says_so_or_the_watch_had_a_minute_to_bring_it():
    from workerqueue_operator.core.supervisor import ORPHAN_GRACE_SECONDS, _token_gone

    young = pod(0, created=T0)
    assert not _token_gone(young, {}, T0 + ORPHAN_GRACE_SECONDS - 1)  # the watch may lag
    assert _token_gone(young, {}, T0 + ORPHAN_GRACE_SECONDS)
    assert not _token_gone(young, {"q1-w0": ("team-a", "q1-w0-token")}, T0 + 3600)
    stuck = Pod.from_body(pending_body("q1-w0", waiting="CreateContainerConfigError"))
    assert _token_gone(stuck, {}, T0)  # the kubelet has looked for it already
    assert not _token_gone(pod(0, "Succeeded", created=T0), {}, T0 + 3600)  # ended: nothing to replace


def made(body: dict[str, Any], at: float) -> dict[str, Any]:
    body["metadata"]["creationTimestamp"] = times.rfc3339(at)
    return body


def test_an_unschedulable_worker_is_reported_only_once_a_node_could_have_been_added():
    """A cluster autoscaler adds a node for a pod the scheduler cannot place yet, in minutes: told at
    once, every scale-up was a Warning and the queue's Progressing turned False for a while."""
    waiting = Pod.from_body(made(pending_body("q1-w0", unschedulable=True), T0))
    early = plan([waiting], singleExecution=True, now=T0 + 10)
    assert early.workers.stuck == [] and not early.events and early.create == ()
    assert early.requeue_after == pytest.approx(workers.UNSCHEDULABLE_GRACE_SECONDS - 10)
    late = plan([waiting], early.workers, singleExecution=True, now=T0 + workers.UNSCHEDULABLE_GRACE_SECONDS)
    assert late.workers.stuck == ["q1-w0: Unschedulable"]
    assert [e.reason for e in late.events] == ["WorkerNotStarting"]
    assert "Insufficient memory" in late.events[0].message
    # Made for an older spec (smaller requests may be the fix): replaced at once by one of the new spec.
    older = dataclasses.replace(waiting, generation=1)
    changed = plan([older], WorkersStatus(next_index=1), generation=2, singleExecution=True, now=T0 + 10)
    assert changed.delete == ("q1-w0",) and changed.create == (1,)
    # An image that cannot be pulled is told at once: no node change fixes it.
    pull = Pod.from_body(made(pending_body("q1-w0", waiting="ImagePullBackOff"), T0))
    assert plan([pull], singleExecution=True, now=T0 + 10).workers.stuck == ["q1-w0: ImagePullBackOff"]


def test_a_stuck_worker_made_with_other_operator_wide_settings_is_replaced():
    """A wrong worker image (or node selector) in the Helm values, fixed and rolled out: no queue's
    spec changed, so every stuck pod stayed stuck until someone deleted it."""
    current = workers.worker_defaults_digest(SETTINGS)
    assert current == workers.worker_defaults_digest(Settings())
    assert Pod.from_body(build_default(SETTINGS)).defaults == current  # each pod says what it was made with
    assert current != workers.worker_defaults_digest(Settings(worker_image="ghcr.io/x/worker:fixed"))
    placed = Settings(worker_pod_template={"spec": {"nodeSelector": {"a": "b"}}})
    assert current != workers.worker_defaults_digest(placed)
    pull = Pod.from_body(made(pending_body("q1-w0", waiting="ImagePullBackOff"), T0))
    # Made with others, or by an earlier version that did not say (upgraded with the fix, say).
    for digest in ("sha256:0123456789abcdef", ""):
        stale = dataclasses.replace(pull, defaults=digest)
        replaced = plan([stale], WorkersStatus(next_index=1), singleExecution=True, now=T0 + 10)
        assert replaced.delete == ("q1-w0",) and replaced.create == (1,)
    # Made with the current ones: told, and left be (a new one would wait the same).
    kept = plan([dataclasses.replace(pull, defaults=current)], WorkersStatus(next_index=1), singleExecution=True,
                now=T0 + 10)
    assert kept.delete == () and kept.create == () and kept.workers.stuck == ["q1-w0: ImagePullBackOff"]
    # A running one is no concern of this: settings apply to new pods only.
    running = plan([dataclasses.replace(pod(0), defaults="sha256:0123456789abcdef")], WorkersStatus(next_index=1),
                   singleExecution=True, now=T0 + 10)
    assert running.delete == () and running.create == ()


def test_a_pool_made_single_execution_stops_the_pools_workers_which_never_exit():
    """Its pool workers counted as the single-execution workers wanted: none was ever made, and the
    ephemeral queue never finished."""
    def running(**spec: Any) -> Pod:
        return dataclasses.replace(Pod.from_body(build_default(SETTINGS, **spec)), phase="Running")

    pooled, single = running(replicas=2), running(singleExecution=True)
    assert (pooled.single_execution, single.single_execution) == (False, True)
    foreign = {"metadata": {"name": "q1-w0"}, "spec": {"containers": [{"name": "x"}]}}
    assert Pod.from_body(foreign).single_execution is None
    p = plan([pooled], WorkersStatus(next_index=1), ephemeral=True, singleExecution=True)
    assert p.delete == ("q1-w0",) and p.create == (1,)
    assert [e.message for e in p.events if e.reason == "ScalingDown"] == [
        "the queue is single-execution now: stopping the pool's workers q1-w0"]
    # Its own kind, or a pod whose kind is not known, is let be.
    for kept in (single, dataclasses.replace(pooled, single_execution=None)):
        p = plan([kept], WorkersStatus(next_index=1), ephemeral=True, singleExecution=True)
        assert p.delete == () and p.create == ()


def test_a_worker_not_started_for_any_reason_is_reported_after_a_deadline():
    """Stuck in ContainerCreating (a CNI out of addresses, a volume that never mounts) matched none of
    the lasting reasons: the pod held its place for good, with Progressing True and no Warning."""
    creating = Pod.from_body(made(pending_body("q1-w0", waiting="ContainerCreating"), T0))
    early = plan([creating], singleExecution=True, now=T0 + 60)
    assert early.workers.stuck == [] and not early.events
    assert early.requeue_after == pytest.approx(workers.PENDING_DEADLINE_SECONDS - 60)
    late = plan([creating], early.workers, singleExecution=True, now=T0 + workers.PENDING_DEADLINE_SECONDS)
    assert late.workers.stuck == ["q1-w0: ContainerCreating"] and late.create == () and late.delete == ()
    assert [e.reason for e in late.events] == ["WorkerNotStarting"]
    assert "not started 600s after it was made" in late.events[0].message
    silent = Pod.from_body(made(pending_body("q1-w0"), T0))
    assert plan([silent], singleExecution=True, now=T0 + 601).workers.stuck == ["q1-w0: NotStarted"]
    running = plan([dataclasses.replace(creating, phase="Running")], late.workers, singleExecution=True,
                   now=T0 + 700)
    assert running.workers.stuck == [] and not running.events


def test_a_worker_that_cannot_start_is_replaced_once_the_spec_changes():
    # Stuck on generation 1's image; the image is fixed (generation 2): a pod of the new spec replaces it.
    stuck = dataclasses.replace(Pod.from_body(pending_body("q1-w0", waiting="ImagePullBackOff")), index=0,
                                generation=1)
    fixed = plan([stuck, pod(1, generation=1)], WorkersStatus(next_index=2), generation=2, singleExecution=True,
                 replicas=2)
    assert fixed.delete == ("q1-w0",) and fixed.create == (2,) and fixed.workers.stuck == []
    # Stuck on the current spec: waiting is all a new pod would do too.
    same = plan([dataclasses.replace(stuck, generation=2), pod(1)], WorkersStatus(next_index=2), generation=2,
                singleExecution=True, replicas=2)
    assert same.delete == () and same.create == ()


@pytest.mark.parametrize("lowered", [{"replicas": 2}, {"replicas": 5, "maxWorkers": 2}])
def test_lowered_replicas_remove_workers_not_started_yet_and_let_running_ones_finish(lowered: dict[str, int]):
    pods = [pod(0), pod(1, "Pending"), pod(2), pod(3, "Pending"), pod(4, "Pending")]
    p = plan(pods, WorkersStatus(next_index=5), singleExecution=True, **lowered)
    assert p.delete == ("q1-w4", "q1-w3", "q1-w1") and p.create == ()
    running = [pod(0), pod(1), pod(2)]
    p = plan(running, WorkersStatus(next_index=5), singleExecution=True, **lowered)
    assert p.delete == () and p.create == ()  # none replaced until fewer than 2 are left


def test_lowered_replicas_of_workers_that_never_exit_by_themselves_delete_the_newest():
    # Not single-execution, a worker never exits by itself: "running ones finish" left an ephemeral
    # queue's surplus running for good, and its status saying they would go.
    pods = [pod(0), pod(1), pod(2, "Pending"), pod(3)]
    p = plan(pods, WorkersStatus(next_index=4), ephemeral=True, replicas=1)
    assert p.delete == ("q1-w2", "q1-w3", "q1-w1") and p.create == ()
    assert [e.reason for e in p.events] == ["ScalingDown"]
    assert plan([pod(0)], WorkersStatus(next_index=4), ephemeral=True, replicas=1).delete == ()
    # Nor all of them: none left, the queue would read as finished and be deleted with its work.
    zero = plan([pod(0), pod(1)], WorkersStatus(next_index=2), ephemeral=True, replicas=0)
    assert zero.delete == () and zero.delete_queue is None


def test_a_queue_whose_workers_now_run_elsewhere_deletes_its_pods_not_started_and_lets_the_others_finish():
    # singleExecution turned off: no pod wanted, but none deleted either; one stuck pulling its image
    # stayed until the queue was deleted.
    pods = [pod(0), pod(1, "Pending"), pod(2)]
    p = plan(pods, WorkersStatus(next_index=3, desired=3))
    assert p.delete == ("q1-w1",) and p.create == () and p.workers.desired == 0


def test_a_refused_pod_is_tried_again_after_the_workers_back_off_and_at_once_after_a_spec_change():
    first = CreateRefusal.after(None, generation=1, now=T0, settings=SETTINGS)
    assert (first.count, first.retry_at) == (1, T0 + 10)
    assert first.holds(1, T0 + 9.9) and not first.holds(1, T0 + 10)
    second = CreateRefusal.after(first, generation=1, now=T0 + 10, settings=SETTINGS)
    assert (second.count, second.retry_at) == (2, T0 + 30)  # 10 s doubling, as failed workers wait
    assert not second.holds(2, T0 + 11)  # the spec changed: tried at once
    changed = CreateRefusal.after(second, generation=2, now=T0 + 11, settings=SETTINGS)
    assert (changed.count, changed.retry_at) == (1, T0 + 21)


def test_a_pod_the_older_spec_could_not_create_is_not_told_under_the_new_one():
    refused = WorkersStatus(observed_generation=1, desired=1, next_index=1, last_error="admission webhook denied it")
    kept = plan([], refused, generation=1, singleExecution=True).workers
    assert kept.last_error == "admission webhook denied it"
    changed = plan([], refused, generation=2, singleExecution=True).workers
    assert (changed.last_error, changed.observed_generation) == (None, 2)


def test_a_finished_pod_someone_else_deletes_before_a_pass_counts_it_is_counted_all_the_same():
    """A cleanup deleting finished pods, a drain: the success was lost, and an ephemeral queue started
    a worker too many; a failure so deleted went uncounted as a displacement."""
    started = WorkersStatus(observed_generation=1, desired=2, next_index=2)
    gone = [dataclasses.replace(pod(0, "Succeeded"), deleting=True),
            dataclasses.replace(pod(1, "Failed"), deleting=True)]
    p = workers.plan(queue(ephemeral=True, replicas=2), gone, previous=started, now=T0, created=T0 - 100,
                     settings=SETTINGS, deleted_outside=frozenset({"q1-w0", "q1-w1"}))
    assert (p.workers.succeeded, p.workers.failed, p.workers.consecutive_displaced) == (1, 0, 1)
    assert p.create == (2,) and p.delete == ()  # one more to make the two completions; none deleted again
    assert [e.reason for e in p.events] == ["WorkerSucceeded", "WorkerDisplaced"]
    # Deleted here (counted before, or as surplus): no news of the worker.
    ours = workers.plan(queue(ephemeral=True, replicas=2), gone, previous=started, now=T0, created=T0 - 100,
                        settings=SETTINGS)
    assert (ours.workers.succeeded, ours.workers.failed, ours.workers.consecutive_displaced) == (0, 0, 0)


def test_a_time_to_come_written_by_a_clock_ahead_holds_no_back_off_longer_than_its_own():
    """A replica whose clock ran an hour ahead wrote the last failure: its back-off of 20 s waited an
    hour, the pool without a pod all that time. The time is taken as now, and written so."""
    ahead = WorkersStatus(consecutive_failures=2, last_failure_time=times.rfc3339(T0 + 3600), next_index=3)
    p = plan([], ahead, singleExecution=True)
    assert p.create == () and p.requeue_after == workers.backoff(2, SETTINGS)
    assert p.workers.last_failure_time == times.rfc3339(T0)
    later = plan([], p.workers, now=T0 + workers.backoff(2, SETTINGS), singleExecution=True)
    assert later.create == (3,)

    finished = WorkersStatus(succeeded=1, finished_time=times.rfc3339(T0 + 3600), next_index=1)
    ttl = plan([], finished, ephemeral=True, singleExecution=True, ttlSecondsAfterFinished=60)
    assert ttl.delete_queue is None and ttl.requeue_after == 60
    assert plan([], ttl.workers, now=T0 + 60, ephemeral=True, singleExecution=True,
                ttlSecondsAfterFinished=60).delete_queue is not None


@pytest.mark.parametrize("text", ["yesterday", "", "2026-01-01t00:00:00z", "2026-01-01T00:00:60Z"])
@pytest.mark.parametrize("field", ["last_failure_time", "last_displaced_time", "finished_time"])
def test_a_status_time_that_is_no_time_is_taken_as_now_not_a_failure_of_every_pass(field: str, text: str):
    """The schema takes any string there (a hand edit, a backup restored): read strictly, it failed
    every pass of the queue for good, no pod made or deleted."""
    status = WorkersStatus(consecutive_failures=1, consecutive_displaced=2, succeeded=1, next_index=1,
                           **{field: text})
    p = plan([], status, ephemeral=True, singleExecution=True, ttlSecondsAfterFinished=60)
    assert getattr(p.workers, field) == times.rfc3339(T0)
    assert p.requeue_after is not None and p.requeue_after > 0


def test_a_credential_never_shows_its_token():
    credential = workers.Credential(queue=("team-a", "q1"), queue_uid="uid", pod="q1-w0", hostname="h",
                                    token="tok-secret-value")
    assert "tok-secret-value" not in repr(credential) and "tok-secret-value" not in str(credential)
    assert "q1-w0" in repr(credential)


def test_a_worker_token_is_its_queues_only_by_the_queues_uid_not_its_name():
    """A deleted queue's per-worker token left behind (`kubectl replace --force`, an orphaning delete)
    has the same name and labels as the new queue's own would: it opens nothing of the new queue's."""
    old, new = queue("q1", uid="uid-old"), queue("q1", uid="uid-new")
    body = workers.credential_secret_body(old, "q1-w0", "tok", now=0.0)
    assert workers.credential_of(body, old) and not workers.credential_of(body, new)
    assert workers.namesakes_credential(body, new) and not workers.namesakes_credential(body, old)
    assert not workers.credential_of({"metadata": {"name": "q1-w0-token", "labels": {}}}, old)  # a user's Secret


# --- Guards a mutation pass found untested ----------------------------------------------------------

def test_a_pool_short_of_a_worker_never_deletes_a_running_one_to_make_up_for_it():
    """A pool of 3 that lost one worker (evicted)
    sliced its staying pods with a negative bound, and deleted its newest healthy worker as "surplus"."""
    spec = {"ephemeral": True, "replicas": 3}
    p = plan([pod(0), pod(1), pod(2, "Failed", reason="Evicted")], WorkersStatus(next_index=3), **spec)
    assert p.workers.desired == 3
    assert p.delete == ("q1-w2",) and p.create == (3,)  # the evicted one goes and is replaced, nothing else
    assert "ScalingDown" not in [e.reason for e in p.events]
    # Nor while a failed worker's replacement waits out its back-off.
    failed = plan([pod(0), pod(1), pod(2, "Failed", exit_code=1)], WorkersStatus(next_index=3), **spec)
    assert failed.create == () and failed.kept == "q1-w2" and failed.delete == ()


@pytest.mark.parametrize("spec", [{"ephemeral": True, "singleExecution": True},
                                  {"singleExecution": True, "replicas": 2}], ids=["ephemeral", "pool"])
def test_backoff_limit_0_starts_workers_and_crash_loops_on_the_first_failure(spec: dict[str, Any]):
    """With backoffLimit 0 ("0 is as 1",
    as a Job's users often write it) a queue was CrashLooping before any worker ran: an ephemeral queue
    never started one, a pool only one."""
    spec = {**spec, "worker": {"backoffLimit": 0}}
    p = plan([], **spec)
    assert p.create == tuple(range(p.workers.desired)) and p.create
    assert p.workers.crash_loop_generation is None and "CrashLooping" not in [e.reason for e in p.events]
    failed = plan([pod(0, "Failed", exit_code=1)], WorkersStatus(next_index=len(p.create)), **spec)
    assert failed.workers.crash_loop_generation == 1 and "CrashLooping" in [e.reason for e in failed.events]


def test_a_suspended_crash_looping_pool_makes_no_try():
    """Within the hour after
    its last failure, a suspended pool made a pod every 300 s, which /start turned away (and the
    next pass deleted as not started)."""
    spec = {"singleExecution": True, "replicas": 2, "worker": {"backoffLimit": 3}}
    status = WorkersStatus(consecutive_failures=3, crash_loop_generation=1, observed_generation=1,
                           failures_generation=1, last_failure_time=times.rfc3339(T0 - 1000), next_index=3)
    assert plan([], status, now=T0, **spec).create == (3,)  # not suspended: the try is due
    suspended = plan([], status, now=T0, suspend=True, **spec)
    assert suspended.create == () and suspended.workers.next_index == 3


def test_an_ephemeral_pool_lowered_below_its_successes_wants_zero_workers_not_fewer():
    """Replicas lowered below the workers that
    already succeeded wrote a negative status.workers.desired (`kubectl get -o wide`: Desired -1)."""
    status = WorkersStatus(succeeded=3, next_index=3, observed_generation=1)
    p = plan([], status, ephemeral=True, replicas=1, ttlSecondsAfterFinished=60)
    assert p.workers.desired == 0 and p.create == ()


def test_the_failed_pod_kept_for_its_logs_goes_in_the_pass_whose_worker_proves_the_fault_gone():
    """A pool's
    try that ran for the longest back-off ends the failures in a row; the failed pod kept for its logs
    must go then, not linger until some later pass happens to come."""
    spec = {"singleExecution": True, "replicas": 1}
    status = WorkersStatus(consecutive_failures=1, failures_generation=1, observed_generation=1, failure_index=2,
                           last_failure_time=times.rfc3339(T0 - 1000), next_index=3, failed=1, counted=["q1-w1"])
    try_ = pod(2, running_since=T0 - SETTINGS.worker_backoff_max_seconds)
    p = plan([pod(1, "Failed", exit_code=1), try_], status, **spec)
    assert p.workers.consecutive_failures == 0 and "BackOffReset" in [e.reason for e in p.events]
    assert p.kept is None and p.delete == ("q1-w1",)


