"""The Helm chart: lint, template, the real API server's dry-run, and install/upgrade/uninstall.

`helm lint`/`helm template` and the dry-runs cover the defaults and every option. The release
lifecycle runs on a control plane of its own: uninstalling deletes the WorkerQueue CRD (and with it
every WorkerQueue), which must not happen to the cluster the other tests share.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from tests.integration.conftest import established, wait_for
from workerqueue_operator import cli
from workerqueue_operator.devcluster.controlplane import ControlPlane
from workerqueue_operator.models import crd
from workerqueue_operator.models.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "workerqueue-operator"
DOCS = ROOT / "docs" / "helm.md"
CRD_TEMPLATE = Path("templates") / "crds" / "workerqueues.yaml"
CRD_NAME = "workerqueues.agentcontrol.dev"

# -- helm ----------------------------------------------------------------------------------------


@dataclass
class Helm:
    """The assets' helm, with its config, cache and data kept out of $HOME."""

    binary: Path
    home: Path

    def __call__(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HELM_CONFIG_HOME": str(self.home / "config"),
               "HELM_CACHE_HOME": str(self.home / "cache"), "HELM_DATA_HOME": str(self.home / "data")}
        env.pop("KUBECONFIG", None)
        command = [str(self.binary), *args]
        if kubeconfig is not None:
            command.append(f"--kubeconfig={kubeconfig}")
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited with {done.returncode}:\n{done.stderr}{done.stdout}")
        return done

    def values_file(self, values: dict[str, Any]) -> Path:
        path = self.home / f"values-{secrets.token_hex(4)}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def template(self, values: dict[str, Any], *, release: str = "wq", namespace: str = "wq-system",
                 chart: Path = CHART, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        out = self("template", release, str(chart), f"--namespace={namespace}",
                   f"--values={self.values_file(values)}", *extra).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session")
def helm(k8s_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(k8s_assets / "helm", tmp_path_factory.mktemp("helm-home"))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None,
         namespace: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
             and (namespace is None or d["metadata"].get("namespace") == namespace)]
    assert len(found) == 1, f"expected one {kind} {namespace or ''}/{name or '*'}, got {len(found)}"
    return found[0]


def api_service(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Service of the HTTP API (not the one of /metrics)."""
    (service,) = [d for d in docs
                  if d["kind"] == "Service" and "agentcontrol.dev/endpoint" not in d["metadata"]["labels"]]
    return service


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def config_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"])
    return loaded


def container_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs} of a (Cluster)Role."""
    result: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule or rule["resources"] == ["secrets"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                result.setdefault((group, resource), set()).update(rule["verbs"])
    return result


# -- the options -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """Where an option renders to: the release namespace, and two more to watch."""

    release: str
    namespace: str
    watched: tuple[str, str]


def option_values(option: str, scope: Scope) -> dict[str, Any]:
    tls = {"tls": {"enabled": True, "secretName": "operator-tls"}}
    network_policy = {"networkPolicy": {
        "enabled": True,
        "ingressFrom": [{"namespaceSelector": {"matchLabels": {"agentcontrol.dev/workers": "true"}}},
                        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
        "metricsFrom": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}],
        "dnsTo": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    }}
    pdb = {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"}}
    service_monitor = {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}}}
    watch = {"watchNamespaces": list(scope.watched),
             "temporal": {"apiKeySecret": {"name": "temporal-default", "key": "api-key"}}}
    peering = {"replicaCount": 2}
    config = {
        "organizationId": "org-42",
        "temporal": {"host": "temporal.internal:7233", "namespace": "agents",
                     "apiKeySecret": {"namespace": scope.watched[0], "name": "temporal", "key": "api-key"}},
        "litellm": {"url": "http://litellm.internal:4000", "apiKeySecret": {"name": "litellm", "key": "key"}},
        "upstream": {"url": "https://api.example.com", "apiKeySecret": {"name": "org-key", "key": "api-key"},
                     "idleTimeoutSeconds": 30, "namespaces": ["trusted", "trusted"]},
        "publicUrl": "https://cp.example.com",
        "tokenReviewAudiences": ["workerqueue"],
        "authCacheSeconds": 5,
        "authReviewTimeoutSeconds": 3,
        "http": {"idleTimeoutSeconds": 20, "bodyTimeoutSeconds": 10, "maxConnections": 1000, "reservedFds": 128},
        "statusResyncSeconds": 120,
        "worker": {"image": "registry.example.com/agent-worker:1.2.3", "command": ["agent", "start"],
                   "podTemplate": {"spec": {"nodeSelector": {"pool": "agents"},
                                            "containers": [{"name": "worker", "resources": {
                                                "requests": {"cpu": "250m", "memory": "512Mi"}}}]}}},
        "extraConfig": {"worker_backoff_seconds": 20},
    }
    options: dict[str, dict[str, Any]] = {
        "defaults": {},
        "tls": tls,
        "networkPolicy": network_policy,
        "podDisruptionBudget": pdb,
        "serviceMonitor": service_monitor,
        "watchNamespaces": watch,
        "peering": peering,
        "peeringWatchNamespaces": {**peering, **watch},
        "config": config,
        "bringYourOwn": {"crds": {"install": False}, "rbac": {"create": False},
                         "serviceAccount": {"create": False, "name": "existing-operator"}},
        "everything": {**tls, **network_policy, **pdb, **service_monitor, **watch, **peering,
                       **{k: v for k, v in config.items() if k != "temporal"},
                       "serviceAccount": {"name": "custom-sa", "annotations": {"example.com/role": "operator"}},
                       "commonLabels": {"team": "agents"}, "podLabels": {"tier": "control"},
                       "image": {"repository": "registry.example.com/wq", "digest": "sha256:" + "a" * 64},
                       "imagePullSecrets": [{"name": "pull"}], "verbose": True,
                       "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
                       "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                      "whenUnsatisfiable": "ScheduleAnyway",
                                                      "labelSelector": {"matchLabels": {"app": "x"}}}],
                       "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                       "service": {"type": "ClusterIP", "port": 80, "annotations": {"a": "b"}}},
    }
    return copy.deepcopy(options[option])


OPTIONS = ["defaults", "tls", "networkPolicy", "podDisruptionBudget", "serviceMonitor", "watchNamespaces",
           "peering", "peeringWatchNamespaces", "config", "bringYourOwn", "everything"]
OFFLINE = Scope(release="wq", namespace="wq-system", watched=("team-a", "team-b"))


@pytest.mark.parametrize("option", OPTIONS)
def test_lint(helm: Helm, option: str):
    values = helm.values_file(option_values(option, OFFLINE))
    done = helm("lint", "--strict", str(CHART), f"--namespace={OFFLINE.namespace}", f"--values={values}")
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(("values", "message"), [
    ({"replicaCount": 0}, "replicaCount"),
    ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
    ({"tls": {"enabled": True}}, "secretName"),
    ({"serviceMonitr": {"enabled": True}}, "serviceMonitr"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"publicUrl": "cp.example.com"}, "publicUrl"),
    ({"upstream": {"url": "https://user:pw@api.example.com"}}, "upstream"),
    ({"upstream": {"url": "https://api.example.com"}}, "apiKeySecret"),
    ({"upstream": {"idleTimeoutSeconds": 0}}, "idleTimeoutSeconds"),
    ({"http": {"drainSeconds": 25}}, "terminationGracePeriodSeconds must be at least http.drainSeconds + 10"),
    ({"http": {"drainSeconds": -1}}, "drainSeconds"),
    ({"temporal": {"apiKeySecret": {"namespace": "Not_Valid.ns", "name": "t", "key": "k"}}}, "namespace"),
    ({"livenessProbe": {"successThreshold": 3}}, "successThreshold"),
    # The probes and the Service would not follow; a typo would crash-loop the pod.
    ({"extraConfig": {"http_port": 9090}}, "additional properties 'http_port' not allowed"),
    ({"extraConfig": {"worker_backof_seconds": 20}}, "additional properties 'worker_backof_seconds' not allowed"),
    # The Roles that read the Secret, and the grace period that covers the drain, would not follow.
    ({"extraConfig": {"temporal_api_key_secret": {"namespace": "ops", "name": "t", "key": "k"}}},
     "additional properties 'temporal_api_key_secret' not allowed"),
    ({"extraConfig": {"http_drain_seconds": 60}}, "additional properties 'http_drain_seconds' not allowed"),
    # Set around the chart, the operator starts without the upstream's key and crash-loops.
    ({"extraConfig": {"upstream_url": "https://api.example.com"}}, "additional properties 'upstream_url' not allowed"),
    # Env is read over the config file: the probes, the Service and the Roles would not follow.
    ({"extraEnv": [{"name": "WQ_NAMESPACES", "value": "team-a"}]}, "/extraEnv/0/name"),
    ({"extraEnv": [{"name": "WQ_HTTP_PORT", "value": "9090"}]}, "/extraEnv/0/name"),
    # The Deployment selects its pods by the chart's labels: a second value breaks it.
    ({"podLabels": {"app.kubernetes.io/name": "x"}}, "invalid propertyName 'app.kubernetes.io/name'"),
    ({"commonLabels": {"app.kubernetes.io/instance": "x"}}, "invalid propertyName 'app.kubernetes.io/instance'"),
    ({"podLabels": {"team": "a"}, "commonLabels": {"team": "b"}}, "podLabels.team is in commonLabels too"),
    ({"serviceMonitor": {"enabled": True, "labels": {"release": "a"}}, "commonLabels": {"release": "b"}},
     "serviceMonitor.labels.release is in commonLabels too"),
    ({"serviceMonitor": {"enabled": True, "labels": {"helm.sh/chart": "x"}}}, "invalid propertyName 'helm.sh/chart'"),
    # The chart's own: a changed config would no longer roll the pods.
    ({"podAnnotations": {"checksum/config": "pinned"}}, "invalid propertyName 'checksum/config'"),
    # A typo the API server would drop with a mere warning, leaving the pod without its limits.
    ({"resources": {"limit": {"memory": "1Gi"}}}, "additional properties 'limit' not allowed"),
    ({"updateStrategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}}, "cannot both be 0"),
    ({"updateStrategy": {"type": "Rolling"}}, "updateStrategy"),
    ({"updateStrategy": {"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}}, "may not be set with type Recreate"),
    # A budget that allows no eviction: every node drain would wait for good.
    ({"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}, "leaves no pod of 1 replicas evictable"),
    ({"podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}}, "leaves no pod of 1 replicas evictable"),
    ({"replicaCount": 2, "podDisruptionBudget": {"enabled": True, "minAvailable": 2}},
     "leaves no pod of 2 replicas evictable"),
    ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": 0}}, "maxUnavailable 0 leaves no pod evictable"),
    # The operator would refuse the template at start and crash-loop: refused at install instead.
    ({"worker": {"podTemplate": {"metadata": {"annotations": {"prometheus.io/port": 8080}}}}}, "prometheus.io~1port"),
    ({"worker": {"podTemplate": {"metadata": {"labels": {"tier": 1}}}}}, "tier"),
    ({"worker": {"podTemplate": {"spec": {"hostNetwork": True}}}}, "hostNetwork"),
    ({"worker": {"podTemplate": {"spec": {"containers": [{"name": "worker", "env": [{"value": "x"}]}]}}}},
     "name"),
    ({"worker": {"podTemplate": {"spec": {"containers": [{"name": "worker", "env": [{"name": ""}]}]}}}},
     "/env/0/name"),
    ({"worker": {"podTemplate": {"spec": {"containers": [{"name": "worker", "env": [{"name": 3}]}]}}}},
     "/env/0/name"),
    ({"worker": {"podTemplate": {"spec": {"hostNetwork": "true"}}}}, "hostNetwork"),
    ({"litellm": {"url": "https://"}}, "/litellm/url"),
    ({"litellm": {"url": "http://a b"}}, "/litellm/url"),
    # extraConfig's values held to the operator's own Settings (generated from them).
    ({"extraConfig": {"peering_lifetime_seconds": 1}}, "/extraConfig/peering_lifetime_seconds"),
    ({"extraConfig": {"worker_backoff_seconds": "soon"}}, "/extraConfig/worker_backoff_seconds"),
    ({"extraConfig": {"worker_command": 3}}, "/extraConfig/worker_command"),
    # null is Helm's way to unset a default: a value the operator cannot do without is required.
    ({"authCacheSeconds": None}, "missing property 'authCacheSeconds'"),
    ({"tokenReviewAudiences": None}, "missing property 'tokenReviewAudiences'"),
    ({"http": {"maxConnections": None}}, "missing property 'maxConnections'"),
    ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": None}}, "set minAvailable or maxUnavailable"),
    # prometheus-operator refuses a ServiceMonitor whose scrape may outlast its interval.
    ({"serviceMonitor": {"enabled": True, "interval": "5s"}}, "scrapeTimeout 10s is longer than"),
    ({"serviceMonitor": {"enabled": True, "interval": "1m", "scrapeTimeout": "1m500ms"}}, "is longer than"),
])
def test_wrong_values_are_refused(helm: Helm, values: dict[str, Any], message: str):
    """By the schema, or by the templates' own checks (which `helm lint` only reports as INFO)."""
    done = helm("template", "wq", str(CHART), f"--values={helm.values_file(values)}", check=False)
    assert done.returncode != 0 and message in done.stdout + done.stderr



NULLABLE_VALUES = {
    "nameOverride", "fullnameOverride", "commonLabels", "publicUrl", "extraConfig",
    "temporal.apiKeySecret", "litellm.apiKeySecret", "upstream.url", "upstream.apiKeySecret",
    "worker.image", "worker.command", "worker.podTemplate", "worker.controlPlaneUrl",
    "image.tag", "image.digest", "image.pullPolicy", "imagePullSecrets",
    "serviceAccount.name", "serviceAccount.annotations", "podAnnotations", "podLabels",
    "podSecurityContext", "securityContext", "resources", "priorityClassName", "nodeSelector", "tolerations",
    "affinity", "topologySpreadConstraints", "updateStrategy", "extraEnv", "service.annotations",
    "service.loadBalancerSourceRanges", "service.externalTrafficPolicy",
    "networkPolicy.ingressFrom", "networkPolicy.egress", "networkPolicy.dnsTo", "podDisruptionBudget.minAvailable",
    "metricsPort", "networkPolicy.metricsFrom",
    "podDisruptionBudget.maxUnavailable", "serviceMonitor.labels", "serviceMonitor.tlsConfig",
}
"""values.yaml keys whose null (Helm's way to unset a default) means "none", and what is inside them;
the values schema requires every other key, so that a null there fails `helm install` by name
rather than rendering a config the operator refuses at start (its pods crash-looping)."""


def _value_paths(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path, value
            if path not in NULLABLE_VALUES:
                yield from _value_paths(value, path)


def test_every_value_is_required_by_the_schema_unless_null_means_none():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, _ in _value_paths(defaults):
        *parents, key = path.split(".")
        node = schema
        for parent in parents:
            node = node["properties"][parent]
        assert (key in node.get("required", [])) != (path in NULLABLE_VALUES), path


@pytest.mark.parametrize("path", sorted(NULLABLE_VALUES))
def test_a_value_set_to_null_renders_what_the_operator_accepts(helm: Helm, path: str):
    values: dict[str, Any] = {}
    node = values
    *parents, key = path.split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
    node[key] = None
    if parents and parents[0] in ("podDisruptionBudget", "serviceMonitor", "networkPolicy"):
        values[parents[0]]["enabled"] = True
    if path == "podDisruptionBudget.maxUnavailable":
        values["podDisruptionBudget"]["minAvailable"] = "50%"
        values["replicaCount"] = 2
    docs = helm.template(values)
    Settings.model_validate(config_of(docs))
    if path.startswith("podDisruptionBudget."):
        budget = find(docs, "PodDisruptionBudget")["spec"]
        assert budget.get("minAvailable") is not None or budget.get("maxUnavailable") is not None, budget


def test_a_required_value_set_to_null_is_refused_by_name(helm: Helm):
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, _ in _value_paths(defaults):
        if path in NULLABLE_VALUES:
            continue
        *parents, key = path.split(".")
        values: dict[str, Any] = {}
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = None
        done = helm("template", "wq", str(CHART), f"--values={helm.values_file(values)}", check=False)
        assert done.returncode != 0 and f"missing property '{key}'" in done.stderr, (path, done.stderr[-300:])

def test_extra_config_takes_a_list_as_its_comma_separated_string_too(helm: Helm):
    """As the operator reads it (and as the README writes WQ_IGNORED_SECRET_TYPES)."""
    docs = helm.template({"extraConfig": {"ignored_secret_types": "helm.sh/release.v1,kubernetes.io/dockercfg",
                                          "worker_command": ["kubiya", "worker", "start"]}})
    settings = Settings.model_validate(config_of(docs))
    assert settings.ignored_secret_types == ("helm.sh/release.v1", "kubernetes.io/dockercfg")

def test_defaults(helm: Helm):
    docs = helm.template({}, release="wq", namespace="wq-system")
    assert kinds(docs) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "CustomResourceDefinition",
                           "Deployment", "Service", "Service", "ServiceAccount"]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "workerqueue-operator", doc["kind"]
        if doc["kind"] != "CustomResourceDefinition":  # generated; the same in every release
            assert labels["app.kubernetes.io/instance"] == "wq", doc["kind"]
            assert labels["app.kubernetes.io/managed-by"] == "Helm", doc["kind"]
    assert find(docs, "CustomResourceDefinition")["metadata"]["name"] == CRD_NAME

    deployment = find(docs, "Deployment", "wq-workerqueue-operator", "wq-system")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    assert pod["serviceAccountName"] == "wq-workerqueue-operator"
    assert pod["enableServiceLinks"] is False  # no WQ_* variables from Services named wq-*
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = container_of(docs)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTP"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTP"}
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container["image"] == f"workerqueue-operator:{app_version}"
    assert container["args"] == ["run"]
    env = {e["name"]: e for e in container["env"]}
    assert env["WQ_CONFIG_FILE"]["value"] == "/etc/workerqueue-operator/config/config.yaml"
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/workerqueue-operator/config": "config", "/tmp": "tmp"}

    service = find(docs, "Service", "wq-workerqueue-operator")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
    # /metrics on a port of its own, in the cluster only: its labels name every queue, which workers
    # need not read.
    metrics = find(docs, "Service", "wq-workerqueue-operator-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and metrics["spec"]["selector"] == service["spec"]["selector"]
    assert metrics["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "http"}]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]

    config = config_of(docs)
    assert config["worker_control_plane_url"] == "http://wq-workerqueue-operator.wq-system.svc:8080"
    assert config["namespaces"] == [] and config["http_port"] == 8080 and config["metrics_port"] == 9090
    # A stop drains the HTTP API for 5 s, within the pod's 30 s.
    assert config["http_drain_seconds"] == 5 and pod["terminationGracePeriodSeconds"] == 30
    assert "public_url" not in config and "worker_image" not in config  # the operator's defaults apply
    assert "worker_pod_template" not in config


@pytest.mark.parametrize("naming", ["release", "fullnameOverride"])
def test_every_service_name_is_a_dns_label_however_long_the_release_name(helm: Helm, naming: str):
    # Helm takes release names of up to 53 characters and truncates the full name to 63: a suffix
    # added after that made a Service name the API server refuses (DNS-1035 labels: 63 at most).
    scope = Scope(release="wq", namespace="wq-system", watched=("team-a", "team-b"))
    values = option_values("everything", scope)
    release = "agents-control-plane-production-eu-west-1-cluster-a"[:53]
    if naming == "fullnameOverride":
        values["fullnameOverride"] = "o" * 63
        release = "wq"
    docs = helm.template(values, release=release, namespace=scope.namespace)
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    assert len(names) == 2
    for name in names:
        assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def test_names_of_digits_render_as_strings(helm: Helm):
    """`2024` is a valid namespace name (and Secret, ServiceAccount, PriorityClass name); written
    unquoted, YAML reads it as a number, which the API server refuses in every such field."""
    digits = Scope(release="wq", namespace="2024", watched=("123", "team-a"))
    values = option_values("everything", digits)
    values["serviceAccount"]["name"] = "4242"
    values["tls"]["secretName"] = "777"
    values["priorityClassName"] = "555"
    docs = helm.template(values, namespace=digits.namespace)

    def leaves(node: Any) -> Iterator[Any]:
        if isinstance(node, dict | list):
            for value in node.values() if isinstance(node, dict) else node:
                yield from leaves(value)
        else:
            yield node

    assert not {2024, 123, 4242, 777, 555} & {leaf for doc in docs for leaf in leaves(doc) if type(leaf) is int}
    deployment = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert (deployment["serviceAccountName"], deployment["priorityClassName"]) == ("4242", "555")

    def namespaces(node: Any) -> list[Any]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "namespace" and not isinstance(v, dict | list)] + [
                found for v in node.values() for found in namespaces(v)]
        if isinstance(node, list):
            return [found for item in node for found in namespaces(item)]
        return []

    found = [value for doc in docs for value in namespaces(doc)]
    assert {"2024", "123"} <= set(found)
    assert all(isinstance(value, str) for value in found), sorted(map(repr, found))


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(helm: Helm):
    docs = helm.template({})
    role = find(docs, "ClusterRole")
    assert rules_of(role) == {
        ("agentcontrol.dev", "workerqueues"): {"get", "list", "watch", "delete"},
        ("agentcontrol.dev", "workerqueues/status"): {"patch"},
        ("agentcontrol.dev", "workerqueues/finalizers"): {"update"},
        ("", "secrets"): {"get", "list", "watch", "create", "delete"},
        ("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "update", "patch", "delete"},
        ("", "pods"): {"list", "watch", "create", "delete"},
        ("", "events"): {"create"},  # core/v1 Events, ours and kopf's: posted, never patched
        ("authentication.k8s.io", "tokenreviews"): {"create"},
        ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    }
    binding = find(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "wq-workerqueue-operator",
                                    "namespace": "wq-system"}]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_watch_namespaces_gives_roles_there_and_little_cluster_wide(helm: Helm):
    docs = helm.template(option_values("watchNamespaces", OFFLINE))
    assert rules_of(find(docs, "ClusterRole")) == {
        ("authentication.k8s.io", "tokenreviews"): {"create"},
        ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
    }  # no CRD discovery: kopf scans nothing when it watches given namespaces
    for namespace in OFFLINE.watched:
        role = find(docs, "Role", "wq-workerqueue-operator", namespace)
        assert ("", "secrets") in rules_of(role) and ("", "pods") in rules_of(role)
        assert ("kopf.dev", "kopfpeerings") not in rules_of(role)
        binding = find(docs, "RoleBinding", "wq-workerqueue-operator", namespace)
        assert binding["subjects"][0]["namespace"] == "wq-system"
    # The operator-wide default Temporal key lives in the release namespace: readable by name only.
    secrets_role = find(docs, "Role", "wq-workerqueue-operator-wq-system-default-secrets", "wq-system")
    assert secrets_role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                                      "resourceNames": ["temporal-default"], "verbs": ["get"]}]
    assert config_of(docs)["namespaces"] == list(OFFLINE.watched)


def test_bring_your_own_crd_service_account_and_rbac(helm: Helm):
    docs = helm.template(option_values("bringYourOwn", OFFLINE))
    assert kinds(docs) == ["ConfigMap", "Deployment", "Service", "Service"]
    assert find(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing-operator"


def test_tls(helm: Helm):
    docs = helm.template(option_values("tls", OFFLINE))
    container = container_of(docs)
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    volumes = {v["name"]: v for v in find(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "operator-tls"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config = config_of(docs)
    assert config["tls_cert_file"] == f"{mounts['tls']}/tls.crt"
    assert config["tls_key_file"] == f"{mounts['tls']}/tls.key"
    assert config["worker_control_plane_url"].startswith("https://")
    assert api_service(docs)["spec"]["ports"][0]["appProtocol"] == "https"
    assert find(docs, "Service", "wq-workerqueue-operator-metrics")["spec"]["ports"][0]["appProtocol"] == "https"


def test_network_policy(helm: Helm):
    docs = helm.template(option_values("networkPolicy", OFFLINE))
    policy = find(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == find(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ingress, metrics = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}] and len(ingress["from"]) == 2
    # The metrics port has its own sources: the workers that may reach /start are not among them.
    assert metrics == {"ports": [{"port": "metrics", "protocol": "TCP"}],
                       "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]}
    # 5353: where the policy meets the resolver's pods after the Service's mapping (OpenShift).
    assert {"port": 53, "protocol": "UDP"} in policy["egress"][0]["ports"]
    assert {"port": 5353, "protocol": "UDP"} in policy["egress"][0]["ports"]
    # DNS to the resolver only when told where it runs (else any destination, the internet's too).
    assert policy["egress"][0]["to"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "kube-system"}}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert policy["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    docs = helm.template({"networkPolicy": {"enabled": True, "egress": [{"ports": [{"port": 443}]}]}})
    assert "to" not in find(docs, "NetworkPolicy")["spec"]["egress"][0]
    # metricsFrom unset: the metrics port takes the HTTP port's sources, as /metrics had on that port
    # (an upgrade must not open it to every source).
    workers = [{"namespaceSelector": {"matchLabels": {"agentcontrol.dev/workers": "true"}}}]
    docs = helm.template({"networkPolicy": {"enabled": True, "ingressFrom": workers}})
    assert [rule.get("from") for rule in find(docs, "NetworkPolicy")["spec"]["ingress"]] == [workers, workers]
    # Without egress rules, egress is not restricted (the API server must stay reachable).
    docs = helm.template({"networkPolicy": {"enabled": True}})
    assert find(docs, "NetworkPolicy")["spec"]["policyTypes"] == ["Ingress"]
    assert "from" not in find(docs, "NetworkPolicy")["spec"]["ingress"][0]



def test_a_load_balancer_takes_source_ranges_and_keeps_client_ips_when_told(helm: Helm):
    docs = helm.template({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"],
                                      "externalTrafficPolicy": "Local"}})
    service = api_service(docs)["spec"]
    assert service["loadBalancerSourceRanges"] == ["10.0.0.0/8"] and service["externalTrafficPolicy"] == "Local"
    assert [p["name"] for p in service["ports"]] == ["http"]
    # /metrics stays in the cluster: not on the balancer the workers reach.
    assert find(docs, "Service", "wq-workerqueue-operator-metrics")["spec"]["type"] == "ClusterIP"
    # Neither means anything to a ClusterIP Service (the API server refuses externalTrafficPolicy there).
    service = api_service(helm.template({"service": {"loadBalancerSourceRanges": ["10.0.0.0/8"],
                                                     "externalTrafficPolicy": "Local"}}))["spec"]
    assert "loadBalancerSourceRanges" not in service and "externalTrafficPolicy" not in service
    with pytest.raises(AssertionError, match="externalTrafficPolicy"):
        helm.template({"service": {"type": "NodePort", "externalTrafficPolicy": "local"}})


def test_notes_tell_what_the_release_serves(helm: Helm):
    values = {"watchNamespaces": ["wq-system", "team-a", "team-a"],
              "extraConfig": {"worker_control_plane_url": "http://elsewhere:80"}}
    notes = helm("install", "wq", str(CHART), "--dry-run=client", "--namespace=wq-system",
                 f"--values={helm.values_file(values)}").stdout.split("NOTES:", 1)[1]
    assert "serves WorkerQueues in wq-system, team-a." in notes
    assert "Workers call the /start API at http://elsewhere:80." in notes
    notes = helm("install", "wq", str(CHART), "--dry-run=client", "--namespace=wq-system").stdout
    assert "Workers call the /start API at http://wq-workerqueue-operator.wq-system.svc:8080." in notes

def test_pod_disruption_budget(helm: Helm):
    pdb = find(helm.template(option_values("podDisruptionBudget", OFFLINE)), "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == "50%" and "minAvailable" not in pdb
    # Every replica is unready while a watch is down: an unready pod must not hold a node drain.
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    pdb = find(helm.template({"podDisruptionBudget": {"enabled": True}}), "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    pdb = find(helm.template({"replicaCount": 3, "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}}),
               "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == "50%" and "maxUnavailable" not in pdb  # 2 of 3 kept: one may be evicted


def test_several_replicas_are_spread_over_nodes_unless_told_otherwise(helm: Helm):
    def spread(values: dict[str, Any]) -> Any:
        return find(helm.template(values), "Deployment")["spec"]["template"]["spec"].get("topologySpreadConstraints")

    assert spread({}) is None  # one replica: nothing to spread
    (soft,) = spread({"replicaCount": 2})
    assert soft["topologyKey"] == "kubernetes.io/hostname" and soft["whenUnsatisfiable"] == "ScheduleAnyway"
    selector = find(helm.template({"replicaCount": 2}), "Deployment")["spec"]["selector"]["matchLabels"]
    assert soft["labelSelector"]["matchLabels"] == selector
    zones = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
              "labelSelector": {"matchLabels": {"app": "x"}}}]
    assert spread({"replicaCount": 2, "topologySpreadConstraints": zones}) == zones
    assert spread({"replicaCount": 2, "affinity": {"podAntiAffinity": {}}}) is None


def test_service_monitor(helm: Helm):
    docs = helm.template(option_values("serviceMonitor", OFFLINE))
    monitor = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    # It selects the metrics Service alone (both carry the release's labels).
    metrics = find(docs, "Service", "wq-workerqueue-operator-metrics")
    selected = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()]
    assert selected == ["wq-workerqueue-operator-metrics"] and metrics["spec"]["ports"][0]["name"] == "metrics"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "scheme": "http",
                                             "interval": "15s", "scrapeTimeout": "10s"}]
    # metricsPort null: /metrics is on the HTTP port, and scraped there.
    docs = helm.template({**option_values("serviceMonitor", OFFLINE), "metricsPort": None})
    assert find(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"
    assert [p["name"] for p in find(docs, "Service")["spec"]["ports"]] == ["http"]  # the one Service
    assert find(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"] == find(docs, "Service")["spec"]["selector"]
    assert "metrics_port" not in config_of(docs)
    with pytest.raises(AssertionError, match="metricsPort must differ from containerPort"):
        helm.template({"metricsPort": 8080})


@pytest.mark.parametrize("option", ["peering", "peeringWatchNamespaces"])
def test_peering(helm: Helm, option: str):
    docs = helm.template(option_values(option, OFFLINE))
    assert find(docs, "Deployment")["spec"]["replicas"] == 2
    # One cluster-wide peering object in both: a watched namespace's admins cannot pause the others.
    # With watchNamespaces, named after the release's namespace too: one release per team, each its own.
    name = "wq-workerqueue-operator" if option == "peering" else "wq-workerqueue-operator-wq-system"
    assert container_of(docs)["args"] == ["run", f"--peering={name}"]
    cluster_rules = rules_of(find(docs, "ClusterRole"))
    assert find(docs, "ClusterKopfPeering")["metadata"]["name"] == name
    assert cluster_rules[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
    assert not [d for d in docs if d["kind"] == "KopfPeering"]
    for namespace in OFFLINE.watched if option == "peeringWatchNamespaces" else ():
        assert ("kopf.dev", "kopfpeerings") not in rules_of(find(docs, "Role", "wq-workerqueue-operator", namespace))
    # The peering CRDs come from crds/: installed before the templates, so the object above can be.
    crds = helm.template({}, extra=("--include-crds",))
    names = {d["metadata"]["name"] for d in crds if d["kind"] == "CustomResourceDefinition"}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", CRD_NAME} <= names


@pytest.mark.parametrize("option", OPTIONS)
def test_rendered_config_is_valid_operator_settings(helm: Helm, option: str, tmp_path: Path):
    config = config_of(helm.template(option_values(option, OFFLINE)))
    unknown = set(config) - set(Settings.model_fields)
    assert not unknown, f"the chart writes settings the operator does not know: {unknown}"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = Settings.load(environ={"WQ_CONFIG_FILE": str(path)})
    if option == "config":
        assert settings.organization_id == "org-42"
        assert (settings.temporal_host, settings.temporal_namespace) == ("temporal.internal:7233", "agents")
        assert settings.temporal_api_key_secret is not None
        assert settings.temporal_api_key_secret.model_dump() == {"namespace": "team-a", "name": "temporal",
                                                                 "key": "api-key"}
        assert settings.litellm_api_key_secret is not None
        assert settings.litellm_api_key_secret.namespace == OFFLINE.namespace  # defaults to the release's
        assert settings.litellm_url == "http://litellm.internal:4000"
        assert settings.public_url == "https://cp.example.com"
        assert settings.token_review_audiences == ("workerqueue",)
        assert (settings.auth_cache_seconds, settings.status_resync_seconds) == (5, 120)
        assert settings.auth_review_timeout_seconds == 3
        assert (settings.http_idle_timeout_seconds, settings.http_body_timeout_seconds) == (20, 10)
        assert (settings.http_max_connections, settings.http_reserved_fds) == (1000, 128)
        dumped = settings.model_dump()
        assert dumped["worker_image"] == "registry.example.com/agent-worker:1.2.3"
        assert list(dumped["worker_command"]) == ["agent", "start"]
        assert settings.worker_pod_template["spec"]["nodeSelector"] == {"pool": "agents"}
        assert settings.worker_pod_template["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "250m"
        assert dumped["worker_control_plane_url"] == "http://wq-workerqueue-operator.wq-system.svc:8080"
        assert dumped["worker_backoff_seconds"] == 20
        assert settings.upstream_url == "https://api.example.com"
        assert settings.upstream_api_key_secret is not None
        assert settings.upstream_api_key_secret.model_dump() == {"namespace": OFFLINE.namespace, "name": "org-key",
                                                                 "key": "api-key"}
        assert (settings.upstream_idle_timeout_seconds, settings.upstream_connect_timeout_seconds) == (30, 5)
        assert settings.upstream_namespaces == ("trusted",)
    if option == "defaults":
        defaults = Settings()
        assert settings.organization_id == defaults.organization_id
        assert settings.auth_cache_seconds == defaults.auth_cache_seconds
        assert settings.http_max_connections == defaults.http_max_connections
        assert settings.http_idle_timeout_seconds == defaults.http_idle_timeout_seconds
        assert settings.auth_negative_cache_seconds == defaults.auth_negative_cache_seconds
        assert settings.status_resync_seconds == defaults.status_resync_seconds
        assert settings.http_port == defaults.http_port
        assert settings.upstream_url is None
        assert settings.upstream_idle_timeout_seconds == defaults.upstream_idle_timeout_seconds
        assert settings.upstream_max_connections == defaults.upstream_max_connections
        assert settings.upstream_max_websockets == defaults.upstream_max_websockets
        assert settings.upstream_namespaces == ()


@pytest.mark.parametrize("option", OPTIONS)
def test_container_args_are_accepted_by_the_cli(helm: Helm, option: str):
    args = container_of(helm.template(option_values(option, OFFLINE)))["args"]
    parsed = cli.parser().parse_args(args)
    assert parsed.func is cli.cmd_run
    peering = "peering" in option.lower() or option == "everything"
    watching = option in ("watchNamespaces", "peeringWatchNamespaces", "everything")
    name = "wq-workerqueue-operator-wq-system" if watching else "wq-workerqueue-operator"
    assert parsed.peering == (name if peering else None)
    assert parsed.priority is None, "each replica draws a random priority"
    assert parsed.verbose == (option == "everything")


def value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every documented value: leaves, and objects the schema leaves free-form."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        node = schema["properties"][key]
        if isinstance(value, dict) and "properties" in node:
            yield from value_paths(value, node, f"{path}.")
        else:
            yield path


def test_every_value_is_in_the_schema_and_documented():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    docs = DOCS.read_text()
    missing = [path for path in value_paths(values, schema) if f"`{path}`" not in docs]
    assert not missing, f"{DOCS.relative_to(ROOT)} does not document {missing}"


def test_chart_crd_template_is_the_generated_one():
    assert (CHART / CRD_TEMPLATE).read_text() == crd.render_chart_template()


# -- the real API server: dry-run ------------------------------------------------------------------

# A reduced copy of prometheus-operator's ServiceMonitor CRD: the fields the chart sets, with their
# real types and patterns, and no others (server-side field validation rejects unknown ones).
DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABEL_SELECTOR = {"type": "object", "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
}}
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"kind": "ServiceMonitor", "listKind": "ServiceMonitorList", "plural": "servicemonitors",
                  "singular": "servicemonitor"},
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
            "type": "object",
            "properties": {"spec": {"type": "object", "required": ["selector"], "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {"type": "object", "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "items": {"type": "object", "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string"},
                    "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
                    "interval": {"type": "string", "pattern": DURATION},
                    "scrapeTimeout": {"type": "string", "pattern": DURATION},
                    "tlsConfig": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                }}},
            }}},
        }}}],
    },
}

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def cluster_crds(kubectl: Kubectl) -> Iterator[None]:
    """kopf's peering CRDs (the chart's crds/) and the reduced ServiceMonitor CRD, for real.

    Both are inert on this cluster; the ServiceMonitor one is removed afterwards, the kopf ones stay
    (another test's operator may use peering, and Helm never deletes crds/ either).
    """
    kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    existing = kubectl("get", "crd", SERVICE_MONITOR_CRD["metadata"]["name"], check=False).returncode == 0
    if not existing:
        kubectl("apply", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    established(kubectl, "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev",
                "servicemonitors.monitoring.coreos.com")
    yield
    if not existing:
        kubectl("delete", "crd", SERVICE_MONITOR_CRD["metadata"]["name"], "--wait=false", check=False)


@pytest.fixture
def watched(api_client: k8s.ApiClient) -> Iterator[tuple[str, str]]:
    core = k8s.CoreV1Api(api_client)
    names = (f"test-{secrets.token_hex(4)}", f"test-{secrets.token_hex(4)}")
    for name in names:
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield names
    for name in names:
        core.delete_namespace(name)


@pytest.mark.parametrize("option", OPTIONS)
def test_server_dry_run(helm: Helm, kubectl: Kubectl, cluster_crds: None, namespace: str,
                        watched: tuple[str, str], option: str):
    # The Pod Security "restricted" profile, warned about on the Deployment's pod template.
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/warn=restricted")
    scope = Scope(release=f"dry-{secrets.token_hex(3)}", namespace=namespace, watched=watched)
    docs = helm.template(option_values(option, scope), release=scope.release, namespace=namespace)
    manifest = yaml.safe_dump_all(docs)
    done = kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest, check=False)
    assert done.returncode == 0, done.stderr
    applied = [line for line in done.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(applied) == len(docs), done.stdout
    assert "Warning" not in done.stderr.replace("Warning: resource customresourcedefinitions", ""), done.stderr


# -- the release lifecycle, on a control plane of its own --------------------------------------------


@pytest.fixture(scope="module")
def own_cluster(k8s_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    state_dir = tmp_path_factory.mktemp("chart-control-plane")
    with ControlPlane(state_dir, k8s_assets, log=lambda m: print(m, file=sys.stderr)) as cp:
        yield cp


@pytest.fixture(scope="module")
def own_api(own_cluster: ControlPlane) -> Iterator[k8s.ApiClient]:
    api = k8s_config.new_client_from_config(config_file=str(own_cluster.kubeconfig))
    yield api
    api.close()


def with_extra_crd_field(chart: Path, field: str) -> None:
    """The chart's CRD template with one more spec property: what a new operator version brings."""
    path = chart / CRD_TEMPLATE
    lines = path.read_text().splitlines()
    assert lines[0].startswith("{{") and lines[-1].startswith("{{"), "the CRD template is `{{ if }} ... {{ end }}`"
    body = "\n".join(line for line in lines[1:-1] if "{{" not in line)
    document = yaml.safe_load(body)
    spec = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"][field] = {"type": "string", "description": "Added by a newer chart."}
    path.write_text("\n".join([lines[0], yaml.safe_dump(document, sort_keys=False), lines[-1]]) + "\n")


def test_install_upgrade_uninstall(helm: Helm, own_cluster: ControlPlane, own_api: k8s.ApiClient, tmp_path: Path):
    kubeconfig, api = own_cluster.kubeconfig, own_api
    core, apps, rbac = k8s.CoreV1Api(api), k8s.AppsV1Api(api), k8s.RbacAuthorizationV1Api(api)
    ext, custom = k8s.ApiextensionsV1Api(api), k8s.CustomObjectsApi(api)
    release, namespace = f"wq-{secrets.token_hex(3)}", f"lifecycle-{secrets.token_hex(3)}"
    fullname = f"{release}-workerqueue-operator"
    cluster_name = f"{fullname}-{namespace}"  # cluster-scoped: named after the release namespace too
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))

    # Install: CRDs (the template and crds/), the peering object of kind from crds/ in the same go.
    helm("install", release, str(CHART), f"--namespace={namespace}", "--set=replicaCount=2",
         kubeconfig=kubeconfig)
    crd_obj = ext.read_custom_resource_definition(CRD_NAME)
    assert crd_obj.metadata.annotations["meta.helm.sh/release-name"] == release
    deployment = apps.read_namespaced_deployment(fullname, namespace)
    assert deployment.spec.replicas == 2
    core.read_namespaced_service(fullname, namespace)
    core.read_namespaced_service_account(fullname, namespace)
    config = core.read_namespaced_config_map(fullname, namespace)
    rbac.read_cluster_role(cluster_name)
    rbac.read_cluster_role_binding(cluster_name)
    custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", fullname)
    status = json.loads(helm("status", release, f"--namespace={namespace}", "--output=json",
                             kubeconfig=kubeconfig).stdout)
    assert status["info"]["status"] == "deployed"

    # Upgrade with a chart whose CRD has a new field, and a changed setting.
    newer = tmp_path / "workerqueue-operator"
    shutil.copytree(CHART, newer)
    with_extra_crd_field(newer, "chartUpgradeProbe")
    helm("upgrade", release, str(newer), f"--namespace={namespace}", "--set=replicaCount=2",
         "--set=organizationId=upgraded", kubeconfig=kubeconfig)

    def upgraded_crd() -> bool:
        schema = ext.read_custom_resource_definition(CRD_NAME).spec.versions[0].schema.open_apiv3_schema
        return "chartUpgradeProbe" in schema.properties["spec"].properties

    wait_for(upgraded_crd, timeout=10, what="the CRD upgraded by helm upgrade")
    assert "organization_id: upgraded" in core.read_namespaced_config_map(fullname, namespace).data["config.yaml"]
    assert config.data != core.read_namespaced_config_map(fullname, namespace).data
    before = deployment.spec.template.metadata.annotations["checksum/config"]
    after = apps.read_namespaced_deployment(fullname, namespace).spec.template.metadata.annotations["checksum/config"]
    assert after != before, "a changed config rolls the pods"
    history = json.loads(helm("history", release, f"--namespace={namespace}", "--output=json",
                              kubeconfig=kubeconfig).stdout)
    assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"

    # To Recreate and back: the rollingUpdate the API server defaulted made the first upgrade fail.
    def strategy() -> dict[str, Any]:
        found: dict[str, Any] = api.sanitize_for_serialization(
            apps.read_namespaced_deployment(fullname, namespace).spec.strategy)
        return found

    for values, expected in ((["--set=updateStrategy.type=Recreate"], {"type": "Recreate"}),
                             ([], {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%",
                                                                               "maxUnavailable": "25%"}})):
        helm("upgrade", release, str(newer), f"--namespace={namespace}", "--set=replicaCount=2", *values,
             kubeconfig=kubeconfig)
        assert strategy() == expected

    # Uninstall: everything of the release goes; the CRD only if the chart does not keep it.
    keep = (newer / CRD_TEMPLATE).read_text().count("helm.sh/resource-policy") > 0
    helm("uninstall", release, f"--namespace={namespace}", "--wait", "--timeout=60s", kubeconfig=kubeconfig)
    for read in (lambda: apps.read_namespaced_deployment(fullname, namespace),
                 lambda: core.read_namespaced_service(fullname, namespace),
                 lambda: core.read_namespaced_config_map(fullname, namespace),
                 lambda: core.read_namespaced_service_account(fullname, namespace),
                 lambda: rbac.read_cluster_role(cluster_name),
                 lambda: rbac.read_cluster_role_binding(cluster_name),
                 lambda: custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", fullname)):
        with pytest.raises(k8s.ApiException) as info:
            read()
        assert info.value.status == 404

    def crd_gone() -> bool:
        try:
            ext.read_custom_resource_definition(CRD_NAME)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    if keep:
        assert not crd_gone(), "crds.keep: the CRD outlives the release"
    else:
        wait_for(crd_gone, timeout=30, what="the CRD deleted with the release")
    ext.read_custom_resource_definition("clusterkopfpeerings.kopf.dev")  # crds/ are never deleted by Helm


def test_two_releases_of_one_name_in_two_namespaces(helm: Helm, own_cluster: ControlPlane, own_api: k8s.ApiClient):
    """One release per team, each named as docs/helm.md installs it: their cluster-scoped objects
    (ClusterRole, ClusterRoleBinding) must not collide, nor one's uninstall take the other's."""
    kubeconfig, core, rbac = own_cluster.kubeconfig, k8s.CoreV1Api(own_api), k8s.RbacAuthorizationV1Api(own_api)
    suffix = secrets.token_hex(3)
    teams = {f"ops-a-{suffix}": f"team-a-{suffix}", f"ops-b-{suffix}": f"team-b-{suffix}"}
    for name in (*teams, *teams.values()):
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    release = "workerqueue-operator"

    def bindings() -> dict[str, set[tuple[str, str]]]:
        """The ClusterRoles bound to each release's ServiceAccount, by release namespace."""
        found: dict[str, set[tuple[str, str]]] = {ns: set() for ns in teams}
        for binding in rbac.list_cluster_role_binding().items:
            for subject in binding.subjects or []:
                if subject.name == release and subject.namespace in teams:
                    found[subject.namespace].add((binding.metadata.name, binding.role_ref.name))
        return found

    try:
        for namespace, watched in teams.items():
            helm("install", release, str(CHART), f"--namespace={namespace}", f"--set=watchNamespaces={{{watched}}}",
                 "--set=crds.install=false", kubeconfig=kubeconfig)
        bound = bindings()
        assert all(bound.values()) and not set.intersection(*bound.values()), bound
        for namespace in teams:
            for _, role in bound[namespace]:
                rules = rbac.read_cluster_role(role).rules
                assert any("tokenreviews" in rule.resources for rule in rules)

        first, second = teams
        helm("uninstall", release, f"--namespace={second}", "--wait", "--timeout=60s", kubeconfig=kubeconfig)
        assert bindings()[first] == bound[first], "uninstalling one release left the other's RBAC alone"
        for _, role in bound[first]:
            rbac.read_cluster_role(role)
    finally:
        for namespace in teams:
            helm("uninstall", release, f"--namespace={namespace}", kubeconfig=kubeconfig, check=False)
        for name in (*teams, *teams.values()):
            with contextlib.suppress(k8s.ApiException):
                core.delete_namespace(name)


def without_value(chart: Path, value: str) -> None:
    """The chart as it was before a top-level value was added: what a previous release was installed from."""
    values = yaml.safe_load((chart / "values.yaml").read_text())
    del values[value]
    (chart / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    schema = json.loads((chart / "values.schema.json").read_text())
    del schema["properties"][value]
    schema["required"] = [key for key in schema.get("required", []) if key != value]
    (chart / "values.schema.json").write_text(json.dumps(schema))
    helpers = chart / "templates" / "_helpers.tpl"
    lines = helpers.read_text().splitlines()
    kept = [line for line in lines if f".{value}." not in line]
    assert len(kept) < len(lines), f"no template uses {value}"
    helpers.write_text("\n".join(kept) + "\n")


def documented_upgrade(namespace: str) -> list[str]:
    """The `helm upgrade` command of docs/helm.md's Upgrade section, for this namespace and chart."""
    section = DOCS.read_text().split("## Upgrade", 1)[1].split("\n## ", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith("helm upgrade ")]
    args = shlex.split(line)[1:]
    args[args.index("-n") + 1] = namespace
    return [str(CHART) if arg == "charts/workerqueue-operator" else arg for arg in args]


def test_documented_upgrade_works_when_the_new_chart_adds_a_value(helm: Helm, own_cluster: ControlPlane,
                                                                   own_api: k8s.ApiClient, tmp_path: Path):
    """`helm upgrade --reuse-values` takes the previous chart's values in place of the new chart's
    defaults, so every value a newer chart adds is missing (a nil pointer in the templates): the
    upgrade docs/helm.md tells people to run must work across chart versions."""
    core, apps = k8s.CoreV1Api(own_api), k8s.AppsV1Api(own_api)
    namespace = f"upgrade-{secrets.token_hex(3)}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    previous = tmp_path / "workerqueue-operator"
    shutil.copytree(CHART, previous)
    without_value(previous, "registry")
    try:
        # Installed as the docs install it, with a setting of its own (the CRD is another release's here).
        helm("install", "workerqueue-operator", str(previous), f"--namespace={namespace}",
             "--set=crds.install=false", "--set=organizationId=kept", kubeconfig=own_cluster.kubeconfig)
        helm(*documented_upgrade(namespace), kubeconfig=own_cluster.kubeconfig)
        config = yaml.safe_load(core.read_namespaced_config_map("workerqueue-operator", namespace).data["config.yaml"])
        assert config["organization_id"] == "kept", "the release's own values are reused"
        assert config["registry_max_pending"] == Settings().registry_max_pending, "the new value has its default"
        apps.read_namespaced_deployment("workerqueue-operator", namespace)
    finally:
        helm("uninstall", "workerqueue-operator", f"--namespace={namespace}", kubeconfig=own_cluster.kubeconfig,
             check=False)
        with contextlib.suppress(k8s.ApiException):
            core.delete_namespace(namespace)
