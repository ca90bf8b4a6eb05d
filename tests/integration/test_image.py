"""The image `make image` builds, run as a real container with the settings the chart renders.

What test_rbac.py proves through a process, proved through the container: the operator starts from
the image's entry point with the chart's arguments, environment, config file and security context
(non-root UID, read-only root filesystem with only the chart's /tmp writable, no capabilities, no
privilege escalation), logs in the way it does in a pod (a TokenRequest token of the chart's
ServiceAccount at the standard path, with ca.crt and namespace, and KUBERNETES_SERVICE_HOST/PORT),
becomes ready, serves /start, creates a worker pod for a single-execution queue, and stops on
SIGTERM. The container runs with podman and runc, on the host network to reach the loopback control
plane; all podman state lives in a temp dir, and whatever podman writes elsewhere is removed after.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from kubernetes import client as k8s

from image import build as image_build
from tests.integration.conftest import Kube, free_port, http, wait_for
from tests.integration.test_chart import Helm, api_service, container_of, find
from tests.integration.test_rbac import DENIAL

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Written by podman (or runc) outside --root/--runroot/--tmpdir whatever the flags: removed after the
# test when the test created them. /dev/shm/libpod_lock: libpod's shared-memory locks.
PODMAN_LEAVES = [Path("/dev/shm/libpod_lock"), Path("/var/lib/containers"), Path("/var/lib/containers/cache"),
                 Path("/run/containers"), Path("/run/libpod"), Path("/run/runc"), Path("/etc/cni/net.d/cni.lock")]


def podman_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "not root: the test runs podman rootful (rootless needs subordinate UID ranges it does not set up)"
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`bash hack/image-tools.sh` installs it; .ci/run does)"
    return None


CANNOT_RUN = podman_cannot_run()
pytestmark = [pytest.mark.usefixtures("crd_installed"),
              pytest.mark.skipif(CANNOT_RUN is not None, reason=str(CANNOT_RUN)),
              # A stale image is rebuilt in the fixture: minutes when the root filesystems are not cached.
              pytest.mark.timeout(900)]


@dataclass
class Podman:
    """podman with every piece of its state in `state`: storage, run state, runc's, networks."""

    state: Path

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = ["podman", f"--root={self.state}/root", f"--runroot={self.state}/runroot",
                   f"--tmpdir={self.state}/tmp", f"--network-config-dir={self.state}/networks",
                   "--cgroup-manager=cgroupfs", "--events-backend=file",
                   # crun cannot start containers on this kernel's hybrid cgroups; runc can.
                   "--runtime=runc", f"--runtime-flag=root={self.state}/runc", *args]
        scratch = self.state / "scratch"  # image copies go through TMPDIR (else /var/tmp)
        scratch.mkdir(exist_ok=True)
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "TMPDIR": str(scratch)})
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} exited with {done.returncode}:\n{done.stderr}")
        return done


@contextlib.contextmanager
def podman_state() -> Iterator[Podman]:
    existed = {path for path in PODMAN_LEAVES if path.exists()}
    # Short: podman refuses a runroot longer than 50 characters (conmon's socket paths live there).
    folder = Path(tempfile.mkdtemp(prefix="wq-podman-", dir="/tmp"))
    podman = Podman(folder)
    try:
        yield podman
    finally:
        podman("rm", "--all", "--force", "--time=0", check=False)
        podman("rmi", "--all", "--force", check=False)
        # Storage mounts podman may have left (e.g. after a crash), deepest first.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{folder}/")), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount], check=False)
        shutil.rmtree(folder, ignore_errors=True)
        for path in PODMAN_LEAVES:
            if path not in existed and path.exists():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def built_image() -> dict[str, Any]:
    """`make image`'s output when it is of the current sources, else a fresh build."""
    summary = image_build.ROOT / "build" / "image" / "image.json"
    inputs = image_build.inputs_digest()
    if summary.exists():
        built: dict[str, Any] = json.loads(summary.read_text())
        if built.get("inputs") == inputs and Path(built["dockerArchive"]).exists():
            return built
    subprocess.run([sys.executable, str(image_build.ROOT / "image" / "build.py")], check=True, timeout=900)
    built = json.loads(summary.read_text())
    assert built["inputs"] == inputs
    return built


@dataclass
class Running:
    podman: Podman
    name: str
    url: str
    namespace: str
    service_url: str  # the chart's Service, which its config file hands to workers
    image_id: str
    memory_limit: str  # the chart's, as Kubernetes writes it (512Mi)
    seconds_to_ready: float
    log_dir: Path

    def logs(self) -> str:
        done = self.podman("logs", self.name, check=False)
        return done.stdout + done.stderr


def podman_run_args(docs: list[dict[str, Any]], *, files: dict[str, Path], env: dict[str, str]) -> list[str]:
    """`podman run` options for the chart's operator container: its security context, volumes and env."""
    deployment = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(docs)
    pod_security, security = pod["securityContext"], container["securityContext"]
    user, group = security.get("runAsUser", pod_security["runAsUser"]), pod_security["runAsGroup"]
    assert user != 0 and (pod_security["runAsNonRoot"] or security["runAsNonRoot"])
    options = [f"--user={user}:{group}", f"--group-add={pod_security['fsGroup']}"]
    if security["readOnlyRootFilesystem"]:
        # Kubernetes makes nothing writable but the volumes: no podman tmpfs on /run, /var/tmp.
        options += ["--read-only", "--read-only-tmpfs=false"]
    if not security["allowPrivilegeEscalation"]:
        options.append("--security-opt=no-new-privileges")
    assert not security.get("privileged")
    assert security["seccompProfile"]["type"] == "RuntimeDefault"  # podman's default profile
    options += [f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]]
    options += [f"--cap-add={cap}" for cap in security["capabilities"].get("add", [])]
    if limit := container["resources"].get("limits", {}).get("memory"):
        options.append(f"--memory={limit.removesuffix('i').lower()}")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "64Mi").removesuffix("i").lower()
            options.append(f"--mount=type=tmpfs,destination={mount['mountPath']},tmpfs-size={size},tmpfs-mode=1777")
        else:
            source = files[mount["name"]]
            options.append(f"--volume={source}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}")
    options.append(f"--volume={files['serviceaccount']}:{SERVICE_ACCOUNT_DIR}:ro")
    for item in container["env"]:
        if "value" in item:
            options.append(f"--env={item['name']}={item['value']}")
        else:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            options.append(f"--env={item['name']}={env[field]}")
    options += [f"--env={k}={v}" for k, v in env.items() if not k.startswith("metadata.")]
    if "command" in container:  # Kubernetes' command replaces the image's ENTRYPOINT, args its CMD
        options.append(f"--entrypoint={json.dumps(container['command'])}")
    return options


def delete_namespace(core: k8s.CoreV1Api, name: str) -> None:
    with contextlib.suppress(k8s.ApiException):
        core.delete_namespace(name)


@pytest.fixture(scope="module")
def helm(k8s_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(k8s_assets / "helm", tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def running(request: pytest.FixtureRequest, helm: Helm, kubectl: Callable[..., Any], api_client: k8s.ApiClient,
            kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    image = built_image()
    core = k8s.CoreV1Api(api_client)
    namespace, release = f"image-{secrets.token_hex(4)}", f"image-{secrets.token_hex(3)}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    docs = helm.template({}, release=release, namespace=namespace)
    assert container_of(docs)["image"] == image["reference"], "the chart's default image is what make image tags"
    identity = [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                                  "RoleBinding")]
    manifest = yaml.safe_dump_all(identity)
    kubectl("apply", "-f", "-", input=manifest)
    service_account = find(docs, "ServiceAccount")["metadata"]["name"]
    token = core.create_namespaced_service_account_token(service_account, namespace, k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))).status.token

    folder = tmp_path_factory.mktemp("image")
    admin = yaml.safe_load(kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    server = urlparse(cluster["server"])
    files = {"config": folder / "config", "serviceaccount": folder / "serviceaccount"}
    # What the kubelet writes into the pod: the ConfigMap's keys, the projected token volume.
    for key, value in find(docs, "ConfigMap")["data"].items():
        files["config"].mkdir(exist_ok=True)
        (files["config"] / key).write_text(value)
    files["serviceaccount"].mkdir()
    (files["serviceaccount"] / "token").write_text(token)
    (files["serviceaccount"] / "ca.crt").write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    (files["serviceaccount"] / "namespace").write_text(namespace)
    for path in [folder, *files.values(), *(p for f in files.values() for p in f.iterdir())]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the container's non-root UID

    port, pod_name = free_port(), f"{release}-0"
    env = {"metadata.name": pod_name, "metadata.namespace": namespace,
           # What the kubelet puts into every container: where the API server is.
           "KUBERNETES_SERVICE_HOST": str(server.hostname), "KUBERNETES_SERVICE_PORT": str(server.port),
           # Host network: the chart's *:8080 would be the host's; keep to a free loopback port.
           "WQ_HTTP_HOST": "127.0.0.1", "WQ_HTTP_PORT": str(port)}
    args = container_of(docs)["args"]
    _, hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.ExitStack() as stack:
        stack.callback(kubectl, "delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifest, check=False)
        stack.callback(delete_namespace, core, namespace)
        podman = stack.enter_context(podman_state())
        loaded = podman("load", "--quiet", f"--input={image['dockerArchive']}").stdout
        assert image["imageId"].removeprefix("sha256:")[:12] in loaded or image["reference"] in loaded, loaded
        stack.enter_context(request.getfixturevalue("operator").paused())
        name = f"wq-{secrets.token_hex(4)}"
        started = time.monotonic()
        podman("run", "--detach", f"--name={name}", "--network=host",
               # Root here lacks CAP_SYS_RESOURCE: limits above the hard ones cannot be set.
               f"--ulimit=nofile={hard_nofile}:{hard_nofile}", "--ulimit=nproc=32768:32768",
               *podman_run_args(docs, files=files, env=env), image["imageId"], *args)
        service = api_service(docs)
        service_url = (f"http://{service['metadata']['name']}.{namespace}.svc:"
                       f"{service['spec']['ports'][0]['port']}")
        running = Running(podman, name, f"http://127.0.0.1:{port}", namespace, service_url, image["imageId"],
                          container_of(docs)["resources"]["limits"]["memory"], 0.0, folder)

        def ready() -> bool:
            state = podman("inspect", "--format={{.State.Running}}", name).stdout.strip()
            assert state == "true", f"the container stopped:\n{running.logs()[-4000:]}"
            with contextlib.suppress(OSError):
                return http("GET", f"{running.url}/readyz", timeout=2).status == 200
            return False

        wait_for(ready, timeout=120, interval=0.2, what="the container's /readyz")
        running.seconds_to_ready = time.monotonic() - started
        print(f"container start to ready: {running.seconds_to_ready:.1f}s")
        try:
            yield running
        finally:
            (folder / "container.log").write_text(running.logs())


def test_runs_as_the_chart_says(running: Running):
    """On the host, the container's process: the chart's non-root UID, no capabilities, no new privileges."""
    pid = running.podman("inspect", "--format={{.State.Pid}}", running.name).stdout.strip()
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    assert status["Uid"].split()[:2] == ["65532", "65532"], status["Uid"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"/opt/venv/bin/workerqueue-operator" in command and b"run" in command, command
    memory = running.podman("inspect", "--format={{.HostConfig.Memory}}", running.name).stdout.strip()
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    assert int(memory) == int(running.memory_limit[:-2]) * units[running.memory_limit[-2:]], memory
    # Read-only root filesystem: not even /opt/venv is writable, only the chart's /tmp.
    probe = running.podman("exec", running.name, "python3", "-c",
                           "import os; print(os.access('/opt/venv', os.W_OK), os.access('/tmp', os.W_OK))")
    assert probe.stdout.split() == ["False", "True"], probe.stdout + probe.stderr


def test_image_is_what_the_dockerfile_and_the_locks_say(running: Running):
    spec = image_build.image_spec()
    (inspected,) = json.loads(running.podman("image", "inspect", running.image_id).stdout)
    config = inspected["Config"]
    assert (config["User"], config["Entrypoint"], config["Cmd"]) == (spec.user, spec.entrypoint, spec.cmd)
    assert dict(e.split("=", 1) for e in config["Env"]) == spec.env
    assert sorted(config["ExposedPorts"]) == spec.exposed_ports
    assert {k: v for k, v in config["Labels"].items() if k in spec.labels} == spec.labels
    # Python packages: exactly the lock's versions (plus the operator and the venv's own pip).
    listed = running.podman("exec", running.name, "python3", "-m", "pip", "list", "--format=json",
                             "--disable-pip-version-check").stdout
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed)}
    lock = image_build.REQUIREMENTS_LOCK.read_text()
    locked = {name.lower(): version for name, version in re.findall(r"^([\w.-]+)==(\S+) ", lock, re.MULTILINE)}
    assert installed.pop("workerqueue-operator") == image_build.image_reference()[1]
    installed.pop("pip")
    assert installed == locked
    # Debian: the builder's packages stayed in the builder.
    statuses = running.podman("exec", running.name, "dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n").stdout
    installed_debs = {line.split()[0] for line in statuses.splitlines() if line.endswith(" installed")}
    assert set(image_build.package_list(image_build.PACKAGES)) <= installed_debs
    assert not set(image_build.package_list(image_build.BUILD_PACKAGES)) & installed_debs


def test_serves_start_and_creates_a_worker_pod(running: Running, api_client: k8s.ApiClient):
    kube, namespace = Kube(api_client), running.namespace
    wait_for(lambda: any(sa.metadata.name == "default"
                         for sa in kube.core.list_namespaced_service_account(namespace).items),
             what="the namespace's default ServiceAccount (pods need it)")
    created = kube.create_queue(namespace, "se", singleExecution=True, temporal={"host": "t:7233", "namespace": "n"})
    kube.wait_condition(namespace, "se", "True", timeout=60)
    queue_id = created["metadata"]["uid"]
    r = http("POST", f"{running.url}/api/v1/worker-queues/{queue_id}/start", body=b"{}",
             token=kube.queue_token(namespace, "se"))
    assert r.status == 200, r.body
    assert r.json()["queue_id"] == queue_id
    pods = wait_for(lambda: kube.pods(namespace, "se", alive=True), timeout=60, what="a worker pod")
    env = {e.name: e.value for e in pods[0].spec.containers[0].env}
    # The URL the chart's config file gives workers: the container read the chart's ConfigMap.
    assert env["CONTROL_PLANE_URL"] == running.service_url


def test_the_operator_was_never_denied(running: Running):
    """After the scenario: logged in as the chart's ServiceAccount, the chart's RBAC allowed all of it."""
    denied = [line for line in running.logs().splitlines() if DENIAL.search(line)]
    assert not denied, "\n".join(denied[:20])


def test_stops_on_sigterm_within_the_grace_period(running: Running):
    started = time.monotonic()
    running.podman("stop", "--time=30", running.name)
    assert time.monotonic() - started < 30
    code = running.podman("inspect", "--format={{.State.ExitCode}}", running.name).stdout.strip()
    assert code == "0", running.logs()[-4000:]
    # The chart's http.drainSeconds reached it: it served on, unready, before closing (test_drain.py).
    assert "serving 5s more while this replica leaves the Service's endpoints" in running.logs()
