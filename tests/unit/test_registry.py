"""The worker registry's pure parts: Lease bodies, expiry, bounds, write pacing, the executions views."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import re
import time
from typing import Any

import pytest

from tests.unit.factories import queue
from workerqueue_operator.core import executions, leases, refusals, registry
from workerqueue_operator.core.temporal import Execution
from workerqueue_operator.devcluster.worker import Latch
from workerqueue_operator.models import times, wire
from workerqueue_operator.models.spec import OBJECT_NAME_PATTERN


def make_worker(**overrides: object) -> leases.Worker:
    values: dict[str, object] = dict(
        worker_id="0b9c6f1e-0000-4000-8000-000000000001", queue=("team-a", "q1"), queue_uid="uid-1",
        queue_id="q-1", lease="q1-slot-0", duration=25.0, registered_at=1000.0, renewed_at=1010.0,
        seen_at=1000.0, slot=0, status="busy", tasks_processed=3, current_task_id="exec-9", hostname="h",
        pod="q1-w3", system_info=b'{"hostname":"h","cpu_count":2}')
    values.update(overrides)
    return leases.Worker(**values)  # type: ignore[arg-type]


def test_a_lease_round_trips_everything_the_registry_keeps():
    worker = make_worker()
    body = leases.lease_body(worker, queue_name="q1")
    assert body["spec"]["holderIdentity"] == worker.worker_id
    assert body["spec"]["leaseDurationSeconds"] == 25
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert body["metadata"]["labels"]["app.kubernetes.io/component"] == leases.COMPONENT
    back = leases.worker_from_lease({**body, "metadata": {**body["metadata"], "resourceVersion": "7"}},
                                      seen_at=2000.0)
    assert back is not None
    assert (back.worker_id, back.queue, back.lease, back.slot, back.pod) == (
        worker.worker_id, ("team-a", "q1"), "q1-slot-0", 0, "q1-w3")
    assert (back.status, back.tasks_processed, back.current_task_id) == ("busy", 3, "exec-9")
    assert abs(back.renewed_at - 1010.0) < 1e-3 and abs(back.registered_at - 1000.0) < 1e-3
    assert back.stored and not back.dirty


def test_a_lease_whose_state_someone_else_wrote_badly_reads_without_failing():
    # Anyone who may write Leases in the namespace could: a heartbeat reading it must not be a 500.
    body = leases.lease_body(make_worker(), queue_name="q1")
    body["metadata"]["annotations"][leases.STATE_ANNOTATION] = json.dumps(
        {"tasksProcessed": "many", "hostname": 5, "pod": {"x": 1}, "currentTaskId": ["a"], "slot": "0"})
    back = leases.worker_from_lease(body, seen_at=2000.0)
    assert back is not None
    assert (back.tasks_processed, back.hostname, back.pod, back.current_task_id, back.slot) == (0, None, None,
                                                                                                None, None)


def test_a_lease_renewed_far_into_the_future_or_lasting_for_hours_holds_its_worker_no_longer_than_its_pace():
    # Edited by hand (or written by a replica whose clock ran far ahead): a renewTime a day ahead kept a
    # dead worker, and its maxWorkers slot, registered for that day, each renewal writing the time on.
    body = leases.lease_body(make_worker(renewed_at=1000.0 + 86_400, registered_at=1000.0 + 86_400), queue_name="q1")
    far = leases.worker_from_lease(body, seen_at=1000.0, now=1000.0)  # as the watch brings it: seen now
    assert far is not None and far.renewed_at == 1000.0 and far.registered_at == 1000.0
    assert far.expired(1000.0 + 25.0)
    # Read for a takeover or a deletion: no renewal told since the floor given, so expired long since.
    taken = leases.worker_from_lease(body, seen_at=0.0, now=1000.0)
    assert taken is not None and taken.renewed_at == 0.0 and taken.expired(1000.0)
    near = leases.worker_from_lease(leases.lease_body(make_worker(renewed_at=1005.0), queue_name="q1"),
                                    seen_at=900.0, now=1000.0)
    assert near is not None and abs(near.renewed_at - 1005.0) < 1e-3  # a clock a little ahead: as written
    body["spec"]["leaseDurationSeconds"] = 10**9
    forever = leases.worker_from_lease(body, seen_at=900.0, now=1000.0)
    assert forever is not None and forever.duration == leases.lease_duration(leases.MAX_INTERVAL)


def test_leases_that_are_not_registrations_are_ignored():
    assert leases.worker_from_lease({"metadata": {"name": "x", "namespace": "n"}, "spec": {}}, seen_at=0) is None
    no_owner = {"metadata": {"name": "x", "namespace": "n"}, "spec": {"holderIdentity": "w"}}
    assert leases.worker_from_lease(no_owner, seen_at=0) is None


def test_expiry_counts_from_the_last_heartbeat_but_not_the_time_nobody_watched():
    worker = make_worker(renewed_at=1000.0, seen_at=1000.0, duration=25.0)
    assert not worker.expired(1024.9)
    assert worker.expired(1025.0)
    # A replica that starts long after the last renewal gives the worker a full duration first.
    late = make_worker(renewed_at=1000.0, seen_at=5000.0, duration=25.0)
    assert not late.expired(5024.0) and late.expired(5025.0)


def test_system_info_is_bounded_and_drops_long_values():
    info = {"hostname": "h", "blob": "x" * 5000, **{f"k{i}": "v" * 100 for i in range(100)}}
    kept = leases.bounded_system_info(info)
    assert kept is not None and "blob" not in kept and kept["hostname"] == "h"
    assert len(str(kept)) <= leases.SYSTEM_INFO_MAX_BYTES + 200
    assert leases.bounded_system_info({}) is None


def test_slot_and_worker_lease_names_fit_a_dns_subdomain_and_stay_apart():
    long_name = "q" * 253
    assert len(leases.slot_lease_name(long_name, 999)) <= 253
    assert len(leases.lease_name(long_name, "0b9c6f1e-0000-4000-8000-000000000001")) <= 253
    assert leases.slot_lease_name("agents", 2) == "agents-slot-2"
    # Two queues whose names begin alike have slots of their own (one slot each, not one between them).
    alpha, beta = "x" * 230 + "-alpha", "x" * 230 + "-beta"
    assert leases.slot_lease_name(alpha, 0) != leases.slot_lease_name(beta, 0)
    # A "." where the name is cut made ".-", which the API server refuses (422): no Lease, every
    # /start of a maxWorkers queue 503, and the others' registrations never written.
    for name in ("a" * 199 + ".b", "a" * 188 + ".b" * 10, "a" * 200 + ".b"):
        for made in (leases.lease_name(name, "0b9c6f1e-0000-4000-8000-000000000001"), leases.slot_lease_name(name, 7)):
            assert re.fullmatch(OBJECT_NAME_PATTERN, made) and len(made) <= 253, made


def execution(id_: str, status: str, holder: str | None, started: str) -> Execution:
    return Execution(id=id_, run_id=f"run-{id_}", status=status, workflow_type="AgentExecutionWorkflow",
                     created_at=started, started_at=started, completed_at=None if status == "running" else started,
                     holder=holder)


LISTING = [
    execution("e4", "running", None, "2026-01-01T00:04:00Z"),  # nobody took it yet
    execution("e3", "running", "12@q1-w2", "2026-01-01T00:03:00Z"),
    execution("e2", "completed", "7@q1-w1", "2026-01-01T00:02:00Z"),
    execution("e1", "completed", "99@q1-w0", "2026-01-01T00:01:00Z"),
]


def test_a_worker_sees_nothing_before_it_holds_an_execution():
    assert executions.worker_view(LISTING, hostname="q1-w9") == []


def test_a_worker_sees_only_its_own_execution_never_another_workers():
    (entry,) = executions.worker_view(LISTING, hostname="q1-w1")
    assert (entry["id"], entry["status"]) == ("e2", "completed")
    (entry,) = executions.worker_view(LISTING, hostname="q1-w2")
    assert (entry["id"], entry["status"]) == ("e3", "running")


def test_a_worker_sees_nothing_while_the_listing_may_have_left_running_executions_out():
    """Cut at the scan's limit, the oldest running ones (what workers took first) may be missing:
    whatever this listing shows a worker may not be its first execution."""
    assert executions.worker_view(LISTING, hostname="q1-w2", cut=True) == []
    assert executions.worker_view(LISTING, hostname="q1-w2", cut=False) != []


def test_a_worker_whose_execution_was_cancelled_before_it_saw_it_run_is_led_to_exit():
    """The worker latches only onto running, completed, failed or waiting_for_input: its execution
    cancelled (or terminated) before its first poll saw it run read `cancelled` for good, and the
    worker waited out its 1,800-s give-up. As the test worker's latch (the real worker's rule) reads it."""
    listing = [execution("e1", "cancelled", "7@q1-w1", "2026-01-01T00:01:00Z")]
    view = executions.worker_view(listing, hostname="q1-w1")
    assert [(e["id"], e["status"]) for e in view] == [("e1", "failed")]
    latch = Latch()
    assert not latch.feed(view) and latch.execution_id == "e1"
    assert latch.feed(executions.worker_view(listing, hostname="q1-w1"))
    # The queue's own listing (people, tools) says what happened.
    assert executions.queue_view(listing, status="all", limit=5)[0]["status"] == "cancelled"


def test_two_workers_on_one_host_each_see_their_own_by_their_process():
    """Two processes on one host (outside pods), each signed in with a Kubernetes identity of its own:
    by the host alone, each was shown the other's execution, latched onto it, and exited at its end."""
    listing = [execution("theirs", "completed", "7@box", "2026-01-01T00:01:00Z"),
               execution("mine", "running", "8@box", "2026-01-01T00:02:00Z")]
    (entry,) = executions.worker_view(listing, hostname="box", pid=8)
    assert (entry["id"], entry["status"], entry["held_executions"]) == ("mine", "running", 1)
    assert executions.worker_view(listing, hostname="box", pid=9) == []
    (entry,) = executions.worker_view(listing, hostname="box")  # the process not known: by the host
    assert entry["id"] == "theirs"
    assert leases.system_pid(b'{"hostname":"box","pid":8}') == 8
    assert [leases.system_pid(held) for held in (None, b"{}", b'{"pid":"8"}', b'{"pid":true}', b"[1]")] == [None] * 5


def test_a_worker_holding_two_stays_running_until_both_are_closed():
    listing = [execution("b", "running", "5@q1-w1", "2026-01-01T00:05:00Z"),
               execution("a", "completed", "5@q1-w1", "2026-01-01T00:01:00Z")]
    (entry,) = executions.worker_view(listing, hostname="q1-w1")
    assert (entry["id"], entry["status"], entry["completed_at"]) == ("a", "running", None)
    done = [execution("b", "failed", "5@q1-w1", "2026-01-01T00:05:00Z"), listing[1]]
    (entry,) = executions.worker_view(done, hostname="q1-w1")
    assert (entry["id"], entry["status"]) == ("a", "completed")


def test_a_worker_is_not_told_its_execution_finished_while_a_running_ones_holder_is_unread():
    # Its second execution was taken just now and its history not read in time: it may be this worker's.
    unread = dataclasses.replace(execution("b", "running", None, "2026-01-01T00:05:00Z"), holder_unread=True)
    (entry,) = executions.worker_view([unread, LISTING[2]], hostname="q1-w1")
    assert (entry["id"], entry["status"], entry["completed_at"]) == ("e2", "running", None)
    read = execution("b", "running", "5@q1-w7", "2026-01-01T00:05:00Z")  # read: another worker's
    (entry,) = executions.worker_view([read, LISTING[2]], hostname="q1-w1")
    assert (entry["id"], entry["status"]) == ("e2", "completed")


def test_a_worker_is_shown_nothing_while_an_earlier_execution_may_be_its_own_unread():
    """It took x, then y, moments apart (a burst). Shown y while x was unread, then x once read, it
    waited for y, which it never saw again, until its 1,800-s give-up."""
    x = execution("x", "running", "5@q1-w1", "2026-01-01T00:05:00Z")
    y = execution("y", "running", "5@q1-w1", "2026-01-01T00:05:01Z")
    assert executions.worker_view([y, dataclasses.replace(x, holder=None, holder_unread=True)], hostname="q1-w1") == []
    (entry,) = executions.worker_view([y, x], hostname="q1-w1")
    assert entry["id"] == "x"
    # One begun after its first was taken cannot come before it: the first is shown (running).
    later = dataclasses.replace(execution("z", "running", None, "2026-01-01T00:06:00Z"), holder_unread=True)
    (entry,) = executions.worker_view([later, x], hostname="q1-w1")
    assert (entry["id"], entry["status"]) == ("x", "running")


def test_a_worker_is_shown_nothing_while_an_earlier_execution_was_read_untaken_before_its_first_was_taken():
    """It took x, then y, moments apart, while one listing read their histories: x's read before x was
    taken (nobody), y's after. Shown y, then x once x was read again, it waited for y, never seen again."""
    taken_y = times.parse("2026-01-01T00:05:01Z")
    y = execution("y", "running", "5@q1-w1", "2026-01-01T00:05:01Z")
    x = dataclasses.replace(execution("x", "running", None, "2026-01-01T00:05:00Z"), started_at=None,
                            untaken_at=taken_y - 0.5)
    assert executions.worker_view([y, x], hostname="q1-w1") == []
    # Within the margin the clocks may differ by, still unsettled.
    skewed = dataclasses.replace(x, untaken_at=taken_y + executions.UNTAKEN_MARGIN_SECONDS - 0.1)
    assert executions.worker_view([y, skewed], hostname="q1-w1") == []
    # Read untaken well after y was taken: taken later, it would come after y. y is the first.
    (entry,) = executions.worker_view([y, dataclasses.replace(x, untaken_at=taken_y + 30)], hostname="q1-w1")
    assert (entry["id"], entry["status"]) == ("y", "running")
    # Made after y was taken: it cannot come before y, however it was read.
    later = dataclasses.replace(x, created_at="2026-01-01T00:06:00Z", untaken_at=taken_y - 0.5)
    (entry,) = executions.worker_view([y, later], hostname="q1-w1")
    assert entry["id"] == "y"


def test_a_run_that_could_not_be_taken_before_a_workers_first_is_no_earlier_one_of_its_own():
    """A cron run waiting for its time, or a start delay, read untaken: as any run read untaken, each
    showed every worker nothing until it was read again, and hundreds of them held every worker's
    "finished" for good behind a Temporal slow to answer."""
    taken_y = times.parse("2026-01-01T00:05:01Z")
    y = execution("y", "running", "5@q1-w1", "2026-01-01T00:05:01Z")
    cron = dataclasses.replace(execution("c", "running", None, "2026-01-01T00:05:00Z"), started_at=None,
                               untaken_at=taken_y - 0.5, delayed=True, due_at=taken_y + 3600)
    (entry,) = executions.worker_view([y, cron], hostname="q1-w1")
    assert (entry["id"], entry["status"]) == ("y", "running")
    # Due before y was taken (within the clocks' margin): it may have been taken first, by this worker.
    due = dataclasses.replace(cron, due_at=taken_y + executions.UNTAKEN_MARGIN_SECONDS - 0.1)
    assert executions.worker_view([y, due], hostname="q1-w1") == []


def test_a_hostname_matches_the_whole_host_part_only():
    assert not executions.held_by(execution("x", "running", "1@q1-w10", "t"), "q1-w1")


def test_the_queue_view_filters_and_limits():
    assert [e["id"] for e in executions.queue_view(LISTING, status="all", limit=3)] == ["e4", "e3", "e2"]
    assert [e["id"] for e in executions.queue_view(LISTING, status="completed", limit=10)] == ["e2", "e1"]


def test_a_queue_lease_duration_is_two_and_a_half_heartbeat_intervals():
    q = queue(heartbeatIntervalSeconds=10)
    assert leases.EXPIRY_INTERVALS * q.spec.heartbeat_interval_seconds == 25


@pytest.mark.parametrize("key", ["k", "h\u00e9", 'a"b'])
@pytest.mark.parametrize("value", ["", "abc", "\u00e9\u2028", 'q"\\\n\t', "x" * 600, "\udce9", True, False, 0, -5,
                                   10 ** 300, 1.5, 1e-7, 123456.789, float("nan"), float("inf"), [1, "a"], {"a": 1}])
def test_entry_length_is_the_length_of_its_json(key: str, value: object):
    # bounded_system_info sizes entries without the encoder; the sizes must be the encoder's.
    assert leases._entry_length(key, value) == len(json.dumps({key: value}, separators=(",", ":"), default=str))


def test_the_writer_sees_only_pending_work_heartbeats_first_and_its_rate_follows_the_fleet():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is flushed here
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None, base_write_rate=20.0)
    q = queue(heartbeatIntervalSeconds=10)
    first, second = reg.register(q, "w1", pod="q1-w1"), reg.register(q, "w2", pod="q1-w2")  # told 10 s
    assert list(reg._creates) == ["w1", "w2"] and not reg._urgent
    assert reg.write_rate() == 20.0  # registrations alone never raise the budget
    reg.heartbeat(second, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert list(reg._urgent) == ["w2"] and list(reg._creates) == ["w1"]  # proven alive: written first
    assert abs(reg.write_rate() - (20.0 + 1.25 / 10)) < 1e-9
    reg._forget("w2")
    assert not reg._urgent and reg.write_rate() == 20.0
    assert first.dirty and reg.get("w1") is first


def test_renewals_about_to_lapse_are_written_before_a_burst_of_new_workers():
    """Another replica knows a worker by its Lease alone: a renewal kept waiting behind many new
    workers' first heartbeats got live workers expired there."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is flushed here
    now = [1000.0]
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None,
                            monotonic=lambda: now[0])
    q = queue(heartbeatIntervalSeconds=10)
    old = []
    for name, written in (("lapsing", 989.0), ("due", 991.0), ("fresh", 999.0)):
        worker = reg.register(q, name, pod=f"q1-{name}")
        reg._unmark(worker)
        worker.stored, worker.confirmed, worker.written_at = True, True, written
        reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
        old.append(worker)
    assert set(reg._renewals) == {"lapsing", "due", "fresh"}
    for i in range(3):  # new workers' first heartbeats, and registrations not heartbeating yet
        new = reg.register(q, f"new{i}", pod=f"q1-new{i}")
        reg.heartbeat(new, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    reg.register(q, "quiet", pod="q1-quiet")
    order = []
    for worker in reg._in_write_order(now[0]):  # each written leaves its queue, as _flush does
        order.append(worker.worker_id)
        reg._unmark(worker)
    assert order == ["lapsing", "new0", "new1", "new2", "due", "quiet"]  # "fresh" is not due yet


def test_a_heartbeat_for_a_registration_ended_meanwhile_brings_nothing_back():
    """A Kubernetes identity's heartbeat waits for its access review: its worker may be let go
    meanwhile (a disconnect, the sweep). Recorded all the same, it was queued for a write again and
    raised the write budget for good."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is flushed here
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None, base_write_rate=20.0)
    worker = reg.register(queue(heartbeatIntervalSeconds=10), "w1")
    reg._forget("w1")
    assert not reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert reg.write_rate() == 20.0 and not (reg._urgent or reg._creates or reg._renewals)


def test_live_counts_are_written_at_a_bounded_rate_and_each_queue_at_most_every_few_seconds():
    import kubernetes

    from workerqueue_operator.core.activity import Activity
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.reconciler import LiveStatus
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [100.0]
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None)
    live = LiveStatus(store=Store(settings=Settings()), registry=reg, client=kube,
                      activity=Activity(identity="me", priority=0), period=1.0, per_queue=5.0, rate=3.0,
                      clock=lambda: now[0])
    for i in range(10):
        reg.register(queue(f"q{i}"), f"w{i}")
    assert live.due() == [("team-a", "q0"), ("team-a", "q1"), ("team-a", "q2")]  # 3 a second at most
    for key in live.due():
        live._dirty.pop(key)
        live._written_at[key] = now[0]
    reg.register(queue("q0"), "w-again")  # q0 changed again at once: it waits its 5 s
    assert ("team-a", "q0") not in live.due() and live.due()[0] == ("team-a", "q3")
    for i in range(3, 10):  # the others written meanwhile
        live._dirty.pop(("team-a", f"q{i}"))
    assert live.due() == []  # only q0 is left, and its 5 s have not passed
    now[0] += 5.0
    assert live.due() == [("team-a", "q0")]
    # Nothing is kept once it holds no write back: queues come and go (ephemeral ones by the thousand).
    live._sent[("team-a", "gone")] = ("uid", 1)
    live._forget(now[0])
    assert live._written_at == {} and live._sent == {}


@pytest.mark.parametrize("info", [
    {"hostname": "h", "platform": "Linux-6.1-x86_64-with-glibc2.36", "pid": 7, "cpu_percent": 1.5,
     "docker_available": False, "supported_runtimes": ["default", "claude_code"], "uptime_seconds": 3600.0},
    {"hostname": "h", "cwd": "/" + "d" * 600},  # one long value: left out
    {"hostname": "h\u00e9", "cwd": "\u00e9" * 300},  # escaped, it is over the bound
    {"hostname": "h", "os_name": "\x01" * 81},
    {"hostname": "h", "os_name": "\x01" * 80},
    {"hostname": "h", "pid": 10 ** 600},
    {"hostname": "h", "supported_runtimes": ["r" * 30] * 40},
    {**{name: "v" * 480 for name in ("platform", "os_name", "os_version", "python_version", "cli_version",
                                     "sdk_version", "cwd", "llm_gateway_url", "docker_version")}, "pid": 1},
    {},
    {"hostname": None},
])
def test_system_info_is_held_bounded_and_reaches_the_lease_bounded_per_entry(info: dict[str, object]):
    from workerqueue_operator.models import wire

    model = wire.WorkerSystemInfo.model_validate(info)
    held = leases.system_info_json(model)
    assert held is None or len(held) <= leases.SYSTEM_INFO_MAX_BYTES  # what a registration holds in memory
    body = leases.lease_body(make_worker(system_info=held), queue_name="q1")
    state = json.loads(body["metadata"]["annotations"][leases.STATE_ANNOTATION])
    assert state["systemInfo"] == leases.bounded_system_info(model.model_dump(exclude_none=True))


def test_the_sweep_forgets_registrations_never_written_and_keeps_renewed_ones():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None, clock=lambda: now[0])
    q = queue(heartbeatIntervalSeconds=10)  # registrations of its pods last 25 s
    reg.register(q, "quiet", pod="q1-w1")
    alive = reg.register(q, "alive", pod="q1-w2")
    now[0] = 1020.0
    reg.heartbeat(alive, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    now[0] = 1025.5
    reg._sweep(ending=True)
    assert reg.get("quiet") is None and reg.get("alive") is alive and reg.total == 1
    assert reg.live(q.key) == [alive]
    now[0] = 1044.0
    reg._sweep(ending=True)
    assert reg.total == 1  # renewed at 1020: 25 s from then
    now[0] = 1045.5
    reg._sweep(ending=True)
    assert reg.total == 0 and not reg._urgent and reg.write_rate() == 20.0


def test_system_info_reaches_the_lease_as_an_object_and_comes_back():
    from workerqueue_operator.models import wire

    info = leases.system_info_json(wire.WorkerSystemInfo(hostname="h", cpu_count=2, supported_runtimes=["default"]))
    body = leases.lease_body(make_worker(system_info=info), queue_name="q1")
    state = json.loads(body["metadata"]["annotations"][leases.STATE_ANNOTATION])
    assert state["systemInfo"] == {"hostname": "h", "cpu_count": 2, "supported_runtimes": ["default"]}
    back = leases.worker_from_lease(body, seen_at=2000.0)
    assert back is not None and back.system_info is not None
    assert json.loads(back.system_info) == state["systemInfo"]


def test_a_registration_stops_counting_as_pending_once_heard_of_or_gone():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")  # registrations last 25 s
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0],
                            bounds=registry.Bounds(pending=10, pending_per_queue=2, workers=10, workers_per_queue=10))
    quiet, elsewhere = reg.register(q, "quiet", pod="q1-w1"), reg.register(q, "elsewhere", pod="q1-w2")
    with pytest.raises(registry.Full, match=r"waiting for their first heartbeat \(in this queue: WQ_\w+=\d+\)"):
        reg.register(q, "third")
    assert (reg.pending, reg.refused, reg.total) == (2, 1, 2)
    # Its own Lease, as written, coming back through the watch: still pending (microseconds rounded up
    # or not), but a heartbeat that reached another replica comes back so too: no longer pending.
    body = leases.lease_body(elsewhere, queue_name=q.name)
    body["spec"]["acquireTime"] = body["spec"]["renewTime"] = times.micro_rfc3339(1000.0000006)
    reg.lease_upserted(body)
    assert reg.pending == 2
    body["spec"]["renewTime"] = times.micro_rfc3339(1005.0)
    now[0] = 1005.0
    reg.lease_upserted(body)
    assert reg.pending == 1 and not elsewhere.pending and quiet.pending
    reg.register(q, "third", pod="q1-w3")
    # One that expires without a word leaves the count too.
    now[0] = 1026.0
    reg._sweep(ending=True)
    assert reg.get("quiet") is None and reg.pending == 1
    reg.register(q, "fourth")
    assert reg.pending == 2


def test_registrations_in_all_are_bounded_too_so_that_one_heartbeat_each_does_not_pass_the_bound():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    q, other = queue("q1", uid="uid-1"), queue("q2", uid="uid-2")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None,
                            bounds=registry.Bounds(pending=2, pending_per_queue=3, workers=5, workers_per_queue=3))
    for i in range(3):  # each heartbeats once: never more than one waits
        worker = reg.register(q, f"w{i}")
        reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    with pytest.raises(registry.Full, match=r"registered \(in this queue: WQ_\w+=\d+\)") as refused:
        reg.register(q, "w3")
    assert not refused.value.pending
    reg.register(other, "v0")
    reg.register(other, "v1")  # two waiting: the pending bound
    with pytest.raises(registry.Full, match=r"waiting for their first heartbeat \(in all queues: WQ_\w+=\d+\)"):
        reg.register(other, "v2")
    assert (reg.total, reg.pending, reg.refused) == (5, 2, 2)


async def test_one_namespace_with_a_few_queues_cannot_take_every_place_from_the_others():
    # Five queues of one team, each under the per-queue bounds, took every place in all: every other
    # team's /start was 503 (and a real worker exits on it) until those registrations expired.
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing was written yet
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None,
                            bounds=registry.Bounds(pending=6, pending_per_queue=2, workers=8, workers_per_queue=3,
                                                   pending_per_namespace=3, workers_per_namespace=4))
    team_a = [queue(f"q{i}", "team-a", uid=f"uid-a{i}") for i in range(4)]
    team_b = queue("q0", "team-b", uid="uid-b")
    started = [reg.register(team_a[0], "a0"), reg.register(team_a[1], "a1"), reg.register(team_a[2], "a2")]
    with pytest.raises(registry.Full, match=r"waiting for their first heartbeat \(in this namespace: WQ_\w+=\d+\)"):
        reg.register(team_a[3], "a3")
    b0 = reg.register(team_b, "b0")  # another team's worker starts
    for worker in started:
        reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    reg.register(team_a[3], "a3")  # the first three heartbeat: places waiting are free again
    with pytest.raises(registry.Full, match=r"registered \(in this namespace: WQ_\w+=\d+\)"):
        reg.register(team_a[3], "a4")
    assert reg.register(team_b, "b1") is not None
    await reg.disconnect(started[0], reason="shutdown", exit_code=0)
    assert reg.register(team_a[3], "a4") is not None  # one of its own gone: a place again
    assert b0.pending and reg.total == 6


async def test_a_worker_that_heartbeats_without_a_registration_joins_again_unless_it_ended_on_purpose(
        monkeypatch: pytest.MonkeyPatch):
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")  # 60 s expected of workers it did not start: 150 s
    events = EventPoster(kube)
    reg = registry.Registry(client=kube, events=events, queue_of=lambda key: q, clock=lambda: now[0],
                            bounds=registry.Bounds(pending=10, pending_per_queue=10, workers=10, workers_per_queue=3))
    back = reg.rejoin(q, "lost", hostname="box-1")
    assert back is not None and reg.get("lost") is back and reg.live(q.key) == [back]
    assert (back.hostname, back.queue_uid, back.lease, back.pending) == ("box-1", "uid-1", "q1-lost", False)
    assert reg.pending == 0 and reg.rejoined == 1 and "lost" in reg._creates
    assert not events._normals  # never known here: a new worker's first heartbeat, maybe
    assert reg.rejoin(q, "lost") is None  # known already: a plain heartbeat

    # An expired registration is found for a heartbeat (which renews it) until it is ended.
    now[0] = 1151.0
    assert reg.get("lost") is None and reg.get("lost", expired=True) is back
    reg.heartbeat(back, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert reg.get("lost") is back
    # Ended for want of heartbeats: it may join again, and that is told after its WorkerExpired.
    now[0] = 1302.0
    reg._sweep(ending=True)
    assert reg.get("lost", expired=True) is None
    again = reg.rejoin(q, "lost")
    assert again is not None
    assert [key[4] for key in events._normals] == ["WorkerRejoined"]
    # It comes back at the pace it keeps, 151 s since its last heartbeat: not to expire again before its next.
    assert again.duration == math.ceil(leases.EXPIRY_INTERVALS * 151) == 378

    # Ended on purpose: a late heartbeat is no reason to register it again.
    await reg.disconnect(reg.register(q, "said-goodbye"), reason="shutdown", exit_code=0)
    assert reg.rejoin(q, "said-goodbye") is None
    reg.register(q, "in-pod", pod="q1-w1")
    # The pods of a namesake made before (another uid, the watch behind) say nothing of this one's.
    reg.pods_ended(q.key, "uid-of-a-namesake", alive_pods=[])
    assert reg.get("in-pod") is not None
    reg.pods_ended(q.key, q.uid, alive_pods=[])
    assert reg.rejoin(q, "in-pod", pod="q1-w1") is None
    # A pod runs one worker: another id from a pod with a registered worker is not one.
    reg.register(q, "current", pod="q1-w2")
    assert reg.rejoin(q, "stale", pod="q1-w2") is None
    # A Lease deleted elsewhere marked as its worker's end (a disconnect there) ends it on purpose
    # too; one deleted after it expired does not.
    quiet = make_worker(worker_id="quiet", lease="q1-quiet", slot=None, renewed_at=now[0], duration=25.0)
    reg.lease_upserted(leases.lease_body(quiet, queue_name=q.name))
    now[0] += 26.0
    alive = make_worker(worker_id="alive", lease="q1-alive", slot=None, renewed_at=now[0])
    alive_body = leases.lease_body(alive, queue_name=q.name)
    reg.lease_upserted(alive_body)
    assert reg.get("alive") is not None and reg.get("quiet") is None
    reg.lease_deleted((alive.namespace, alive.lease), marked(alive_body))
    reg.lease_deleted((quiet.namespace, quiet.lease), None)  # a relist: no body, taken for an expiry
    assert reg.rejoin(q, "alive") is None
    # Over the bound on registrations: refused, as /start would be.
    assert reg.total == 2
    assert reg.rejoin(q, "quiet") is not None
    with pytest.raises(registry.Full, match=r"registered \(in this queue: WQ_\w+=\d+\)"):
        reg.rejoin(q, "one-more")
    # With maxWorkers its slot is claimed through the API server (rejoin_slot, which asks it first
    # about one never seen here: its Lease may not be seen yet), never here.
    capped = queue("capped", uid="uid-2", maxWorkers=2)
    reg._bury(make_worker(worker_id="seen-to-expire"), on_purpose=False)
    assert reg.may_rejoin(capped, "seen-to-expire") and reg.rejoin(capped, "seen-to-expire") is None
    assert reg.may_rejoin(capped, "never-seen") and reg.rejoin(capped, "never-seen") is None
    # The ids ended are remembered up to a bound, oldest forgotten first.
    monkeypatch.setattr(registry, "ENDED_KEPT", 2)
    reg._bury(make_worker(worker_id="newer"), on_purpose=True)
    assert list(reg._ended) == ["seen-to-expire", "newer"]


def test_a_worker_that_expired_and_joins_again_keeps_its_host_and_process():
    """Two workers of one host are told apart by their process id (its system_info, sent again every
    5 min at most): one that expires and joins again from a plain heartbeat keeps it, or it would see
    its neighbour's executions as its own."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0])
    first = reg.register(q, "w-8", hostname="box", identity="user:ci",
                         system_info=wire.WorkerSystemInfo(hostname="box", pid=8))
    reg.heartbeat(first, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    now[0] += 1000.0
    reg._sweep(ending=True)
    assert reg.get("w-8", expired=True) is None
    again = reg.rejoin(q, "w-8", identity="user:ci")
    assert again is not None and (again.hostname, again.since) == ("box", first.since)
    assert leases.system_pid(again.system_info) == 8


def test_a_fresh_lease_collected_with_its_queue_lets_its_worker_join_the_queue_made_again():
    """`kubectl replace --force`: the garbage collector deletes the old queue's fresh Leases. Taken for
    disconnects, their workers' heartbeats were 404 for good here, and 200 after a restart."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    current = [queue(heartbeatIntervalSeconds=10, uid="uid-1")]
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: current[0],
                            clock=lambda: now[0], active=lambda: False)
    for name in ("kept", "collected"):
        held = make_worker(worker_id=name, lease=f"q1-{name}", slot=None, pod=None, renewed_at=now[0],
                           duration=25.0, queue_uid="uid-1")
        reg.lease_upserted(leases.lease_body(held, queue_name="q1"))
    bodies = {name: leases.lease_body(reg.get(name), queue_name="q1") for name in ("kept", "collected")}
    reg.lease_deleted(("team-a", "q1-kept"), marked(bodies["kept"]))  # a disconnect elsewhere
    current[0] = queue(heartbeatIntervalSeconds=10, uid="uid-2")  # made again
    reg.lease_deleted(("team-a", "q1-collected"), bodies["collected"])
    assert not reg.may_rejoin(current[0], "kept")
    assert reg.may_rejoin(current[0], "collected")


def standby_holding(now: list[float], *names: str) -> tuple[registry.Registry, Any]:
    """A standby's registry (nothing is written here) holding fresh Leases of workers `names` of q1."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0],
                            active=lambda: False)
    for name in names:
        held = make_worker(worker_id=name, lease=f"q1-{name}", slot=None, pod=None, renewed_at=now[0], duration=25.0)
        reg.lease_upserted(leases.lease_body(held, queue_name=q.name))
    return reg, q


async def test_heartbeats_lost_with_a_replica_that_left_do_not_end_their_workers():
    """Two replicas share the heartbeats; one dies (a lost node), and its Service sends it heartbeats
    until its endpoints change, 40 s and more. The one left ended those live workers' registrations
    (their Leases not renewed: 2.5 intervals) and gave their slots away: their heartbeats then 409."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    ended: list[str] = []
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0])
    reg._end = lambda worker, *_, **__: ended.append(worker.worker_id)  # type: ignore[method-assign]
    for name in ("w1", "w2"):
        reg.lease_upserted(leases.lease_body(make_worker(worker_id=name, lease=f"q1-{name}", slot=None, pod=None,
                                                         renewed_at=now[0], duration=25.0), queue_name=q.name))
    now[0] += 12  # the peer's keep-alives expire meanwhile: it left
    reg.peer_lost()
    reg._sweep(ending=True)
    now[0] += 40  # well past the Leases' 25 s, still within the forgiveness
    reg._sweep(ending=True)
    assert ended == [] and reg.get("w1") is not None
    now[0] += registry.PEER_LOST_FORGIVEN_SECONDS  # a whole lease past its end: w1 heartbeats here, w2 is dead
    reg.heartbeat(reg.get("w1", expired=True), status="idle", tasks_processed=0,  # type: ignore[arg-type]
                  current_task_id=None, system_info=None)
    reg._sweep(ending=True)
    now[0] += 20
    reg._sweep(ending=True)
    assert ended == ["w2"]
    await kube.close()


@pytest.mark.parametrize("period", [4, 70])
async def test_a_peer_leaving_again_and_again_does_not_keep_dead_workers_for_good(period: int):
    """A peer whose keep-alives come late (its clock behind, a loaded API server) leaves the peering at
    each one: forgiven at each, no dead worker would ever be ended, nor its slot freed."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    ended: list[float] = []
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0])
    reg._end = lambda worker, *_, **__: ended.append(now[0])  # type: ignore[method-assign]
    reg.lease_upserted(leases.lease_body(make_worker(worker_id="dead", lease="q1-dead", slot=None, pod=None,
                                                     renewed_at=now[0], duration=25.0), queue_name=q.name))
    while now[0] < 5000 and not ended:
        reg.peer_lost()
        for _ in range(period):
            now[0] += 1
            reg._sweep(ending=True)
    assert ended and ended[0] <= 1000 + period + registry.BLIND_FORGIVEN_SECONDS + 25 + 1
    await kube.close()


def test_a_lease_the_active_replica_deleted_as_expired_ends_it_not_on_purpose_though_a_heartbeat_came_here():
    """A standby hears a heartbeat (not written yet) just as the active replica deletes the Lease,
    expired by its renew time: the worker may come back at its next heartbeat. A Lease marked as its
    worker's end (a disconnect there): a late heartbeat does not bring it back."""
    now = [1000.0]
    reg, q = standby_holding(now, "cut-off", "said-goodbye")
    now[0] += 25.3
    cut_off = reg.get("cut-off", expired=True)
    assert cut_off is not None
    reg.heartbeat(cut_off, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    expired_lease = leases.lease_body(make_worker(worker_id="cut-off", lease="q1-cut-off", slot=None, pod=None,
                                                  renewed_at=1000.0, duration=25.0), queue_name=q.name)
    reg.lease_deleted(("team-a", "q1-cut-off"), expired_lease)
    assert reg.get("cut-off") is None and reg.may_rejoin(q, "cut-off")
    fresh_lease = leases.lease_body(make_worker(worker_id="said-goodbye", lease="q1-said-goodbye", slot=None,
                                                pod=None, renewed_at=now[0] - 1, duration=25.0), queue_name=q.name)
    reg.lease_deleted(("team-a", "q1-said-goodbye"), marked(fresh_lease))
    assert not reg.may_rejoin(q, "said-goodbye")

    # Registered here, its Lease not written here yet: one written elsewhere and deleted there as its
    # worker's end ends it here too; one deleted there as expired does not (it is alive here: written anew).
    for name, renewed, ends in (("gone-there", now[0] - 1, True), ("lapsed-there", now[0] - 30, False)):
        here = reg.register(q, name)
        assert not here.stored
        elsewhere = leases.lease_body(make_worker(worker_id=name, lease=f"q1-{name}", slot=None, pod=None,
                                                  renewed_at=renewed, duration=25.0), queue_name=q.name)
        reg.lease_deleted(("team-a", f"q1-{name}"), marked(elsewhere) if ends else elsewhere)
        assert (reg.get(name) is None) is ends and reg.may_rejoin(q, name) is False


async def test_a_lease_the_active_replica_deleted_at_its_expiry_reads_as_expired_whatever_its_interval():
    """An odd interval makes 2.5 of them end in .5: the Lease keeps whole seconds. Expired in memory
    before the end the Lease shows, its delete read elsewhere as a disconnect turned the worker away
    for good (about one expiry in ten at the real worker's learned 61 s)."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.3]
    q = queue(heartbeatIntervalSeconds=61, uid="uid-1")
    active = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0])
    standby = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q,
                                clock=lambda: now[0], active=lambda: False)
    worker = active.register(q, "odd", pod="q1-w1")
    body = leases.lease_body(worker, queue_name=q.name)
    assert body["spec"]["leaseDurationSeconds"] == worker.duration  # what both replicas go by
    standby.lease_upserted(body)
    now[0] = math.ceil(worker.expires_at())  # the second the active replica's sweep ends it
    assert worker.expired(now[0])
    standby.lease_deleted((worker.namespace, worker.lease), body)
    assert standby.may_rejoin(q, "odd")
    # Marked as its worker's end (a disconnect there): a late heartbeat does not bring it back.
    early = leases.lease_body(active.register(q, "left", pod="q1-w2"), queue_name=q.name)
    standby.lease_upserted(early)
    standby.lease_deleted(("team-a", early["metadata"]["name"]), marked(early))
    assert not standby.may_rejoin(q, "left")


def test_an_expiry_by_a_replica_whose_clock_is_ahead_is_no_disconnect_here():
    """The active replica's clock 3 s ahead of this one's: its sweep deletes the Lease at the end by
    its clock, 3 s before the end here. Taken for a disconnect, the worker was turned away for good."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0],
                            active=lambda: False)
    held = make_worker(worker_id="skewed", lease="q1-skewed", slot=None, pod=None, renewed_at=now[0], duration=25.0)
    reg.lease_upserted(leases.lease_body(held, queue_name=q.name))
    now[0] += 22.0
    reg.lease_deleted(("team-a", "q1-skewed"), leases.lease_body(held, queue_name=q.name))
    assert reg.may_rejoin(q, "skewed")
    # Marked as its worker's end: a disconnect.
    left = make_worker(worker_id="left", lease="q1-left", slot=None, pod=None, renewed_at=now[0], duration=25.0)
    reg.lease_upserted(leases.lease_body(left, queue_name=q.name))
    now[0] += 9.0
    reg.lease_deleted(("team-a", "q1-left"), marked(leases.lease_body(left, queue_name=q.name)))
    assert not reg.may_rejoin(q, "left")


def test_a_worker_that_rejoined_into_another_slot_is_known_there_only():
    """The active replica expired it, could not delete its slot, and registered it again in another
    from its next heartbeat. Here, the first slot's delete made again later must not end it, and the
    first slot seen again (a relist) must not take it back."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1200.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1", maxWorkers=2)
    standby = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q,
                                clock=lambda: now[0], active=lambda: False)
    first = leases.lease_body(make_worker(worker_id="w", lease="q1-slot-0", slot=0, registered_at=1000.0,
                                          renewed_at=1010.0, duration=25.0), queue_name=q.name)
    moved = leases.lease_body(make_worker(worker_id="w", lease="q1-slot-1", slot=1, registered_at=1190.0,
                                          renewed_at=1190.0, duration=25.0), queue_name=q.name)
    standby.lease_upserted(first)
    standby.lease_upserted(moved)
    worker = standby.get("w")
    assert worker is not None and (worker.lease, worker.slot) == ("q1-slot-1", 1)
    standby.lease_upserted(first)  # a relist, before its delete
    assert (worker.lease, worker.slot) == ("q1-slot-1", 1)
    standby.lease_deleted(("team-a", "q1-slot-0"), first)
    assert standby.get("w") is worker
    standby.lease_deleted(("team-a", "q1-slot-1"), moved)
    assert standby.get("w") is None


def test_a_registration_written_first_by_the_replica_its_heartbeat_reached_is_not_written_over():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    here = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q)
    # The other's clock stands still (a little ahead of this one's): a heartbeat right after the
    # registration must still show.
    still = time.time() + 5
    there = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: still)
    started = here.register(q, "w1", hostname="box-1")
    assert "w1" in here._creates
    # Its first heartbeat reaches the other replica first, which registers it again and writes it.
    rejoined = there.rejoin(q, "w1")
    assert rejoined is not None
    there.heartbeat(rejoined, status="busy", tasks_processed=1, current_task_id="e-1", system_info=None)
    written = leases.lease_body(rejoined, queue_name=q.name)
    incoming = leases.worker_from_lease(written, seen_at=0.0)
    assert incoming is not None and incoming.confirmed  # a heartbeat, at the Lease's microseconds too
    here.lease_upserted(written)
    # Here: heard of, nothing left to write over it, and what it says is what this replica serves.
    assert not started.pending and not started.dirty and started.stored and "w1" not in here._creates
    assert (started.status, started.tasks_processed, started.current_task_id) == ("busy", 1, "e-1")


@pytest.mark.parametrize(("current", "gap", "expected"), [
    (60.0, 30.2, 31.0),  # clearly shorter: taken, whole seconds up
    (60.0, 50.0, 60.0),  # about the same: kept, so that jitter never rewrites the Lease
    (60.0, 4.0, 10.0),  # never below the queue's interval
    (30.0, 61.0, 61.0),  # longer: taken at once, a late heartbeat must not be an expiry
    (60.0, 4000.0, leases.MAX_INTERVAL),  # cut off for an hour: not registered for hours once dead
])
def test_a_pace_is_learned_from_the_gap_between_heartbeats(current: float, gap: float, expected: float):
    assert leases.paced_interval(current, 10, gap) == expected


def test_a_worker_the_operator_did_not_start_is_expected_at_the_real_workers_default_pace_first():
    assert leases.first_interval(10, pod="q1-w1") == 10.0  # its pod's environment says 10
    assert leases.first_interval(10, pod=None) == leases.WORKER_DEFAULT_INTERVAL
    assert leases.first_interval(120, pod=None) == 120.0


def test_a_pod_is_expected_at_the_interval_it_was_given_though_the_queue_says_another_since():
    # The pod was made while the queue said 60 s: its worker beats every 60 s, and a registration made
    # after the queue was lowered to 10 s (its container restarted, or its /start came late) expired
    # 25 s in, at every heartbeat; with maxWorkers its slot could be given away meanwhile.
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.store import Store, WorkerCredential
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    store = Store(settings=Settings())
    store.upsert_worker_credential(("team-a", "q1-w0-token"), WorkerCredential(
        queue=q.key, pod="q1-w0", queue_uid="uid-1", interval=60.0), "pod-token")
    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q,
                            pod_interval=store.pod_interval)
    assert reg.register(q, "w0", pod="q1-w0").duration == leases.EXPIRY_INTERVALS * 60
    assert reg.register(q, "w1", pod="q1-w1").duration == leases.EXPIRY_INTERVALS * 10  # no token known: the queue's


def test_a_worker_heartbeating_slower_than_its_queue_says_stays_registered_and_a_faster_one_expires_sooner():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0])

    def beat(worker: leases.Worker, at: float) -> None:
        now[0] = at
        reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)

    # The real worker ignores the 10 s /start answers: without HEARTBEAT_INTERVAL it beats every 60 s.
    slow, fast = reg.register(q, "slow"), reg.register(q, "fast")
    assert slow.duration == fast.duration == leases.EXPIRY_INTERVALS * leases.WORKER_DEFAULT_INTERVAL
    beat(slow, 1002.0)
    beat(fast, 1002.0)
    beat(fast, 1012.0)  # it keeps the queue's 10 s: expected at that pace from now on
    assert fast.duration == 25.0 and abs(reg.write_rate() - (20.0 + 1.25 / 60 + 1.25 / 10)) < 1e-9
    assert leases.lease_body(fast, queue_name=q.name)["spec"]["leaseDurationSeconds"] == 25
    beat(slow, 1062.5)
    assert slow.duration == 153.0  # 60.5 s, in whole seconds up: 61; 2.5 of them, in whole seconds up
    now[0] = 1038.0
    reg._sweep(ending=True)  # the faster one is looked at when it expires, not when it would have first
    assert reg.get("fast", expired=True) is None and reg.get("slow") is slow
    now[0] = 1120.0
    reg._sweep(ending=True)
    assert reg.get("slow") is slow  # 25 s after a heartbeat is no expiry for a worker that beats every 60
    assert [w.worker_id for w in reg.live(q.key)] == ["slow"]

    # A pace that keeps changing (heartbeats lost now and then) files the worker once at its earliest.
    flaky = reg.register(q, "flaky")
    for at in range(1200, 1600, 40):
        beat(flaky, at)
        beat(flaky, at + 10)
    assert sum(w is flaky for filed in reg._expiries.values() for w in filed) <= 2

    # A newer heartbeat heard by another replica brings the pace that replica learned.
    body = leases.lease_body(make_worker(worker_id="slow", lease="q1-slow", slot=None, pod=None,
                                           renewed_at=1125.0, duration=75.0), queue_name=q.name)
    reg.lease_upserted(body)
    assert slow.duration == 75.0


def test_time_the_operator_was_away_is_no_pace_of_the_workers():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [5000.0]  # the operator restarted at 5000; the worker's last heartbeat was at 3000, every 60 s
    q = queue(uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0])
    body = leases.lease_body(make_worker(worker_id="w", lease="q1-w", slot=None, pod=None, registered_at=2000.0,
                                         renewed_at=3000.0, duration=150.0), queue_name=q.name)
    reg.lease_upserted(body)
    worker = reg.get("w")
    assert worker is not None and worker.duration == 150.0
    now[0] = 5010.0
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert worker.duration == 150.0  # not 2.5 x the 2,010 s since its last heartbeat
    now[0] = 5070.0
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert worker.duration == 150.0  # its own 60 s again


def test_a_worker_whose_slot_was_taken_over_may_come_back_for_a_slot():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    q = queue(maxWorkers=1, uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: 1100.0)
    reg.lease_upserted(leases.lease_body(make_worker(worker_id="w1", pod=None), queue_name=q.name))
    assert reg.get("w1", expired=True) is not None
    # Another replica gave the slot of w1, expired there, to w2: w1 was cut off, not gone for good.
    reg.lease_upserted(leases.lease_body(make_worker(worker_id="w2", pod=None, renewed_at=1090.0), queue_name=q.name))
    assert reg.get("w1", expired=True) is None
    assert reg.may_rejoin(q, "w1")  # then answered 409 while the one slot is w2's, and a slot when one is free


def test_its_own_lease_read_back_is_no_heartbeat_though_a_microtime_rounds_up():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    start = 1_800_000_000.0000007  # written as .000001: the Lease reads later than the registration
    assert times.parse_or_none(times.micro_rfc3339(start)) > start
    now = [start]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: now[0])
    worker = reg.register(q, "w")
    reg.lease_upserted(leases.lease_body(worker, queue_name=q.name))  # the watch brings its own write back
    assert worker.info()["last_heartbeat"] is None  # nor listed as heard of
    now[0] = start + 1.5
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    # Its first heartbeat: no pace to learn yet. Taken for its second, 1.5 s after a first one, the
    # worker (beating every 60 s, whatever the queue says) would be expected at 10 s and expire in 25.
    assert worker.duration == leases.EXPIRY_INTERVALS * leases.WORKER_DEFAULT_INTERVAL
    assert worker.heard() and leases.worker_from_lease(leases.lease_body(worker, queue_name=q.name),
                                                         seen_at=now[0]).confirmed


def test_a_worker_never_sees_what_a_pod_of_its_name_took_before_it_was_made():
    # A queue deleted and made again under its queueId names its pods from -w0 again, on a task queue
    # that still lists the old pods' executions: the old q1-w0's e1 would make the new one exit at once.
    made = datetime.datetime(2026, 1, 1, 0, 1, 30, tzinfo=datetime.UTC).timestamp()
    assert executions.worker_view(LISTING, hostname="q1-w0", since=made) == []
    listing = [execution("new", "running", "1@q1-w0", "2026-01-01T00:01:30.250Z"), *LISTING]
    (entry,) = executions.worker_view(listing, hostname="q1-w0", since=made)
    assert (entry["id"], entry["status"], entry["held_executions"]) == ("new", "running", 1)
    (entry,) = executions.worker_view(LISTING, hostname="q1-w0")  # when the pod's making is not known
    assert entry["id"] == "e1"


@pytest.mark.looptime
async def test_a_registration_whose_write_failed_is_written_again_after_2s_not_at_every_tick():
    import asyncio

    from tests.unit import apps
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    with apps.unreachable() as kube:
        q = queue("q")
        # On the loop's fake clock (looptime): the retry comes 1.6-2 s after (its jitter), the next
        # one 3.2-4 s after that; real time left 0.1 s between the first check and the retry.
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, tick=0.05,
                                monotonic=asyncio.get_running_loop().time)
        reg.register(q, "w1")
        task = asyncio.create_task(reg.run())
        try:
            await asyncio.sleep(1.5)
            assert reg.writes == 1  # at 20 ticks a second
            await asyncio.sleep(1.5)
            assert reg.writes == 2
            await asyncio.sleep(1.5)
            assert reg.writes == 2  # the next after 3.2-4 s
            assert reg.write_failures == 2  # nobody answers there
            with pytest.raises(client_.ERRORS):  # a deletion whose read fails does not get through either
                await reg._calls.delete(reg.get("w1"))  # type: ignore[arg-type]
            assert reg.write_failures == 3
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.close()


async def test_a_refusal_at_start_is_remembered_for_its_pod_for_a_while_and_within_a_bound(
        monkeypatch: pytest.MonkeyPatch):
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster

    with unreachable() as kube:  # its Lease cannot be written: remembered here all the same
        now = [100.0]
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None,
                                monotonic=lambda: now[0])
        q1 = queue("q1")
        await reg.refusals.start_refused(q1, "q1-w0", "409: full")
        assert reg.refusals.why(q1, "q1-w0") == "409: full" and reg.refusals.why(q1, "q1-w1") == ""
        # A queue made again under the name names its pods the same: not its refusal.
        assert reg.refusals.why(dataclasses.replace(q1, uid="another-uid"), "q1-w0") == ""
        now[0] += refusals.REFUSAL_SECONDS + 1
        assert reg.refusals.why(q1, "q1-w0") == ""
        # The Lease of the very claim answered 503 for taking too long, brought by the watch after the
        # refusal, keeps it (one registered after it ends it: test_api.py).
        wall = [2000.0]
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1, clock=lambda: wall[0])
        q1 = queue("q1", uid="uid-1")
        await reg.refusals.start_refused(q1, "q1-w3", "503: registry unavailable")
        reg.lease_upserted(leases.lease_body(make_worker(registered_at=1999.0, renewed_at=1999.0), queue_name="q1"))
        assert reg.refusals.why(q1, "q1-w3") == "503: registry unavailable"
        reg.lease_upserted(leases.lease_body(make_worker(worker_id="0b9c6f1e-0000-4000-8000-000000000002",
                                                         lease="q1-slot-1", slot=1, registered_at=2001.0,
                                                         renewed_at=2001.0), queue_name="q1"))
        assert reg.refusals.why(q1, "q1-w3") == ""
        monkeypatch.setattr(refusals, "REFUSALS_KEPT", 3)
        for i in range(5):
            await reg.refusals.start_refused(q1, f"q1-w{i}", "503: not ready")
        assert [reg.refusals.why(q1, f"q1-w{i}") for i in range(5)] == ["", "", "503: not ready", "503: not ready",
                                                                   "503: not ready"]
        await kube.close()


def test_a_refusal_lease_round_trips_and_is_no_registration():
    refusal = leases.Refusal(queue=("team-a", "q1"), queue_uid="uid-1", pod="q1-w4", at=1234.5, why="409: full")
    body = leases.refusal_lease_body(refusal, queue_name="q1")
    assert body["metadata"]["name"] == "q1-w4-refused"
    assert leases.refusal_from_lease(body) == refusal
    assert leases.worker_from_lease(body, seen_at=0.0) is None
    # Never counted among a queue's slots or registrations.
    assert body["metadata"]["labels"]["app.kubernetes.io/component"] != leases.COMPONENT
    assert leases.refusal_from_lease(leases.lease_body(make_worker(), queue_name="q1")) is None
    longest = leases.refusal_lease_name("p" * 253)
    assert longest.endswith("-refused") and len(longest) <= 253
    assert longest != leases.refusal_lease_name("p" * 252 + "q")


async def test_a_refusal_written_by_another_replica_is_known_here_until_its_pod_registers():
    """The replica that supervises pods may not be the one that answered /start."""
    from tests.unit.apps import unreachable

    with unreachable() as kube:  # an expired one is deleted: that fails here, quietly
        await _refusals_seen(kube)
        await kube.close()


async def _refusals_seen(kube: Any) -> None:
    from workerqueue_operator.core.events import EventPoster

    wall, mono = [5000.0], [50.0]
    q1 = queue("q1", uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1, clock=lambda: wall[0],
                            monotonic=lambda: mono[0])

    def seen(pod: str, at: float, uid: str = "uid-1") -> None:
        refusal = leases.Refusal(queue=("team-a", "q1"), queue_uid=uid, pod=pod, at=at, why="409: full")
        reg.lease_upserted(leases.refusal_lease_body(refusal, queue_name="q1"))

    seen("q1-w0", 4990.0)
    assert reg.refusals.why(q1, "q1-w0") == "409: full" and reg.total == 0
    mono[0] += refusals.REFUSAL_SECONDS - 9  # its age counts from when it was written
    assert reg.refusals.why(q1, "q1-w0") == ""
    seen("q1-w1", wall[0] - refusals.REFUSAL_SECONDS - 1)  # too old when seen (a relist)
    assert reg.refusals.why(q1, "q1-w1") == ""
    await asyncio.sleep(0.1)
    seen("q1-w2", 4999.0, uid="uid-of-a-namesake")
    assert reg.refusals.why(q1, "q1-w2") == ""
    # Its pod's worker registered after it: a relist showing the Lease again does not bring it back.
    reg.lease_upserted(leases.lease_body(make_worker(pod="q1-w3", registered_at=4999.5, renewed_at=4999.5),
                                         queue_name="q1"))
    seen("q1-w3", 4999.0)
    assert reg.refusals.why(q1, "q1-w3") == ""
    reg.lease_deleted(("team-a", "q1-w0-refused"), leases.refusal_lease_body(
        leases.Refusal(queue=("team-a", "q1"), queue_uid="uid-1", pod="q1-w0", at=4990.0, why="409: full"),
        queue_name="q1"))
    assert reg.total == 1


async def test_a_sweep_of_refusal_records_that_cannot_delete_keeps_them_for_the_next(
        caplog: pytest.LogCaptureFixture):
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster

    with unreachable() as kube:
        now = [100.0]
        q1 = queue("q1", uid="uid-1")
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1,
                                monotonic=lambda: now[0])
        record = leases.refusal_lease_body(leases.Refusal(queue=("team-a", "q1"), queue_uid="uid-1", pod="q1-w0",
                                                          at=reg._clock(), why="409: full"), queue_name="q1")
        record["metadata"]["uid"] = "lease-uid"  # as the API server gives it
        reg.lease_upserted(record)
        assert reg.refusals.lease_uid(q1, "q1-w0") == "lease-uid"
        # Its pod listed after it, and there: kept, and no call made.
        listing = refusals.PodListing("uid-1", reg._clock() + refusals.REFUSAL_SWEEP_MARGIN + 1, frozenset({"q1-w0"}))
        assert await reg.refusals.sweep(lambda key: listing) == 0 and not caplog.records
        now[0] += refusals.REFUSAL_SECONDS + 1  # expired: its Lease is to be deleted, which fails here
        assert await reg.refusals.sweep(lambda key: listing) == 0
        assert "deleting refusal records failed after 0 of 1" in caplog.text
        assert reg.refusals.lease_uid(q1, "q1-w0") == "lease-uid"  # for the next sweep
        await kube.close()


async def test_a_deletion_seen_by_a_relist_is_taken_for_an_expiry_not_a_disconnect():
    """A replica that restarted while a worker was cut off knows the worker younger than its Lease.
    The active replica deletes the Lease as expired; this replica's relist sees it gone, without its
    body. Taken for a disconnect, the worker's heartbeats were 404 here for good, and this replica
    deleted the Lease another replica gave the worker again, which then took that for a disconnect too."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    class Calls:
        """Records what the registry asks of the API server (it must delete nothing here)."""

        def __init__(self) -> None:
            self.made: list[tuple[str, str]] = []

        async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
            self.made.append((method, path))
            return {}

    api, kube = Calls(), client_.KubeClient(kubernetes.client.Configuration())
    now = [1010.0]
    reg = registry.Registry(client=api, events=EventPoster(kube),  # type: ignore[arg-type]
                            queue_of=lambda key: None, clock=lambda: now[0], active=lambda: False)
    q = queue(heartbeatIntervalSeconds=10)
    cut_off = make_worker(worker_id="cut-off", lease="q1-cut-off", slot=None, renewed_at=1000.0, duration=25.0)
    reg.lease_upserted(leases.lease_body(cut_off, queue_name=q.name))  # listed as this replica starts
    now[0] = 1030.0
    reg.lease_deleted((cut_off.namespace, cut_off.lease), None)
    assert reg.may_rejoin(q, "cut-off")
    # Its heartbeat reaches another replica, which registers it again: this one keeps that Lease.
    now[0] = 1040.0
    again = make_worker(worker_id="cut-off", lease="q1-cut-off", slot=None, renewed_at=1040.0, registered_at=1040.0)
    reg.lease_upserted(leases.lease_body(again, queue_name=q.name))
    await asyncio.sleep(0.05)
    assert reg.get("cut-off") is not None and api.made == []
    await kube.close()


def test_a_kubernetes_identitys_registration_keeps_who_made_it_and_since_when():
    """Its executions poll names no worker: the registration says which worker of that identity asks,
    and since when its host's takes are its own, across a re-registration and on every replica."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None, clock=lambda: now[0])
    q = queue(heartbeatIntervalSeconds=60)
    sa = "system:serviceaccount:team-a:runner"
    worker = reg.register(q, "w-1", hostname="runner-host", identity=sa)
    reg.register(q, "w-2", hostname="shared")  # a queue token's: no identity
    assert (worker.identity, worker.since) == (sa, 1000.0)
    assert reg.registered_as(q.key, sa) == [worker] and reg.registered_as(q.key, "someone-else") == []
    # The Lease carries both, for the other replicas; a queue token's carries neither.
    back = leases.worker_from_lease(leases.lease_body(worker, queue_name=q.name), seen_at=now[0])
    assert back is not None and (back.identity, back.since) == (sa, 1000.0)
    shared = reg.get("w-2")
    assert shared is not None and "identity" not in shared.state()
    # Expired, then back with its next heartbeat: the same since, not the time it came back.
    now[0] = 1000.0 + worker.duration + 1
    reg._sweep(ending=True)
    assert reg.registered_as(q.key, sa) == [] and reg.expired_in("w-1", sa) == q.key
    assert reg.expired_in("w-1", "someone-else") is None  # only the identity that registered it brings it back
    # Its heartbeat seldom carries its system_info: the hostname it registered with is kept too.
    again = reg.rejoin(q, "w-1", identity=sa)
    assert again is not None and (again.since, again.hostname) == (1000.0, "runner-host")
    # One never told its hostname learns it from a heartbeat that carries it.
    from workerqueue_operator.models import wire

    bare = reg.register(q, "w-3", identity=sa)
    reg.heartbeat(bare, status="busy", tasks_processed=0, current_task_id=None,
                  system_info=wire.WorkerSystemInfo(hostname="late-host"))
    assert bare.hostname == "late-host"


async def test_a_slot_lease_made_after_start_gave_up_on_its_claim_is_deleted_when_seen(
        monkeypatch: pytest.MonkeyPatch):
    """The API server made the slot Lease, but its answer came after /start's deadline (503: its worker
    exits). Nobody would renew that Lease, and it kept the slot from other workers until it expired."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    class SlowAnswers:
        """Makes what it is asked to, and answers a POST only after the claim's deadline."""

        def __init__(self) -> None:
            self.made: list[tuple[str, str]] = []
            self.created: dict[str, Any] = {}

        async def request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                          **_: Any) -> dict[str, Any]:
            self.made.append((method, path))
            if method == "POST" and body is not None:
                self.created = {**body, "metadata": {**body["metadata"], "resourceVersion": "7", "uid": "u"}}
                await asyncio.sleep(1.0)
            return self.created

    monkeypatch.setattr(registry, "CLAIM_DEADLINE_SECONDS", 0.2)
    api, kube = SlowAnswers(), client_.KubeClient(kubernetes.client.Configuration())
    q = queue(maxWorkers=1)
    reg = registry.Registry(client=api, events=EventPoster(kube), queue_of=lambda key: q)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await reg.claim(q, "gave-up", limit=1)
    reg.abandoned(q, "gave-up")  # as /start does before its 503
    reg.lease_upserted(api.created)  # the watch brings the Lease the API server made
    await asyncio.sleep(0.05)
    assert reg.get("gave-up") is None
    lease = api.created["metadata"]["name"]
    assert api.made[-1] == ("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/team-a/leases/{lease}")
    # A worker that did get its answer is no such case.
    fresh = registry.Registry(client=api, events=EventPoster(kube),  # type: ignore[arg-type]
                              queue_of=lambda key: q)
    fresh.lease_upserted(api.created)
    assert fresh.get("gave-up") is not None
    # The watch may show the Lease before the claim gives up: deleted at once then.
    raced = registry.Registry(client=api, events=EventPoster(kube),  # type: ignore[arg-type]
                              queue_of=lambda key: q)
    claim = asyncio.create_task(raced.claim(q, "raced", limit=1))
    await asyncio.sleep(0.05)
    raced.lease_upserted(api.created | {"spec": {**api.created["spec"], "holderIdentity": "raced"}})
    assert raced.get("raced") is not None
    with pytest.raises(TimeoutError):
        await claim
    api.made.clear()
    raced.abandoned(q, "raced")
    await asyncio.sleep(0.05)
    assert raced.get("raced") is None and raced.live_count(q.key) == 0
    assert ("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/team-a/leases/{lease}") in api.made
    await kube.close()


def marked(body: dict[str, Any]) -> dict[str, Any]:
    """The Lease as the operator leaves it just before it deletes it at its worker's end."""
    annotations = {**body["metadata"]["annotations"], leases.ENDED_ANNOTATION: "disconnected"}
    return {**body, "metadata": {**body["metadata"], "annotations": annotations}}


def test_a_fresh_lease_deleted_by_someone_else_lets_its_live_worker_back_in():
    """`kubectl delete lease`: no end its worker asked for. Taken for a disconnect, the live worker's
    heartbeats were 404 for good (its slot free for another, it went on polling Temporal)."""
    now = [1000.0]
    reg, q = standby_holding(now, "deleted-by-hand", "disconnected")
    now[0] += 1.0
    fresh = leases.lease_body(reg.get("deleted-by-hand"), queue_name=q.name)
    reg.lease_deleted(("team-a", "q1-deleted-by-hand"), fresh)
    assert reg.get("deleted-by-hand") is None and reg.may_rejoin(q, "deleted-by-hand")
    # Marked first (the watch brings that change before the deletion): ended then, for good.
    ending = marked(leases.lease_body(reg.get("disconnected"), queue_name=q.name))
    reg.lease_upserted(ending)
    assert reg.get("disconnected") is None and not reg.may_rejoin(q, "disconnected")
    reg.lease_deleted(("team-a", "q1-disconnected"), ending)
    assert not reg.may_rejoin(q, "disconnected")


def test_an_id_ended_on_purpose_in_one_queue_is_no_end_of_another_queues_registration():
    """Ended here on purpose, an id's Lease seen again is deleted: only its own queue's, never another
    queue's registration that bears the same id."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    first, other = queue("q1", uid="uid-1"), queue("q2", uid="uid-2")
    queues_ = {first.key: first, other.key: other}
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=queues_.get, active=lambda: False)
    ending = make_worker(worker_id="same-id", lease="q1-same-id", slot=None, pod=None, queue_uid="uid-1")
    reg.lease_upserted(marked(leases.lease_body(ending, queue_name="q1")))
    assert not reg.may_rejoin(first, "same-id")
    elsewhere = dataclasses.replace(ending, queue=other.key, lease="q2-same-id", queue_uid="uid-2")
    reg.lease_upserted(leases.lease_body(elsewhere, queue_name="q2"))
    assert reg.get("same-id") is not None and not reg._writes


async def test_failed_writes_of_many_registrations_are_one_log_line_not_one_each(caplog: pytest.LogCaptureFixture):
    """An API-server outage fails every worker's renewal at once: one line each was ~1,100 lines a
    second at 10,000 workers."""
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster

    with unreachable() as kube:
        q1 = queue("q1", uid="uid-1")
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1)
        workers = [reg.register(q1, f"w-{i}") for i in range(20)]
        await asyncio.gather(*(reg._write(worker) for worker in workers))
        written = [r for r in caplog.records if "writing the registration" in r.getMessage()]
        assert len(written) == 1 and written[0].kind == "lease_write_failed"
        await kube.close()


async def test_a_write_that_fails_unforeseen_is_retried_not_held_under_way_for_good(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """An answer no one foresaw (JSON that is no object, once) ended the write's task: the worker stayed
    "under way" and its Lease was never written again; a deletion so ended held its slot."""
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster

    with unreachable() as kube:
        q1 = queue("q1", uid="uid-1")
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1)
        worker = reg.register(q1, "w-1")

        async def unforeseen(*args: object, **kwargs: object) -> None:
            raise AttributeError("'NoneType' object has no attribute 'get'")

        monkeypatch.setattr(reg._calls, "create", unforeseen)
        await reg._write(worker)
        assert worker.write_failures == 1 and worker.held_until < float("inf")
        assert [r.kind for r in caplog.records if "writing the registration" in r.getMessage()] == [
            "lease_write_error"]
        monkeypatch.setattr(reg._calls, "delete", unforeseen)
        again: list[object] = []
        monkeypatch.setattr(reg, "_delete_again", lambda *args: again.append(args))
        await reg._delete_quietly(worker, "disconnected", on_purpose=True, wait=0.01)
        await asyncio.sleep(0.05)
        assert len(again) == 1  # tried again, as after the API server's failure
        await kube.close()


def test_a_paced_log_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture):
    import logging

    from workerqueue_operator.core.pacedlog import PacedLog

    now = [0.0]
    paced = PacedLog(logging.getLogger("paced-test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="paced-test"):
        for _ in range(5):
            paced.warning("a", "failed %s", "x")
        paced.warning("b", "another kind")  # a kind of its own is not held back
        now[0] = 12.0
        paced.warning("a", "failed %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "failed x", "another kind", "failed y (and 4 more like it in the last 12s)"]


def test_a_paced_log_tells_what_the_end_of_a_flood_left_out(caplog: pytest.LogCaptureFixture):
    """The flood ended within its first line's interval: nothing else would ever say it went on."""
    import logging

    from workerqueue_operator.core.pacedlog import PacedLog

    now = [0.0]
    paced = PacedLog(logging.getLogger("paced-test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="paced-test"):
        for i in range(4):
            paced.warning("a", "failed %s", i)
        paced.warning("b", "once")
        now[0] = 9.0
        paced.settle()  # too early: the pace holds
        now[0] = 10.5
        paced.settle()
        paced.settle()  # told once
        now[0] = 11.0
        paced.warning("a", "failed %s", "again")  # within the pace of the line settle wrote
        now[0] = 21.0
        paced.settle()
    assert [r.getMessage() for r in caplog.records] == [
        "failed 0", "once", "failed 3 (and 2 more like it in the last 10s)", "failed again"]


async def test_an_expiry_after_calls_refused_for_their_token_says_so(monkeypatch: pytest.MonkeyPatch):
    """The worker kept calling, with a token revoked meanwhile: "sent no heartbeat" alone sent whoever
    read the Event looking for a network fault. Only the token the worker's id was issued with says so."""
    import kubernetes

    from workerqueue_operator.core import queues
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: LeaseCalls.delete is replaced
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    events = EventPoster(kube)
    reg = registry.Registry(client=kube, events=events, queue_of=lambda key: q, clock=lambda: now[0])

    async def deleted(worker: leases.Worker, **kwargs: object) -> bool:
        return True

    monkeypatch.setattr(reg._calls, "delete", deleted)
    old = queues.digest("the-revoked-queue-token")
    ids = {name: queues.new_worker_id(old) for name in ("revoked", "silent", "restored", "made-up")}
    for worker_id in ids.values():
        worker = reg.register(q, worker_id)
        worker.stored = True
        reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    reg.token_refused(ids["revoked"], old)
    reg.token_refused(ids["restored"], old)
    reg.token_refused(ids["made-up"], queues.digest("anyone-elses-token"))  # proves nothing: not noted
    reg.token_refused("never-registered", old)
    told = [message for (*_, reason, message) in events._warnings if reason == "WorkerTokenRefused"]
    assert sorted(m.split()[1] for m in told) == sorted([ids["revoked"], ids["restored"]])
    reg.heartbeat(reg.get(ids["restored"]), status="active", tasks_processed=0, current_task_id=None,
                  system_info=None)  # its token opens the queue again (restored)
    now[0] += 1000.0
    reg._sweep(ending=True)
    await asyncio.gather(*reg._writes)
    messages = {message.split()[1]: message for (*_, reason, message) in events._warnings
                if reason == "WorkerExpired"}
    assert "its calls were refused: the token was revoked or rotated" in messages[ids["revoked"]]
    for name in ("silent", "restored", "made-up"):
        assert " sent no heartbeat for " in messages[ids[name]], name


async def test_a_lease_marked_as_its_workers_end_and_left_behind_is_deleted_by_the_active_replica(
        monkeypatch: pytest.MonkeyPatch):
    """The replica that marked it stopped before deleting it (or its deletion was refused for good):
    no replica holds the worker any more, so no sweep would ever delete it."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: LeaseCalls.delete is replaced
    mono = [100.0]
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q,
                            monotonic=lambda: mono[0])
    deleted: list[str] = []

    async def delete(worker: leases.Worker, **kwargs: object) -> bool:
        deleted.append(worker.lease)
        return True

    monkeypatch.setattr(reg._calls, "delete", delete)
    for name in ("left-behind", "deleted-in-time"):
        held = make_worker(worker_id=name, lease=f"q1-{name}", slot=None, pod=None)
        reg.lease_upserted(leases.lease_body(held, queue_name="q1"))
        reg.lease_upserted(marked(leases.lease_body(held, queue_name="q1")))
        assert reg.get(name, expired=True) is None  # ended here at once
    reg.lease_deleted(("team-a", "q1-deleted-in-time"), marked(leases.lease_body(
        make_worker(worker_id="deleted-in-time", lease="q1-deleted-in-time", slot=None, pod=None), queue_name="q1")))
    mono[0] += registry.MARKED_GRACE_SECONDS + 1
    reg._delete_left_behind()  # called by the active replica only (run)
    await asyncio.gather(*reg._writes)
    assert deleted == ["q1-left-behind"]
    reg._delete_left_behind()  # once
    await asyncio.gather(*reg._writes)
    assert deleted == ["q1-left-behind"]


def test_an_id_that_ended_on_purpose_in_one_queue_may_still_join_another():
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    first, other = queue("q1", uid="uid-1"), queue("q2", uid="uid-2")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of={first.key: first, other.key: other}.get)
    reg._bury(make_worker(worker_id="same-id", queue=first.key), on_purpose=True)
    assert not reg.may_rejoin(first, "same-id") and reg.may_rejoin(other, "same-id")


async def test_a_disconnect_answers_by_its_deadline_however_long_its_deletion_takes(monkeypatch: pytest.MonkeyPatch):
    """Time spent before (a pod's token awaited) is taken from the wait: the real worker gives the call 10 s."""
    import time

    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: LeaseCalls.delete is replaced
    q = queue(heartbeatIntervalSeconds=10, uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q)

    async def slow(worker: leases.Worker, **kwargs: object) -> bool:
        await asyncio.sleep(5)
        return True

    monkeypatch.setattr(reg._calls, "delete", slow)
    worker = reg.register(q, "leaving")
    worker.stored = True
    began = time.monotonic()
    await reg.disconnect(worker, reason="shutdown", exit_code=0, deadline=asyncio.get_running_loop().time() + 0.3)
    assert time.monotonic() - began < 2
    for task in reg._writes:
        task.cancel()
    await asyncio.gather(*reg._writes, return_exceptions=True)


def test_a_namesakes_registrations_are_none_of_the_queue_made_again_under_its_name():
    """`kubectl replace --force`: the deleted queue's Leases wait for the garbage collector, filed under
    the same name. They were listed as the new queue's workers and filled its maxWorkers meanwhile."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    old, new = queue(uid="uid-1", created="2026-01-01T00:00:00Z"), queue(uid="uid-2", created="2026-03-01T00:00:00Z")
    current = [old]
    now = [times.parse("2026-02-01T00:00:00Z")]
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: current[0],
                            clock=lambda: now[0],
                            bounds=registry.Bounds(pending=10, pending_per_queue=10, workers=10, workers_per_queue=2))
    gone = [reg.register(old, f"old-{i}") for i in range(2)]
    assert reg.live(old.key) == gone and reg.live_count(old.key) == 2
    current[0], now[0] = new, times.parse("2026-03-01T00:00:10Z")
    assert reg.live(new.key) == [] and reg.live_count(new.key) == 0
    mine = [reg.register(new, f"new-{i}") for i in range(2)]  # the namesake's take no place of the two
    assert reg.live(new.key) == mine
    with pytest.raises(registry.Full):
        reg.register(new, "one-too-many")


def test_a_lease_left_by_a_gone_namesake_is_told_from_ones_of_the_queue_and_from_other_leases():
    owner = {"apiVersion": "agentcontrol.dev/v1alpha1", "kind": "WorkerQueue", "name": "q1", "uid": "uid-2"}
    labels = {**leases.LABELS, "agentcontrol.dev/queue": "q1"}
    body = {"metadata": {"namespace": "team-a", "name": "q1-slot-0", "labels": labels, "ownerReferences": [owner]}}
    made = times.parse("2026-03-01T00:00:00Z")  # this queue's creation

    def current(acquired: str = "2026-02-01T00:00:00.000000Z", **meta: Any) -> dict[str, Any]:
        return {"metadata": {"namespace": "team-a", "name": "q1-slot-0", "labels": labels, **meta},
                "spec": {"acquireTime": acquired}}

    def left(lease: dict[str, Any]) -> bool:
        return leases.left_by_another_queue(lease, body, created_at=made)

    assert left(current())  # orphaned: no owner
    assert left(current(ownerReferences=[{**owner, "uid": "uid-1"}]))  # a namesake's, made before this queue
    # Another uid's, made after this queue: a later queue's, which this replica's watch has not brought.
    assert not left(current("2026-03-01T00:00:01.000000Z", ownerReferences=[{**owner, "uid": "uid-3"}]))
    assert not left(current(ownerReferences=[owner]))  # this queue's own
    refusal = {**labels, "app.kubernetes.io/component": leases.REFUSAL_COMPONENT}
    assert not left(current(labels=refusal))
    assert not left(current(labels={}))  # no Lease of the operator's
    assert not left(current(labels={**labels, "agentcontrol.dev/queue": "q2"}))


def test_a_replica_behind_on_a_queue_made_again_counts_the_new_queues_registrations_and_takes_none_of_its_slots():
    """Its watch has not brought the new queue yet: the new queue's live workers were a namesake's to
    it, left out of the count and their slots overwritten for the deleted queue."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    old = queue(uid="uid-1", created="2026-01-01T00:00:00Z")
    new = queue(uid="uid-2", created="2026-03-01T00:00:00Z")
    now = [times.parse("2026-03-01T00:01:00Z")]
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: old, clock=lambda: now[0],
                            bounds=registry.Bounds(pending=10, pending_per_queue=10, workers=10, workers_per_queue=1))
    theirs = reg.register(new, "new-0")  # as the watch brings it: made after the queue this replica knows
    assert not registry.namesakes(theirs, old) and reg.live(old.key) == [theirs]
    with pytest.raises(registry.Full):
        reg.register(old, "one-too-many")


async def test_registrations_ended_by_disconnect_leave_memory_at_once_not_at_their_lease_end():
    # A loop of /start and disconnect never had more than one registration waiting, so no bound held
    # it; each ended one stayed filed for its expiry (2.5 heartbeat intervals, up to 750 s): ~1-4 KB each.
    import gc

    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing was written yet
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: None)
    q = queue(heartbeatIntervalSeconds=300)

    def workers_in_memory() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, leases.Worker))

    before = workers_in_memory()
    for n in range(500):
        worker = reg.register(q, f"w-{n}", hostname="h")
        await reg.disconnect(worker, reason="shutdown", exit_code=0)
    del worker
    assert reg.total == 0
    assert workers_in_memory() - before < 5


@pytest.mark.looptime
async def test_failing_lease_writes_back_off_per_worker_and_heartbeats_add_none():
    """An API server answering 429: each failed write was retried every 2 s, and each heartbeat of a
    worker not confirmed yet queued one more besides: ~9x the writes of a healthy cluster at a 10-s
    interval, all against the server that asked for fewer."""
    from workerqueue_operator.k8s import client as client_

    class Throttling:
        def __init__(self) -> None:
            self.failing, self.calls, self.in_flight, self.most_in_flight = True, 0, 0, 0

        async def request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                          **_: Any) -> dict[str, Any]:
            self.calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(0.5)
                if self.failing:
                    raise client_.ApiError(429, "TooManyRequests", "the server has received too many requests")
                assert body is not None
                return {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.calls)}}
            finally:
                self.in_flight -= 1

    class NoEvents:
        def post(self, **_: Any) -> None:
            pass

    loop = asyncio.get_running_loop()
    api = Throttling()
    q = queue(heartbeatIntervalSeconds=60)
    reg = registry.Registry(client=api, events=NoEvents(), queue_of=lambda key: q,  # type: ignore[arg-type]
                            active=lambda: False, monotonic=loop.time)
    runner = asyncio.create_task(reg.run())
    try:
        worker = reg.register(q, "w0", pod="q1-w0")
        for _ in range(40):  # heartbeats far more often than its interval, as a burst of calls would
            reg.heartbeat(worker, status="running", tasks_processed=0, current_task_id=None, system_info=None)
            await asyncio.sleep(1.5)
        # 60 s of failures: 2, 4, 8, then 15 s (a quarter of its interval) apart, each within 20% less:
        # about 7 writes, where 2-s retries and a write per heartbeat made over 40.
        assert 5 <= api.calls <= 9 and api.most_in_flight == 1
        api.failing = False
        await asyncio.sleep(20)
        # Healthy again: written, its heartbeat with it, and later ones paced as before.
        assert reg.get("w0") is worker and worker.stored and worker.confirmed and worker.write_failures == 0
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_heartbeat_in_the_turn_its_first_write_is_spawned_waits_for_that_write():
    """The create of a new worker's Lease spawned, its first heartbeat handled before the task's first
    step: the heartbeat queued a second write, made alongside the first (two creates in flight)."""

    class Slow:
        def __init__(self) -> None:
            self.in_flight = self.most_in_flight = 0
            self.methods: list[str] = []

        async def request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                          **_: Any) -> dict[str, Any]:
            self.methods.append(method)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(0.3)
                assert body is not None
                return {**body, "metadata": {**body["metadata"], "resourceVersion": str(len(self.methods))}}
            finally:
                self.in_flight -= 1

    class NoEvents:
        def post(self, **_: Any) -> None:
            pass

    api = Slow()
    q = queue(heartbeatIntervalSeconds=10)
    reg = registry.Registry(client=api, events=NoEvents(), queue_of=lambda key: q,  # type: ignore[arg-type]
                            active=lambda: False)
    worker = reg.register(q, "w0", pod="q1-w0")
    reg._flush()  # the create spawned
    reg.heartbeat(worker, status="running", tasks_processed=0, current_task_id=None, system_info=None)
    await asyncio.sleep(0.1)
    reg._flush()  # the writer's next tick, the create in flight
    await asyncio.sleep(0.4)
    reg._flush()
    await asyncio.sleep(0.4)
    # One create, which carries the heartbeat: it was written as the task began.
    assert api.most_in_flight == 1 and api.methods == ["POST"] and worker.confirmed


def test_the_queues_an_identity_is_registered_in_are_those_known_where_it_lives():
    """The pass-through routes a Kubernetes identity's calls by them (api/passthrough.py): a deleted
    queue's, an expired registration, a namesake's or an ended one must not count, and an identity
    with none is forgotten whole."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    one, two = queue("one", uid="uid-1", created="2026-01-01T00:00:00Z"), queue("two", uid="uid-2")
    known = {one.key: one, two.key: two}
    now = [times.parse("2026-02-01T00:00:00Z")]
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=known.get, clock=lambda: now[0])
    runner = "system:serviceaccount:team-a:runner"
    assert reg.queues_registered_by(runner) == [] and reg._by_identity == {}
    first = reg.register(one, "w1", identity=runner)
    reg.register(one, "w2", identity=runner)
    reg.register(two, "w3", identity="system:serviceaccount:team-a:other")
    assert reg.queues_registered_by(runner) == [one.key]
    reg.register(two, "w4", identity=runner)
    assert sorted(reg.queues_registered_by(runner)) == sorted([one.key, two.key])
    del known[two.key]  # deleted: its registrations wait for the garbage collector, and count for nothing
    assert reg.queues_registered_by(runner) == [one.key]
    known[one.key] = queue("one", uid="uid-9", created="2026-03-01T00:00:00Z")  # made again under its name
    assert reg.queues_registered_by(runner) == []
    known[one.key] = one
    reg._forget(first.worker_id)
    assert reg.queues_registered_by(runner) == [one.key]  # w2 still there
    now[0] += 10_000  # every registration expired
    assert reg.queues_registered_by(runner) == []
    for worker_id in ("w2", "w3", "w4"):
        reg._forget(worker_id)
    assert reg._by_identity == {}


async def test_a_late_seen_end_of_a_slots_last_holder_is_no_end_of_its_new_one():
    """Its first holder disconnected: the slot's Lease marked, then deleted. The watch brought the mark,
    the slot went to a new worker here (its create answered), then the deletion came, behind: taken for
    the new holder's, that worker was ended on purpose, its own Lease deleted as the watch showed it,
    its heartbeats 404 for good, and the queue ran a worker over maxWorkers."""
    import time

    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    class Answers:
        def __init__(self) -> None:
            self.made: list[str] = []
            self.created: dict[str, Any] = {}

        async def request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                          **_: Any) -> dict[str, Any]:
            self.made.append(method)
            if method == "POST" and body is not None:
                self.created = {**body, "metadata": {**body["metadata"], "resourceVersion": "9", "uid": "u2"}}
            return self.created

    api, kube = Answers(), client_.KubeClient(kubernetes.client.Configuration())
    q = queue(maxWorkers=1, uid="uid-1")
    reg = registry.Registry(client=api, events=EventPoster(kube), queue_of=lambda key: q)  # type: ignore[arg-type]
    first = leases.lease_body(make_worker(worker_id="first", pod=None, renewed_at=time.time()), queue_name=q.name)
    reg.lease_upserted(first)
    reg.lease_upserted(marked(first))
    second = await reg.claim(q, "second", limit=1)
    assert second is not None and second.lease == "q1-slot-0"
    reg.lease_upserted(marked(first))  # the mark again, behind the claim's answer
    assert reg.get("second") is second
    reg.lease_deleted(("team-a", "q1-slot-0"), marked(first))
    assert reg.get("second") is second
    reg.lease_upserted(api.created)  # the new holder's own Lease, as the watch brings it
    await asyncio.sleep(0.05)
    assert reg.get("second") is second and reg.may_rejoin(q, "first") is False
    assert api.made == ["POST"]  # nothing of the new holder's deleted, nor marked
    await kube.close()


async def test_a_full_queue_is_looked_at_again_when_the_lease_watch_is_down():
    """Its Lease watch down, a replica took a queue for full from what it knew: the slot's worker gone
    and its Lease deleted by the other replica meanwhile, each /start here was a 409, and a worker
    turned away exits for good. A Lease the API server still holds keeps its slot."""
    import time

    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    class Answers:
        def __init__(self) -> None:
            self.made: list[str] = []
            self.items: list[dict[str, Any]] = []

        async def request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                          **_: Any) -> dict[str, Any]:
            self.made.append(method)
            if method == "GET":
                return {"items": self.items}
            assert body is not None
            return {**body, "metadata": {**body["metadata"], "resourceVersion": "9", "uid": "u2"}}

    api, kube = Answers(), client_.KubeClient(kubernetes.client.Configuration())
    q = queue(maxWorkers=1, uid="uid-1")
    watching, clock = [True], [0.0]
    reg = registry.Registry(client=api, events=EventPoster(kube), queue_of=lambda key: q,  # type: ignore[arg-type]
                            watching=lambda: watching[0], monotonic=lambda: clock[0])
    held = leases.lease_body(make_worker(worker_id="held", pod=None, renewed_at=time.time()), queue_name=q.name)
    reg.lease_upserted(held)
    assert await reg.claim(q, "new", limit=1) is None and api.made == []  # the watch is up: full it is
    watching[0] = False
    api.items = [held]
    assert await reg.claim(q, "new", limit=1) is None and api.made == ["GET"]  # still held
    api.items = []  # deleted by the other replica, unseen here
    assert await reg.claim(q, "new", limit=1) is None and api.made == ["GET"]  # listed at most every 2 s
    clock[0] += registry.RECHECK_SECONDS
    claimed = await reg.claim(q, "new", limit=1)
    assert claimed is not None and claimed.lease == "q1-slot-0" and api.made == ["GET", "GET", "POST"]
    assert reg.get("held") is None and reg.may_rejoin(q, "held")  # taken for expired: it may come back
    await kube.close()


def test_the_end_of_a_newer_holder_seen_late_ends_the_older_registration_filed_here():
    """The slot changed hands while this replica's Lease watch was away, and its new holder ended: the
    relist shows its Lease marked. The older registration filed here was taken over (it may come back),
    and the newer one ended for good."""
    import time

    now = time.time()
    reg, q = standby_holding([now])
    older = make_worker(worker_id="older", pod=None, registered_at=now - 30, renewed_at=now - 5)
    reg.lease_upserted(leases.lease_body(older, queue_name=q.name))
    assert reg.get("older") is not None
    newer = leases.lease_body(make_worker(worker_id="newer", pod=None, registered_at=now - 1, renewed_at=now),
                              queue_name=q.name)
    reg.lease_upserted(marked(newer))
    assert reg.get("older") is None and reg.may_rejoin(q, "older") and not reg.may_rejoin(q, "newer")
    reg.lease_deleted(("team-a", "q1-slot-0"), marked(newer))
    assert reg.live_count(q.key) == 0
    # Its deletion alone (the mark unseen) takes the older one over too.
    again, q = standby_holding([now])
    again.lease_upserted(leases.lease_body(older, queue_name=q.name))
    again.lease_deleted(("team-a", "q1-slot-0"), marked(newer))
    assert again.get("older") is None and again.may_rejoin(q, "older")


def test_a_lease_of_another_queue_naming_a_registered_worker_changes_nothing_of_it():
    # Whoever may write Leases in their own namespace, and read a worker id in an Event, made it theirs:
    # a renewal far ahead kept its slot for good, and its status and counts were theirs.
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    now = [1000.0]
    q, evil = queue("q1", uid="uid-1", heartbeatIntervalSeconds=10), queue("x", namespace="evil", uid="uid-x")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q if key == q.key else evil,
                            clock=lambda: now[0])
    mine = reg.register(q, "w-1")
    before = (mine.queue, mine.lease, mine.status, mine.tasks_processed, mine.renewed_at)
    assert before == (q.key, "q1-w-1", "starting", 0, 1000.0)
    # A renewal far ahead (read as now) and one just ahead, within the slack a clock may differ by.
    for renewed_at in (1_000_000.0, 1010.0):
        now[0] += 1
        forged = dataclasses.replace(mine, queue=evil.key, queue_uid=evil.uid, queue_id="x", lease="evil-w-1",
                                     registered_at=mine.registered_at + 1, renewed_at=renewed_at,
                                     status="pwned", tasks_processed=999)
        reg.lease_upserted(leases.lease_body(forged, queue_name=evil.name))
        kept = reg.get("w-1")
        assert kept is not None
        assert (kept.queue, kept.lease, kept.status, kept.tasks_processed, kept.renewed_at) == before
    now[0] = 1000.0 + mine.duration + 1
    assert reg.get("w-1") is None  # expires as its own heartbeats say, not the forged renewal


async def test_a_deletion_waiting_for_its_retry_is_tried_once_more_when_the_replica_stops(
        monkeypatch: pytest.MonkeyPatch):
    """A disconnect whose Lease delete failed waits (seconds) for its retry: a rolling update stopping
    the replica meanwhile dropped it, and the next replica listed the Lease as a live worker holding
    its slot for a whole lease duration. A stopping replica tries each such deletion once more."""
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    with unreachable() as kube:
        q1 = queue("q1", uid="uid-1")
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1, tick=0.01)
        worker = reg.register(q1, "w-1")
        tried: list[str] = []

        async def delete(gone: leases.Worker, **kwargs: object) -> bool:
            tried.append(gone.worker_id)
            raise client_.ApiError(503, "Service Unavailable", "the API server is failing")

        monkeypatch.setattr(reg._calls, "delete", delete)
        running = asyncio.create_task(reg.run())
        reg._forget(worker.worker_id)  # as a disconnect does before it deletes
        await reg._delete_quietly(worker, "disconnected", on_purpose=True, wait=60.0)
        assert tried == ["w-1"]  # failed: its retry is a minute away
        await asyncio.sleep(0.05)  # the registry runs (a few ticks), as it does in the operator
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        assert tried == ["w-1", "w-1"]
        assert not reg._retries  # none left to run after the registry stopped
        await kube.close()


async def test_deletions_of_one_lease_that_fail_together_leave_one_retry(monkeypatch: pytest.MonkeyPatch):
    """A disconnect's delete and a sweep's of the same Lease, both failing in an outage: each left a
    retry chain of its own, every failure of the Lease one more for as long as the outage lasted."""
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    with unreachable() as kube:
        q1 = queue("q1", uid="uid-1")
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1, tick=0.01)
        worker = reg.register(q1, "w-1")
        tried: list[str] = []
        failing = [True]

        async def delete(gone: leases.Worker, **kwargs: object) -> bool:
            tried.append(gone.worker_id)
            if failing[0]:
                raise client_.ApiError(503, "Service Unavailable", "the API server is failing")
            return True

        monkeypatch.setattr(reg._calls, "delete", delete)
        reg._forget(worker.worker_id)
        await reg._delete_quietly(worker, "disconnected", on_purpose=True, wait=0.05)
        await reg._delete_quietly(worker, "no heartbeat for 30s", on_purpose=False, wait=0.05)
        assert tried == ["w-1", "w-1"] and list(reg._retries) == [(worker.namespace, worker.lease)]
        failing[0] = False
        await asyncio.sleep(0.3)  # past the retry's wait, jitter and all
        assert tried == ["w-1", "w-1", "w-1"] and not reg._retries
        await kube.close()


async def test_a_refusal_record_that_fails_to_be_written_is_written_again(monkeypatch: pytest.MonkeyPatch):
    """The refused worker exits and never calls again: a record left unwritten made the replica that
    supervises the pod (another one, or this one restarted) count its failure as a crash."""
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    monkeypatch.setattr(refusals, "REFUSAL_RETRY_SECONDS", 0.01)
    with unreachable() as kube:
        q1 = queue("q1", uid="uid-1")
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1)
        written: list[str] = []

        bodies: list[dict[str, Any]] = []

        async def create(body: dict[str, Any]) -> dict[str, Any]:
            written.append(body["metadata"]["name"])
            bodies.append(body)
            await asyncio.sleep(0.01)  # the clock moves between the writes
            if len(written) <= 2:
                raise client_.ApiError(503, "Service Unavailable", "the API server is failing")
            return {**body, "metadata": {**body["metadata"], "uid": "lease-uid"}}

        monkeypatch.setattr(reg._calls, "create", create)
        await reg.refusals.start_refused(q1, "q1-w0", "409: full")
        assert written == ["q1-w0-refused"]
        await asyncio.sleep(0.2)  # again after 0.01 s, then 0.02 s: the third lands
        assert written == ["q1-w0-refused"] * 3
        assert reg.refusals._refused[("team-a", "q1-w0", "uid-1")].lease_uid == "lease-uid"
        await asyncio.sleep(0.1)
        assert len(written) == 3  # written: no more tries
        # Each says when the pod was refused, not when it was written at last.
        assert len({leases.refusal_from_lease(body).at for body in bodies}) == 1  # type: ignore[union-attr]

        async def forbidden(body: dict[str, Any]) -> dict[str, Any]:
            written.append(body["metadata"]["name"])
            raise client_.ApiError(403, "Forbidden", "leases is forbidden")

        monkeypatch.setattr(reg._calls, "create", forbidden)
        await reg.refusals.start_refused(q1, "q1-w1", "409: full")
        await asyncio.sleep(0.2)
        assert written[3:] == ["q1-w1-refused"]  # refused for what it is: not tried again
        await kube.close()


async def test_a_refusal_record_being_written_at_the_stop_is_not_tried_again_after_it(
        monkeypatch: pytest.MonkeyPatch):
    """Its write was no task of the registry's: failing after the stop, it scheduled a retry nothing
    would ever cancel, and wrote again with the operator stopped."""
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    monkeypatch.setattr(refusals, "REFUSAL_RETRY_SECONDS", 0.01)
    with unreachable() as kube:
        q1 = queue("q1", uid="uid-1")
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1)
        written: list[str] = []

        async def create(body: dict[str, Any]) -> dict[str, Any]:
            written.append(body["metadata"]["name"])
            with contextlib.suppress(asyncio.CancelledError):  # as a call whose answer comes all the same
                await asyncio.sleep(0.05)
            raise client_.ApiError(503, "Service Unavailable", "the API server is failing")

        monkeypatch.setattr(reg._calls, "create", create)
        running = asyncio.create_task(reg.run())
        await asyncio.sleep(0)
        await reg.refusals.start_refused(q1, "q1-w0", "503: the API server is unavailable", wait=False)
        await asyncio.sleep(0.01)  # the write is under way
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await asyncio.sleep(0.2)
        assert written == ["q1-w0-refused"] and not reg.refusals._retries
        await kube.close()


def test_a_listed_worker_is_the_wire_model_exactly_with_times_in_utc():
    """`GET .../workers` is built by hand (per worker, thousands a list): its keys are WorkerInfo's, its
    times RFC 3339 with "Z" as every other time the operator answers with."""
    worker = make_worker(registered_at=1_767_225_600.25, renewed_at=1_767_225_660.5)
    info = worker.info()
    assert set(info) == set(wire.WorkerInfo.model_fields)
    assert wire.WorkerInfo.model_validate(info).model_dump() == info
    assert info["registered_at"] == "2026-01-01T00:00:00.250000Z"
    assert info["last_heartbeat"] == "2026-01-01T00:01:00.500000Z"


@pytest.mark.parametrize("pending", [True, False])
@pytest.mark.parametrize("scope", ["in this queue", "in this namespace", "in all queues"])
def test_a_refusal_for_the_bounds_names_the_setting_that_bounds_it(pending: bool, scope: str):
    from workerqueue_operator.models.settings import Settings

    message = str(registry.Full(pending=pending, scope=scope, limit=7))
    setting = message.rsplit(": ", 1)[1].rstrip(")").split("=")[0]
    assert setting.startswith("WQ_") and setting[3:].lower() in Settings.model_fields, message
    assert message.endswith("=7)")


async def test_a_registration_refused_as_its_namespace_goes_is_no_warning(caplog: pytest.LogCaptureFixture):
    """Refused until the namespace is gone, and the queue with it: a Warning every 10 s meanwhile said
    nothing an operator could act on."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())

    async def terminating(*args: object, **kwargs: object) -> dict[str, object]:
        raise client_.ApiError(403, "Forbidden", "unable to create new content in namespace team-a because it is "
                               "being terminated", ("NamespaceTerminating",))

    kube.request = terminating  # type: ignore[method-assign]
    q1 = queue("q1", uid="uid-1")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1)
    worker = reg.register(q1, "w-1")
    with caplog.at_level(logging.DEBUG):
        await reg._write(worker)
    assert worker.write_failures == 1  # tried again later, as any failed write
    said = [r for r in caplog.records if "registration of worker w-1" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG] and "being deleted" in said[0].getMessage()
    await kube.close()


def _stepping_registry() -> tuple[registry.Registry, list[float], list[float], Any]:
    """A registry on a wall clock and a monotonic clock the test moves (never written: no API server)."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())
    wall, mono = [100_000.0], [0.0]
    q = queue(heartbeatIntervalSeconds=10)  # registrations of its pods last 25 s
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, clock=lambda: wall[0],
                            monotonic=lambda: mono[0])
    return reg, wall, mono, q


def _tick(reg: registry.Registry, wall: list[float], mono: list[float], seconds: float, *,
          step: float = 0.0, stall: float = 0.0) -> None:
    """The wall clock steps by `step` and the replica stands still for `stall` s (one sweep after
    that), then `seconds` pass, swept each second as run() sweeps."""
    if step or stall:
        wall[0] += step + stall + 1
        mono[0] += stall + 1
        reg._mind_the_clock(mono[0])
        reg._sweep(ending=True)
    while seconds > 0:
        wall[0] += min(seconds, 1.0)
        mono[0] += min(seconds, 1.0)
        seconds -= 1.0
        reg._mind_the_clock(mono[0])
        reg._sweep(ending=True)


@pytest.mark.parametrize("step, stall", [(120.0, 0.0), (0.0, 60.0), (3600.0, 0.0)])
def test_a_forward_step_of_the_clock_or_a_stand_still_expires_no_live_worker(step: float, stall: float):
    """A VM resumed, an NTP step, SIGSTOP: every live worker seemed to have missed its heartbeats, and
    all of them were expired at once (Events, their Leases deleted, their slots given away)."""
    reg, wall, mono, q = _stepping_registry()
    _tick(reg, wall, mono, 0)
    alive = reg.register(q, "alive", pod="q1-w1")
    _tick(reg, wall, mono, 5)
    reg.heartbeat(alive, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    _tick(reg, wall, mono, 0, step=step, stall=stall)
    assert reg.get("alive") is alive and reg.live(q.key) == [alive]
    reg.heartbeat(alive, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert alive.duration == 25  # the gap across the step is no pace of the worker's
    _tick(reg, wall, mono, 24)
    assert reg.get("alive") is alive
    _tick(reg, wall, mono, 1.5)  # no heartbeat within its lease after the step: it is gone, as ever
    assert reg.get("alive") is None


@pytest.mark.parametrize("step, stall", [(6.0, 0.0), (0.0, 6.0)])
def test_steps_or_stand_stills_again_and_again_keep_no_dead_worker_for_good(step: float, stall: float):
    """Each moves a lease on by the time lost, not by a whole lease: given a new one at each, a dead
    worker (and its slot) stayed while the clock stepped, or the loop blocked, more often than a lease lasts."""
    reg, wall, mono, q = _stepping_registry()
    _tick(reg, wall, mono, 0)
    dead = reg.register(q, "dead", pod="q1-w1")
    _tick(reg, wall, mono, 5)
    reg.heartbeat(dead, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    for _ in range(3):  # 6 s lost, then 14 s of work: over a minute of heartbeats missed in all
        _tick(reg, wall, mono, 13, step=step, stall=stall)
    assert reg.get("dead") is None


async def test_forward_steps_again_and_again_keep_no_dead_worker_known_by_its_lease_for_good():
    """A registration with a Lease (another replica's renewals may be unseen) was also moved to the time
    of each step by the sweep, on top of the time lost: a whole new lease at each step."""
    reg, wall, mono, q = _stepping_registry()
    _tick(reg, wall, mono, 0)
    dead = make_worker(worker_id="dead", lease="q1-dead", slot=None, renewed_at=wall[0], duration=25.0)
    reg.lease_upserted(leases.lease_body(dead, queue_name=q.name))
    assert reg.get("dead") is not None
    try:
        for _ in range(3):  # 6 s lost, then 14 s of work: 42 s of heartbeats missed in all
            _tick(reg, wall, mono, 13, step=6)
        assert reg.get("dead") is None
    finally:
        for write in list(reg._writes):  # its Lease's deletion: no API server here
            write.cancel()
        await asyncio.gather(*reg._writes, return_exceptions=True)


def test_a_backward_step_of_the_clock_holds_a_dead_worker_no_longer_than_its_lease():
    """An hour's step back: times noted before it lay an hour ahead, and held the dead worker (and its
    slot) an hour more."""
    reg, wall, mono, q = _stepping_registry()
    _tick(reg, wall, mono, 0)
    dead = reg.register(q, "dead", pod="q1-w1")
    _tick(reg, wall, mono, 5)
    reg.heartbeat(dead, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    _tick(reg, wall, mono, 0, step=-3600)
    assert reg.get("dead") is dead and dead.heard()
    _tick(reg, wall, mono, 24)
    assert reg.get("dead") is dead  # as if it had beaten just now: never expired early
    _tick(reg, wall, mono, 1.5)
    assert reg.get("dead") is None


def test_a_heartbeat_after_a_small_step_back_teaches_no_pace():
    """Its gap negative, a worker heartbeating every 60 s was taken for one at the queue's 10 s, and
    expired between two heartbeats."""
    reg, wall, _mono, q = _stepping_registry()
    worker = reg.register(q, "outside")  # no pod: expected at the real worker's 60 s
    assert worker.duration == 150
    wall[0] += 60
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    wall[0] -= 1.5  # under CLOCK_STEP_SECONDS: slewed, not a step
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert worker.duration == 150


def test_a_heartbeat_after_a_big_step_back_teaches_no_pace():
    """45 s after a heartbeat the clock stepped back 60 s: its times taken as now, the next heartbeat
    on time came 15 s after, by the clock, and a worker heartbeating every 60 s was taken for one at
    12 s (a lease of 35 s), and expired before its next heartbeat: its slot free for another."""
    reg, wall, mono, q = _stepping_registry()
    _tick(reg, wall, mono, 0)
    worker = reg.register(q, "outside")  # no pod: expected at the real worker's 60 s
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    _tick(reg, wall, mono, 60)
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert worker.duration == 150
    _tick(reg, wall, mono, 44)
    _tick(reg, wall, mono, 15, step=-61)
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert worker.duration == 150
    _tick(reg, wall, mono, 59)
    assert reg.get("outside") is worker
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    assert worker.duration == 150  # its pace across the next gap, as ever


def test_a_worker_rejoining_after_a_small_step_back_is_expected_at_its_own_pace():
    """Its gap since the last heartbeat heard negative, a worker heartbeating every 60 s came back
    with the queue's 10 s pace, and expired between two heartbeats."""
    reg, wall, _mono, q = _stepping_registry()
    worker = reg.register(q, "outside")  # no pod: expected at the real worker's 60 s
    reg.heartbeat(worker, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    heard = wall[0]
    wall[0] += worker.duration + 1
    reg._sweep(ending=True)
    assert reg.get("outside") is None
    wall[0] = heard - 1.5  # slewed back under CLOCK_STEP_SECONDS, its next heartbeat at once
    again = reg.rejoin(q, "outside")
    assert again is not None and again.duration == 150


def test_pods_deleted_end_the_workers_of_that_queue_not_a_namesakes():
    """A pass over a queue deleted since (another uid) ended the live worker of the queue made again
    under its name, in a pod of the same name, and gave its slot away."""
    reg, _wall, _mono, q = _stepping_registry()
    worker = reg.register(q, "in-pod", pod="q1-w0")
    reg.pods_deleted(q.key, "uid-of-a-namesake", ["q1-w0"])
    assert reg.get("in-pod") is worker
    reg.pods_deleted(q.key, q.uid, ["q1-w1"])
    assert reg.get("in-pod") is worker
    reg.pods_deleted(q.key, q.uid, ["q1-w0"])
    assert reg.get("in-pod") is None


async def test_the_writer_keeps_a_bounded_number_of_writes_under_way_and_the_rest_waits_its_turn():
    """Against an API server slow to answer, every renewal due went to the client's pool at once and
    queued there for a connection: a TokenReview or a slot's claim behind them missed its bound."""
    import kubernetes
    from aiohttp import web

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    answer, under_way, most, asked = asyncio.Event(), [0], [0], set()

    async def slow(request: web.Request) -> web.Response:
        asked.add((await request.json())["metadata"]["name"])
        under_way[0] += 1
        most[0] = max(most[0], under_way[0])
        try:
            await answer.wait()
        finally:
            under_way[0] -= 1
        return web.json_response({"kind": "Status", "code": 503, "reason": "ServiceUnavailable"}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kube = client_.KubeClient(kubernetes.client.Configuration(host=f"http://127.0.0.1:{port}"))
    q = queue("q")
    reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q, tick=0.01,
                            base_write_rate=10_000.0)
    for i in range(100):
        reg.register(q, f"w{i}")
    task = asyncio.create_task(reg.run())
    try:
        deadline = time.monotonic() + 10
        while under_way[0] < registry.WRITES_IN_FLIGHT:
            assert time.monotonic() < deadline, f"{under_way[0]} writes under way"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # at 100 ticks a second, the writer would have sent them all
        assert most[0] == registry.WRITES_IN_FLIGHT
        answer.set()
        while len(asked) < 100:  # the others in their turn
            assert time.monotonic() < deadline, f"{len(asked)} of 100 written"
            await asyncio.sleep(0.05)
        assert most[0] == registry.WRITES_IN_FLIGHT
    finally:
        answer.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()
        await runner.cleanup()


# --- Guards a mutation pass found untested ----------------------------------------------------------

class LeaseAnswers:
    """Answers Lease calls as the API server would for the few calls a registry makes: POST makes (409
    if there), GET reads, PUT overwrites, PATCH adds annotations, DELETE takes away, each with a new
    version. Only for the registry's own bookkeeping between calls; the API server's behaviour is tested
    in tests/integration."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, Any]] = {}
        self.made: list[str] = []
        self.version = 10
        self.gate: asyncio.Event | None = None
        """Set: POSTs wait for it (a create in flight)."""

    async def request(self, method: str, path: str, *, body: dict[str, Any] | None = None, **_: Any) -> Any:
        from workerqueue_operator.k8s import client as client_

        self.made.append(method)
        if method == "POST" and self.gate is not None:
            await self.gate.wait()
        name = body["metadata"]["name"] if method in ("POST", "PUT") and body is not None else path.rsplit("/", 1)[-1]
        if method in ("POST", "PUT") and body is not None:
            if method == "POST" and name in self.held:
                raise client_.ApiError(409, "AlreadyExists", "exists")
            self.version += 1
            self.held[name] = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
            return self.held[name]
        if method == "GET" and name in self.held:
            return self.held[name]
        if method == "PATCH" and name in self.held and body is not None:
            meta = self.held[name]["metadata"]
            meta["annotations"] = {**(meta.get("annotations") or {}), **body["metadata"].get("annotations", {})}
            self.version += 1
            meta["resourceVersion"] = str(self.version)
            return self.held[name]
        if method == "DELETE" and name in self.held:
            return self.held.pop(name)
        raise client_.ApiError(404, "NotFound", "not found")


@contextlib.asynccontextmanager
async def answered_registry(api: Any, q: Any, **options: Any) -> Any:
    """A registry whose Lease calls `api` answers, serving the queue `q`."""
    import kubernetes

    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.k8s import client as client_

    kube = client_.KubeClient(kubernetes.client.Configuration())
    try:
        yield registry.Registry(client=api, events=EventPoster(kube), queue_of=lambda key: q, **options)
    finally:
        await kube.close()


async def test_a_pods_claim_keeps_its_own_registration_and_ends_its_pods_earlier_one():
    """A pod runs one worker: its second /start ends the first registration (one made before
    maxWorkers was set, in no slot), never the one it has just made."""
    capped = queue(maxWorkers=2, uid="uid-1")
    async with answered_registry(LeaseAnswers(), capped) as reg:
        reg.register(queue(uid="uid-1"), "old", pod="q1-w0")
        new = await reg.claim(capped, "new", limit=2, pod="q1-w0")
        assert new is not None and reg.get("new") is new
        assert reg.get("old") is None and [w.worker_id for w in reg.live(capped.key)] == ["new"]


async def test_a_full_slot_held_by_a_live_worker_of_no_pod_is_not_read_again():
    """Only a pod's own earlier worker, or an expired one, may give its slot to a newcomer: a live
    holder's Lease is not read at every /start of a partly full queue."""
    q = queue(maxWorkers=2, uid="uid-1")
    api = LeaseAnswers()
    async with answered_registry(api, q) as reg:
        first, second = await reg.claim(q, "a", limit=2), await reg.claim(q, "b", limit=2)
        assert first is not None and second is not None and (first.slot, second.slot) == (0, 1)
        assert api.made == ["POST", "POST"]


async def test_a_slot_taken_from_an_expired_holder_lets_that_holder_go_here():
    """On a standby (which leaves ending workers to the active replica), a holder whose slot went to a
    newcomer stayed registered: its late heartbeat was answered 200, counted live over maxWorkers."""
    now = [1000.0]
    q = queue(maxWorkers=1, uid="uid-1", heartbeatIntervalSeconds=10)
    async with answered_registry(LeaseAnswers(), q, clock=lambda: now[0], active=lambda: False) as reg:
        old = await reg.claim(q, "old", limit=1)
        assert old is not None
        now[0] += old.duration + 1
        reg._sweep(ending=False)
        new = await reg.claim(q, "new", limit=1)
        assert new is not None and new.slot == 0
        assert reg.get("old", expired=True) is None and reg.may_rejoin(q, "old")
        assert [w.worker_id for w in reg.live(q.key)] == ["new"]


@contextlib.asynccontextmanager
async def rejoining(limit: int) -> Any:
    """(registry, queue of `limit` slots, its LeaseAnswers with creates held): worker `w` expired here,
    so that its next heartbeat may bring it back (rejoin_slot)."""
    api = LeaseAnswers()
    api.gate = asyncio.Event()
    q = queue(maxWorkers=limit, uid="uid-1")
    async with answered_registry(api, q) as reg:
        reg._remember("w", registry._Ended(False, None, q.key))
        yield reg, q, api


async def test_a_second_heartbeat_while_a_rejoin_claims_a_slot_claims_none():
    """A heartbeat retried while the first one's rejoin claims a slot (claims may take seconds) took a
    second slot, and the queue ran one short for the worker's life."""
    async with rejoining(2) as (reg, q, api):
        first = asyncio.create_task(reg.rejoin_slot(q, "w"))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(reg.rejoin_slot(q, "w"))
        await asyncio.sleep(0.01)
        api.gate.set()
        assert await first is not None and await second is None
        assert api.made.count("POST") == 1


async def test_a_disconnect_while_a_rejoin_claims_its_slot_gives_the_slot_back():
    """The worker left while its rejoin's create was in flight: it held the slot until it expired."""
    async with rejoining(1) as (reg, q, api):
        claiming = asyncio.create_task(reg.rejoin_slot(q, "w"))
        await asyncio.sleep(0.01)
        reg._remember("w", registry._Ended(True, None, q.key))  # as its disconnect does meanwhile
        api.gate.set()
        assert await claiming is None
        await asyncio.gather(*reg._writes)
        assert reg.get("w", expired=True) is None and api.held == {}


def test_a_standby_leaves_expired_workers_to_the_active_replica():
    """A standby ending expired workers doubled the deletions after an outage, and one whose watch lags
    forgot workers alive through the active replica."""
    now = [1000.0]
    reg, _ = standby_holding(now, "w1")
    ended: list[str] = []
    reg._end = lambda worker, *_, **__: ended.append(worker.worker_id)  # type: ignore[method-assign]
    now[0] += 30
    reg._sweep(ending=False)
    assert ended == [] and reg.get("w1", expired=True) is not None
    now[0] += 2
    reg._sweep(ending=True)
    assert ended == ["w1"]


async def test_a_deletion_failing_for_an_outage_is_retried_past_the_bound_on_refusals(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Only a refusal is given up after DELETE_REFUSED_TRIES: an outage's 503s are tried until it
    ends, or a departed worker's slot stays taken for its Lease's whole duration."""
    from workerqueue_operator.k8s import client as client_

    q = queue("q1", uid="uid-1")
    tried: list[str] = []

    async def delete(gone: leases.Worker, **kwargs: object) -> bool:
        tried.append(gone.worker_id)
        if len(tried) <= registry.DELETE_REFUSED_TRIES:
            raise client_.ApiError(503, "Service Unavailable", "the API server is failing")
        return True

    async with answered_registry(LeaseAnswers(), q, tick=0.01) as reg:
        departed = reg.register(q, "w-1")
        monkeypatch.setattr(reg._calls, "delete", delete)
        reg._forget(departed.worker_id)
        await reg._delete_quietly(departed, "disconnected", on_purpose=True, wait=0.01)
        for _ in range(100):
            if len(tried) > registry.DELETE_REFUSED_TRIES:
                break
            await asyncio.sleep(0.02)
        assert len(tried) == registry.DELETE_REFUSED_TRIES + 1 and not reg._retries
        assert "given up" not in caplog.text


async def test_a_disconnect_of_an_unknown_worker_leaves_nothing_behind():
    """Each disconnect of a worker id this replica does not know left an entry for good: made-up ids
    grew memory without bound."""
    from tests.unit.apps import unreachable
    from workerqueue_operator.core.events import EventPoster

    with unreachable() as kube:
        q1 = queue("q1", uid="uid-1")
        reg = registry.Registry(client=kube, events=EventPoster(kube), queue_of=lambda key: q1)
        assert await reg.disconnect_unseen(q1, "w-unknown", reason="shutdown", exit_code=0)
        assert reg._disconnecting == {} and not reg.may_rejoin(q1, "w-unknown")
        await kube.close()


def test_a_registration_never_written_expires_while_the_watch_is_down():
    """The sweep forgives registrations their Lease's renewals it cannot see while the watch is down:
    not one never written (a /start never followed by a heartbeat), which counted as pending 300 s more."""
    now = [1000.0]
    q = queue(heartbeatIntervalSeconds=10)
    reg = registry.Registry(client=None, events=None, queue_of=lambda key: q,  # type: ignore[arg-type]
                            clock=lambda: now[0], watching=lambda: False)
    quiet = reg.register(q, "w-quiet", pod="q1-w1")
    reg._sweep(ending=True)
    now[0] += quiet.duration + 2
    reg._sweep(ending=True)
    assert reg.get("w-quiet", expired=True) is None and reg.pending == 0


async def test_a_write_that_ends_after_its_worker_was_let_go_leaves_the_new_registration_queued():
    """The old record's write ended after a new registration of the same id replaced it: marked again,
    the old one took the new one's place in the write queue, whose Lease came a heartbeat late."""
    q = queue(heartbeatIntervalSeconds=10)
    reg = registry.Registry(client=None, events=None, queue_of=lambda key: q)  # type: ignore[arg-type]
    old = reg.register(q, "w1")
    reg.heartbeat(old, status="active", tasks_processed=0, current_task_id=None, system_info=None)
    again: list[leases.Worker | None] = []

    async def write_lease(worker: leases.Worker, queue_: Any) -> bool:
        reg._forget(worker.worker_id)  # taken for expired meanwhile; its next heartbeat registers it again
        again.append(reg.rejoin(q, worker.worker_id))
        worker.dirty = True  # the old registration had news of its own
        return False

    reg._write_lease = write_lease  # type: ignore[method-assign]
    await reg._write(old)
    assert again[0] is not None and reg._creates.get("w1") is again[0] and "w1" not in reg._urgent


def test_a_namesakes_lease_naming_a_registered_worker_changes_nothing_of_it():
    """A Lease of a deleted queue of the same name (kubectl replace --force) naming a live worker
    overwrote its renewal time, status and counts."""
    now = [1000.0]
    q, namesake = queue("q1", uid="uid-1", heartbeatIntervalSeconds=10), queue("q1", uid="uid-old")
    reg = registry.Registry(client=None, events=None, queue_of=lambda key: q,  # type: ignore[arg-type]
                            clock=lambda: now[0])
    mine = reg.register(q, "w-1")
    before = (mine.queue_uid, mine.status, mine.tasks_processed, mine.renewed_at)
    now[0] += 1
    other = dataclasses.replace(mine, queue_uid=namesake.uid, registered_at=mine.registered_at + 1,
                                renewed_at=1010.0, status="busy", tasks_processed=999)
    reg.lease_upserted(leases.lease_body(other, queue_name=namesake.name))
    kept = reg.get("w-1")
    assert kept is mine and (kept.queue_uid, kept.status, kept.tasks_processed, kept.renewed_at) == before


async def test_a_slot_lease_read_after_a_forward_step_of_the_clock_is_not_taken_for_expired():
    """Another replica's renewal, read after this replica's clock stepped forward (a VM resumed, an NTP
    step), looks older by the step: its live holder's slot was taken at the next /start."""
    wall, mono = [100_000.0], [0.0]
    q = queue(maxWorkers=1, uid="uid-1", heartbeatIntervalSeconds=10)
    api = LeaseAnswers()
    holder = make_worker(worker_id="other", pod=None, registered_at=wall[0] - 60, renewed_at=wall[0], duration=25.0)
    body = leases.lease_body(holder, queue_name=q.name)
    api.held["q1-slot-0"] = {**body, "metadata": {**body["metadata"], "resourceVersion": "5", "uid": "u-5"}}
    async with answered_registry(api, q, clock=lambda: wall[0], monotonic=lambda: mono[0]) as reg:
        _tick(reg, wall, mono, 1)
        _tick(reg, wall, mono, 0, step=120)
        assert await reg.claim(q, "new", limit=1) is None  # full: its holder renewed a moment ago
        assert api.held["q1-slot-0"]["spec"]["holderIdentity"] == "other"
        _tick(reg, wall, mono, 30)  # no renewal within its lease since: it is gone, as ever
        await asyncio.gather(*reg._writes)
        taken = await reg.claim(q, "new", limit=1)
        assert taken is not None and api.held["q1-slot-0"]["spec"]["holderIdentity"] == "new"


async def test_a_worker_that_disconnects_while_its_full_queue_is_listed_stays_ended_on_purpose():
    """Its Lease watch down, a full queue's Leases are listed: a worker that disconnected meanwhile, its
    Lease deleted by the time the listing answered, was taken for expired, and its late heartbeat
    brought it back."""
    q = queue(maxWorkers=1, uid="uid-1")
    api = LeaseAnswers()
    listing = asyncio.Event()
    answer = asyncio.Event()
    answered = api.request

    async def request(method: str, path: str, **kwargs: Any) -> Any:
        if method == "GET" and path.endswith("/leases"):
            listing.set()
            await answer.wait()
            return {"items": []}  # its Lease deleted by its disconnect, meanwhile
        return await answered(method, path, **kwargs)

    api.request = request  # type: ignore[method-assign]
    async with answered_registry(api, q, watching=lambda: False) as reg:
        held = leases.lease_body(make_worker(worker_id="held", pod=None, renewed_at=time.time()), queue_name=q.name)
        reg.lease_upserted({**held, "metadata": {**held["metadata"], "resourceVersion": "5", "uid": "u-5"}})
        worker = reg.get("held")
        assert worker is not None
        claiming = asyncio.create_task(reg.claim(q, "new", limit=1))
        await asyncio.wait_for(listing.wait(), 5)
        reg._end(worker, "disconnected")  # on purpose
        answer.set()
        await claiming
        await asyncio.gather(*reg._writes)
        assert not reg.may_rejoin(q, "held")
