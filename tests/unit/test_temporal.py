"""core.temporal without a Temporal server: the status mapping, timestamps, to_json, the endpoint's
secrecy, and what a Temporal that cannot be reached (a loopback port that never answers) gets."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.api.workflowservice.v1 import DescribeTaskQueueResponse
from temporalio.client import Client
from temporalio.client import WorkflowExecutionStatus as S

from workerqueue_operator.core import executions
from workerqueue_operator.core import temporal as temporal_
from workerqueue_operator.core.temporal import (
    _HISTORY_READS,
    HOLDERS_PER_TASK_QUEUE,
    Endpoint,
    Execution,
    Temporal,
    TemporalUnavailable,
    _Holder,
    _Run,
    rfc3339,
    status_of,
)


@pytest.mark.parametrize(("status", "expected"), [
    (S.RUNNING, "running"), (S.COMPLETED, "completed"), (S.FAILED, "failed"), (S.TIMED_OUT, "failed"),
    (S.CANCELED, "cancelled"), (S.TERMINATED, "cancelled"), (S.CONTINUED_AS_NEW, "running"), (None, "running"),
])
def test_status_in_the_workers_terms(status: S | None, expected: str):
    assert status_of(status) == expected


def test_every_temporal_status_is_mapped():
    assert {status_of(s) for s in S} == {"running", "completed", "failed", "cancelled"}


def test_rfc3339():
    moment = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert rfc3339(moment) == "2026-01-02T01:04:05.678Z"
    assert rfc3339(datetime.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"
    assert rfc3339(None) is None


def test_to_json():
    e = Execution(id="exec-1", run_id="run-1", status="running", workflow_type="AgentExecutionWorkflow",
                  created_at="2026-01-01T00:00:00.000Z", started_at=None, completed_at=None, holder=None)
    assert e.to_json() == {
        "id": "exec-1", "status": "running", "created_at": "2026-01-01T00:00:00.000Z", "started_at": None,
        "completed_at": None, "temporal_workflow_id": "exec-1", "temporal_run_id": "run-1",
        "workflow_type": "AgentExecutionWorkflow", "worker_identity": None,
    }


def test_the_api_key_shows_nowhere():
    endpoint = Endpoint(host="ns.tmprl.cloud:7233", namespace="ns", api_key="s3cr3t-key", tls=True)
    assert "s3cr3t" not in repr(endpoint) and "s3cr3t" not in str(endpoint)
    assert "s3cr3t" not in repr(endpoint.key)
    assert endpoint.key != Endpoint(host="ns.tmprl.cloud:7233", namespace="ns", api_key="other", tls=True).key
    # Nor a password written into the host, which status, Events and 503s name the endpoint by.
    assert str(Endpoint(host="user:s3cr3t@temporal:7233", namespace="ns")) == "temporal:7233/ns"


async def test_tls_and_the_api_key_go_to_the_sdk_and_failures_name_no_key(monkeypatch: pytest.MonkeyPatch):
    seen: list[tuple[str, dict[str, Any]]] = []

    async def connect(target_host: str, **kwargs: Any) -> Any:
        seen.append((target_host, kwargs))
        raise RuntimeError("Failed client connect: Server connection error: transport error")

    monkeypatch.setattr(Client, "connect", connect)
    temporal = Temporal(timeout=1.0)
    endpoint = Endpoint(host="ns.tmprl.cloud:7233", namespace="ns", api_key="s3cr3t-key", tls=True)
    with pytest.raises(TemporalUnavailable) as caught:
        await temporal.executions(endpoint, "tq")
    await temporal.close()
    ((host, kwargs),) = seen
    assert (host, kwargs["namespace"], kwargs["tls"], kwargs["api_key"]) == ("ns.tmprl.cloud:7233", "ns", True,
                                                                             "s3cr3t-key")
    assert "ns.tmprl.cloud:7233/ns is unreachable: Failed client connect" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


async def test_plaintext_sends_the_key_if_set(monkeypatch: pytest.MonkeyPatch):
    seen: list[dict[str, Any]] = []

    async def connect(target_host: str, **kwargs: Any) -> Any:
        seen.append(kwargs)
        raise RuntimeError("refused")

    monkeypatch.setattr(Client, "connect", connect)
    temporal = Temporal(timeout=1.0, coalesce=0.0)
    for key in ("k", ""):
        with pytest.raises(TemporalUnavailable):
            await temporal.executions(Endpoint(host="t:7233", namespace="n", api_key=key), "tq")
    await temporal.close()
    assert [(s["tls"], s["api_key"]) for s in seen] == [(False, "k"), (False, None)]


Hung = tuple[Temporal, Endpoint, list[asyncio.StreamWriter]]


@contextlib.asynccontextmanager
async def hung(*, timeout: float, down_seconds: float) -> AsyncIterator[Hung]:
    """A Temporal at a loopback address that takes connections and never answers, as a hung one does;
    its access; and the connections it took."""
    taken: list[asyncio.StreamWriter] = []

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(writer)

    server = await asyncio.start_server(take, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    temporal = Temporal(timeout=timeout, coalesce=0.0, down_seconds=down_seconds)
    try:
        yield temporal, Endpoint(host=address, namespace="n"), taken
    finally:
        await temporal.close()
        server.close()  # first: no connection is taken after the ones closed below
        for writer in taken:
            writer.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # their sockets close on the next loop turn


async def test_calls_right_behind_one_that_could_not_connect_fail_at_once_without_dialling():
    async with hung(timeout=0.5, down_seconds=60.0) as (temporal, endpoint, taken):
        with pytest.raises(TemporalUnavailable, match=r"did not answer within 0\.5s") as first:
            await temporal.describe_task_queue(endpoint, "tq-1")
        dialled = len(taken)
        assert dialled >= 1
        for task_queue in ("tq-2", "tq-3"):  # other queues of the same Temporal
            with pytest.raises(TemporalUnavailable) as again:
                await temporal.executions(endpoint, task_queue)
            assert str(again.value) == str(first.value)
        assert len(taken) == dialled
        with pytest.raises(TemporalUnavailable):  # another endpoint is tried on its own
            await temporal.describe_task_queue(Endpoint(host=endpoint.host, namespace="other"), "tq-1")
        assert len(taken) > dialled


async def test_an_endpoint_that_could_not_connect_is_dialled_again_once_the_window_is_over():
    async with hung(timeout=0.3, down_seconds=0.2) as (temporal, endpoint, taken):
        with pytest.raises(TemporalUnavailable):
            await temporal.describe_task_queue(endpoint, "tq")
        dialled = len(taken)
        await asyncio.sleep(0.3)
        with pytest.raises(TemporalUnavailable):
            await temporal.describe_task_queue(endpoint, "tq")
        assert len(taken) > dialled


async def test_calls_sharing_a_connection_that_is_given_up_each_fail_as_unavailable():
    # The first call's timeout gives up the connection the second waits for too: the second must fail
    # as unavailable, not end cancelled (a probe ended so was never run again).
    async with hung(timeout=0.5, down_seconds=0.0) as (temporal, endpoint, _):
        first = asyncio.create_task(temporal.describe_task_queue(endpoint, "tq-1"))
        await asyncio.sleep(0.2)
        second = asyncio.create_task(temporal.describe_task_queue(endpoint, "tq-2"))
        done = await asyncio.gather(first, second, return_exceptions=True)
        assert [type(outcome) for outcome in done] == [TemporalUnavailable, TemporalUnavailable], done
        assert all("did not answer within 0.5s" in str(outcome) for outcome in done)


async def test_a_client_no_call_uses_any_more_is_let_go(monkeypatch: pytest.MonkeyPatch):
    # A rotated API key is a new endpoint key: the old key's connection must not stay open for good.
    dialled: list[str] = []

    async def connect(target_host: str, **kwargs: Any) -> Any:
        dialled.append(kwargs["api_key"])
        return object()

    monkeypatch.setattr(Client, "connect", connect)
    temporal = Temporal(client_idle_seconds=0.2)
    old = Endpoint(host="t:7233", namespace="ns", api_key="old-key", tls=True)
    new = Endpoint(host="t:7233", namespace="ns", api_key="new-key", tls=True)
    await temporal._client(old)
    await asyncio.sleep(0.1)
    await temporal._client(new)
    assert len(temporal._clients) == 2  # both used within the idle time
    await asyncio.sleep(0.15)
    await temporal._client(new)  # the old one idle for 0.25 s by now
    assert list(temporal._clients) == [new.key] and dialled == ["old-key", "new-key"]
    await temporal.close()


async def test_the_holder_cache_grows_with_the_task_queues_listed():
    """Listings of many queues taking turns pushed each other's holders out of a fixed-size LRU (a
    little smaller than their sum keeps none): every listing read every history again."""
    access = Temporal(holder_cache_size=100)
    try:
        assert access._holder_capacity() == 100
        for i in range(3):
            access._listed(Endpoint(host="t:7233", namespace="n"), f"tq-{i}")
        assert access._holder_capacity() == 3 * HOLDERS_PER_TASK_QUEUE
        access._listed(Endpoint(host="t:7233", namespace="n"), "tq-0")  # listed again: one of the three
        assert access._holder_capacity() == 3 * HOLDERS_PER_TASK_QUEUE
        # But never past a ceiling: 10,000 polled task queues kept ~1.5 million holders (~1 GiB).
        for i in range(3, 2000):
            access._listed(Endpoint(host="t:7233", namespace="n"), f"tq-{i}")
        assert access._holder_capacity() == temporal_.HOLDER_CACHE_MOST < 2000 * HOLDERS_PER_TASK_QUEUE
    finally:
        await access.close()


START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def counted_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many visibility scans are made from now on (`[n]`), the listing patched already."""
    scans = [0]
    original = Temporal._scan

    def counted(self: Temporal, *args: Any) -> Any:
        scans[0] += 1
        return original(self, *args)

    monkeypatch.setattr(Temporal, "_scan", counted)
    return scans


def patch_listing(monkeypatch: pytest.MonkeyPatch, runs: list[_Run], read: Any, scan_seconds: float = 0.0) -> None:
    """Temporal's visibility listing gives `runs` (after `scan_seconds`); `read` stands in for a history read."""

    async def scan(self: Temporal, *args: Any, **kwargs: Any) -> AsyncIterator[_Run]:
        await asyncio.sleep(scan_seconds)
        for run in runs:
            yield run

    async def connect(target_host: str, **kwargs: Any) -> Any:
        return object()

    monkeypatch.setattr(Temporal, "_scan", scan)
    monkeypatch.setattr(Temporal, "_holder", read)
    monkeypatch.setattr(Client, "connect", connect)


async def test_a_run_not_due_yet_is_read_again_only_before_a_worker_is_told_it_finished(
    monkeypatch: pytest.MonkeyPatch,
):
    # Hundreds of cron runs and start delays were read again every few seconds each, and before every
    # "finished"; not due, nobody can take one but by signalling it, which a recheck still reads.
    delayed = _Run("cron", "c1", S.RUNNING, "W", START, None)
    reads: list[str] = []

    async def read(self: Temporal, client: Any, endpoint: Endpoint, workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(workflow_id)
        # Read a minute ago: as a run merely untaken, it would be read again (UNTAKEN_REUSE_SECONDS).
        return temporal_._Holder(None, None, untaken_at=time.time() - 60, asked=time.monotonic() - 60,
                                 scheduled=False, due_at=time.time() + 3600)

    patch_listing(monkeypatch, [delayed], read)
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    try:
        for i in range(3):
            found = await access.executions(endpoint, "tq", limit=10, taken_first=True)
            assert found[0].delayed and found[0].due_at is not None and found.reused is (i > 0)
        assert reads == ["cron"]
        await access.executions(endpoint, "tq", limit=10, taken_first=True, recheck=True)
        assert reads == ["cron", "cron"]
    finally:
        await access.close()


async def test_history_reads_a_listing_leaves_running_are_bounded_and_end(monkeypatch: pytest.MonkeyPatch):
    # A listing's history reads go on after it (for the next listing), so behind a slow Temporal they
    # must not pile up, one set per poll: a task queue has _HISTORY_READS at most, each for a bounded time.
    runs = [_Run(f"wf-{i}", f"run-{i}", S.RUNNING, "W", START, None) for i in range(20)]
    reading: set[str] = set()
    most = [0]

    async def read(self: Temporal, client: Any, endpoint: Endpoint, workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        reading.add(workflow_id)
        most[0] = max(most[0], len(reading))
        try:
            await asyncio.sleep(3600)  # a history Temporal never sends
        finally:
            reading.discard(workflow_id)

    patch_listing(monkeypatch, runs, read)
    access = Temporal(timeout=0.3, coalesce=0.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        for _ in range(3):  # three polls, each answered without holders
            listed = await access.executions(endpoint, "tq", running=True)
            assert len(listed) == 20 and all(e.holder_unread for e in listed)
        assert 0 < most[0] <= _HISTORY_READS
        await asyncio.sleep(0.3 * 3 + 0.2)  # a read's bound, and a turn's
        assert reading == set() and access._reads == {}
    finally:
        await access.close()


async def test_a_history_slower_than_a_listing_is_read_once_for_the_next_listings(monkeypatch: pytest.MonkeyPatch):
    # Cut at each listing's end, a history that takes longer than a listing waits was started over at
    # every poll and never read: its worker never saw its execution as its own.
    runs = [_Run("wf-slow", "run-1", S.RUNNING, "W", START, None)]
    reads: list[str] = []

    async def read(self: Temporal, client: Any, endpoint: Endpoint, workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(workflow_id)
        await asyncio.sleep(0.5)  # more than a listing waits (half the timeout, 0.4 s)
        return _Holder("1@pod-a", rfc3339(START))

    patch_listing(monkeypatch, runs, read)
    access = Temporal(timeout=0.8, coalesce=0.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        (first,) = await access.executions(endpoint, "tq", running=True)
        assert first.holder_unread
        (second,) = await access.executions(endpoint, "tq", running=True)
        assert (second.holder, second.holder_unread) == ("1@pod-a", False)
        assert reads == ["wf-slow"]
    finally:
        await access.close()


async def test_a_slow_scan_leaves_the_reads_the_time_left_not_the_listing_failed(monkeypatch: pytest.MonkeyPatch):
    # Half the timeout for the reads after a scan that took most of it ran past the caller's bound:
    # the whole listing failed as unavailable rather than show the runs without holders.
    runs = [_Run("wf-1", "run-1", S.RUNNING, "W", START, None)]

    async def read(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)

    patch_listing(monkeypatch, runs, read, scan_seconds=0.7)
    access = Temporal(timeout=1.0, coalesce=0.0)
    try:
        (listed,) = await access.executions(Endpoint(host="t:7233", namespace="n"), "tq", running=True)
        assert listed.id == "wf-1" and listed.holder_unread
    finally:
        await access.close()


async def test_unread_runs_of_many_task_queues_wait_in_line_not_as_tasks_and_temporal_gets_a_bounded_few(
        monkeypatch: pytest.MonkeyPatch):
    # After a restart every polled queue's ~110 runs are unread at once: a task (two) per run was
    # ~5.6 KiB each (1,000 queues: ~600 MiB), and 8 reads for each task queue at once, 8,000 at one Temporal.
    monkeypatch.setattr(temporal_, "_HISTORY_READS_PER_NAMESPACE", 12)
    queues, per_queue = 30, 60
    reading: set[str] = set()
    most = [0]

    async def scan(self: Temporal, client: Any, endpoint: Endpoint, query: str) -> AsyncIterator[_Run]:
        task_queue = query.split('"')[1]
        for i in range(per_queue):
            yield _Run(f"{task_queue}-wf-{i}", "run", S.RUNNING, "W", START, None)

    async def read(self: Temporal, client: Any, endpoint: Endpoint, workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        reading.add(workflow_id)
        most[0] = max(most[0], len(reading))
        try:
            await asyncio.sleep(0.05)
            return _Holder(None, None)
        finally:
            reading.discard(workflow_id)

    patch_listing(monkeypatch, [], read)
    monkeypatch.setattr(Temporal, "_scan", scan)
    access = Temporal(timeout=2.0, coalesce=0.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        before = len(asyncio.all_tasks())
        listings = [asyncio.create_task(access.executions(endpoint, f"tq-{q}", running=True)) for q in range(queues)]
        await asyncio.sleep(0.2)  # every listing has scanned, and waits for its reads
        assert len(access._reads) > queues * per_queue // 2  # most not read yet: they wait
        tasks = len(asyncio.all_tasks()) - before
        assert tasks <= queues * (2 + _HISTORY_READS)  # each caller, its listing and its readers: not one per run
        await asyncio.gather(*listings)
        assert 0 < most[0] <= 12
    finally:
        await access.close()


async def test_a_temporal_that_never_answers_a_history_read_holds_no_turn_of_another_namespace(
        monkeypatch: pytest.MonkeyPatch):
    async def scan(self: Temporal, client: Any, endpoint: Endpoint, query: str) -> AsyncIterator[_Run]:
        task_queue = query.split('"')[1]
        for i in range(20):
            yield _Run(f"{endpoint.namespace}-{task_queue}-wf-{i}", "run", S.RUNNING, "W", START, None)

    async def read(self: Temporal, client: Any, endpoint: Endpoint, workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        if endpoint.namespace == "hung":
            await asyncio.sleep(3600)
        return _Holder("1@pod", rfc3339(START))

    patch_listing(monkeypatch, [], read)
    monkeypatch.setattr(Temporal, "_scan", scan)
    access = Temporal(timeout=1.0, coalesce=0.0)
    try:
        hung, other = Endpoint(host="t:7233", namespace="hung"), Endpoint(host="t:7233", namespace="team-b")
        # Forty task queues of the hung namespace, 800 reads waiting, and then another team's listing.
        await asyncio.gather(*(access.executions(hung, f"tq-{q}", running=True) for q in range(40)))
        listed = await access.executions(other, "tq", running=True)
        assert [e.holder for e in listed] == ["1@pod"] * 20
    finally:
        await access.close()


class FakeService:
    def __init__(self) -> None:
        self._bridge_client: object | None = object()  # what holds the connection in the SDK


class FakeClient:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.service_client = FakeService()

    @property
    def open(self) -> bool:
        return self.service_client._bridge_client is not None


async def test_a_client_let_go_is_closed_at_once_or_when_the_reads_using_it_end(monkeypatch: pytest.MonkeyPatch):
    # Dropped, a client stayed connected until a full garbage collection (it and the SDK's service
    # client refer to each other); closed while a read used it, that read would connect anew.
    made: dict[str, FakeClient] = {}
    reading = asyncio.Event()

    async def connect(target_host: str, **kwargs: Any) -> Any:
        made[kwargs["namespace"]] = FakeClient(kwargs["namespace"])
        return made[kwargs["namespace"]]

    async def read(self: Temporal, client: Any, endpoint: Endpoint, *args: Any, **kwargs: Any) -> Any:
        assert client.open
        reading.set()
        await asyncio.sleep(0.3)
        assert client.open  # let go meanwhile, but not closed under the read
        return _Holder("1@pod", rfc3339(START))

    patch_listing(monkeypatch, [_Run("wf", "run", S.RUNNING, "W", START, None)], read)
    monkeypatch.setattr(Client, "connect", connect)
    access = Temporal(timeout=1.0, coalesce=0.0, max_clients=1)
    try:
        listing = asyncio.create_task(access.executions(Endpoint(host="t:7233", namespace="a"), "tq", running=True))
        await reading.wait()
        other = asyncio.create_task(access.executions(Endpoint(host="t:7233", namespace="b"), "tq", running=True))
        await asyncio.sleep(0.1)
        assert "b" in made and made["a"].open  # let go for b, but a's read goes on
        await listing
        assert not made["a"].open and made["b"].open
        await other
        await access.executions(Endpoint(host="t:7233", namespace="c"), "tq", running=True)  # lets b go
        assert not made["b"].open  # nothing used it: closed at once
    finally:
        await access.close()
    assert not made["c"].open


async def test_a_workers_first_execution_stays_in_its_view_once_its_later_one_closes(monkeypatch: pytest.MonkeyPatch):
    # It took `first` and `later` together, latched onto `first` while `later` ran, and more than
    # `limit` others closed since `first` did, long ago. Kept while `later` ran, `first` left the
    # view as `later` closed: the worker saw `later` instead, never its own closed, and never exited.
    now = datetime.datetime.now(datetime.UTC)
    ago = datetime.timedelta
    runs = [_Run("first", "r0", S.COMPLETED, "W", now - ago(hours=2), now - ago(hours=2)),
            _Run("later", "r1", S.COMPLETED, "W", now - ago(hours=2), now - ago(seconds=5)),
            *(_Run(f"other-{i}", f"x{i}", S.COMPLETED, "W", now - ago(hours=1), now - ago(minutes=30 - i))
              for i in range(3))]

    async def read(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("every holder is known")

    patch_listing(monkeypatch, runs, read)
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    for run in runs:
        host = "pod-b" if run.id in ("first", "later") else f"pod-{run.id}"
        access._holders[(endpoint.host, endpoint.namespace, run.id, run.run_id)] = temporal_._Holder(
            f"1@{host}", temporal_.rfc3339(run.start_time))
    try:
        found = await access.executions(endpoint, "tq", limit=2, taken_first=True)
        (entry,) = executions.worker_view(found, hostname="pod-b")
        assert (entry["id"], entry["status"]) == ("first", "completed")
        # Only while its worker closed one lately: else each listing kept every run it had read.
        monkeypatch.setattr(temporal_, "CLOSED_SHOWN_SECONDS", 1.0)
        found = await access.executions(endpoint, "tq", limit=2, taken_first=True)
        assert "first" not in {e.id for e in found}
    finally:
        await access.close()


async def test_a_crons_earlier_runs_leave_the_view_as_closed_ones_do_and_a_chain_stays_while_it_runs(
    monkeypatch: pytest.MonkeyPatch,
):
    # A cron's runs are one workflow id: each earlier one (closed COMPLETED) stayed in what every
    # worker is shown for as long as the cron went on, up to the scan's bound, each kept cached and
    # its long-gone pod counted busy. Only a continued-as-new run stays while its chain runs.
    now = datetime.datetime.now(datetime.UTC)
    ago = datetime.timedelta
    runs = [_Run("cron", "c0", S.COMPLETED, "W", now - ago(hours=2), now - ago(hours=2)),
            _Run("cron", "c1", S.COMPLETED, "W", now - ago(hours=1), now - ago(hours=1)),
            _Run("cron", "c2", S.RUNNING, "W", now - ago(minutes=1), None),
            _Run("chain", "k0", S.CONTINUED_AS_NEW, "W", now - ago(hours=2), now - ago(hours=1)),
            _Run("chain", "k1", S.RUNNING, "W", now - ago(hours=1), None)]

    async def read(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        return _Holder(None, None, untaken_at=time.time(), asked=time.monotonic())  # the cron's next run, not due yet

    patch_listing(monkeypatch, runs, read)
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    for run_id, host in (("c0", "pod-0"), ("c1", "pod-1"), ("k0", "pod-k"), ("k1", "pod-x")):
        run = next(r for r in runs if r.run_id == run_id)
        access._holders[(endpoint.host, endpoint.namespace, run.id, run_id)] = _Holder(
            f"1@{host}", rfc3339(run.start_time))
    try:
        found = await access.executions(endpoint, "tq", limit=0, taken_first=True)
        assert {e.run_id for e in found} == {"c2", "k0", "k1"}
        assert [(e["id"], e["status"]) for e in executions.worker_view(found, hostname="pod-k")] == [
            ("chain", "running")]
        assert executions.worker_view(found, hostname="pod-0") == []
    finally:
        await access.close()


def patch_chains(monkeypatch: pytest.MonkeyPatch, scans: dict[str, list[_Run]]) -> list[str]:
    """Visibility lists `scans["tq"]` for the task queue and `scans[<id>]` for `WorkflowId="<id>"`;
    every holder is known. Returns the queries made."""
    queries: list[str] = []

    async def scan(self: Temporal, client: Any, endpoint: Any, query: str, *,
                   limit: int | None = None) -> AsyncIterator[_Run]:
        queries.append(query)
        for run in scans.get("tq" if query.startswith("TaskQueue") else query.split('"')[1], []):
            yield run

    async def read(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("every holder is known")

    patch_listing(monkeypatch, [], read)
    monkeypatch.setattr(Temporal, "_scan", scan)
    return queries


def holding(access: Temporal, endpoint: Endpoint, *held: tuple[_Run, str]) -> None:
    for run, host in held:
        access._holders[(endpoint.host, endpoint.namespace, run.id, run.run_id)] = _Holder(
            f"1@{host}", rfc3339(run.start_time))


def shown(found: list[Execution], pod: str) -> list[tuple[str, str]]:
    return [(e["id"], e["status"]) for e in executions.worker_view(found, hostname=pod)]


NOW = datetime.datetime.now(datetime.UTC)
AGO = datetime.timedelta


def chain_ended_while_its_worker_runs_another() -> tuple[_Run, _Run, _Run, list[_Run]]:
    """pod-b's first, W (its run r1), continued as new in r2, pod-a's, which ended 10 minutes ago;
    pod-b runs Y; three more closed since (out of a listing with room for 2)."""
    r1 = _Run("W", "r1", S.CONTINUED_AS_NEW, "T", NOW - AGO(hours=2), NOW - AGO(hours=1))
    r2 = _Run("W", "r2", S.COMPLETED, "T", NOW - AGO(hours=1), NOW - AGO(minutes=10))
    y = _Run("Y", "y1", S.RUNNING, "T", NOW - AGO(minutes=50), None)
    others = [_Run(f"o{i}", f"o{i}", S.COMPLETED, "T", NOW - AGO(minutes=9), NOW - AGO(minutes=8 - i))
              for i in range(3)]
    return r1, r2, y, others


async def test_a_first_execution_continued_as_new_stays_in_view_while_its_worker_runs_a_later_one(
    monkeypatch: pytest.MonkeyPatch,
):
    # pod-b's first, W, continued as new in a run pod-a took, which ended 10 minutes ago; pod-b runs Y.
    # Past the chain's end, W left pod-b's view, and Y took its place: pod-b waited for W until its give-up.
    r1, r2, y, others = chain_ended_while_its_worker_runs_another()
    patch_chains(monkeypatch, {"tq": [y, *others, r2, r1]})
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    holding(access, endpoint, (r1, "pod-b"), (r2, "pod-a"), (y, "pod-b"), *((o, "pod-x") for o in others))
    try:
        found = await access.executions(endpoint, "tq", limit=2, taken_first=True)
        assert shown(found, "pod-b") == [("W", "running")]  # its first, while it runs Y
        assert shown(found, "pod-a") == []  # its part ended long ago
    finally:
        await access.close()


async def test_a_chain_found_by_its_workflow_id_shows_its_end_to_the_worker_that_took_its_first_run(
    monkeypatch: pytest.MonkeyPatch,
):
    # A replica whose scan no longer holds pod-b's run r1 found it by listing W's runs; once the chain
    # ended, W was no longer listed so, and pod-b never saw it end.
    r1 = _Run("W", "r1", S.CONTINUED_AS_NEW, "T", NOW - AGO(hours=2), NOW - AGO(hours=1))
    r2 = _Run("W", "r2", S.RUNNING, "T", NOW - AGO(hours=1), None)
    others = [_Run(f"o{i}", f"o{i}", S.COMPLETED, "T", NOW - AGO(minutes=9), NOW - AGO(minutes=8 - i))
              for i in range(3)]
    scans = {"tq": [r2, *others], "W": [r2, r1]}
    queries = patch_chains(monkeypatch, scans)
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    holding(access, endpoint, (r1, "pod-b"), (r2, "pod-a"), *((o, "pod-x") for o in others))
    access._continuing[(endpoint.host, endpoint.namespace, "W", "r2")] = "r1"  # as r2's history said
    try:
        assert shown(await access.executions(endpoint, "tq", limit=2, taken_first=True), "pod-b") == [
            ("W", "running")]
        ended = r2._replace(status=S.COMPLETED, close_time=datetime.datetime.now(datetime.UTC))
        scans["tq"], scans["W"] = [ended, *others], [ended, r1]
        for _ in range(2):  # its two confirming polls
            found = await access.executions(endpoint, "tq", limit=2, taken_first=True)
            assert shown(found, "pod-b") == [("W", "completed")] == shown(found, "pod-a")
        assert queries.count('WorkflowId="W"') == 1  # listed once, kept
    finally:
        await access.close()


async def test_a_chain_found_by_its_workflow_id_stays_in_view_past_its_end_while_its_worker_runs_another(
    monkeypatch: pytest.MonkeyPatch,
):
    # Found only by listing W's runs (out of the scan), pod-b's first run left the listing a minute
    # after W ended, while pod-b ran Y: Y took its place, and pod-b waited for W until its give-up.
    r1, r2, y, others = chain_ended_while_its_worker_runs_another()
    queries = patch_chains(monkeypatch, {"tq": [y, r2, *others], "W": [r2, r1]})
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    holding(access, endpoint, (r1, "pod-b"), (r2, "pod-a"), (y, "pod-b"), *((o, "pod-x") for o in others))
    access._continuing[(endpoint.host, endpoint.namespace, "W", "r2")] = "r1"
    try:
        for _ in range(2):
            found = await access.executions(endpoint, "tq", limit=2, taken_first=True)
            assert shown(found, "pod-b") == [("W", "running")]  # its first, while it runs Y
        assert queries.count('WorkflowId="W"') == 1
    finally:
        await access.close()


async def test_a_chain_whose_first_run_is_past_retention_is_listed_once(monkeypatch: pytest.MonkeyPatch):
    # The run it continues never listed again (deleted at the namespace's retention): taken for the
    # visibility store being behind, W was listed by id at every listing, ~1 a second, and a few such
    # workflows used up the visibility store's rate limit that every worker's listing needs.
    r2 = _Run("W", "r2", S.RUNNING, "T", NOW - AGO(days=2), None)
    queries = patch_chains(monkeypatch, {"tq": [r2], "W": [r2]})
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    holding(access, endpoint, (r2, "pod-a"))
    access._continuing[(endpoint.host, endpoint.namespace, "W", "r2")] = "r1"
    try:
        for _ in range(3):
            await access.executions(endpoint, "tq", limit=2, taken_first=True)
        assert queries.count('WorkflowId="W"') == 1
    finally:
        await access.close()


async def test_a_run_of_a_status_the_sdk_does_not_know_is_running_in_its_workers_view(
    monkeypatch: pytest.MonkeyPatch,
):
    # pod-a's first, Y, completed; it then took X, paused (Temporal 1.28's PAUSED, which this SDK
    # does not know). Sorted among the closed runs, X left the listing past `limit` closed ones and
    # pod-a was told Y completed: it would exit with X's work not done.
    y = _Run("Y", "y1", S.COMPLETED, "T", NOW - AGO(minutes=50), NOW - AGO(minutes=45))
    x = _Run("X", "x1", None, "T", NOW - AGO(minutes=40), None)
    others = [_Run(f"o{i}", f"o{i}", S.COMPLETED, "T", NOW - AGO(minutes=9), NOW - AGO(minutes=8 - i))
              for i in range(2)]
    patch_chains(monkeypatch, {"tq": [x, *others, y]})
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    holding(access, endpoint, (y, "pod-a"), (x, "pod-a"), *((o, "pod-x") for o in others))
    try:
        found = await access.executions(endpoint, "tq", limit=2, taken_first=True)
        assert shown(found, "pod-a") == [("Y", "running")]  # its first, while it holds X
    finally:
        await access.close()


async def test_chains_whose_first_runs_are_past_retention_are_bounded_too(monkeypatch: pytest.MonkeyPatch):
    # Each such workflow is kept with no earlier run: they counted nothing towards the bound, and one
    # entry a workflow id was kept for good (~600 B each; 58 MiB for 100,000 workflows).
    monkeypatch.setattr(temporal_, "CHAINED_RUNS_KEPT", 3)
    runs = [_Run(f"W{i}", f"r{i}", S.RUNNING, "T", NOW - AGO(days=2), None) for i in range(10)]
    patch_chains(monkeypatch, {run.id: [run] for run in runs})
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    try:
        for run in runs:
            await access._chain(None, endpoint, run, "past-retention")  # type: ignore[arg-type]
        assert list(access._chains) == [(endpoint.host, endpoint.namespace, f"W{i}") for i in (7, 8, 9)]
    finally:
        await access.close()


async def test_a_later_execution_continued_on_another_worker_keeps_none_waiting(monkeypatch: pytest.MonkeyPatch):
    # pod-b's first, X, completed; pod-b also took V, which goes on in a run pod-c took: pod-b's part of
    # V is over, and it was kept waiting for V for hours (its give-up).
    x = _Run("X", "x1", S.COMPLETED, "T", NOW - AGO(minutes=30), NOW - AGO(minutes=20))
    v1 = _Run("V", "v1", S.CONTINUED_AS_NEW, "T", NOW - AGO(minutes=25), NOW - AGO(minutes=24))
    v2 = _Run("V", "v2", S.RUNNING, "T", NOW - AGO(minutes=24), None)
    patch_chains(monkeypatch, {"tq": [v2, x, v1]})
    access = Temporal(timeout=1.0, coalesce=0.0)
    endpoint = Endpoint(host="t:7233", namespace="n")
    holding(access, endpoint, (x, "pod-b"), (v1, "pod-b"), (v2, "pod-c"))
    try:
        found = await access.executions(endpoint, "tq", limit=100, taken_first=True)
        assert shown(found, "pod-b") == [("X", "completed")]
        assert shown(found, "pod-c") == [("V", "running")]
    finally:
        await access.close()


async def test_a_fresh_listing_joins_none_begun_before_it(monkeypatch: pytest.MonkeyPatch):
    # A scaling probe stamps its reading with its own start: joined to a listing begun earlier (by
    # another queue on the task queue, or a worker's poll), its reading was older than it said, and
    # a pod or an ephemeral queue was deleted on it.
    runs = [_Run("wf-1", "run-1", S.RUNNING, "W", START, None)]

    async def read(self: Temporal, *args: Any, **kwargs: Any) -> Any:
        return _Holder("1@pod-a", rfc3339(START))

    patch_listing(monkeypatch, runs, read, scan_seconds=0.3)
    scans = counted_scans(monkeypatch)
    access = Temporal(timeout=2.0, coalesce=5.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        first = asyncio.create_task(access.executions(endpoint, "tq", running=True))
        await asyncio.sleep(0.1)
        await access.executions(endpoint, "tq", running=True)  # joins the one under way
        assert scans[0] == 1
        await access.executions(endpoint, "tq", running=True, fresh=True)
        assert scans[0] == 2
        await first
        await access.executions(endpoint, "tq", running=True)  # within the coalescing window: joined
        assert scans[0] == 2
    finally:
        await access.close()


@pytest.mark.parametrize("asked", [{"running": True, "fresh": True}, {"taken_first": True, "recheck": True}])
async def test_a_fresh_listing_or_a_recheck_joins_no_history_read_begun_before_it(
        monkeypatch: pytest.MonkeyPatch, asked: dict[str, bool]):
    # A worker's poll began reading a run's history; a pod took the run; then
    # - the scaling probe's fresh listing joined that read: "untaken", stamped with the probe's own
    #   time, and the pod that holds it counted idle (deleted, but for a running activity seen);
    # - the recheck that was to tell that pod its first execution is over joined it: told so while
    #   it ran that run.
    runs, taken, _ = first_done_and_a_later_run()

    async def read(self: Temporal, client: Any, endpoint: Endpoint, workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        if workflow_id == "wf-first":
            return _Holder("1@pod-a", rfc3339(START))
        seen_taken = taken[0]  # as of when the history is asked for
        await asyncio.sleep(0.3)
        if seen_taken:
            return _Holder("1@pod-a", rfc3339(START))
        return _Holder(None, None, untaken_at=time.time(), asked=time.monotonic())

    patch_listing(monkeypatch, runs, read)
    access = Temporal(timeout=4.0, coalesce=0.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        poll = asyncio.create_task(access.executions(endpoint, "tq", limit=100, taken_first=True))
        await asyncio.sleep(0.1)  # its read of wf-later under way
        taken[0] = True  # pod-a takes it
        listed = await access.executions(endpoint, "tq", limit=100, **asked)
        assert next(e for e in listed if e.id == "wf-later").holder == "1@pod-a"
        await poll
    finally:
        await access.close()


def test_the_host_of_a_workers_identity_is_what_follows_its_pid():
    assert temporal_.host_of("42@queue-w0") == "queue-w0"
    assert temporal_.host_of("42@host@example") == "host@example"  # one parse everywhere: after the pid
    assert [temporal_.host_of(i) for i in (None, "", "queue-w0", "@queue-w0", "42@")] == [None] * 5


def untaken_runs(monkeypatch: pytest.MonkeyPatch, count: int) -> list[str]:
    """`count` running runs listed, none of which anybody took: the workflow ids whose history is read."""
    runs = [_Run(f"wf-{i}", f"run-{i}", S.RUNNING, "W", START, None) for i in range(count)]
    reads: list[str] = []

    async def read(self: Temporal, client: Any, endpoint: Endpoint, workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(workflow_id)
        return _Holder(None, None, untaken_at=time.time(), asked=time.monotonic())

    patch_listing(monkeypatch, runs, read)
    return reads


async def test_a_backlog_nobody_took_is_read_again_for_workers_only_after_a_while(monkeypatch: pytest.MonkeyPatch):
    # 300 runs waiting for a worker had their histories read again at every listing, each second, and
    # while some were unread no worker was shown its execution.
    reads = untaken_runs(monkeypatch, 300)
    access = Temporal(timeout=4.0, coalesce=0.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        first = await access.executions(endpoint, "tq", taken_first=True)
        assert len(reads) == 300 and not first.reused and not any(e.holder_unread for e in first)
        again = await access.executions(endpoint, "tq", taken_first=True)
        assert len(reads) == 300 and again.reused
        assert [(e.holder, e.untaken_at) for e in again] == [(e.holder, e.untaken_at) for e in first]
        # Read anew when asked to, for a scaling probe, and for people (who see each run's holder as of now).
        rechecked = await access.executions(endpoint, "tq", taken_first=True, recheck=True)
        assert len(reads) == 600 and not rechecked.reused
        await access.executions(endpoint, "tq", limit=300, running=True, fresh=True)
        await access.executions(endpoint, "tq", limit=300)
        assert len(reads) == 1200
        # Past the reuse window, read again.
        monkeypatch.setattr(temporal_, "UNTAKEN_REUSE_SECONDS", 0.0)
        later = await access.executions(endpoint, "tq", taken_first=True)
        assert len(reads) == 1500 and not later.reused
    finally:
        await access.close()


def first_done_and_a_later_run() -> tuple[list[_Run], list[bool], Any]:
    """pod-a's first run, completed, and a later one; the history `read` tells the later one untaken
    until `taken[0]`, then pod-a's."""
    first = _Run("wf-first", "run-1", S.COMPLETED, "W", START, START + datetime.timedelta(seconds=30))
    later = _Run("wf-later", "run-2", S.RUNNING, "W", START + datetime.timedelta(seconds=60), None)
    taken = [False]

    async def read(self: Temporal, client: Any, endpoint: Endpoint, workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        if workflow_id == "wf-first":
            return _Holder("1@pod-a", rfc3339(START))
        if taken[0]:
            return _Holder("1@pod-a", rfc3339(START + datetime.timedelta(seconds=61)))
        return _Holder(None, None, untaken_at=time.time(), asked=time.monotonic())

    return [later, first], taken, read


async def test_a_worker_is_told_its_execution_is_over_only_once_the_runs_shown_untaken_are_read_again(
        monkeypatch: pytest.MonkeyPatch):
    # pod-a's first execution completed; a later run, read untaken a moment ago, it has taken since.
    # Told "completed" from the earlier reading, it would exit with that run under way.
    runs, taken, read = first_done_and_a_later_run()
    patch_listing(monkeypatch, runs, read)
    access = Temporal(timeout=4.0, coalesce=0.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        (shown,) = await executions.for_worker(access, endpoint, "tq", limit=100, hostname="pod-a")
        assert (shown["id"], shown["status"]) == ("wf-first", "completed")  # read just now: nobody had it
        taken[0] = True  # pod-a takes the later run
        listed = await access.executions(endpoint, "tq", limit=100, taken_first=True)
        assert listed.reused  # as read before: untaken
        assert executions.worker_view(listed, hostname="pod-a")[0]["status"] == "completed"
        (shown,) = await executions.for_worker(access, endpoint, "tq", limit=100, hostname="pod-a")
        assert (shown["id"], shown["status"], shown["held_executions"]) == ("wf-first", "running", 2)
    finally:
        await access.close()


@pytest.mark.looptime  # the loop's clock: a loaded machine's delays are no part of what is measured
async def test_a_listing_again_for_a_worker_keeps_to_one_timeout_in_all(monkeypatch: pytest.MonkeyPatch):
    # Two listings one after the other took up to twice the timeout: past the worker's own bound on
    # its poll. Not listed again in time, its execution is told running (it polls again in 2 s).
    runs, _, read = first_done_and_a_later_run()
    patch_listing(monkeypatch, runs, read)
    access = Temporal(timeout=1.0, coalesce=0.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        (shown,) = await executions.for_worker(access, endpoint, "tq", limit=100, hostname="pod-a")
        assert shown["status"] == "completed"
        patch_listing(monkeypatch, runs, read, scan_seconds=0.8)  # each listing takes 0.8 s now
        loop = asyncio.get_running_loop()
        began = loop.time()
        (shown,) = await executions.for_worker(access, endpoint, "tq", limit=100, hostname="pod-a")
        assert (shown["status"], shown["completed_at"]) == ("running", None)
        assert loop.time() - began < 1.4  # not the 1.6 s of both listings
    finally:
        await access.close()


async def test_a_connection_made_within_a_calls_bound_is_kept_when_the_call_runs_out_of_it(
        monkeypatch: pytest.MonkeyPatch):
    # Connecting and the first answer together took more than the bound: the connection, made, was
    # dropped with the call, so every call connected anew and failed so, for good.
    connects = [0]

    class Service:
        async def describe_task_queue(self, request: Any, timeout: Any = None) -> Any:
            await asyncio.sleep(0.6)
            return DescribeTaskQueueResponse()

    class Connected:
        workflow_service = Service()

    async def connect(target_host: str, **kwargs: Any) -> Any:
        connects[0] += 1
        await asyncio.sleep(0.6)
        return Connected()

    monkeypatch.setattr(Client, "connect", connect)
    access = Temporal(timeout=1.0, coalesce=0.0, down_seconds=0.0)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        with pytest.raises(TemporalUnavailable, match="did not answer within 1s"):
            await access.describe_task_queue(endpoint, "tq")
        assert (await access.describe_task_queue(endpoint, "tq")).pollers == ()
        assert connects[0] == 1
    finally:
        await access.close()


async def test_a_recheck_joins_no_listing_begun_before_the_coalescing_window(monkeypatch: pytest.MonkeyPatch):
    # A slow listing's reads may date from before a worker took a run: a recheck joining it, a worker
    # was told its execution was over on two polls in a row while it ran that run.
    runs, _, read = first_done_and_a_later_run()
    patch_listing(monkeypatch, runs, read, scan_seconds=0.8)
    scans = counted_scans(monkeypatch)
    access = Temporal(timeout=4.0, coalesce=0.5)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        slow = asyncio.create_task(access.executions(endpoint, "tq", taken_first=True, recheck=True))
        soon = asyncio.create_task(access.executions(endpoint, "tq", taken_first=True, recheck=True))
        await asyncio.sleep(0.6)
        assert scans[0] == 1  # the second, within the window, joined the first
        await access.executions(endpoint, "tq", taken_first=True, recheck=True)
        assert scans[0] == 2  # past it, its own
        await asyncio.gather(slow, soon)
    finally:
        await access.close()


async def test_a_recheck_reads_untaken_runs_again_also_after_the_clock_stepped_back(monkeypatch: pytest.MonkeyPatch):
    """The reuse window was timed by the wall clock: an hour's step back made readings of runs nobody
    had taken count as fresh for an hour, and a recheck (before a worker is told its execution is
    over) read none of them again."""
    reads = untaken_runs(monkeypatch, 3)
    access = Temporal(timeout=4.0, coalesce=0.2)
    try:
        endpoint = Endpoint(host="t:7233", namespace="n")
        await access.executions(endpoint, "tq", taken_first=True)
        assert len(reads) == 3
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600)
        await asyncio.sleep(0.3)  # past the coalescing window
        await access.executions(endpoint, "tq", taken_first=True, recheck=True)
        assert len(reads) == 6
    finally:
        await access.close()
