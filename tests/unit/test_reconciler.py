"""The status writer's reads of Secrets no watch brings, against an API server that cannot be reached
(a port nobody listens on): how often it tries again, and for how long. The waits are the loop's
(asyncio.sleep): on its fake clock (looptime) they are exact, as the real one's were not on a busy machine."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.unit import apps
from tests.unit.factories import queue
from workerqueue_operator.core import reconciler
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.store import Store
from workerqueue_operator.k8s.client import KubeClient
from workerqueue_operator.models.settings import Settings

KEY = {"name": "tk", "key": "k"}


def tries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The waits announced by each failed read of team-a/tk."""
    return [r.getMessage().partition("again in ")[2].split(":")[0] for r in caplog.records
            if r.getMessage().startswith("reading secret team-a/tk failed")]


def status_writer(kube: KubeClient) -> tuple[Store, reconciler.Reconciler]:
    """The status writer over a Store holding one queue whose Temporal key is in Secret team-a/tk."""
    store = Store(settings=Settings())
    store.upsert_queue(queue(temporal={"host": "t:1", "namespace": "n", "apiKeySecretRef": KEY}))
    return store, reconciler.Reconciler(store=store, client=kube, resync_seconds=3600, events=EventPoster(kube),
                                        activity=Activity(identity="test", priority=0))


@pytest.mark.looptime
async def test_a_secret_that_cannot_be_read_is_read_again_after_a_growing_wait(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger=reconciler.__name__)
    with apps.unreachable() as kube:
        _, writer = status_writer(kube)
        writer.fetch_secrets({("team-a", "tk")})
        await asyncio.sleep(3.5)  # read at 0, 1 and 3 s (every second: 4 reads)
        assert tries(caplog) == ["1s", "2s", "4s"]
        await kube.close()


@pytest.mark.looptime
async def test_a_secret_no_queue_uses_any_more_is_not_read_again(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger=reconciler.__name__)
    with apps.unreachable() as kube:
        store, writer = status_writer(kube)
        q = queue(temporal={"host": "t:1", "namespace": "n", "apiKeySecretRef": KEY})
        writer.fetch_secrets({("team-a", "tk")})
        await asyncio.sleep(0.5)
        store.remove_queue(q.key)
        await asyncio.sleep(2)
        assert tries(caplog) == ["1s"]
        await kube.close()


@pytest.mark.looptime
async def test_a_read_failing_unexpectedly_is_tried_again_and_its_text_is_not_logged(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Not an API error (an answer that is not what a Secret looks like): the name must not stay
    taken for good, and the exception's text, which could quote what was read, stays out of the log."""
    caplog.set_level(logging.WARNING, logger=reconciler.__name__)
    reads = []

    async def malformed(client: object, namespace: str, name: str) -> dict[str, object]:
        reads.append((namespace, name))
        raise ValueError("could not decode 'hunter2'")

    monkeypatch.setattr(reconciler.resources, "read_secret", malformed)
    with apps.unreachable() as kube:
        _, writer = status_writer(kube)
        writer.fetch_secrets({("team-a", "tk")})
        await asyncio.sleep(1.5)
        assert reads == [("team-a", "tk")] * 2
        assert tries(caplog) == ["1s", "2s"]
        assert "ValueError" in caplog.text and "hunter2" not in caplog.text
        await kube.close()


async def test_a_queue_deleted_while_the_replica_stood_by_leaves_nothing_behind():
    """A replica that was active for a while (a rollout of the other) held the token it saw, conflicts
    and refusals of each queue; those deleted once it stood by again stayed for the process's life."""
    with apps.unreachable() as kube:  # never reached: nothing is read or written
        store = Store(settings=Settings())
        activity = Activity(identity="me", priority=1, peerings=[("", "wq")])
        writer = reconciler.Reconciler(store=store, client=kube, resync_seconds=3600, events=EventPoster(kube),
                                       activity=activity)
        gone = queue("gone")
        writer._token_seen[gone.key] = gone.uid
        writer._conflicts.refused(gone.key)
        writer._token_refusals.refused(gone.key)
        assert not activity.is_active()  # the peering not seen yet: standing by
        await writer.reconcile(gone.key)  # the work queue's pass after the deletion
        assert gone.key not in writer._token_seen
        assert gone.key not in writer._conflicts and gone.key not in writer._token_refusals
        await kube.close()


@pytest.mark.looptime
async def test_a_spec_invalid_status_whose_write_failed_is_written_again():
    """Such a queue is held by no Store, so no resync writes its status: one failed write (an etcd
    leader change) left the Ready=True of an earlier run on it for good, while /start answered 404."""
    from tests.unit.factories import queue_body
    from workerqueue_operator.k8s import client as client_

    class FailingOnce:
        patches = 0

        async def patch(self, *_: object, **__: object) -> dict[str, object]:
            self.patches += 1
            if self.patches == 1:
                raise client_.ApiError(503, "ServiceUnavailable", "etcd leader changed")
            return {"metadata": {"resourceVersion": "9"}}

    class NoEvents:
        def post(self, **_: object) -> None:
            pass

    api = FailingOnce()
    writer = reconciler.Reconciler(store=Store(settings=Settings()), client=api, resync_seconds=1,  # type: ignore[arg-type]
                                   events=NoEvents(), activity=Activity(identity="me", priority=0))  # type: ignore[arg-type]
    body = queue_body()
    body["metadata"]["resourceVersion"] = "5"
    body["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                                      "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}
    writer.spec_invalid(body, "spec.replicas: Input should be greater than or equal to 0")
    await asyncio.sleep(2.5)
    assert api.patches == 2
