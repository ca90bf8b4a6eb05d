"""The operator's own watches (the Store's informers): big objects, failures that are loud and heal."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes import client as k8s

from tests.integration.conftest import Kube, OperatorProcess, http, wait_for
from tests.integration.test_start import service_account_token
from tests.proxy import Proxy
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import informer

TEMPORAL = {"host": "temporal:7233", "namespace": "agents"}


def test_a_one_mebibyte_secret_leaves_the_watches_working(operator: OperatorProcess, kube: Kube, namespace: str):
    # A full-size Secret (the API server's limit is 1 MiB of data): 1.4 MB of JSON in one watch event.
    big = base64.b64encode(os.urandom(1024 * 1024 - 4096)).decode()
    kube.core.create_namespaced_secret(namespace, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="big"), data={"blob": big}))
    kube.put_secret(namespace, "after-big", **{"api-key": "v"})  # a change the watch sees after the big one
    kube.create_queue(namespace, "after", queueId=f"after-{namespace}",
                      temporal={**TEMPORAL, "apiKeySecretRef": {"name": "after-big", "key": "api-key"}})
    kube.wait_condition(namespace, "after", "True")
    token = kube.queue_token(namespace, "after")
    r = operator.start_worker(f"after-{namespace}", token)
    assert r.status == 200 and r.json()["temporal_api_key"] == "v"
    kube.put_secret(namespace, "after-big", **{"api-key": "rotated"})
    wait_for(lambda: operator.start_worker(f"after-{namespace}", token).json()["temporal_api_key"] == "rotated",
             timeout=30, what="a rotation seen through the Secret watch")
    assert "watch secrets" not in operator.logs()


def failures(op: OperatorProcess) -> dict[str, float]:
    return {labels["resource"]: value for labels, value in op.samples("workerqueue_watch_failures_total")}


KOPF_GIVES_UP_SECONDS = sum((1, 1, 2, 3, 5, 8, 13, 21))
"""kopf's default back-offs for a failing request, after which it gives up."""


def test_a_failing_watch_is_logged_counted_unready_and_recovers(
    proxied_kubeconfig: tuple[Path, Proxy], crd_installed: None, kube: Kube, namespace: str, tmp_path: Path,
    operator: OperatorProcess,
):
    config, proxy = proxied_kubeconfig
    own = OperatorProcess(config, tmp_path / "own.log", env={"WQ_NAMESPACES": namespace,
                                                             "WQ_WATCH_UNREADY_SECONDS": "3"})
    with operator.paused():  # the session's operator would make the queue Ready whatever ours does
        try:
            own.start()
            assert failures(own) == {f"workerqueues/{namespace}": 0, f"secrets/{namespace}": 0,
                                     f"leases/{namespace}": 0}
            assert own.metric("workerqueue_watch_idle_restarts_total", resource=f"secrets/{namespace}") == 0
            proxy.cut()
            wait_for(lambda: f"watch workerqueues/{namespace} failed" in own.logs(), timeout=30,
                     what="the failure in the log")
            wait_for(lambda: http("GET", f"{own.url}/readyz").status == 503, timeout=30,
                     what="/readyz 503 while a watch is down")
            assert failures(own)[f"workerqueues/{namespace}"] >= 1
            line = next(x for x in own.logs().splitlines() if f"watch workerqueues/{namespace} failed" in x)
            # The cause, in one line; a watch cut mid-stream is watched again from its version first.
            assert ("relisting in" in line or "watching again from version" in line) and "Error" in line

            proxy.heal()
            wait_for(own.ready, timeout=60, what="/readyz 200 once the watches have listed again")
            kube.create_queue(namespace, "later", queueId=f"later-{namespace}", temporal=TEMPORAL)
            kube.wait_condition(namespace, "later", "True")
            assert own.start_worker(f"later-{namespace}", kube.queue_token(namespace, "later")).status == 200
            assert f"watch workerqueues/{namespace} recovered" in own.logs()
        finally:
            own.stop()


def test_an_api_server_out_of_reach_at_start_is_waited_for_without_a_crash_loop(
    proxied_kubeconfig: tuple[Path, Proxy], crd_installed: None, kube: Kube, namespace: str, tmp_path: Path,
    operator: OperatorProcess,
):
    """kopf, started at once, gave up after about a minute of refused connections, with a traceback,
    and the operator exited 1: in a pod, a crash loop whose back-off put recovery off at each restart."""
    config, proxy = proxied_kubeconfig
    own = OperatorProcess(config, tmp_path / "own.log", env={"WQ_NAMESPACES": namespace})
    with operator.paused():
        proxy.cut()
        try:
            own.launch()
            wait_for(lambda: "the API server does not answer" in own.logs(), timeout=30, what="the wait told")
            # A kind to alert on, not the words (docs/operations.md, "Log lines worth an alert").
            told = [json.loads(line) for line in own.logs().splitlines() if "does not answer" in line]
            assert told and all(line.get("kind") == "api_server_unanswered" for line in told), told
            time.sleep(KOPF_GIVES_UP_SECONDS + 10)
            assert own.process is not None and own.process.poll() is None, own.logs()[-3000:]
            assert http("GET", f"{own.url}/healthz").status == 200
            assert http("GET", f"{own.url}/readyz").status == 503
            proxy.heal()
            wait_for(own.ready, timeout=60, what="/readyz 200 once the API server answers")
            kube.create_queue(namespace, "late", queueId=f"late-{namespace}", singleExecution=True,
                              temporal=TEMPORAL)
            wait_for(lambda: "late-w0" in kube.pod_names(namespace), what="its worker pod (kopf's handlers run)")
            assert "Traceback" not in own.logs()
        finally:
            own.stop()


def test_a_worker_reaching_a_replica_before_its_lists_is_answered_once_they_are_in(
    proxied_kubeconfig: tuple[Path, Proxy], crd_installed: None, kube: Kube, namespace: str, other_namespace: str,
    tmp_path: Path, operator: OperatorProcess,
):
    """A restarted replica listens before its watches have listed (an in-place restart, before its
    endpoint is marked not ready; a client calling the pod): a valid queue token was 401 there, the
    queue 404, and a worker exits for good on either. It is answered once the lists are in, and the
    Secret they do not bring (a default key of an unwatched namespace, read after them: 503 "not read
    yet" meanwhile)."""
    config, proxy = proxied_kubeconfig
    kube.put_secret(other_namespace, "llm", key="default-llm-key")
    own = OperatorProcess(config, tmp_path / "own.log", env={
        "WQ_NAMESPACES": namespace, "WQ_LITELLM_URL": "http://litellm.internal",
        "WQ_LITELLM_API_KEY_SECRET": f"{other_namespace}/llm:key"})
    queue_id = f"early-{namespace}"
    with operator.paused():
        try:
            own.start()
            kube.create_queue(namespace, "early", queueId=queue_id, temporal=TEMPORAL)
            kube.wait_condition(namespace, "early", "True")
            token = kube.queue_token(namespace, "early")
            own.stop()
            proxy.latency = 1.0  # every answer of the API server a second late: its lists take seconds
            seen: dict[str, Any] = {}

            def early_worker() -> None:  # calls as soon as the replica listens
                wait_for(lambda: _answers(f"{own.url}/healthz"), timeout=60, what="the replica listening")
                seen["readyz"] = http("GET", f"{own.url}/readyz").status
                seen["start"] = own.start_worker(queue_id, token)

            # The operator is started here, not in the thread: it dies with the thread that made it.
            worker = threading.Thread(target=early_worker)
            worker.start()
            try:
                own.start()
            finally:
                proxy.latency = 0.0
                worker.join()
            assert seen["readyz"] == 503  # the call came before the lists
            answer = seen["start"]
            assert answer.status == 200, answer.body
            assert answer.json()["litellm_api_key"] == "default-llm-key"
            assert own.call("POST", f"/api/v1/workers/{answer.json()['worker_id']}/heartbeat", token,
                            {"status": "idle", "tasks_processed": 0}).status in (200, 204)
        finally:
            own.stop()


def _answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=2).status == 200
    except OSError:
        return False


def test_an_api_server_hanging_up_on_a_write_stops_no_loop(
    proxied_kubeconfig: tuple[Path, Proxy], crd_installed: None, kube: Kube, namespace: str, tmp_path: Path,
    operator: OperatorProcess,
):
    """A write cut short by the API server (aiohttp's ServerDisconnectedError, which is no OSError)
    fails that write, to be made again: it stops no loop of the operator."""
    config, proxy = proxied_kubeconfig
    own = OperatorProcess(config, tmp_path / "own.log", env={"WQ_NAMESPACES": namespace})
    with operator.paused():  # the session's operator would write what ours must
        try:
            own.start()
            # Queues written at once: the operator's client keeps as many connections, every one of
            # which then hangs up on its next request.
            for i in range(8):
                kube.create_queue(namespace, f"q{i}", queueId=f"q{i}-{namespace}", temporal=TEMPORAL)
            for i in range(8):
                kube.wait_condition(namespace, f"q{i}", "True")
            token = kube.queue_token(namespace, "q0")
            proxy.hang_up()
            assert own.start_worker(f"q0-{namespace}", token).status == 200  # its live count is to be written
            failed = re.compile(f"writing the live worker count of {namespace}/q0 failed "
                                r"\(again in \d+s\): Server disconnected")
            wait_for(lambda: failed.search(own.logs()) is not None, timeout=30, what=failed.pattern)
            wait_for(lambda: (kube.get_queue(namespace, "q0")["status"].get("workers") or {}).get("live") == 1,
                     timeout=30, what="the live worker count written again")
            assert own.process is not None and own.process.poll() is None
            assert own.start_worker(f"q0-{namespace}", token).status == 200
        finally:
            own.stop()


def test_a_slot_whose_lease_delete_failed_is_freed_once_the_api_server_answers(
    proxied_kubeconfig: tuple[Path, Proxy], crd_installed: None, kube: Kube, namespace: str, tmp_path: Path,
    operator: OperatorProcess,
):
    """A worker of a maxWorkers queue says goodbye while the API server cannot be reached: its slot's
    Lease is deleted once it can, and the slot is another worker's (it stayed taken until a relist
    and 150 s of expiry: the record was forgotten, the Lease left behind)."""
    config, proxy = proxied_kubeconfig
    own = OperatorProcess(config, tmp_path / "own.log", env={"WQ_NAMESPACES": namespace})
    queue_id = f"capped-{namespace}"
    with operator.paused():  # the session's operator would write what ours must
        try:
            own.start()
            kube.create_queue(namespace, "capped", queueId=queue_id, temporal=TEMPORAL, maxWorkers=1)
            kube.wait_condition(namespace, "capped", "True")
            token = kube.queue_token(namespace, "capped")
            first = own.start_worker(queue_id, token)
            assert first.status == 200
            worker_id = first.json()["worker_id"]
            assert own.start_worker(queue_id, token).status == 409  # its one slot is taken
            proxy.cut()
            bye = own.call("POST", f"/api/v1/workers/{worker_id}/disconnect", token,
                           {"reason": "shutdown", "exit_code": 0})
            assert bye.status == 200
            failed = f"deleting the registration of worker {worker_id} failed, again in "
            wait_for(lambda: failed in own.logs(), timeout=30, what=failed)
            proxy.heal()
            wait_for(lambda: own.start_worker(queue_id, token).status == 200, timeout=30,
                     what="the slot free again")
        finally:
            own.stop()


@contextlib.asynccontextmanager
async def running(watch: informer.Informer, client: client_.KubeClient) -> AsyncIterator[None]:
    """The informer running for the block; stopped, and its client closed, on any exit."""
    task = asyncio.create_task(watch.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def until(predicate: Callable[[], bool], seconds: float = 30.0) -> None:
    """Waits, without blocking the loop the informer runs on, until `predicate` holds; fails the test
    if it does not within `seconds` (returns as soon as it holds: a long bound costs nothing)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {predicate}")
        await asyncio.sleep(0.05)


async def test_a_watch_whose_connection_goes_silent_is_watched_again(
    proxied_kubeconfig: tuple[Path, Proxy], kube: Kube, namespace: str,
):
    """A connection dropped without a word (no FIN, no RST) leaves a watch waiting for events that
    never come; the API server's bookmark a minute tells a live watch from such a one."""
    config, proxy = proxied_kubeconfig
    client = client_.KubeClient(client_.load_configuration(str(config)))
    seen: set[str] = set()
    watch = informer.Informer(client, f"/api/v1/namespaces/{namespace}/configmaps",
                              on_upsert=lambda obj: seen.add(obj["metadata"]["name"]), on_delete=lambda *_: None,
                              name="configmaps", idle_seconds=3)
    async with running(watch, client):
        # An object seen through the watch: its request is answered and streaming when frozen, not
        # on its way (which would make it a failed request, relisted, rather than a silent watch).
        await until(watch.synced.is_set)
        kube.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="before")))
        await until(lambda: "before" in seen)
        proxy.freeze()
        kube.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="after")))
        await until(lambda: "after" in seen)  # only through a new watch: the frozen one hears nothing
    assert watch.idle_restarts >= 1


def list_only_client(kube: Kube, namespace: str, kubeconfig: Path, host: str | None = None) -> client_.KubeClient:
    """A client of a ServiceAccount that may list configmaps in the namespace, not watch them."""
    kube.rbac.create_namespaced_role(namespace, k8s.V1Role(
        metadata=k8s.V1ObjectMeta(name="list-only"),
        rules=[k8s.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])]))
    kube.rbac.create_namespaced_role_binding(namespace, k8s.V1RoleBinding(
        metadata=k8s.V1ObjectMeta(name="list-only"),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="list-only"),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="lister", namespace=namespace)]))
    admin = client_.load_configuration(str(kubeconfig))
    configuration = kubernetes.client.Configuration(
        host=host or admin.host, api_key={"authorization": service_account_token(kube, namespace, "lister")},
        api_key_prefix={"authorization": "Bearer"})
    configuration.ssl_ca_cert = admin.ssl_ca_cert
    return client_.KubeClient(configuration)


async def test_a_watch_refused_after_every_good_list_backs_off_and_stays_down(kubeconfig: Path, kube: Kube,
                                                                               namespace: str):
    """RBAC that lets list but not watch (or a 429 on every watch): each list succeeds, each watch
    fails at once. That is no recovery: the back-off grows and the informer stays down (unready)."""
    client = list_only_client(kube, namespace, kubeconfig)
    watch = informer.Informer(client, f"/api/v1/namespaces/{namespace}/configmaps", on_upsert=lambda _: None,
                              on_delete=lambda *_: None, name="configmaps")
    async with running(watch, client):
        await until(lambda: watch.failures >= 3)  # refused after 0 s, 0.5 s, 1.5 s
        await asyncio.sleep(1)
        assert watch.synced.is_set()  # its lists succeed
        assert watch.failures <= 4  # the next one waits 4 s (at 0.5 s a time: 7 by now)
        assert watch.down_for() >= 2.5  # since the first failure: no list reset it


async def test_a_watch_refused_slowly_after_every_good_list_backs_off_and_stays_down(
    proxied_kubeconfig: tuple[Path, Proxy], kubeconfig: Path, kube: Kube, namespace: str,
):
    """The same, with every answer 3 s late (an API server queueing requests before a 429): a watch
    refused after longer than it takes a watch to count as working has not worked."""
    config, proxy = proxied_kubeconfig
    lister = list_only_client(kube, namespace, kubeconfig, host=client_.load_configuration(str(config)).host)
    watch = informer.Informer(lister, f"/api/v1/namespaces/{namespace}/configmaps", on_upsert=lambda _: None,
                              on_delete=lambda *_: None, name="configmaps")
    proxy.latency = 3.0
    async with running(watch, lister):
        await until(lambda: watch.failures >= 2)
        first_failure = time.monotonic() - watch.down_for()
        await until(lambda: watch.failures >= 3)
        assert watch.synced.is_set()  # its lists succeed
        assert time.monotonic() - watch.down_for() == pytest.approx(first_failure, abs=0.5)  # never reset


async def test_a_watch_the_api_server_ends_at_once_is_backed_off(kubeconfig: Path, namespace: str):
    """Watches that end at once without an event (here: asked to last a second) fail like refusals:
    backed off and down, not watched again at once for ever."""
    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    watch = informer.Informer(client, f"/api/v1/namespaces/{namespace}/configmaps", on_upsert=lambda _: None,
                              on_delete=lambda *_: None, name="configmaps", watch_seconds=1)
    async with running(watch, client):
        await until(lambda: watch.failures >= 2)
        assert watch.down_for() > 0


async def test_a_resource_the_api_server_does_not_serve_is_named_in_the_log(kubeconfig: Path,
                                                                            caplog: pytest.LogCaptureFixture):
    """An operator started before its CRD (`crds.install=false`, the CRD not applied yet) stays
    unready; its log must say what is missing, not `404 : `."""
    caplog.set_level(logging.WARNING, logger=informer.__name__)
    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    path = "/apis/notinstalled.agentcontrol.dev/v1alpha1/workerqueues"
    watch = informer.Informer(client, path, on_upsert=lambda _: None, on_delete=lambda *_: None,
                              name="workerqueues/*")
    async with running(watch, client):
        await until(lambda: watch.failures > 0)
    assert not watch.synced.is_set()
    line = next(r.getMessage() for r in caplog.records if "watch workerqueues/* failed" in r.getMessage())
    assert path in line and "CustomResourceDefinition" in line, line


async def test_a_callback_failing_on_one_object_leaves_the_others_delivered(
    kubeconfig: Path, kube: Kube, namespace: str, caplog: pytest.LogCaptureFixture,
):
    """A bug that trips on one object must cost that object only: relisting would meet it again, and
    every object after it in every namespace would go unseen (found with a queue named past the
    limits of the objects named after it)."""
    caplog.set_level(logging.ERROR, logger=informer.__name__)
    for name in ("a", "b", "c"):
        kube.put_secret(namespace, name, token=name)
    seen: list[str] = []

    def upsert(body: dict) -> None:
        name = body["metadata"]["name"]
        if name == "a":
            raise ValueError("a bug that trips on this one object")
        seen.append(name)

    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    watch = informer.Informer(client, f"/api/v1/namespaces/{namespace}/secrets", on_upsert=upsert,
                              on_delete=lambda *_: None, name="secrets", page_size=1)
    async with running(watch, client):
        await asyncio.wait_for(watch.synced.wait(), 30)
        kube.put_secret(namespace, "d", token="d")
        await until(lambda: "d" in seen)
    assert {"b", "c", "d"} <= set(seen) and "a" not in seen
    assert (watch.callback_failures, watch.failures) == (1, 0)
    assert any(f"handling {namespace}/a failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_an_informer_says_while_it_lists(kubeconfig: Path, kube: Kube, namespace: str):
    """While it lists (at start, after a 410 or a failure) what was made meanwhile may be unknown yet:
    a per-worker token is awaited rather than refused then (api/unseen.py)."""
    for name in ("a", "b"):
        kube.put_secret(namespace, name, token=name)
    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    listing: dict[str, bool] = {}

    def upsert(body: dict) -> None:
        listing[body["metadata"]["name"]] = watch.listing

    watch = informer.Informer(client, f"/api/v1/namespaces/{namespace}/secrets", on_upsert=upsert,
                              on_delete=lambda *_: None, name="secrets", page_size=1)
    assert not watch.listing
    async with running(watch, client):
        await asyncio.wait_for(watch.synced.wait(), 30)
        assert not watch.listing
        kube.put_secret(namespace, "c", token="c")
        await until(lambda: "c" in listing)
    assert listing == {"a": True, "b": True, "c": False}


async def test_an_informer_holds_its_consumers_news_while_it_lists(kubeconfig: Path, kube: Kube, namespace: str):
    """A relist comes in pages, and what one page brings may only make sense once the list is whole
    (the Store tells of queues then: Store.holding_news); watch events are told at once."""
    for name in ("a", "b"):
        kube.put_secret(namespace, name, token=name)
    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    held: list[bool] = []
    seen: dict[str, bool] = {}

    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        held.append(True)
        try:
            yield
        finally:
            held.pop()

    def upsert(body: dict) -> None:
        seen[body["metadata"]["name"]] = bool(held)

    watch = informer.Informer(client, f"/api/v1/namespaces/{namespace}/secrets", on_upsert=upsert,
                              on_delete=lambda *_: None, name="secrets", page_size=1, hold=hold)
    async with running(watch, client):
        await asyncio.wait_for(watch.synced.wait(), 30)
        assert held == []  # let go once the list is whole
        kube.put_secret(namespace, "c", token="c")
        await until(lambda: "c" in seen)
    assert seen == {"a": True, "b": True, "c": False}


def secrets_informer(client: client_.KubeClient, namespace: str, **options: Any
                     ) -> tuple[informer.Informer, list[int], list[str]]:
    """An informer of the namespace's Secrets: (it, a 1 for each (re)list, the names it was told of)."""
    lists: list[int] = []
    seen: list[str] = []

    @contextlib.contextmanager
    def counted() -> Iterator[None]:  # entered around each (re)list
        lists.append(1)
        yield

    watch = informer.Informer(client, f"/api/v1/namespaces/{namespace}/secrets", name="secrets", hold=counted,
                              on_upsert=lambda body: seen.append(body["metadata"]["name"]),
                              on_delete=lambda *_: None, **options)
    return watch, lists, seen


async def test_a_watch_takes_the_api_servers_bookmarks_as_news_of_its_version_only(
    kubeconfig: Path, kube: Kube, namespace: str,
):
    """A BOOKMARK carries no object, only a resourceVersion (the API server sends one a minute, and one
    2 s before a watch's timeoutSeconds, when newer than what the watch has seen): taken for an object,
    it failed the watch and cost a relist."""
    labelled = k8s.V1ObjectMeta(name="before", labels={"watched": "yes"})
    kube.core.create_namespaced_secret(namespace, k8s.V1Secret(metadata=labelled, string_data={"token": "b"}))

    kinds: list[str] = []

    class Recording(client_.KubeClient):
        """The real client, noting the kind of each event it reads."""

        async def watch(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
            async for event in super().watch(*args, **kwargs):
                kinds.append(str(event.get("type")))
                yield event

    client = Recording(client_.load_configuration(str(kubeconfig)))
    watch, lists, seen = secrets_informer(client, namespace, watch_seconds=5, params={"labelSelector": "watched=yes"})
    async with running(watch, client):
        for tick in range(60):  # Secrets the watch does not select: versions move on, no event comes
            kube.put_secret(namespace, "unwatched", tick=str(tick))
            await asyncio.sleep(0.5)
            if kinds.count("BOOKMARK") >= 2:  # two watches' worth
                break
        labelled.name = "after"
        kube.core.create_namespaced_secret(namespace, k8s.V1Secret(metadata=labelled, string_data={"token": "a"}))
        await until(lambda: "after" in seen)
    assert kinds.count("BOOKMARK") >= 2
    assert watch.failures == 0 and watch.callback_failures == 0
    assert len(lists) == 1  # each watch went on from the version its bookmark told
    assert seen == ["before", "after"]


async def test_a_watch_cut_mid_stream_goes_on_from_its_version_without_a_relist(
    proxied_kubeconfig: tuple[Path, Proxy], kube: Kube, namespace: str,
):
    """A proxy (or an API server restarting) cutting the long watch connection: each cut cost a full
    relist, of every replica at once, where client-go watches again from the last version it saw."""
    config, proxy = proxied_kubeconfig
    kube.put_secret(namespace, "before", token="b")
    client = client_.KubeClient(client_.load_configuration(str(config)))
    watch, lists, seen = secrets_informer(client, namespace)
    async with running(watch, client):
        await asyncio.wait_for(watch.synced.wait(), 30)
        for i in range(2):
            kube.put_secret(namespace, f"during-{i}", token="d")
            await until(lambda: f"during-{i}" in seen)  # noqa: B023 - awaited in this turn
            proxy.cut()  # the watch's connection closed mid-stream
            proxy.heal()
        kube.put_secret(namespace, "after", token="a")
        await until(lambda: "after" in seen)
    assert len(lists) == 1 and watch.cut_restarts >= 2
    assert seen.count("before") == 1  # not listed again


async def test_what_was_deleted_while_the_watch_was_down_is_told_at_the_relist(
    proxied_kubeconfig: tuple[Path, Proxy], kube: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch,
):
    """No watch event tells of a deletion made while the API server was out of reach: the relist must,
    for what its first list brought and for what a watch brought since alike, or a deleted queue would
    be served, a deleted (revoked) token keep opening, a deleted Lease keep its slot."""
    monkeypatch.setattr(informer, "RESUME_SECONDS", 0.0)  # the outage outlasts resuming: a relist
    config, proxy = proxied_kubeconfig
    kube.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="listed")))
    client = client_.KubeClient(client_.load_configuration(str(config)))
    seen: set[str] = set()
    deleted: dict[str, Any] = {}
    watch = informer.Informer(client, f"/api/v1/namespaces/{namespace}/configmaps", name="configmaps",
                              on_upsert=lambda obj: seen.add(obj["metadata"]["name"]),
                              on_delete=lambda key, body: deleted.update({key[1]: body}))
    async with running(watch, client):
        await until(lambda: "listed" in seen)
        kube.core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="watched")))
        await until(lambda: "watched" in seen)
        proxy.cut()  # and every connection refused until healed
        await until(lambda: watch.failures >= 1)
        for name in ("listed", "watched"):
            kube.core.delete_namespaced_config_map(name, namespace)
        proxy.heal()
        await until(lambda: len(deleted) == 2)
    assert deleted == {"listed": None, "watched": None}  # gone, its last state unknown
    assert not watch.knows((namespace, "listed")) and not watch.knows((namespace, "watched"))


async def test_the_api_servers_clock_is_read_against_this_one(operator: OperatorProcess, kubeconfig: Path):
    """Peering and the registry's Leases take the replicas' clocks to agree with each other: a replica
    compares its own with the API server's, and says so when they differ (here they are one clock)."""
    client = client_.KubeClient(client_.load_configuration(str(kubeconfig)))
    try:
        offset = await client.clock_offset()
    finally:
        await client.close()
    # Off by half a second at most for the Date header's whole seconds, and by half the round trip.
    assert offset is not None and abs(offset) < 1.5
    assert abs(operator.metric("workerqueue_clock_offset_seconds")) < 1.5
    assert "the API server's: kopf peering" not in operator.logs()
