"""The local control plane behaves like a real cluster where the operator depends on it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from workerqueue_operator.devcluster import procs
from workerqueue_operator.devcluster.controlplane import SERVICE_ACCOUNT_ISSUER, ControlPlane, ControlPlaneError

RBAC_GROUP = "rbac.authorization.k8s.io"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def test_secret_round_trip(
    api_client: client.ApiClient, namespace: str, kubectl: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    core = client.CoreV1Api(api_client)
    assert core.read_namespace(namespace).status.phase == "Active"
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="creds"), string_data={"password": "hunter2"})
    core.create_namespaced_secret(namespace, secret)

    read = core.read_namespaced_secret("creds", namespace)
    assert base64.b64decode(read.data["password"]) == b"hunter2"
    # kubectl, with the same kubeconfig, sees the very same object.
    seen = json.loads(kubectl("get", "secret", "creds", "-n", namespace, "-o", "json").stdout)
    assert seen["metadata"]["uid"] == read.metadata.uid


def test_token_request_and_token_review(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="robot"))
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[SERVICE_ACCOUNT_ISSUER], expiration_seconds=600)
    )
    token = core.create_namespaced_service_account_token("robot", namespace, request).status.token

    auth = client.AuthenticationV1Api(api_client)

    def review(t: str) -> client.V1TokenReviewStatus:
        return auth.create_token_review(client.V1TokenReview(spec=client.V1TokenReviewSpec(token=t))).status

    status = review(token)
    assert status.authenticated, status.error
    assert status.user.username == f"system:serviceaccount:{namespace}:robot"
    assert SERVICE_ACCOUNT_ISSUER in status.audiences

    # The same token with a corrupted signature must be rejected.
    head, signature = token.rsplit(".", 1)
    forged = f"{head}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
    assert not review(forged).authenticated


def test_subject_access_review_follows_rbac(api_client: client.ApiClient, namespace: str) -> None:
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="configmap-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="alice-reads-configmaps"),
            role_ref=client.V1RoleRef(api_group=RBAC_GROUP, kind="Role", name="configmap-reader"),
            subjects=[client.RbacV1Subject(kind="User", name="alice", api_group=RBAC_GROUP)],
        ),
    )
    authz = client.AuthorizationV1Api(api_client)

    def allowed(verb: str, resource: str) -> bool:
        attributes = client.V1ResourceAttributes(namespace=namespace, verb=verb, resource=resource)
        spec = client.V1SubjectAccessReviewSpec(user="alice", resource_attributes=attributes)
        return bool(authz.create_subject_access_review(client.V1SubjectAccessReview(spec=spec)).status.allowed)

    # The RBAC authorizer reads through an informer cache: the binding shows up a moment later.
    wait_until(lambda: allowed("get", "configmaps"), "alice to be allowed to get configmaps", timeout=15)
    assert allowed("list", "configmaps")
    assert not allowed("delete", "configmaps")
    assert not allowed("get", "secrets")


def test_garbage_collector_deletes_dependents(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    uid = owner.metadata.uid
    reference = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=uid)
    pod = core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="dependent", owner_references=[reference]),
            spec=client.V1PodSpec(containers=[client.V1Container(name="main", image="busybox")]),
        ),
    )
    # ServiceAccount admission is on: it filled in the account.
    assert pod.spec.service_account_name == "default"

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def pod_gone() -> bool:
        try:
            core.read_namespaced_pod("dependent", namespace)
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        return False

    wait_until(pod_gone, "the garbage collector to delete the dependent pod", timeout=60)


def test_failed_start_reports_the_log_and_stops_everything(k8s_assets: Path, tmp_path: Path) -> None:
    # Real etcd, and a kube-apiserver that fails the way a bad flag would.
    assets = tmp_path / "bin"
    assets.mkdir()
    for name in ("etcd", "kube-controller-manager"):
        (assets / name).symlink_to(k8s_assets / name)
    (assets / "kube-apiserver").write_text("#!/bin/sh\necho 'E0101 unknown flag: --frobnicate' >&2\nexit 1\n")
    (assets / "kube-apiserver").chmod(0o755)
    state_dir = tmp_path / "state"

    control_plane = ControlPlane(state_dir, assets)
    with pytest.raises(ControlPlaneError, match=r"(?s)kube-apiserver exited with code 1.*--frobnicate"):
        control_plane.start()

    assert control_plane.pids() == []
    assert not _processes_mentioning(str(state_dir)), "etcd was left running"
    control_plane.stop()  # harmless after a failed start


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_text() and _alive(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


# Started in a child interpreter so that the test can signal it like a user or a supervisor would.
CHILD = """
import pathlib, sys
from workerqueue_operator.devcluster.controlplane import ControlPlane, run_until_signal

state_dir, assets = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
run_until_signal(ControlPlane(state_dir, assets, log=lambda m: print(m, file=sys.stderr)))
"""


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, waiting for init to reap it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm-stops", "sigkill-pdeathsig"])
def test_processes_die_with_their_owner(k8s_assets: Path, tmp_path: Path, sig: signal.Signals) -> None:
    state_dir = tmp_path / "state"
    pids_file = state_dir / "pids"
    pids: list[int] = []
    with (tmp_path / "child.log").open("wb") as child_log:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state_dir), str(k8s_assets)],
            stdout=subprocess.DEVNULL,
            stderr=child_log,
            preexec_fn=procs.die_with_parent(os.getpid()),  # also if pytest is SIGKILLed
        )
    try:
        # The pids file is written once the control plane is ready.
        wait_until(lambda: pids_file.exists() or child.poll() is not None, "the pids file", timeout=150)
        assert child.poll() is None, (tmp_path / "child.log").read_text()
        pids = [int(line) for line in pids_file.read_text().split()]
        assert len(pids) == 3
        assert all(_alive(pid) for pid in pids)

        child.send_signal(sig)
        code = child.wait(timeout=60)
        wait_until(lambda: not any(_alive(pid) for pid in pids), "every control-plane process to end", 15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in pids:  # if the behaviour under test is broken, don't leak a cluster
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    if sig == signal.SIGTERM:
        assert code == 0, (tmp_path / "child.log").read_text()
        assert not pids_file.exists()  # a clean stop removes it
    else:
        assert code == -signal.SIGKILL


def test_a_killed_client_of_the_kubeconfig_leaves_no_file_behind(kubeconfig: Path, tmp_path: Path) -> None:
    """The `kubernetes` client copies a kubeconfig's inline CA to a temporary file that only a clean exit
    removes: with inline data, every operator a test SIGKILLs would leave one in /tmp."""
    script = (
        "import os, signal, sys\n"
        "from workerqueue_operator.k8s.client import load_configuration\n"
        "print(load_configuration(sys.argv[1]).ssl_ca_cert, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(kubeconfig)], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(temp)}, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert Path(done.stdout.strip()).is_file()
    assert list(temp.iterdir()) == []
