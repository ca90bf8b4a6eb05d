"""kopf's configuration as the operator sets it at startup (no cluster)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import kopf
import pytest
from kopf._cogs.structs import references

from workerqueue_operator import handlers
from workerqueue_operator.core.supervisor import Supervisor
from workerqueue_operator.models.settings import Settings

PODS = references.Resource("", "v1", "pods", kind="Pod", singular="pod", namespaced=True, verbs=["list", "watch"])
QUEUES = references.Resource("agentcontrol.dev", "v1alpha1", "workerqueues", kind="WorkerQueue",
                             singular="workerqueue", namespaced=True, verbs=["list", "watch"])


def _configured() -> kopf.OperatorSettings:
    reg = handlers.registry(settings=Settings(), supervisor=cast(Supervisor, object()))  # configure needs none
    (configure,) = [h for h in reg._activities.get_all_handlers() if h.id == "configure"]
    settings = kopf.OperatorSettings()
    configure.fn(settings=settings)
    return settings


def test_the_pod_watch_asks_the_api_server_for_the_operators_pods_only():
    # kopf filters a handler's `labels=` after each event arrived; only a watch selector spares the
    # operator every other pod of the cluster.
    selectors = _configured().watching.label_selectors
    assert selectors.collect(PODS) == ["app.kubernetes.io/managed-by=workerqueue-operator"]
    assert selectors.collect(QUEUES) == []


def _login(monkeypatch: pytest.MonkeyPatch, kubeconfig: str | None) -> object:
    in_pod = kopf.ConnectionInfo(server="https://10.0.0.1:443")
    from_file = kopf.ConnectionInfo(server="https://elsewhere:6443")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: in_pod)
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda **_: from_file)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    reg = handlers.registry(settings=Settings(), supervisor=cast(Supervisor, object()), kubeconfig=kubeconfig)
    (login,) = [h for h in reg._activities.get_all_handlers() if h.id == "login"]
    return cast(kopf.ConnectionInfo, login.fn()).server


def test_run_kubeconfig_wins_over_the_pods_service_account_for_kopf_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # The operator's own client takes the file given to --kubeconfig; kopf taking the pod's
    # ServiceAccount would watch one cluster while the operator writes to another.
    assert _login(monkeypatch, "/etc/other/kubeconfig") == "https://elsewhere:6443"
    assert _login(monkeypatch, None) == "https://10.0.0.1:443"


async def test_the_stop_signals_do_what_they_did_before_once_the_operator_returns():
    """`dev` stops what it started on a signal; after the operator returned, a second SIGTERM during
    that stop killed `dev` at once (the loop's removal leaves the default), its children with it and
    its state folder (the cluster's admin token) behind."""
    import asyncio
    import signal

    from workerqueue_operator.handlers.embedded import handlers, stop_signals

    def devs(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGTERM, devs)
    try:
        with stop_signals(lambda sig: None):
            assert signal.getsignal(signal.SIGTERM) is not devs
        assert signal.getsignal(signal.SIGTERM) is devs
        # kopf's spawn_tasks sets its own first: what is put back is what was there before it.
        was = handlers()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)
        with stop_signals(lambda sig: None, restore=was):
            pass
        assert signal.getsignal(signal.SIGTERM) is devs
    finally:
        signal.signal(signal.SIGTERM, before)


def test_kopfs_routine_lines_are_quiet_and_its_retries_no_errors():
    """kopf logs every handler's success at INFO, and each API call it will retry at ERROR: an API
    server's blip paged whoever alerts on ERROR. One it gives up on stays an ERROR."""
    import logging

    from workerqueue_operator.runner import RoutineKopfMessages

    def level(name: str, level: int, message: str) -> int:
        record = logging.LogRecord(name, level, __file__, 1, message, None, None)
        RoutineKopfMessages().filter(record)
        return record.levelno

    assert level("kopf.objects", logging.INFO, "Handler 'pod-event' succeeded.") == logging.DEBUG
    assert level("kopf._cogs.clients.api", logging.ERROR,
                 "Request attempt #1/9 failed; will retry: GET /apis -> ClientConnectorError()") == logging.WARNING
    assert level("kopf._cogs.clients.api", logging.ERROR,
                 "Request attempt #2/9 failed; TCP closed; will re-authenticate: GET /apis") == logging.WARNING
    assert level("kopf._cogs.clients.api", logging.ERROR,
                 "Request attempt #9/9 failed; escalating: GET /apis -> ClientConnectorError()") == logging.ERROR
    assert level("workerqueue_operator.x", logging.ERROR, "Request attempt #1/9 failed; will retry: x") == logging.ERROR


def test_json_log_lines_name_their_logger(capsys: pytest.CaptureFixture[str]):
    """A log pipeline tells the operator's own lines from aiohttp's or kopf's by the logger's name."""
    import json
    import logging

    from workerqueue_operator.runner import configure_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging(False)
        logging.getLogger("workerqueue_operator.core.x").warning("hello %s", "there", extra={"queue": "a/b"})
        line = json.loads(capsys.readouterr().err.strip())
        assert line["logger"] == "workerqueue_operator.core.x"
        assert (line["message"], line["queue"], line["severity"]) == ("hello there", "a/b", "warn")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_a_refused_kopf_watch_is_begun_again_and_logged_as_a_warning_now_and_then(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """A namespace whose admins took the operator's RoleBinding away is refused for as long as they
    like: not an ERROR every 30 s, one WARNING every 10 minutes, saying what it means."""
    import logging

    from kopf._cogs.clients import errors as kopf_errors
    from kopf._cogs.clients import watching as kopf_watching

    from workerqueue_operator.handlers import embedded

    tries = []

    async def refused(**kwargs: object) -> Any:
        tries.append(kwargs)
        now[0] += 300.0  # each refusal five minutes after the one before
        if len(tries) <= 4:
            raise kopf_errors.APIForbiddenError({"message": "forbidden"}, status=403, headers={})
        yield "event"

    monkeypatch.setattr(kopf_watching, "infinite_watch", refused)
    monkeypatch.setattr(embedded, "REFUSED_WATCH_RETRY_SECONDS", 0.0)
    now = [1000.0]
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: now[0])
    embedded._watches_outlive_refusals()
    events = []
    with caplog.at_level(logging.DEBUG, logger=embedded.__name__):
        async for event in kopf_watching.infinite_watch(resource="pods", namespace="team-b"):
            events.append(event)
        levels = [r.levelno for r in caplog.records if "is refused" in r.getMessage()]
    assert events == ["event"] and len(tries) == 5
    assert levels == [logging.WARNING, logging.DEBUG, logging.WARNING, logging.DEBUG]
    assert "RoleBinding" in caplog.records[0].getMessage() and "team-b" in caplog.records[0].getMessage()


@pytest.mark.parametrize("plural, said", [("pods", "the worker pods there are not supervised"),
                                          ("customresourcedefinitions", "what it tells is not handled")])
async def test_a_refused_kopf_watch_is_told_in_a_line_fit_for_its_resource(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, plural: str, said: str):
    """It printed kopf's whole Status, and said the worker pods were not supervised of any resource."""
    from kopf._cogs.clients import errors as kopf_errors
    from kopf._cogs.clients import watching as kopf_watching
    from kopf._cogs.structs.references import Resource

    from workerqueue_operator.handlers import embedded

    tries: list[int] = []

    async def refused_once(**kwargs: Any) -> Any:
        tries.append(1)
        if len(tries) == 1:
            raise kopf_errors.APIForbiddenError({"kind": "Status", "message": "long text", "code": 403}, status=403,
                                                headers={})
        yield {"type": "ADDED"}

    monkeypatch.setattr(kopf_watching, "infinite_watch", refused_once)
    monkeypatch.setattr(embedded, "REFUSED_WATCH_RETRY_SECONDS", 0.0)
    embedded._watches_outlive_refusals()
    resource = Resource(group="", version="v1", plural=plural)
    events = [e async for e in kopf_watching.infinite_watch(resource=resource, namespace="team-a")]
    assert events == [{"type": "ADDED"}]
    (line,) = [r.getMessage() for r in caplog.records if "is refused" in r.getMessage()]
    assert line.startswith(f"kopf's watch of {plural} in team-a is refused (403 Forbidden): {said}"), line
    assert "long text" not in line
