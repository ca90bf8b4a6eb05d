"""Fixtures shared by all tests.

Integration tests (everything under tests/integration/, marked `integration` automatically) get a
real control plane, started once per session; `pytest -m "not integration"` never starts it.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from kubernetes import client
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from workerqueue_operator.devcluster import procs
from workerqueue_operator.devcluster.assets import find_assets
from workerqueue_operator.devcluster.controlplane import ControlPlane
from workerqueue_operator.devcluster.kubelet import LocalKubelet
from workerqueue_operator.devcluster.temporal import TemporalServer

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_configure(config: pytest.Config) -> None:
    procs.bypass_proxies_for_loopback()  # all test traffic stays on loopback, whatever proxy CI sets
    # SIGTERM (a CI run cancelled) ends the run as Ctrl-C does, through every fixture's teardown: by
    # default it killed pytest at once, and what the fixtures started (a podman container, whose
    # conmon is no child of ours) lived on.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the teardown short
    raise KeyboardInterrupt


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


class Kubectl(Protocol):
    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="session")
def k8s_assets() -> Path:
    """The folder with etcd, kube-apiserver, kube-controller-manager, kubectl and helm."""
    return find_assets()


@pytest.fixture(scope="session")
def control_plane(k8s_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    # Logs stay in the temp dir for a post-mortem; the context manager stops the processes on
    # any exit, KeyboardInterrupt included (pytest tears fixtures down on it).
    state_dir = tmp_path_factory.mktemp("control-plane")
    with ControlPlane(state_dir, k8s_assets, log=lambda m: print(m, file=sys.stderr)) as cp:
        yield cp


@pytest.fixture(scope="session")
def temporal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalServer]:
    """A real Temporal dev server on loopback (`temporal server start-dev`), once per session.

    A test that stops it must start it again (on the same port and database) before it ends.
    """
    with TemporalServer(tmp_path_factory.mktemp("temporal"), log=lambda m: print(m, file=sys.stderr)) as server:
        yield server


@pytest.fixture
def kubelet(kubeconfig: Path, tmp_path: Path) -> Iterator[Callable[..., LocalKubelet]]:
    """Starts local kubelets (LocalKubelet's keyword arguments) that run the operator's pods as processes.

    Every one started is stopped at the end of the test, its children with it.
    """
    started: list[LocalKubelet] = []

    def start(**kwargs: Any) -> LocalKubelet:
        kwargs.setdefault("log", lambda m: print(m, file=sys.stderr))
        kubelet = LocalKubelet(kubeconfig, tmp_path / f"kubelet-{len(started)}", **kwargs)
        started.append(kubelet)  # stopped at the end (stop() is idempotent) even if its start fails half-way
        kubelet.start()
        return kubelet

    yield start
    for kubelet in reversed(started):
        kubelet.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> Iterator[client.ApiClient]:
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


@contextlib.contextmanager
def _fresh_namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists (pods can be created in it)."""
    core = client.CoreV1Api(api_client)
    name = f"test-{secrets.token_hex(4)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        _wait_for(
            lambda: _exists(lambda: core.read_namespaced_service_account("default", name)),
            f"ServiceAccount {name}/default",
        )
        yield name
    finally:  # also when its ServiceAccount never came
        # Not waiting for the namespace controller to empty it: nothing depends on that.
        with contextlib.suppress(ApiException):
            core.delete_namespace(name)


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    with _fresh_namespace(api_client) as name:
        yield name


@pytest.fixture
def other_namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A second fresh namespace, for what spans two."""
    with _fresh_namespace(api_client) as name:
        yield name


@pytest.fixture(scope="session")
def kubectl(k8s_assets: Path, kubeconfig: Path) -> Kubectl:
    """Runs the assets' kubectl against the test cluster; raises with its stderr if `check` and it fails."""
    cache_dir = kubeconfig.parent / "kubectl-cache"  # keep ~/.kube out of it

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(k8s_assets / "kubectl"), f"--kubeconfig={kubeconfig}", f"--cache-dir={cache_dir}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited with {done.returncode}:\n{done.stderr}")
        return done

    return run


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _exists(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True
