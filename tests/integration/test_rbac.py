"""The operator authenticated as the chart's ServiceAccount: the chart's RBAC is enough, and no more.

The chart's ServiceAccount and RBAC are rendered with `helm template` and applied for real; the
operator runs with a TokenRequest token of that ServiceAccount (RBAC is on in the test control
plane), with the chart's config file and container arguments, and the essential scenarios of
test_start.py and test_workers.py run against it, reused as they are. Three renderings are covered:
cluster-wide (the default), `watchNamespaces`, and peering (`replicaCount: 2`, one replica here).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from tests.integration import test_start as start_scenarios
from tests.integration import test_workers as worker_scenarios
from tests.integration.conftest import Kube, OperatorProcess, established, free_port, wait_for
from tests.integration.test_chart import CHART, Helm, container_of, find
from workerqueue_operator.devcluster.controlplane import ControlPlane

pytestmark = pytest.mark.usefixtures("crd_installed")

MODES = ["cluster-wide", "watchNamespaces", "peering"]
# An RBAC denial as the API server words it, or kopf's; not other 403s (e.g. a namespace being deleted).
DENIAL = re.compile(r"forbidden: User \S+ cannot|Not enough permissions")


@dataclass
class Deployed:
    """The chart's identity in a namespace, and the operator running as it."""

    mode: str
    namespace: str
    service_account: str
    operator: OperatorProcess

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@pytest.fixture(scope="module")
def helm(k8s_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(k8s_assets / "helm", tmp_path_factory.mktemp("helm-home"))


def service_account_kubeconfig(admin_kubeconfig: Path, token: str, path: Path) -> Path:
    """The admin kubeconfig's server and CA, with the ServiceAccount's token as the only credential."""
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    context = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}],
    }))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module", params=MODES)
def deployed(request: pytest.FixtureRequest, helm: Helm, kubectl: Callable[..., Any], api_client: k8s.ApiClient,
             kubeconfig: Path, crd_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """The chart rendered for a fresh namespace; its identity, RBAC (and peering object) applied; the
    operator started with the chart's config file and arguments and a token of its ServiceAccount."""
    mode: str = request.param
    core = k8s.CoreV1Api(api_client)
    namespace, release = f"rbac-{secrets.token_hex(4)}", f"rbac-{secrets.token_hex(3)}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    values = {"cluster-wide": {}, "watchNamespaces": {"watchNamespaces": [namespace]},
              "peering": {"replicaCount": 2}}[mode]
    docs = helm.template(values, release=release, namespace=namespace)
    applied = [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                                 "RoleBinding", "ClusterKopfPeering", "KopfPeering")]
    if mode == "peering":
        kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
        established(kubectl, "clusterkopfpeerings.kopf.dev")
    manifest = yaml.safe_dump_all(applied)
    kubectl("apply", "-f", "-", input=manifest)
    service_account = find(docs, "ServiceAccount")["metadata"]["name"]
    request_ = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
    token = core.create_namespaced_service_account_token(service_account, namespace, request_).status.token
    folder = tmp_path_factory.mktemp(f"rbac-{mode}")
    config = service_account_kubeconfig(kubeconfig, token, folder / "kubeconfig")
    config_file = folder / "config.yaml"
    config_file.write_text(find(docs, "ConfigMap")["data"]["config.yaml"])
    args = container_of(docs)["args"]
    assert args[0] == "run"
    # OperatorProcess's WQ_* env (loopback ports, short back-offs) still wins over the file.
    operator = OperatorProcess(config, folder / "operator.log", args=args[1:],
                               env={"WQ_CONFIG_FILE": str(config_file), "WQ_METRICS_PORT": str(free_port())})
    try:
        with request.getfixturevalue("operator").paused():
            yield Deployed(mode, namespace, service_account, operator.start())
    finally:
        operator.stop()
        kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifest, check=False)
        with contextlib.suppress(k8s.ApiException):
            core.delete_namespace(namespace)


def run_scenario(scenario: Callable[..., None], deployed: Deployed, kube: Kube, contract: dict[str, Any],
                 kubectl: Callable[..., Any], **more: Any) -> None:
    """A test function of another module, given the fixtures it asks for by name."""
    available = {"operator": deployed.operator, "kube": kube, "namespace": deployed.namespace,
                 "contract": contract, "kubectl": kubectl,
                 "listed_elsewhere": True,  # its own module's parameter: the case with more to read
                 **more}
    scenario(**{name: available[name] for name in inspect.signature(scenario).parameters})


START_SCENARIOS = [
    start_scenarios.test_every_response_field,  # Secret references resolved, Ready, 200 with the values
    start_scenarios.test_defaults_of_a_minimal_queue,
    start_scenarios.test_generated_token_secret_is_owned_by_the_queue,
    start_scenarios.test_error_answers,  # 401, 403, 404, 400, 503, 422, 413
    start_scenarios.test_queue_created_before_its_secret,  # Events, and a Secret that comes later
    start_scenarios.test_kubernetes_identities_are_authorized_by_rbac,  # TokenReview, SubjectAccessReview
    start_scenarios.test_rotation_is_served_within_seconds,
    start_scenarios.test_deleted_queue_stops_serving,
    # workerqueues: get (the old queue's token Secret is deleted once the queue is read as gone)
    start_scenarios.test_a_queue_made_again_before_the_garbage_collector_ran_gets_a_token_of_its_own,
]
WORKER_SCENARIOS = [
    worker_scenarios.test_single_execution_keeps_replicas_alive_and_replaces_finished,  # pods: create, delete
    worker_scenarios.test_ephemeral_queue_is_deleted_after_its_workers_finish,  # workerqueues: delete
    worker_scenarios.test_failures_back_off_then_crash_loop_until_a_worker_succeeds,  # status, Events
    worker_scenarios.test_active_deadline_bounds_an_ephemeral_queue,
    worker_scenarios.test_a_pod_deleted_or_evicted_by_someone_else_is_replaced,
    worker_scenarios.test_suspend_lets_running_workers_finish_and_starts_none,
    worker_scenarios.test_a_pod_whose_token_secret_was_deleted_before_it_started_is_replaced,  # secrets: get
    worker_scenarios.test_a_pod_taken_out_of_its_queue_by_its_labels_keeps_its_token_until_it_is_gone,  # pods: list
]


@pytest.mark.parametrize("scenario", START_SCENARIOS + WORKER_SCENARIOS, ids=lambda s: s.__name__)
def test_scenario_passes_as_the_chart_service_account(deployed: Deployed, scenario: Callable[..., None],
                                                      api_client: k8s.ApiClient, contract: dict[str, Any],
                                                      kubectl: Callable[..., Any], control_plane: ControlPlane):
    run_scenario(scenario, deployed, Kube(api_client), contract, kubectl, control_plane=control_plane)


def test_the_operator_was_never_denied(deployed: Deployed):
    """Runs after the scenarios: whatever they made the operator do, the API server allowed it."""
    denied = [line for line in deployed.operator.logs().splitlines() if DENIAL.search(line)]
    assert not denied, "\n".join(denied[:20])


def can_i(kubectl: Callable[..., Any], deployed: Deployed, verb: str, resource: str,
          namespace: str | None = None) -> bool:
    """`kubectl auth can-i` as the ServiceAccount; `resource/sub` means a subresource (not a name)."""
    resource, _, subresource = resource.partition("/")
    where = ["--all-namespaces"] if namespace == "*" else [f"--namespace={namespace or deployed.namespace}"]
    if subresource:
        where.append(f"--subresource={subresource}")
    done = kubectl("auth", "can-i", verb, resource, f"--as={deployed.user}", *where, check=False)
    assert done.stdout.strip() in ("yes", "no"), done.stdout + done.stderr
    return bool(done.stdout.strip() == "yes")


ALLOWED = [
    ("create", "pods"), ("delete", "pods"), ("watch", "pods"),
    ("list", "secrets"), ("watch", "secrets"), ("get", "secrets"), ("create", "secrets"), ("delete", "secrets"),
    # Leases: worker registrations and refusal records (read back, renewed by patch, replaced by update).
    ("get", "leases.coordination.k8s.io"), ("list", "leases.coordination.k8s.io"),
    ("create", "leases.coordination.k8s.io"), ("update", "leases.coordination.k8s.io"),
    ("patch", "leases.coordination.k8s.io"), ("delete", "leases.coordination.k8s.io"),
    ("watch", "leases.coordination.k8s.io"),
    ("patch", "workerqueues.agentcontrol.dev/status"),
    ("watch", "workerqueues.agentcontrol.dev"), ("delete", "workerqueues.agentcontrol.dev"),
    ("get", "workerqueues.agentcontrol.dev"),
    ("create", "events"),
]
DENIED = [
    # Secrets: read, create token Secrets, delete a worker pod's own; never changed in place.
    ("update", "secrets"), ("patch", "secrets"), ("deletecollection", "secrets"),
    # Kinds it does not use at all.
    ("list", "configmaps"), ("get", "configmaps"), ("create", "deployments.apps"), ("list", "deployments.apps"),
    ("get", "serviceaccounts"), ("create", "serviceaccounts/token"), ("create", "pods/exec"),
    ("get", "pods/log"), ("create", "rolebindings.rbac.authorization.k8s.io"), ("update", "pods"),
    # WorkerQueues are the users' to create and change; the operator writes status, deletes finished ones.
    ("create", "workerqueues.agentcontrol.dev"), ("update", "workerqueues.agentcontrol.dev"),
    ("patch", "workerqueues.agentcontrol.dev"), ("update", "workerqueues.agentcontrol.dev/status"),
    # Events are posted (core/v1, as kopf does too), never changed afterwards.
    ("patch", "events"), ("create", "events.events.k8s.io"),
]
DENIED_CLUSTER = [
    ("delete", "namespaces"), ("create", "namespaces"), ("get", "namespaces"), ("list", "nodes"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("update", "customresourcedefinitions.apiextensions.k8s.io"),
    ("get", "customresourcedefinitions.apiextensions.k8s.io"),  # kopf lists and watches them only
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"), ("impersonate", "users"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"), ("bind", "clusterroles.rbac.authorization.k8s.io"),
]
ALLOWED_CLUSTER = [
    ("create", "tokenreviews.authentication.k8s.io"), ("create", "subjectaccessreviews.authorization.k8s.io"),
]


def test_least_privilege(deployed: Deployed, kubectl: Callable[..., Any]):
    wrong = [f"can {v} {r}" for v, r in DENIED if can_i(kubectl, deployed, v, r)]
    wrong += [f"cannot {v} {r}" for v, r in ALLOWED if not can_i(kubectl, deployed, v, r)]
    wrong += [f"can {v} {r} (cluster)" for v, r in DENIED_CLUSTER if can_i(kubectl, deployed, v, r)]
    wrong += [f"cannot {v} {r} (cluster)" for v, r in ALLOWED_CLUSTER if not can_i(kubectl, deployed, v, r)]
    # Elsewhere: everything in cluster-wide mode, nothing with watchNamespaces; namespaces never.
    everywhere = deployed.mode != "watchNamespaces"
    if can_i(kubectl, deployed, "list", "namespaces"):
        wrong.append("can list namespaces")
    for verb, resource in (("list", "secrets"), ("create", "pods"), ("delete", "workerqueues.agentcontrol.dev")):
        if can_i(kubectl, deployed, verb, resource, "kube-system") != everywhere:
            wrong.append(f"{verb} {resource} in kube-system: expected {everywhere}")
        if can_i(kubectl, deployed, verb, resource, "*") != everywhere:
            wrong.append(f"{verb} {resource} in all namespaces: expected {everywhere}")
    # kopf discovers resources (CRDs) only when it scans, which it does not for given namespaces.
    if can_i(kubectl, deployed, "watch", "customresourcedefinitions.apiextensions.k8s.io") != everywhere:
        wrong.append(f"watch customresourcedefinitions: expected {everywhere}")
    # get: a standby reads the peering object before it takes over for a peer that expired.
    for verb in ("get", "patch"):
        if can_i(kubectl, deployed, verb, "clusterkopfpeerings.kopf.dev") != (deployed.mode == "peering"):
            wrong.append(f"{verb} clusterkopfpeerings: expected {deployed.mode == 'peering'}")
    assert not wrong, f"{deployed.user} ({deployed.mode}): {wrong}"


def test_peering_object_is_kept_alive(deployed: Deployed, api_client: k8s.ApiClient):
    """kopf, in peering mode, writes its identity into the chart's peering object."""
    if deployed.mode != "peering":
        pytest.skip("peering mode only")
    custom = k8s.CustomObjectsApi(api_client)
    name = deployed.service_account  # the release's full name, like the peering object's

    def peers() -> dict[str, Any]:
        body = custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name)
        return dict(body.get("status") or {})

    assert wait_for(peers, timeout=30, what="kopf's keep-alive in the ClusterKopfPeering")
