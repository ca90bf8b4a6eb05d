"""One team's namespace cannot take the operator from the others, standalone or under peering.

The operator watching named namespaces holds a Role in each. A namespace's admins may delete what is in
their namespace, RoleBindings included: the operator then may no longer read that namespace, and
everything else it serves must go on.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from tests.integration.conftest import Kube, OperatorProcess, established, free_port, http, wait_for
from tests.integration.test_chart import CHART, Helm, container_of, find
from tests.integration.test_rbac import service_account_kubeconfig

pytestmark = pytest.mark.usefixtures("crd_installed")

UNREADY_SECONDS = 3
"""The operator's watch_unready_seconds here: a failing watch that counts turns /readyz 503 after it."""
KOPF_GIVES_UP_SECONDS = sum((1, 1, 2, 3, 5, 8, 13, 21))
"""kopf's default back-offs for a failing request, after which it gives up."""


@pytest.fixture(scope="module")
def helm(k8s_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(k8s_assets / "helm", tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(params=["standalone", "peering"])
def two_teams(helm: Helm, kubectl: Callable[..., Any], api_client: k8s.ApiClient, kubeconfig: Path,
              tmp_path: Path, request: pytest.FixtureRequest
              ) -> Iterator[tuple[OperatorProcess, str, str, dict[str, Any]]]:
    """The chart for two watched namespaces (the first also the release's), applied; the operator run
    as its ServiceAccount (with peering: one replica of two). Yields the operator, the two namespaces
    and the second one's RoleBinding."""
    core = k8s.CoreV1Api(api_client)
    first, second = f"team-a-{secrets.token_hex(3)}", f"team-b-{secrets.token_hex(3)}"
    for name in (first, second):
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    values: dict[str, Any] = {"watchNamespaces": [first, second]}
    if request.param == "peering":
        values["replicaCount"] = 2
        kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
        established(kubectl, "clusterkopfpeerings.kopf.dev")
    docs = helm.template(values, release=f"t-{secrets.token_hex(3)}", namespace=first)
    applied = [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                                 "RoleBinding", "ClusterKopfPeering")]
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(applied))
    binding = next(d for d in applied if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == second)
    account = find(docs, "ServiceAccount")["metadata"]["name"]
    token_request = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[],
                                                                                  expiration_seconds=3600))
    token = core.create_namespaced_service_account_token(account, first, token_request).status.token
    config = service_account_kubeconfig(kubeconfig, token, tmp_path / "kubeconfig")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(find(docs, "ConfigMap")["data"]["config.yaml"])
    operator = OperatorProcess(config, tmp_path / "operator.log", args=container_of(docs)["args"][1:], env={
        "WQ_CONFIG_FILE": str(config_file), "WQ_METRICS_PORT": str(free_port()),
        "WQ_WATCH_UNREADY_SECONDS": str(UNREADY_SECONDS),
        "WQ_TEMPORAL_HOST": "127.0.0.1:9", "WQ_TEMPORAL_NAMESPACE": "agents"})  # nothing listens: not needed
    try:
        with request.getfixturevalue("operator").paused():
            yield operator.start(), first, second, binding
    finally:
        operator.stop()
        kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=yaml.safe_dump_all(applied),
                check=False)
        for name in (first, second):
            with contextlib.suppress(k8s.ApiException):
                core.delete_namespace(name)


def test_a_namespace_that_refuses_the_operator_does_not_take_it_from_the_others(
        two_teams: tuple[OperatorProcess, str, str, dict[str, Any]], kube: Kube, kubectl: Callable[..., Any]):
    operator, first, second, binding = two_teams
    kube.create_queue(first, "a", queueId=f"a-{first}")
    kube.create_queue(second, "b", queueId=f"b-{second}")
    kube.wait_condition(first, "a", "True")
    kube.wait_condition(second, "b", "True")
    kube.rbac.delete_namespaced_role_binding(binding["metadata"]["name"], second)
    # Watches open already go on (the API server checks access when one begins): a restart begins all.
    operator.stop()
    restarted = time.monotonic()
    operator.start()
    # The other team is served as before: /start, a queue made now, its pods.
    assert operator.start_worker(f"a-{first}", kube.queue_token(first, "a")).status == 200
    kube.create_queue(first, "later", queueId=f"later-{first}", singleExecution=True)
    kube.wait_condition(first, "later", "True")
    wait_for(lambda: "later-w0" in kube.pod_names(first), what="the new queue's worker pod")
    # kopf gives a refused watch about a minute of retries, then ended it, and the operator with it.
    wait_for(lambda: "is refused" in operator.logs(), timeout=KOPF_GIVES_UP_SECONDS + 60,
             what="kopf's refused pod watch begun again")
    assert restarted + UNREADY_SECONDS < time.monotonic()  # and a failing watch that counted turned /readyz 503
    assert operator.process is not None and operator.process.poll() is None, operator.logs()[-3000:]
    assert http("GET", f"{operator.url}/readyz").status == 200
    assert operator.metric("workerqueue_active_replica") == 1  # with peering too: nothing to wait for
    kube.core.delete_namespaced_pod("later-w0", first)  # kopf's pod watch tells the supervisor
    wait_for(lambda: kube.pod_names(first) == ["later-w1"], what="the deleted pod replaced")
    assert operator.start_worker(f"b-{second}", kube.queue_token(second, "b")).status == 401  # its token unread
    # Its access given back, the namespace is served again.
    kubectl("apply", "-f", "-", input=yaml.safe_dump(binding))
    wait_for(lambda: operator.start_worker(f"b-{second}", kube.queue_token(second, "b")).status == 200,
             timeout=60, what="the namespace served again")
