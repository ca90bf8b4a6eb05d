"""The informer's view of a scope that refuses the operator (403), as runner.Watches judges readiness by."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import informer


async def test_a_refused_scope_stays_refused_through_other_failures_until_it_is_watched():
    """A namespace refusing the operator (403) is not counted for readiness (runner.Watches): one 503
    between two refusals (an API server restarting) counted it again, failing since the first refusal
    an hour ago, and every replica turned unready at once."""
    answers: list[Exception | dict[str, Any]] = [
        client_.ApiError(403, "Forbidden", "rolebinding gone"), client_.ApiError(503, "ServiceUnavailable", "")]

    blip = asyncio.Event()

    class Answering:
        async def get(self, path: str, params: Any = None) -> Any:
            answer = answers.pop(0) if answers else client_.ApiError(403, "Forbidden", "rolebinding gone")
            if isinstance(answer, client_.ApiError) and answer.status == 503:
                blip.set()  # the informer has taken it in by the time the waiter runs
            if isinstance(answer, Exception):
                raise answer
            return answer

        async def watch(self, path: str, params: Any, *, on_open: Any, **bounds: float) -> AsyncIterator[Any]:
            on_open()
            await asyncio.Event().wait()  # accepted, and quiet
            yield {}

    watch = informer.Informer(Answering(), "/api/v1/namespaces/team-x/secrets",  # type: ignore[arg-type]
                              on_upsert=lambda _: None, on_delete=lambda *_: None, name="secrets/team-x")
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(watch.settled.wait(), 5)
        assert watch.refused and not watch.synced.is_set()
        await asyncio.wait_for(blip.wait(), 5)
        assert watch.failures == 2 and watch.refused
        answers.append({"items": [], "metadata": {"resourceVersion": "1"}})  # access given back
        await asyncio.wait_for(watch.synced.wait(), 10)
        assert watch.refused  # listed: its watch may still be refused
        await asyncio.sleep(informer.STABLE_SECONDS + 0.5)  # its watch has worked since
        assert not watch.refused
        assert watch.down_since is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_readiness_counts_refused_namespaces_only_while_another_is_served():
    """Every watched namespace refusing (the Roles forgotten at install): /readyz answered 200 with
    nothing served, and `helm --wait` passed."""
    from workerqueue_operator.runner import counted

    def informers(*refused: bool) -> list[informer.Informer]:
        made = []
        for i, no in enumerate(refused):
            watch = informer.Informer(None, f"/api/v1/namespaces/team-{i}/secrets",  # type: ignore[arg-type]
                                      on_upsert=lambda _: None, on_delete=lambda *_: None, name=f"secrets/team-{i}")
            watch.refused = no
            made.append(watch)
        return made

    some = informers(True, False)
    assert counted(some, namespaced=True) == some[1:]
    every = informers(True, True)
    assert counted(every, namespaced=True) == every
    assert counted(some, namespaced=False) == some  # cluster-wide: a refusal is no team's choice
    # A namespace served in part (its Role without Leases, say) is a namespace refusing.
    leases = informer.Informer(None, "/apis/coordination.k8s.io/v1/namespaces/team-1/leases",  # type: ignore[arg-type]
                               on_upsert=lambda _: None, on_delete=lambda *_: None, name="leases/team-1")
    leases.refused = True
    part = [*informers(False, False), leases]
    assert counted(part, namespaced=True) == [part[0]]
    only = [informers(False, False)[1], leases]
    assert counted(only, namespaced=True) == only  # the only namespace, served in part: not ready
