"""The HTTP API under faults and hostile clients, against real operator processes.

A frozen API server (its kube-apiserver SIGSTOPped, on a control plane this module owns, so that
no other test sees the freeze) must cost a Kubernetes-token caller a prompt 503, not a hang; made-up
tokens must not each cost a TokenReview.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client as http_client
import resource
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from tests.integration.conftest import CRD_FILE, Http, Kube, OperatorProcess, frozen, http, wait_for
from tests.integration.test_start import service_account_token
from workerqueue_operator.devcluster.controlplane import ControlPlane


@pytest.fixture(scope="module")
def own_control_plane(k8s_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path_factory.mktemp("frozen-cp"), k8s_assets, log=lambda m: print(m, file=sys.stderr)) as cp:
        yield cp


@pytest.fixture(scope="module")
def own_kube(own_control_plane: ControlPlane, k8s_assets: Path) -> Iterator[Kube]:
    api = k8s_config.new_client_from_config(config_file=str(own_control_plane.kubeconfig))
    try:
        from kubernetes import utils
        utils.create_from_yaml(api, str(CRD_FILE))
        ext = k8s.ApiextensionsV1Api(api)
        wait_for(lambda: any(c.type == "Established" and c.status == "True" for c in
                             (ext.read_custom_resource_definition("workerqueues.agentcontrol.dev").status.conditions
                              or [])), what="CRD Established")
        yield Kube(api)
    finally:
        api.close()


def timed_start(operator: OperatorProcess, queue_id: str, token: str) -> tuple[Http, float]:
    began = time.monotonic()
    answer = http("POST", f"{operator.url}/api/v1/worker-queues/{queue_id}/start", token=token, timeout=60)
    return answer, time.monotonic() - began


def robot_may_start(kube: Kube, namespace: str, operator: OperatorProcess, queue_id: str,
                    fresh: int) -> tuple[str, list[str]]:
    """The ServiceAccount `robot` may start workers of the queue `agents`: one of its tokens reviewed
    (cached by the operator now), and `fresh` more never seen."""
    kube.grant(namespace, "start-workers", resource="workerqueues/start", verb="create", queue="agents",
               account="robot")
    cached = service_account_token(kube, namespace, "robot")
    request = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
    tokens = [str(kube.core.create_namespaced_service_account_token("robot", namespace, request).status.token)
              for _ in range(fresh)]
    wait_for(lambda: operator.start_worker(queue_id, cached).status == 200, timeout=15,
             what="the RBAC binding to be seen")
    return cached, tokens


def own_operator(control_plane: ControlPlane, kube: Kube, tmp_path: Path, namespace: str,
                 env: dict[str, str]) -> OperatorProcess:
    """An operator on this module's control plane, its queue `agents` (queue id `<namespace>-agents`) Ready."""
    kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    wait_for(lambda: kube.core.list_namespaced_service_account(namespace).items, what="default ServiceAccount")
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "operator.log", env=env)
    operator.start()
    try:
        kube.create_queue(namespace, "agents", queueId=f"{namespace}-agents",
                          temporal={"host": "t:1", "namespace": "n"})
        kube.wait_condition(namespace, "agents", "True")
    except BaseException:
        operator.stop()
        raise
    return operator


MADE_UP = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJub2JvZHkifQ.c2lnbmF0dXJl"
"""A token shaped as a JWT, as a ServiceAccount's is, that nobody issued."""


def test_frozen_api_server_gives_kubernetes_tokens_a_prompt_503(
        own_control_plane: ControlPlane, own_kube: Kube, tmp_path: Path):
    kube = own_kube
    namespace = "frozen"
    operator = own_operator(own_control_plane, kube, tmp_path, namespace,
                            {"WQ_AUTH_CACHE_SECONDS": "60", "WQ_AUTH_MAX_CONCURRENT_REVIEWS": "2"})
    try:
        queue_token = kube.queue_token(namespace, "agents")
        cached, fresh = robot_may_start(kube, namespace, operator, "frozen-agents", 3)

        # A made-up token costs one TokenReview, then is rejected from memory.
        assert operator.start_worker("frozen-agents", MADE_UP).status == 401
        assert operator.start_worker("frozen-agents", MADE_UP).status == 401
        assert operator.metric("workerqueue_token_reviews_total", outcome="rejected") == 1
        assert operator.metric("workerqueue_token_reviews_total", outcome="rejected_cached") == 1

        with frozen(own_control_plane.pid("kube-apiserver")):
            # From memory: queue tokens and cached reviews.
            assert operator.start_worker("frozen-agents", queue_token).status == 200
            assert operator.start_worker("frozen-agents", cached).status == 200
            assert operator.start_worker("frozen-agents", MADE_UP).status == 401
            # A token that is no JWT is never reviewed (a rotated-out queue token, an organization's
            # key: the API server's audit log and webhooks would be sent it): 401 at once.
            answer, seconds = timed_start(operator, "frozen-agents", "rotated-out-queue-token")
            assert answer.status == 401 and seconds < 2
            assert operator.metric("workerqueue_token_reviews_total", outcome="not_a_jwt") == 1
            # A token needing a review: 503 within the review timeout (4 s), not ~30 s (the bound
            # leaves a loaded machine slack, and is far below the hang).
            answer, seconds = timed_start(operator, "frozen-agents", fresh[0])
            assert answer.status == 503, answer.body
            assert seconds < 10
            # Beyond the bound on reviews in flight (2 here), a caller waits for a slot, within the
            # same 4 s: 503 with Retry-After, as prompt as the others.
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                futures = [pool.submit(timed_start, operator, "frozen-agents", token) for token in fresh]
                results = [f.result() for f in futures]
            assert all(a.status == 503 for a, _ in results), [a.body for a, _ in results]
            assert all(s < 10 for _, s in results), results
            assert [a.headers.get("Retry-After") for a, _ in results].count("1") == 1, results
        logs = operator.logs()
        assert "TokenReview failed: TimeoutError: no answer within 4s" in logs
        assert "TokenReview not made: no review slot free in time (2 in flight)" in logs
        assert "Traceback" not in logs
        # Thawed: the same token is reviewed again and admitted.
        wait_for(lambda: operator.start_worker("frozen-agents", fresh[0]).status == 200, timeout=30,
                 what="a review after the thaw")
    finally:
        operator.stop()


def start_from(source: str, operator: OperatorProcess, queue_id: str, token: str) -> int:
    """/start's status, sent from `source` (another loopback address is another client)."""
    url = urllib.parse.urlsplit(operator.url)
    connection = http_client.HTTPConnection(str(url.hostname), url.port, timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", f"/api/v1/worker-queues/{queue_id}/start", body=b"{}",
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_flood_of_made_up_tokens_from_one_client_turns_no_other_away(
        own_control_plane: ControlPlane, own_kube: Kube, tmp_path: Path):
    """Each made-up token waits for a review while the API server is slow: one client sending them
    filled the whole waiting room (64 a review slot), and every other Kubernetes-identity caller was
    answered 503 at once, which the real worker takes for good. Waiters take turns by address now."""
    kube = own_kube
    namespace = "flood"
    operator = own_operator(own_control_plane, kube, tmp_path, namespace, {"WQ_AUTH_MAX_CONCURRENT_REVIEWS": "1"})
    try:
        _, (token,) = robot_may_start(kube, namespace, operator, "flood-agents", 1)
        with concurrent.futures.ThreadPoolExecutor(81) as pool:
            with frozen(own_control_plane.pid("kube-apiserver")):
                flood = [pool.submit(start_from, "127.0.0.2", operator, "flood-agents", f"{MADE_UP}{i}")
                         for i in range(80)]
                # One review in flight, 64 waiting, the 15 beyond turned away at once.
                wait_for(lambda: operator.metric("workerqueue_token_reviews_total", outcome="busy") >= 15,
                         timeout=30, what="the waiting room full")
                mine = pool.submit(start_from, "127.0.0.1", operator, "flood-agents", token)
                time.sleep(0.5)
            assert mine.result() == 200  # served in its turn once the API server answers
            assert {f.result() for f in flood} <= {401, 503}
        assert "Traceback" not in operator.logs()
    finally:
        operator.stop()


def test_a_flood_of_idle_connections_leaves_the_operator_working(
        operator: OperatorProcess, kube: Kube, namespace: str, kubeconfig: Path, tmp_path: Path,
        request: pytest.FixtureRequest):
    # 3,000 sockets against an operator allowed 1,024 fds: without a connection limit they exhaust
    # them, and it can neither answer /healthz nor reach the API server.
    flood = 3000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < flood + 200:
        # Many machines give 1,024 soft under a far higher hard limit: raised, not skipped.
        if hard != resource.RLIM_INFINITY and hard < flood + 200:
            pytest.fail(f"this test process may open {hard} files at most, {flood + 200} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (flood + 200, hard))
        request.addfinalizer(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    own = OperatorProcess(kubeconfig, tmp_path / "operator.log", env={"WQ_HTTP_IDLE_TIMEOUT_SECONDS": "60"},
                          fd_limit=1024)
    sockets: list[socket.socket] = []
    with operator.paused():  # the session's operator would create the token Secret in our stead
        own.start()
        try:
            began = time.monotonic()
            for _ in range(flood):
                if time.monotonic() - began > 60:  # an operator that stops accepting fails below, not by hanging here
                    break
                with contextlib.suppress(OSError):
                    sockets.append(socket.create_connection(("127.0.0.1", own.port), timeout=2))
            flooded = time.monotonic() - began

            # Answers still come, while every one of those sockets is held open.
            answer = http("GET", f"{own.url}/healthz", timeout=5)
            assert answer.status == 200
            assert len(sockets) > 2000, f"only {len(sockets)} connections were accepted in {flooded:.0f}s"
            kube.create_queue(namespace, "after-flood", queueId=f"flood-{namespace}",
                              temporal={"host": "t:1", "namespace": "n"})
            token = kube.queue_token(namespace, "after-flood")
            kube.wait_condition(namespace, "after-flood", "True")
            assert own.start_worker(f"flood-{namespace}", token).status == 200
            assert time.monotonic() - began < flooded + 60  # not waiting for the idle timeout

            # Half of what http_reserved_fds and the Temporal connections (temporal_max_clients) leave:
            # the other half for the upstream's connections.
            assert own.metric("workerqueue_http_connections_limit") == (1024 - 256 - 256) // 2
            assert own.metric("workerqueue_http_connections") <= (1024 - 256 - 256) // 2
            assert own.metric("workerqueue_http_problems_total", kind="connections_evicted") >= flood - 768
            logs = own.logs()
            assert "Traceback" not in logs
            assert logs.count("the longest-idle one was closed") < 10  # throttled: one line per 10 s
        finally:
            for s in sockets:
                s.close()
            own.stop()


def test_a_start_loop_holds_a_bounded_number_of_registrations(
        operator: OperatorProcess, kube: Kube, namespace: str, kubeconfig: Path, tmp_path: Path):
    # Each /start holds a registration in memory until the worker's first heartbeat or its expiry
    # (150 s here): a token holder calling it in a loop must meet a bound, not the pod's memory limit.
    tokens = {}
    for name in ("loop-a", "loop-b"):
        kube.create_queue(namespace, name, queueId=f"{name}-{namespace}", temporal={"host": "t:1", "namespace": "n"})
        kube.wait_condition(namespace, name, "True")
        tokens[name] = kube.queue_token(namespace, name)
    own = OperatorProcess(kubeconfig, tmp_path / "operator.log", env={
        "WQ_NAMESPACES": namespace, "WQ_REGISTRY_MAX_PENDING_PER_QUEUE": "20", "WQ_REGISTRY_MAX_PENDING": "30",
        "WQ_REGISTRY_MAX_WORKERS": "31"})
    with operator.paused():  # two operators would both write the registrations' Leases
        own.start()
        try:
            looped = [own.start_worker(f"loop-a-{namespace}", tokens["loop-a"]) for _ in range(25)]
            assert [r.status for r in looped] == [200] * 20 + [503] * 5
            assert looped[-1].headers.get("Retry-After") == "5"
            assert looped[-1].json() == {"detail": "Too many workers are starting at once, try again"}
            # The other queue is not refused for the first one's loop, until all hold the global bound.
            assert [own.start_worker(f"loop-b-{namespace}", tokens["loop-b"]).status for _ in range(11)] == \
                [200] * 10 + [503]
            # A worker's first heartbeat makes room.
            worker_id = looped[0].json()["worker_id"]
            assert own.call("POST", f"/api/v1/workers/{worker_id}/heartbeat", tokens["loop-a"],
                            {"status": "active"}).status == 200
            assert own.start_worker(f"loop-b-{namespace}", tokens["loop-b"]).status == 200
            assert own.metric("workerqueue_workers_pending") == 30
            # Heartbeating once per worker passes no bound either: registrations in all are bounded too.
            assert own.call("POST", f"/api/v1/workers/{looped[1].json()['worker_id']}/heartbeat", tokens["loop-a"],
                            {"status": "active"}).status == 200
            refused = own.start_worker(f"loop-b-{namespace}", tokens["loop-b"])
            assert refused.status == 503 and refused.headers.get("Retry-After") == "30"
            assert refused.json() == {"detail": "Too many workers are registered, try again later"}
            assert own.metric("workerqueue_workers_live") == 31
            assert own.metric("workerqueue_registrations_refused_total") == 7
            assert own.metric("workerqueue_http_problems_total", kind="registrations_refused") == 7
            assert "Traceback" not in own.logs()
        finally:
            own.stop()
