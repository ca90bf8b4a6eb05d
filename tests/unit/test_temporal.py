"""core.temporal's pure parts: the status mapping, timestamps, to_json, the endpoint's secrecy."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.client import WorkflowExecutionStatus as S

from workerqueue_operator.core.temporal import Endpoint, Execution, Temporal, TemporalUnavailable, rfc3339, status_of


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
