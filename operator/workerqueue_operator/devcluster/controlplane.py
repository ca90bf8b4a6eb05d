"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager.

There is no kubelet, scheduler or container runtime: pods are stored but never run. What is real
is the API (validation, admission incl. ServiceAccount, RBAC, TokenRequest/TokenReview) and the
controllers that matter to an operator (garbage collection, namespace deletion, service accounts).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from workerqueue_operator.devcluster import procs

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
CONTROLLERS = (  # the short names: 1.27 knows only these (KUBEBUILDER_ASSETS may be of any version), later ones too
    "garbagecollector",
    "namespace",
    "serviceaccount",
    "serviceaccount-token",
    # Fills the aggregated admin/edit/view ClusterRoles, so that binding them grants something.
    "clusterrole-aggregation",
    # Publishes kube-root-ca.crt in every namespace, which ServiceAccount token volumes refer to.
    "root-ca-cert-publisher",
)
_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")

LogFn = Callable[[str], None]


class ControlPlaneError(RuntimeError):
    """The control plane could not be started."""


class _PortInUse(ControlPlaneError, procs.PortCollision):
    """A randomly picked port was taken in the meantime; worth one more try."""


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


class ControlPlane(procs.Service):
    """etcd + kube-apiserver + kube-controller-manager as child processes, state and logs in `state_dir`.

    `start()` must be called from a thread that outlives the control plane (normally the main
    thread): the children are SIGKILLed by the kernel when the thread that started them ends, so
    that they never outlive a killed parent.
    """

    def __init__(
        self,
        state_dir: Path,
        assets: Path,
        *,
        log: LogFn | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.assets = assets.resolve()  # Popen runs in state_dir: a relative path would break
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.pids_file = self.state_dir / "pids"
        self.admin_token = secrets.token_urlsafe(32)
        self.start_timeout = start_timeout
        self._controller_token = secrets.token_urlsafe(32)
        self._log = log
        self._procs: list[_Proc] = []
        self._server_url: str | None = None
        self._certs_dir = self.state_dir / "certs"
        # The apiserver writes its self-signed serving cert followed by the CA that signed it.
        self._serving_cert = self._certs_dir / "apiserver.crt"

    # -- public API ---------------------------------------------------------------------------

    @property
    def server_url(self) -> str:
        if self._server_url is None:
            raise ControlPlaneError("the control plane is not started")
        return self._server_url

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self._procs]

    def pid(self, name: str) -> int:
        """The pid of one of the processes, by binary name (e.g. to freeze it in a test)."""
        for p in self._procs:
            if p.name == name:
                return p.popen.pid
        raise ControlPlaneError(f"no {name} among the control plane's processes")

    def start(self) -> None:
        """Start all three processes and return once the API answers and controllers run."""
        if self._procs:
            raise ControlPlaneError("the control plane is already started")
        began = time.monotonic()
        procs.start_once_more_on_collision(self._start_once, self.stop, self._say)
        self._say(f"control plane ready at {self.server_url} in {time.monotonic() - began:.1f}s")

    def stop(self) -> None:
        """Stop whatever runs, newest first (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        self._server_url = None
        while self._procs:
            # Popped only once gone, so that a stop() cut short (e.g. by a signal) can be redone.
            procs.terminate(self._procs[-1].popen)
            self._procs.pop()
        self.pids_file.unlink(missing_ok=True)

    # -- start-up -----------------------------------------------------------------------------

    def _start_once(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        missing = [b for b in _BINARIES if not (self.assets / b).is_file()]
        if missing:
            raise ControlPlaneError(f"{self.assets} lacks {', '.join(missing)}")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._certs_dir.mkdir(exist_ok=True)
        etcd_port, peer_port, api_port = procs.free_ports(3)
        sa_key, sa_pub = self._service_account_keys()
        tokens = self.state_dir / "tokens.csv"
        tokens.write_text(
            f'{self.admin_token},admin,admin,"system:masters"\n'
            f'{self._controller_token},system:kube-controller-manager,kube-controller-manager,"system:masters"\n'
        )
        tokens.chmod(0o600)

        # A fresh cluster each start: the state of a previous run would be of little use anyway.
        etcd_dir = self.state_dir / "etcd"
        shutil.rmtree(etcd_dir, ignore_errors=True)
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn(
            "etcd",
            [
                "--name=local",
                f"--data-dir={etcd_dir}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=local={peer_url}",
                "--unsafe-no-fsync",  # throw-away data: durability only costs time
                "--log-level=warn",
            ],
        )
        self._wait_until(lambda: _http_status(f"{etcd_url}/health") == 200, "etcd /health", etcd, deadline)
        self._say(f"etcd ready on {etcd_url}")

        apiserver = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={self._certs_dir}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={tokens}",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
            ],
        )
        server_url = f"https://127.0.0.1:{api_port}"
        self._wait_until(
            lambda: self._api_status(server_url, "/readyz") == 200,
            "kube-apiserver /readyz",
            apiserver,
            deadline,
        )
        self._server_url = server_url
        self._say(f"kube-apiserver ready on {server_url}")
        self._write_kubeconfig(self.kubeconfig, "admin", self.admin_token)
        cm_kubeconfig = self.state_dir / "controller-manager.kubeconfig"
        self._write_kubeconfig(cm_kubeconfig, "kube-controller-manager", self._controller_token)

        controller_manager = self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={cm_kubeconfig}",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={self._serving_cert}",
                "--leader-elect=false",
                "--secure-port=0",  # no health/metrics endpoint needed, and one port fewer
            ],
        )
        # The `default` ServiceAccount is made by the serviceaccount controller: proof that it runs.
        self._wait_until(
            lambda: self._api_status(server_url, "/api/v1/namespaces/default/serviceaccounts/default") == 200,
            "the default ServiceAccount (kube-controller-manager)",
            controller_manager,
            deadline,
        )
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{pid}\n" for pid in self.pids()))
        tmp.replace(self.pids_file)  # readers never see a partial file

    def _service_account_keys(self) -> tuple[Path, Path]:
        key, pub = self.state_dir / "sa.key", self.state_dir / "sa.pub"
        if not (key.exists() and pub.exists()):
            for cmd in (
                ["openssl", "genrsa", "-out", str(key), "2048"],
                ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
            ):
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise ControlPlaneError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
        return key, pub

    def _spawn(self, name: str, args: Sequence[str]) -> _Proc:
        log_path = self.state_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [str(self.assets / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=procs.die_with_parent(os.getpid()),
            )
        proc = _Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def _wait_until(self, ready: Callable[[], bool], what: str, proc: _Proc, deadline: float) -> None:
        while not ready():
            for p in self._procs:
                code = p.popen.poll()
                if code is not None:
                    tail = procs.tail(p.log_path)
                    error = _PortInUse if "address already in use" in tail else ControlPlaneError
                    raise error(f"{p.name} exited with code {code} while waiting for {what}:\n{tail}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"timed out after {self.start_timeout:.0f}s waiting for {what}; "
                    f"tail of {proc.log_path}:\n{procs.tail(proc.log_path)}"
                )
            time.sleep(0.1)

    def _api_status(self, server_url: str, path: str) -> int | None:
        if not self._serving_cert.exists():
            return None
        return _http_status(
            server_url + path,
            token=self.admin_token,
            context=ssl.create_default_context(cafile=str(self._serving_cert)),
        )

    def _write_kubeconfig(self, path: Path, user: str, token: str) -> None:
        # The CA by path, not inline: the `kubernetes` client copies inline data to a temporary file
        # that only a clean exit removes, so every SIGKILLed operator would leave one behind.
        cluster = {"server": self.server_url, "certificate-authority": str(self._serving_cert)}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
            "current-context": "local",
        }
        # JSON is YAML too, and needs no YAML library.
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)

    def _say(self, message: str) -> None:
        if self._log is not None:
            self._log(message)


def wait_established(kubectl: Callable[..., str], *crds: str, timeout: float = 60.0) -> None:
    """Waits until each CRD (`name.group`) serves, given `kubectl(*args) -> stdout` (raising on failure).

    Reads the CRD and its Established condition here rather than `kubectl wait
    --for=condition=Established` or a jsonpath filter on the conditions: both fail instead of waiting
    while a CRD just created has no conditions yet.
    """
    deadline = time.monotonic() + timeout
    for name in crds:
        while not _established(json.loads(kubectl("get", f"crd/{name}", "-o", "json"))):
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {name} not Established within {timeout:.0f}s")
            time.sleep(0.1)


def _established(crd: Mapping[str, Any]) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


class _Interrupted(KeyboardInterrupt):
    """Raised by the signal handler of run_until_signal to unwind whatever is running. A
    KeyboardInterrupt, as asyncio passes only those (and SystemExit) out of a task it runs: any
    other BaseException stays in the task, the signal lost (its handler ignores the next ones)."""


def run_until_signal(
    control_plane: ControlPlane,
    main: Callable[[ControlPlane], None] | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> int | None:
    """Start `control_plane`, run `main` on it (default: wait for one of `signals`), then stop it.

    A signal at any point, start-up included, unwinds to the stop; it is returned. Main thread only.
    `main` may install handlers of its own for these signals (as kopf does) and simply return.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        control_plane.start()
        if main is not None:
            main(control_plane)
            return None
        while True:
            signal.pause()
    except _Interrupted as e:
        received: int = e.args[0]
        return received
    finally:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        control_plane.stop()
        for s, h in previous.items():
            signal.signal(s, h)


# -- helpers ----------------------------------------------------------------------------------


def _http_status(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None) -> int | None:
    """The HTTP status of a GET, or None when nothing answers (yet)."""
    request = urllib.request.Request(url)  # noqa: S310 - our own loopback URLs
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, http.client.HTTPException):
        return None
