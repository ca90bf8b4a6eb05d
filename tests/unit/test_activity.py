"""Which replica is active under kopf peering: kopf's rule, applied to the peering object's status."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from typing import Any

import pytest

from workerqueue_operator.core.activity import Activity, blocking_peers

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def peer(priority: int, seconds_ago: float, lifetime: int = 10) -> dict[str, object]:
    seen = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_only_live_peers_with_a_priority_as_high_block():
    status = {"me": peer(5, 0), "higher-live": peer(9, 3), "higher-dead": peer(9, 11),
              "lower": peer(1, 0), "same": peer(5, 9.5), "junk": "x"}
    assert blocking_peers(status, identity="me", priority=5, now=NOW) == ["higher-live", "same"]
    assert blocking_peers({"other": {"priority": 9}}, identity="me", priority=5, now=NOW) == ["other"]


def test_a_peer_entry_beyond_a_datetime_is_read_not_raised():
    """Anyone with write access to the peering may write such an entry: reading it raised OverflowError,
    which stopped the operator, at every start again."""
    status = {"far": {"priority": 9, "lifetime": 10, "lastseen": "9999-12-31T23:59:59Z"},
              "long": {"priority": 9, "lifetime": 10**12, "lastseen": NOW.isoformat()},
              "past": {"priority": 9, "lifetime": -(10**12), "lastseen": NOW.isoformat()}}
    assert blocking_peers(status, identity="me", priority=5, now=NOW) == ["far", "long"]


def test_standalone_is_always_active():
    activity = Activity(identity="me", priority=0)
    assert activity.standalone and activity.is_active()


def test_a_standby_takes_over_when_the_active_peer_expires_and_is_told_so():
    clock = [NOW]
    activity = Activity(identity="me", priority=1, peerings=[("", "wq")], now=lambda: clock[0])
    heard: list[bool] = []
    activity.subscribe(heard.append)
    assert not activity.is_active()  # nothing seen yet: paused, as kopf is
    activity.observed(("", "other-peering"), {"status": {}})  # not ours
    assert not activity.is_active()

    activity.observed(("", "wq"), {"status": {"me": peer(1, 0), "boss": peer(2, 1)}})
    assert not activity.is_active() and heard == []
    clock[0] = NOW + datetime.timedelta(seconds=8.9)
    activity._refresh()
    assert not activity.is_active()
    clock[0] = NOW + datetime.timedelta(seconds=9.1)  # the boss's keep-alive is 10 s old: it is gone
    activity._refresh()  # run()'s tick
    assert activity.is_active() and heard == [True]

    activity.observed(("", "wq"), {"status": {"me": peer(1, 0), "boss": peer(2, -9)}})  # it is back
    assert not activity.is_active() and heard == [True, False]
    activity.observed(("", "wq"), None)
    assert not activity.is_active()


def test_a_replica_leaving_the_peering_is_told_whichever_replica_is_active():
    """Its Service still sent it heartbeats until its endpoints changed: the registry forgives them."""
    clock = [NOW]
    activity = Activity(identity="me", priority=2, peerings=[("", "wq")], now=lambda: clock[0])
    lost: list[int] = []
    activity.on_peer_lost(lambda: lost.append(1))
    activity.observed(("", "wq"), {"status": {"me": peer(2, 0), "standby": peer(1, 0), "other": peer(1, 5)}})
    assert activity.is_active() and lost == []
    clock[0] = NOW + datetime.timedelta(seconds=5.1)  # `other`'s keep-alive expired: lost, though below us
    activity._refresh()
    assert lost == [1] and activity.is_active()
    activity._refresh()
    assert lost == [1]  # once
    activity.observed(("", "wq"), {"status": {"me": peer(2, -5)}})  # `standby` stopped: taken out
    assert lost == [1, 1]


async def until(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_a_peer_expired_by_the_clock_alone_is_read_again_before_a_takeover():
    """The boss's keep-alives stop coming (a stalled watch, say): the clock alone would make this
    replica active while the boss still acts. It takes over only once a read of the peering says so."""
    clock = [NOW]
    activity = Activity(identity="me", priority=1, peerings=[("", "wq")], now=lambda: clock[0])
    heard: list[bool] = []
    activity.subscribe(heard.append)
    answers: list[object] = []
    reads: list[tuple[str, str]] = []

    async def read(key: tuple[str, str]) -> object:
        reads.append(key)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    activity.confirm_with(read)  # type: ignore[arg-type]
    activity.observed(("", "wq"), {"status": {"me": peer(1, 0), "boss": peer(2, 1)}})
    clock[0] = NOW + datetime.timedelta(seconds=30)  # nothing heard of the boss for 31 s
    answers[:] = [{"status": {"me": peer(1, 0), "boss": peer(2, -29)}},  # it keeps alive: 1 s ago
                  ConnectionResetError("reset")]
    running = asyncio.create_task(activity.run(tick=0.01))
    try:
        await until(lambda: len(reads) >= 1)
        await asyncio.sleep(0.05)
        assert not activity.is_active() and heard == [] and len(reads) == 1  # alive: no read until it expires
        clock[0] = NOW + datetime.timedelta(seconds=45)
        await until(lambda: len(reads) >= 2)
        await asyncio.sleep(0.05)
        assert not activity.is_active() and heard == []  # the read failed: it stands by, and waits to read again
        assert len(reads) == 2
        answers.append({"status": {"me": peer(1, 0)}})  # the boss is gone for the API server too
        activity._read_failed_at = None
        await until(activity.is_active)
        assert heard == [True] and len(reads) == 3
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_takeover_read_answered_after_a_newer_peering_event_does_not_overwrite_it():
    clock = [NOW]
    activity = Activity(identity="me", priority=1, peerings=[("", "wq")], now=lambda: clock[0])

    async def read(key: tuple[str, str]) -> object:
        # The boss's keep-alive comes through the watch while this read is on its way; the read's
        # answer was made before it, with the boss's last keep-alive long ago.
        activity.observed(("", "wq"), {"status": {"me": peer(1, 0), "boss": peer(2, -59)}})
        return {"status": {"me": peer(1, 0), "boss": peer(2, 30)}}

    activity.confirm_with(read)  # type: ignore[arg-type]
    activity.observed(("", "wq"), {"status": {"me": peer(1, 0), "boss": peer(2, 1)}})
    clock[0] = NOW + datetime.timedelta(seconds=60)
    assert activity._takes_over() and await activity._read_again()
    activity._refresh()
    assert not activity.is_active()


def test_every_namespace_peering_must_let_us_act():
    activity = Activity(identity="me", priority=3, peerings=[("a", "wq"), ("b", "wq")], now=lambda: NOW)
    activity.observed(("a", "wq"), {"status": {"me": peer(3, 0)}})
    assert not activity.is_active()
    activity.observed(("b", "wq"), {"status": {"x": peer(1, 0)}})
    assert activity.is_active()


def test_a_stopping_replica_stands_down_whatever_the_peering_says():
    for activity in (Activity(identity="me", priority=0),  # standalone
                     Activity(identity="me", priority=9, peerings=[("", "wq")], now=lambda: NOW)):
        activity.observed(("", "wq"), {"status": {"other": peer(1, 0)}})  # nobody above us
        assert activity.is_active()
        heard: list[bool] = []
        activity.subscribe(heard.append)
        activity.stand_down()
        assert not activity.is_active() and heard == [False]
        activity.observed(("", "wq"), {"status": {}})  # kopf has left the peering object: still nothing to do
        assert not activity.is_active() and heard == [False]


async def test_a_standby_keeps_nothing_per_queue_that_churn_would_grow():
    """A standby (for weeks, with peering) made a probe timeline entry for every queue made or edited,
    and a live-count mark for every queue a worker came or went from, deleted ones included; it
    writes none of them. It audits and schedules every queue when it becomes the active one."""
    import kubernetes

    from tests.unit.factories import queue
    from workerqueue_operator.core import registry as registry_
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.reconciler import LiveStatus
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.core.supervisor import Supervisor
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is written here
    activity = Activity(identity="me", priority=1, peerings=[("", "wq")], now=lambda: NOW)
    store = Store(settings=Settings())
    registry = registry_.Registry(client=kube, events=EventPoster(kube), queue_of=store.queue)
    supervisor = Supervisor(store=store, client=kube, settings=Settings(), events=EventPoster(kube),
                            activity=activity, registry=registry)
    live = LiveStatus(store=store, registry=registry, client=kube, activity=activity)
    for i in range(50):
        made = queue(f"gone-{i}")
        supervisor.queue_changed(made)
        registry.register(made, f"w-{i}")
        supervisor.queue_deleted(made.key)
    kept = queue("kept")
    supervisor.queue_changed(kept)
    assert supervisor.prober._timeline == [] and live._dirty == {}

    activity.observed(("", "wq"), {"status": {"me": peer(1, 0)}})  # alone: the active one
    assert activity.is_active()
    assert [entry[2] for entry in supervisor.prober._timeline] == [kept.key]
    assert live._audit_due  # every queue's count compared at its next pass
    registry.register(kept, "w-kept")
    assert live._dirty == {kept.key: None}
    await kube.close()


async def test_temporal_as_read_before_a_standby_spell_is_not_acted_on_after_it():
    """Read before standing down, a backlog of 3 the other replica ran meanwhile made three workers
    for work done once this one was active again (the planner only refuses readings over 30 s old);
    a "nothing waits" as old could delete an ephemeral queue that work had come to."""
    import kubernetes

    from tests.unit.factories import queue
    from workerqueue_operator.core import workers
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.core.supervisor import Supervisor
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called
    activity = Activity(identity="me", priority=1, peerings=[("", "wq")], now=lambda: NOW)
    supervisor = Supervisor(store=Store(settings=Settings()), client=kube, settings=Settings(),
                            events=EventPoster(kube), activity=activity)
    activity.observed(("", "wq"), {"status": {"me": peer(1, 0)}})  # alone: the active one
    key = queue("q1").key
    supervisor.prober._demand[key] = workers.Demand(backlog=3)
    epoch = supervisor.prober._epoch
    activity.observed(("", "wq"), {"status": {"me": peer(1, 0), "other": peer(2, 0)}})  # stands by
    assert not activity.is_active()
    assert supervisor.prober._demand == {} and supervisor.prober._epoch > epoch  # a probe under way keeps nothing
    await kube.close()

async def test_a_live_count_written_before_standing_by_holds_nothing_back_once_active_again():
    """live=5 written, then this replica stood by and the other wrote 2 over it: the watch will never
    show the 5. Once active again, a count that the status shows is no more waited for."""
    import kubernetes

    from tests.unit.factories import queue_body
    from workerqueue_operator.core import queues
    from workerqueue_operator.core import registry as registry_
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.reconciler import LiveStatus
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: the count shows already
    clock = [NOW]
    activity = Activity(identity="me", priority=1, peerings=[("", "wq")], now=lambda: clock[0])
    store = Store(settings=Settings())
    registry = registry_.Registry(client=kube, events=EventPoster(kube), queue_of=store.queue)
    live = LiveStatus(store=store, registry=registry, client=kube, activity=activity)
    activity.observed(("", "wq"), {"status": {"me": peer(1, 0)}})
    made = queues.QueueObject.from_body({**queue_body("q"), "status": {"workers": {"live": 0}}})
    store.upsert_queue(made)
    live._sent[made.key] = (made.uid, 5)  # written; the watch has not shown it
    activity.observed(("", "wq"), {"status": {"me": peer(1, 0), "boss": peer(2, 0)}})  # stands by
    activity.observed(("", "wq"), {"status": {"me": peer(1, 0)}})  # the boss gone: active again
    assert activity.is_active()
    await live._write(made.key)  # the count (0) is what the status shows
    assert made.key not in live._dirty
    await kube.close()


async def test_a_live_count_written_to_a_namesake_holds_nothing_back_for_the_queue_made_again():
    """live=3 written to a queue, which was deleted and made again under its name before the watch
    showed the 3: its namesake shows 0, rightly, and was looked at again every 5 s until its own count
    changed, waiting for a write that was never its own."""
    import kubernetes

    from tests.unit.factories import queue_body
    from workerqueue_operator.core import queues
    from workerqueue_operator.core import registry as registry_
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.reconciler import LiveStatus
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: the count shows already
    store = Store(settings=Settings())
    registry = registry_.Registry(client=kube, events=EventPoster(kube), queue_of=store.queue)
    live = LiveStatus(store=store, registry=registry, client=kube, activity=Activity(identity="me", priority=0))
    again = queues.QueueObject.from_body({**queue_body("q", uid="uid-2"), "status": {"workers": {"live": 0}}})
    store.upsert_queue(again)
    live._sent[again.key] = ("uid-1", 3)  # written to the queue of that name before it
    await live._write(again.key)
    assert again.key not in live._dirty and again.key not in live._sent
    await kube.close()


async def test_a_reconcile_leaves_nothing_behind_of_a_queue_deleted_meanwhile():
    import kubernetes

    from tests.unit.factories import queue
    from workerqueue_operator.core import refusals
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.core.supervisor import Supervisor
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: the queue is gone
    supervisor = Supervisor(store=Store(settings=Settings()), client=kube, settings=Settings(),
                            events=EventPoster(kube), activity=Activity(identity="me", priority=0))
    key = queue("gone").key
    supervisor._listed[key] = refusals.PodListing("uid", 0.0, frozenset({"gone-w0"}))  # by a pass under way
    supervisor._alive[key] = 1
    await supervisor.reconcile(key)
    assert key not in supervisor._listed and key not in supervisor._alive
    await kube.close()


async def test_only_the_active_replica_sweeps_refusal_records(monkeypatch: pytest.MonkeyPatch):
    """Deleting a refusal's Lease whose pod is gone changes what the active replica counts: a standby's
    resync leaves them alone."""
    import kubernetes

    from workerqueue_operator.core import registry as registry_
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.core.supervisor import Supervisor
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: the sweep is counted instead
    activity = Activity(identity="me", priority=1, peerings=[("", "wq")], now=lambda: NOW)
    store = Store(settings=Settings())
    registry = registry_.Registry(client=kube, events=EventPoster(kube), queue_of=store.queue)
    fast = Settings().model_copy(update={"worker_resync_seconds": 0.01})  # below what a setting may be
    supervisor = Supervisor(store=store, client=kube, settings=fast,
                            events=EventPoster(kube), activity=activity, registry=registry)
    sweeps: list[object] = []

    async def sweep(listing: object) -> int:
        sweeps.append(listing)
        return 0

    monkeypatch.setattr(registry.refusals, "sweep", sweep)
    resync = asyncio.create_task(supervisor._resync())
    try:
        await asyncio.sleep(0.1)
        assert sweeps == []  # a standby
        activity.observed(("", "wq"), {"status": {"me": peer(1, 0)}})  # alone: the active one
        await asyncio.sleep(0.1)
        assert sweeps and sweeps[0] == supervisor._listed.get
    finally:
        resync.cancel()
        await asyncio.gather(resync, return_exceptions=True)
        await kube.close()


async def test_a_replica_that_stands_down_mid_burst_creates_no_more_pods(monkeypatch: pytest.MonkeyPatch):
    """Pods are made 1, 2, 4, ... at a time; a replica stopping (or losing the peering) meanwhile must
    make no more of them: the replica taking over makes the indices it finds missing, and both making
    them would run up to a burst of workers too many."""
    import kubernetes

    from tests.unit.factories import queue
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.core.supervisor import Supervisor
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.k8s import resources
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: the creates are counted
    activity = Activity(identity="me", priority=0)  # standalone: active until it stops
    made = queue("burst", singleExecution=True, replicas=32)
    store = Store(settings=Settings())
    store.upsert_queue(made)
    supervisor = Supervisor(store=store, client=kube, settings=Settings(), events=EventPoster(kube),
                            activity=activity)
    tokens: list[str] = []
    pods: list[str] = []

    async def create_credential(_queue: object, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.001)
        tokens.append(body["metadata"]["name"])
        return body

    async def create_if_absent(_client: object, _path: str, body: dict[str, Any], **_: object) -> bool:
        await asyncio.sleep(0.001)
        pods.append(body["metadata"]["name"])
        if len(pods) == 3:  # the second batch (two pods) is under way when the replica stops
            activity.stand_down()
        return True

    monkeypatch.setattr(supervisor, "_create_credential", create_credential)
    monkeypatch.setattr(resources, "create_if_absent", create_if_absent)
    try:
        await supervisor._create_pods(made, tuple(range(32)))
        assert len(pods) == 3 and len(tokens) == 3  # the batch under way ends; none begins after it
    finally:
        await kube.close()


def test_a_pod_already_being_deleted_when_first_seen_is_not_counted_as_displaced():
    """After a restart or a handover, the pods the previous replica deleted that still terminate (a
    sidecar, a long grace period) were each a WorkerDisplaced Warning, "deleted by someone else", and
    counted a displacement. Only a pod this replica saw alive counts when someone else deletes it."""
    import kubernetes

    from tests.unit.factories import queue
    from workerqueue_operator.core import workers
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.core.supervisor import Supervisor
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    kube = client_.KubeClient(kubernetes.client.Configuration())  # never called: nothing is read or written
    supervisor = Supervisor(store=Store(settings=Settings()), client=kube, settings=Settings(),
                            events=EventPoster(kube), activity=Activity(identity="me", priority=0))
    key = queue("q").key

    def listed(*names: str, deleting: tuple[str, ...] = ()) -> list[workers.Pod]:
        return [workers.Pod(name=n, phase="Running", deleting=n in deleting, index=i) for i, n in enumerate(names)]

    first = listed("q-w0", "q-w1", deleting=("q-w0",))
    assert supervisor._deleted_outside(key, first) == frozenset()  # the replica before this one deleted it
    supervisor._passed(key, first)
    later = listed("q-w0", "q-w1", deleting=("q-w0", "q-w1"))
    assert supervisor._deleted_outside(key, later) == frozenset({"q-w1"})  # seen alive, deleted by another
    supervisor._passed(key, listed("q-w1"))
    assert supervisor._deleted_outside(key, []) == frozenset({"q-w1"})  # seen alive, gone now


async def test_no_live_count_is_written_before_the_leases_are_listed():
    """Active from its start (a peering won at once, or one replica rolling over another), a replica
    wrote `live` from a registry its Lease list had only half filled: 1 where 3 workers live, or 0."""
    import kubernetes

    from tests.unit.factories import queue, queue_body
    from tests.unit.test_registry import make_worker
    from workerqueue_operator.core import leases, queues
    from workerqueue_operator.core import registry as registry_
    from workerqueue_operator.core.events import EventPoster
    from workerqueue_operator.core.reconciler import LiveStatus
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings

    class Patches:
        def __init__(self) -> None:
            self.sent: list[object] = []

        async def patch(self, path: str, body: object, **_: object) -> dict[str, object]:
            self.sent.append(body)
            return {}

    kube = client_.KubeClient(kubernetes.client.Configuration())
    api, listed, clock = Patches(), [False], [100.0]
    store = Store(settings=Settings())
    made = queues.QueueObject.from_body({**queue_body("q1", uid="uid-1"), "status": {"workers": {"live": 3}}})
    store.upsert_queue(made)
    registry = registry_.Registry(client=kube, events=EventPoster(kube), queue_of=store.queue)
    live = LiveStatus(store=store, registry=registry, client=api,  # type: ignore[arg-type]
                      activity=Activity(identity="me", priority=0), listed=lambda: listed[0],
                      clock=lambda: clock[0])
    q = queue("q1", uid="uid-1")

    def lease_listed(name: str) -> None:
        worker = make_worker(worker_id=name, lease=f"q1-{name}", slot=None, pod=None, renewed_at=time.time())
        registry.lease_upserted(leases.lease_body(worker, queue_name=q.name))

    lease_listed("a")  # the first page of the Lease list
    await live.tick()
    assert api.sent == []
    lease_listed("b")
    lease_listed("c")
    listed[0] = True
    await live.tick()
    assert api.sent == []  # 3 as shown
    registry.lease_deleted(("team-a", "q1-c"), None)
    clock[0] += 5.0  # a queue is written at most every 5 s
    await live.tick()
    assert api.sent == [{"status": {"workers": {"live": 2}}}]
    await kube.close()
