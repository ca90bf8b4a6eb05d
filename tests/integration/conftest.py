"""Integration fixtures: the CRD installed on the real control plane and the operator as a process."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client as k8s

from tests.proxy import Proxy
from workerqueue_operator.devcluster import controlplane, procs
from workerqueue_operator.devcluster.temporal import TemporalServer

if TYPE_CHECKING:
    from tests.integration.inprocess import InProcess

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "agentcontrol.dev_workerqueues.yaml"
GROUP, VERSION, PLURAL = "agentcontrol.dev", "v1alpha1", "workerqueues"
HOLD = "test.agentcontrol.dev/hold"
"""A finalizer of the tests' own, keeping an object until they let it go."""
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class Http:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def established(kubectl: Callable[..., subprocess.CompletedProcess[str]], *crds: str) -> None:
    """Waits until the CRDs serve (see controlplane.wait_established)."""
    controlplane.wait_established(lambda *args: kubectl(*args).stdout, *crds)


def alive(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def http(method: str, url: str, *, body: bytes | None = None, token: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10, context: ssl.SSLContext | None = None) -> Http:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None and not request.has_header("Content-type"):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return Http(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Http(exc.code, dict(exc.headers), exc.read())


@contextlib.contextmanager
def deletions_refused(kubectl: Callable[..., subprocess.CompletedProcess[str]], namespace: str, *, group: str,
                      resource: str, message: str = "", message_expression: str = "") -> Iterator[None]:
    """A ValidatingAdmissionPolicy refusing every deletion of `resource` (of API `group`) in the
    namespace, as a webhook or a policy engine may: a refusal no retry mends. Its message is
    `message`, or what `message_expression` (CEL, given `oldObject`) makes of the object."""
    name = f"no-{resource}-deletion-{namespace}"
    validation: dict[str, str] = {"expression": "false", "reason": "Forbidden"}
    validation.update({"messageExpression": message_expression} if message_expression else {"message": message})
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": name},
              "spec": {"failurePolicy": "Fail", "matchConstraints": {
                  "resourceRules": [{"apiGroups": [group], "apiVersions": ["v1"], "operations": ["DELETE"],
                                     "resources": [resource]}],
                  "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
                  "validations": [validation]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name}, "spec": {"policyName": name, "validationActions": ["Deny"]}}
    applied = kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                            "items": [policy, binding]}), check=False)
    if applied.returncode != 0 and "no matches for kind" in applied.stderr:
        pytest.skip("needs ValidatingAdmissionPolicy v1 (Kubernetes 1.30+)")
    assert applied.returncode == 0, applied.stderr
    try:
        yield
    finally:
        kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, "--wait=false")


@pytest.fixture(scope="session")
def crd_installed(kubectl: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    established(kubectl, f"{PLURAL}.{GROUP}")


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block, continued on any exit."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class OperatorProcess:
    """`workerqueue-operator run` as its own process group, its logs in a file the tests can read."""

    def __init__(self, kubeconfig: Path, log_path: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None, context: ssl.SSLContext | None = None,
                 fd_limit: int | None = None) -> None:
        self.port = free_port()
        self.context = context  # set: the operator serves HTTPS, trusted through this context
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._kubeconfig = kubeconfig
        self._env = env or {}
        # Set: /metrics is served there, not on the API's port.
        self.metrics_port = int(self._env["WQ_METRICS_PORT"]) if "WQ_METRICS_PORT" in self._env else None
        self._args = args or []
        self._fd_limit = fd_limit  # set: the operator's RLIMIT_NOFILE, soft and hard
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = self._environment()
        first = self.process is None
        for attempt in (1, 2):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._spawn(env)
                wait_for(self.ready, timeout=60, what=f"operator readiness (log: {self.log_path})")
                return self
            except BaseException:
                self.stop()  # never left running by a failed start, a timeout or Ctrl-C
                collided = "address already in use" in self._log_since(logged).lower()
                # The port picked as free was taken before the operator bound it. Only a first start
                # moves to another: a restart keeps the URL the test holds.
                if not (first and attempt == 1 and collided):
                    raise
            self.port = free_port()
            self.url = f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"
            env["WQ_HTTP_PORT"] = str(self.port)
        raise AssertionError("unreachable")

    def launch(self) -> OperatorProcess:
        """Started, not waited for: for a test of what comes before it is ready (stopped as ever)."""
        self._spawn(self._environment())
        return self

    def _environment(self) -> dict[str, str]:
        return {**os.environ, "WQ_HTTP_HOST": "127.0.0.1", "WQ_HTTP_PORT": str(self.port),
               "WQ_ORGANIZATION_ID": "org-test", "WQ_AUTH_CACHE_SECONDS": "1",
               # Short back-offs and resyncs keep the pod tests quick; the planner's unit tests
               # check the real 10 s .. 5 min schedule with explicit times.
               "WQ_WORKER_BACKOFF_SECONDS": "1", "WQ_WORKER_BACKOFF_MAX_SECONDS": "4",
               "WQ_WORKER_RESYNC_SECONDS": "5", "WQ_WORKER_CONTROL_PLANE_URL": "http://workerqueue-operator.test:8080",
               # Short upstream timeouts keep the 502/504 tests quick; their defaults are in settings.py.
               "WQ_UPSTREAM_CONNECT_TIMEOUT_SECONDS": "2", "WQ_UPSTREAM_IDLE_TIMEOUT_SECONDS": "3",
               # No Service in front: a stop need not wait for one (test_drain.py sets it).
               "WQ_HTTP_DRAIN_SECONDS": "0",
               **self._env}

    def _spawn(self, env: dict[str, str]) -> None:
        # Its own session (stopped as a group), and killed with pytest should pytest itself be killed.
        preexec = procs.die_with_parent(os.getpid())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workerqueue_operator.cli", "run", "--kubeconfig", str(self._kubeconfig),
                 *self._args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=procs.chain(preexec, self._limit_fds) if self._fd_limit else preexec)

    def _log_since(self, offset: int) -> str:
        with contextlib.suppress(OSError), self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
        return ""

    def _limit_fds(self) -> None:
        assert self._fd_limit is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self._fd_limit, self._fd_limit))

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log_path.read_text()[-3000:]
            raise AssertionError(f"operator exited with {self.process.returncode}:\n{tail}")
        try:
            return http("GET", f"{self.url}/readyz", timeout=2, context=self.context).status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stopped meanwhile: for a test running an operator of its own that this one would race."""
        running = self.process is not None and self.process.poll() is None
        if running:
            self.stop()
        try:
            yield
        finally:
            if running:
                self.start()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Metric `name`'s samples on /metrics, (labels, value) each."""
        base = self.url if self.metrics_port is None else f"{self.url.rsplit(':', 1)[0]}:{self.metrics_port}"
        text = http("GET", f"{base}/metrics", context=self.context).body.decode()
        matches = (_SAMPLE.match(line) for line in text.splitlines())
        return [(dict(_LABEL.findall(m[2] or "")), float(m[3])) for m in matches if m and m[1] == name]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of metric `name`'s samples that carry `labels`; fails when there is none."""
        values = [value for found, value in self.samples(name) if labels.items() <= found.items()]
        assert values, f"no sample of {name} {labels} on /metrics"
        return sum(values)

    def call(self, method: str, path: str, token: str | None, body: dict[str, Any] | None = None,
             timeout: float = 10) -> Http:
        payload = json.dumps(body).encode() if body is not None else None
        return http(method, f"{self.url}{path}", body=payload, token=token, context=self.context, timeout=timeout)

    def start_worker(self, queue_id: str, token: str | None, body: dict[str, Any] | None = None) -> Http:
        payload = json.dumps(body).encode() if body is not None else None
        return http("POST", f"{self.url}/api/v1/worker-queues/{queue_id}/start", body=payload, token=token,
                    context=self.context)


@pytest.fixture(scope="session")
def operator(
    crd_installed: None, kubeconfig: Path, temporal: TemporalServer, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    # The session's Temporal is the default of queues that name none (as in `dev` and the examples).
    # Scaling queues let idle workers go after 3 s here (60 s by default): the tests wait for it.
    env = {"WQ_TEMPORAL_HOST": temporal.address, "WQ_TEMPORAL_NAMESPACE": temporal.namespace,
           "WQ_SCALE_DOWN_GRACE_SECONDS": "3"}
    proc = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", env=env)
    try:
        yield proc.start()
    finally:
        proc.stop()


class Kube:
    """Thin sync helpers over the official client for test set-up and assertions."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.core = k8s.CoreV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.rbac = k8s.RbacAuthorizationV1Api(api_client)
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.admission = k8s.AdmissionregistrationV1Api(api_client)
        self.authorization = k8s.AuthorizationV1Api(api_client)

    def create_queue(self, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkerQueue",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        return result

    def get_queue(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        return result

    def patch_queue(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})

    def delete_queue(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def put_secret(self, namespace: str, name: str, **data: str) -> None:
        body = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data=data)
        try:
            self.core.create_namespaced_secret(namespace, body)
        except k8s.ApiException as exc:
            if exc.status != 409:
                raise
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            self.core.patch_namespaced_secret(name, namespace, {"data": encoded})

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        secret = self.core.read_namespaced_secret(name, namespace)
        return base64.b64decode(secret.data[key]).decode()

    def condition(self, namespace: str, name: str, type_: str = "Ready") -> dict[str, Any] | None:
        status = self.get_queue(namespace, name).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == type_), None)

    def wait_condition(self, namespace: str, name: str, status: str, reason: str | None = None,
                       timeout: float = 30, type_: str = "Ready") -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            c = self.condition(namespace, name, type_)
            if c and c["status"] == status and (reason is None or c["reason"] == reason):
                return c
            return None
        result: dict[str, Any] = wait_for(matches, timeout=timeout, what=f"{name} {type_}={status} {reason or ''}")
        return result

    def queue_token(self, namespace: str, queue: str) -> str:
        wait_for(lambda: self.has_secret(namespace, f"{queue}-worker-token"), what="generated token Secret")
        return self.secret_value(namespace, f"{queue}-worker-token", "token")

    def has_secret(self, namespace: str, name: str) -> bool:
        return self.secret_or_none(namespace, name) is not None

    def secret_or_none(self, namespace: str, name: str) -> k8s.V1Secret | None:
        try:
            return self.core.read_namespaced_secret(name, namespace)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def forbid_new_secrets(self, namespace: str) -> None:
        """A ResourceQuota that leaves no room for another Secret, enforced (no resource-quota
        controller runs here: its figures are written as it would)."""
        self.core.create_namespaced_resource_quota(namespace, k8s.V1ResourceQuota(
            metadata=k8s.V1ObjectMeta(name="no-secrets"), spec=k8s.V1ResourceQuotaSpec(hard={"secrets": "0"})))
        self.core.patch_namespaced_resource_quota_status("no-secrets", namespace, {"status": {
            "hard": {"secrets": "0"}, "used": {"secrets": "1"}}})

        def refused() -> bool:
            try:
                self.put_secret(namespace, "probe", key="v")
            except k8s.ApiException as exc:
                return exc.status == 403
            self.core.delete_namespaced_secret("probe", namespace)
            return False
        wait_for(refused, what="the quota to be enforced")

    @contextlib.contextmanager
    def held(self, namespace: str, name: str) -> Iterator[None]:
        """The queue held by a finalizer of someone else's while in the block (its deletion waits for it)."""
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   {"metadata": {"finalizers": [HOLD]}})
        try:
            yield
        finally:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                       {"metadata": {"finalizers": None}})

    @contextlib.contextmanager
    def unreachable_webhook(self, namespace: str, name: str, rule: k8s.V1RuleWithOperations) -> Iterator[None]:
        """An admission webhook (`name`) on the namespace's requests that `rule` matches, which the API
        server cannot reach (failurePolicy Fail: cert-manager's or a policy engine's, while it is down):
        each such request fails with a 500 until the block ends."""
        with socket.socket() as closed:  # bound, never listening: connections are refused
            closed.bind(("127.0.0.1", 0))
            self.admission.create_validating_webhook_configuration(k8s.V1ValidatingWebhookConfiguration(
                metadata=k8s.V1ObjectMeta(name=name),
                webhooks=[k8s.V1ValidatingWebhook(
                    name="unreachable.webhook.test", admission_review_versions=["v1"], side_effects="None",
                    failure_policy="Fail", timeout_seconds=2,
                    client_config=k8s.AdmissionregistrationV1WebhookClientConfig(
                        url=f"https://127.0.0.1:{closed.getsockname()[1]}/validate"),
                    namespace_selector=k8s.V1LabelSelector(match_labels={"kubernetes.io/metadata.name": namespace}),
                    rules=[rule])]))
            try:
                yield
            finally:
                self.admission.delete_validating_webhook_configuration(name)

    @contextlib.contextmanager
    def unreachable_status_webhook(self, namespace: str, probe: str) -> Iterator[None]:
        """unreachable_webhook on the namespace's queue status writes: each fails with a 500 until the
        block ends (`probe`, a queue of the namespace, is written to see the webhook called)."""
        rule = k8s.V1RuleWithOperations(api_groups=[GROUP], api_versions=[VERSION], operations=["UPDATE"],
                                        resources=[f"{PLURAL}/status"])

        def failing() -> bool:
            try:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, probe, {"status": {"probe": str(uuid.uuid4())}})
            except k8s.ApiException as exc:
                return exc.status == 500
            return False

        with self.unreachable_webhook(namespace, f"unreachable-status-{namespace}", rule):
            wait_for(failing, what="the webhook to be called")
            yield

    @contextlib.contextmanager
    def unreachable_pod_webhook(self, namespace: str, operation: str = "CREATE") -> Iterator[None]:
        """unreachable_webhook on the namespace's pod creates (or deletes): every one fails with a 500
        until the block ends."""
        rule = k8s.V1RuleWithOperations(api_groups=[""], api_versions=["v1"], operations=[operation],
                                        resources=["pods"])
        probe = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="webhook-probe"),
                          spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="c", image="i")]))

        def failing() -> bool:
            try:
                self.core.create_namespaced_pod(namespace, probe)
            except k8s.ApiException as exc:
                return exc.status == 500 and operation == "CREATE"
            try:
                self.core.delete_namespaced_pod("webhook-probe", namespace, grace_period_seconds=0)
            except k8s.ApiException as exc:
                return exc.status == 500 and operation == "DELETE"
            return False

        try:
            with self.unreachable_webhook(namespace, f"unreachable-{namespace}-{operation.lower()}", rule):
                wait_for(failing, what="the webhook to be called")
                yield
        finally:
            if operation == "DELETE":  # left by the probe, deleted once the webhook is gone
                wait_for(lambda: self._deleted("webhook-probe", namespace), what="the probe pod deleted")

    def _deleted(self, pod: str, namespace: str) -> bool:
        try:
            self.core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
        except k8s.ApiException as exc:
            return exc.status == 404
        return True

    def allow_new_secrets(self, namespace: str) -> None:
        self.core.delete_namespaced_resource_quota("no-secrets", namespace)

    def pods(self, namespace: str, queue: str | None = None, *, alive: bool = False) -> list[k8s.V1Pod]:
        selector = f"agentcontrol.dev/queue={queue}" if queue else "app.kubernetes.io/managed-by=workerqueue-operator"
        items = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        if alive:
            items = [p for p in items if p.status.phase in (None, "Pending", "Running")
                     and p.metadata.deletion_timestamp is None]
        return sorted(items, key=lambda p: p.metadata.name)

    def pod_names(self, namespace: str, queue: str | None = None, *, alive: bool = True) -> list[str]:
        return [p.metadata.name for p in self.pods(namespace, queue, alive=alive)]

    def set_phase(self, namespace: str, pod: str, phase: str, *, exit_code: int | None = None,
                  reason: str | None = None) -> None:
        """What a kubelet would report: there is none, so the test writes pod status itself."""
        status: dict[str, Any] = {"phase": phase}
        if exit_code is not None:
            body = self.core.read_namespaced_pod(pod, namespace)
            status["containerStatuses"] = [{
                "name": c.name, "image": c.image, "imageID": "", "ready": False, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "reason": reason or "Error"}},
            } for c in body.spec.containers]
        elif reason is not None:
            status["reason"] = reason
        self.core.patch_namespaced_pod_status(pod, namespace, {"status": status})

    def workers(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = (self.get_queue(namespace, name).get("status") or {}).get("workers") or {}
        return result

    def queue_exists(self, namespace: str, name: str) -> bool:
        try:
            self.get_queue(namespace, name)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def registrations(self, namespace: str) -> dict[str, k8s.V1Lease]:
        """The worker registrations (Leases) of a namespace, by worker id."""
        items = self.coordination.list_namespaced_lease(
            namespace, label_selector="app.kubernetes.io/component=worker-registration").items
        return {lease.spec.holder_identity: lease for lease in items}

    def grant(self, namespace: str, role: str, *, resource: str, verb: str, queue: str, account: str) -> None:
        """A Role allowing `verb` on `resource` of the queue `queue` only, bound to a ServiceAccount."""
        self.rbac.create_namespaced_role(namespace, k8s.V1Role(
            metadata=k8s.V1ObjectMeta(name=role),
            rules=[k8s.V1PolicyRule(api_groups=[GROUP], resources=[resource], verbs=[verb], resource_names=[queue])]))
        self.rbac.create_namespaced_role_binding(namespace, k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name=role),
            role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=role),
            subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=account, namespace=namespace)]))
        # The API server's authorizer reads RBAC from its own watch: a review a moment later may
        # still deny, and the operator caches answers. Granted once the authorizer says so.
        plural, _, subresource = resource.partition("/")
        review = k8s.V1SubjectAccessReview(spec=k8s.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{namespace}:{account}",
            resource_attributes=k8s.V1ResourceAttributes(namespace=namespace, group=GROUP, resource=plural,
                                                         subresource=subresource or None, verb=verb, name=queue)))
        wait_for(lambda: self.authorization.create_subject_access_review(review).status.allowed,
                 what=f"{account} allowed to {verb} {resource}")

    def events(self, namespace: str, name: str | None = None) -> list[k8s.CoreV1Event]:
        items = self.core.list_namespaced_event(namespace).items
        return [e for e in items if name is None or e.involved_object.name == name]

    def wait_events(self, namespace: str, name: str, reason: str, *, timeout: float = 15) -> list[k8s.CoreV1Event]:
        """The object's Events of `reason`, once there is one: the operator posts Events in the
        background, after the change they tell of (a pod made, a status written) is seen."""
        return wait_for(lambda: [e for e in self.events(namespace, name) if e.reason == reason], timeout=timeout,
                        what=f"a {reason} Event on {namespace}/{name}")


@pytest.fixture
def kube(api_client: k8s.ApiClient) -> Kube:
    return Kube(api_client)


@pytest.fixture(scope="session")
def real_worker() -> Path:
    """The real worker's console script, `kubiya-control-plane-worker`: hack/real-worker.sh installs it
    once per machine (`make test` before the tests, out of their timeouts) or names WQ_REAL_WORKER."""
    code, out = procs.run_script(["bash", str(ROOT / "hack" / "real-worker.sh")], timeout=900)
    if code != 0:
        pytest.fail(f"hack/real-worker.sh failed ({code}); its output is above")
    return Path(out.strip())


@pytest.fixture(scope="session")
def contract() -> dict[str, Any]:
    """The API contract from ../shared/spec (CI lays shared/ beside the clone)."""
    candidates = [ROOT.parent / "shared" / "spec", ROOT / ".." / ".." / "shared" / "spec", Path("/work/shared/spec")]
    for folder in candidates:
        path = folder / "start-worker-for-queue.openapi.yaml"
        if path.exists():
            loaded: dict[str, Any] = yaml.safe_load(path.read_text())
            return loaded
    pytest.fail("the API contract shared/spec/start-worker-for-queue.openapi.yaml was not found beside the repo")


@pytest.fixture
def proxied_kubeconfig(kubeconfig: Path, tmp_path: Path) -> Iterator[tuple[Path, Proxy]]:
    """The admin kubeconfig reaching the API server through a Proxy on loopback (network faults)."""
    config = yaml.safe_load(kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    host, port = re.match(r"https?://([^:/]+):(\d+)", server).groups()  # type: ignore[union-attr]
    proxy = Proxy((host, int(port)))
    config["clusters"][0]["cluster"]["server"] = server.replace(f":{port}", f":{proxy.port}")
    path = tmp_path / "proxied.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    try:
        yield path, proxy
    finally:
        proxy.close()


@pytest.fixture
async def in_process(operator: OperatorProcess, kube: Kube, kubeconfig: Path,
                     namespace: str) -> AsyncIterator[Callable[[str], InProcess]]:
    """Makes InProcess harnesses of queues of `namespace`, the session's operator stopped meanwhile (it
    would act on the same queues)."""
    from tests.integration.inprocess import InProcess  # it uses Kube, from here

    made: list[InProcess] = []

    def make(name: str) -> InProcess:
        made.append(InProcess(kube, kubeconfig, namespace, name))
        return made[-1]

    try:
        with operator.paused():
            yield make
    finally:
        for each in made:
            await each.client.close()
