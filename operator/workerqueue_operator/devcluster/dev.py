"""`workerqueue-operator dev`: a local control plane, a local Temporal, the CRD, the examples and the operator.

The operator's default Temporal host and namespace are the local Temporal's, so the examples that
set none use it; a local kubelet runs the operator's worker pods as test-worker processes.
Everything runs until Ctrl-C, SIGTERM or SIGHUP (its terminal closed); then the operator stops, and
the kubelet's children, the Temporal server and the control plane's processes are stopped by PID
(they also die with this process if it is SIGKILLed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pydantic

from workerqueue_operator.devcluster import assets as assets_
from workerqueue_operator.devcluster import controlplane, procs
from workerqueue_operator.devcluster.controlplane import ControlPlane, run_until_signal
from workerqueue_operator.devcluster.kubelet import LocalKubelet
from workerqueue_operator.devcluster.temporal import TemporalServer, find_cli
from workerqueue_operator.models import crd
from workerqueue_operator.models import settings as settings_
from workerqueue_operator.models.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _say(message: str) -> None:
    with contextlib.suppress(OSError):  # its terminal closed (SIGHUP): the clean-up goes on unsaid
        print(message, file=sys.stderr, flush=True)


def _kubectl(bin_dir: Path, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    # Its discovery cache in the state folder, gone with it: in ~/.kube/cache, one per port, for good.
    cache = kubeconfig.parent / "kubectl-cache"
    result = subprocess.run([str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), f"--cache-dir={cache}", *args],
                            input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def install_crds(bin_dir: Path, kubeconfig: Path) -> None:
    _kubectl(bin_dir, kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crd.render_crd_yaml())
    controlplane.wait_established(functools.partial(_kubectl, bin_dir, kubeconfig), "workerqueues.agentcontrol.dev")


DEV_SETTINGS = ("http_host", "http_port", "public_url", "http_drain_seconds", "temporal_host", "temporal_namespace")
"""The settings `dev` sets itself: its cluster's Temporal, its loopback HTTP API (WQ_* of these are ignored)."""


def usage(state_dir: Path, port: int, *, temporal_address: str, temporal_namespace: str,
          bin_dir: Path | None = None) -> str:
    """What `dev` prints once everything runs: the commands to try, each ready to paste into a shell."""
    kubeconfig = state_dir / "kubeconfig"
    # The kubectl of the control plane's version first: one on PATH may be far older, or none there be.
    path = f"\n  export PATH={bin_dir}:$PATH" if bin_dir is not None else ""
    url = f"http://127.0.0.1:{port}"
    cli = find_cli()
    return f"""
workerqueue-operator dev is running. State and logs: {state_dir}

  export KUBECONFIG={kubeconfig}{path}
  kubectl get --raw /version
  kubectl get workerqueues -o wide
  curl -f {url}/readyz

Start a worker for the example queue, as the real worker client does:

  TOKEN=$(kubectl get secret minimal-worker-token -o jsonpath='{{.data.token}}' | base64 -d)
  curl -s -X POST -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
       -d '{{"worker_sdk_version": "dev"}}' {url}/api/v1/worker-queues/minimal-queue/start

or run the test worker (it behaves as the real one) and give it a workflow on the local Temporal ({temporal_address}):

  KUBIYA_API_KEY=$TOKEN CONTROL_PLANE_URL={url} QUEUE_ID=minimal-queue TEMPORAL_HOST=temporal:local \\
      {sys.executable} -m workerqueue_operator.devcluster.worker
  {cli} workflow start --address {temporal_address} --namespace {temporal_namespace} \\
      --task-queue minimal-queue --type AgentExecutionWorkflow --workflow-id demo-1 \\
      --input '{{"execution_id": "demo-1", "duration_seconds": 5}}'

or the real worker, `kubiya-control-plane-worker` from PyPI (installed once by hack/real-worker.sh), run from
this repository, with a workflow of the input it expects (stop the test worker first: on the same task queue,
it may take the workflow); this queue has no upstream, so the workflow fails at its first call
("Execution demo-3 not found"), as it would on a real control plane that never created it:

  KUBIYA_API_KEY=$TOKEN CONTROL_PLANE_URL={url} QUEUE_ID=minimal-queue TEMPORAL_HOST=temporal:local \\
      LITELLM_LOCAL_MODEL_COST_MAP=True "$(bash hack/real-worker.sh)"
  {cli} workflow start --address {temporal_address} --namespace {temporal_namespace} \\
      --task-queue minimal-queue --type AgentExecutionWorkflow --workflow-id demo-3 \\
      --input '{{"execution_id": "demo-3", "agent_id": "agent-1", "organization_id": "default", "prompt": "hi"}}'

The operator runs the pods of the single-execution example as local processes (logs: {state_dir / "kubelet"});
a workflow on its queue is taken by one of them, which then exits and is replaced:

  kubectl get pods -l app.kubernetes.io/managed-by=workerqueue-operator -w
  {cli} workflow start --address {temporal_address} --namespace {temporal_namespace} \\
      --task-queue single-execution-queue --type AgentExecutionWorkflow --workflow-id demo-2 \\
      --input '{{"execution_id": "demo-2", "duration_seconds": 5}}'

Ctrl-C stops everything.
"""


def setting_warnings(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """What `run` warns of (a WQ_* name that is no setting, unlikely values), and the WQ_* settings that
    `dev` sets itself: names only, a value may be a secret."""
    lines = []
    unknown = Settings.unknown_env(environ)
    if unknown:
        lines.append(f"environment variables ignored, no such setting: {', '.join(unknown)}")
    overridden = [name for field in DEV_SETTINGS if (name := f"{settings_.ENV_PREFIX}{field.upper()}") in environ]
    if overridden:
        lines.append(f"environment variables ignored, set by dev itself: {', '.join(overridden)}")
    lines.extend(f"settings: {doubt}" for doubt in settings.doubts(in_cluster=False))
    return lines


def main(*, state_dir: Path | None, port: int | None, verbose: bool) -> int:
    from workerqueue_operator import runner

    runner.configure_logging(verbose, plain=True)  # read by a person in a terminal
    try:  # before anything starts: the WQ_* settings of this shell, as the operator will take them
        loaded = Settings.load(http_host="127.0.0.1", http_port=port or 0, public_url="http://127.0.0.1",
                               http_drain_seconds=0)
    except pydantic.ValidationError as exc:
        for line in settings_.problems(exc):
            _say(line)
        return 2
    except settings_.SettingsError as exc:
        _say(str(exc))
        return 2
    for line in setting_warnings(loaded, os.environ):
        _say(line)
    procs.bypass_proxies_for_loopback()
    state = (state_dir or Path(tempfile.mkdtemp(prefix="workerqueue-dev-"))).resolve()
    state.mkdir(parents=True, exist_ok=True)
    bin_dir = assets_.find_assets()
    temporal = TemporalServer(state / "temporal", log=_say)
    temporal.db_file.unlink(missing_ok=True)  # a fresh Temporal, like the fresh cluster

    def serve(control_plane: ControlPlane) -> None:
        install_crds(bin_dir, control_plane.kubeconfig)
        # Started in this (main) thread: its process dies with it, like the control plane's.
        with temporal:
            # Picked like every other port here (8080 is often taken), once the control plane's and
            # Temporal's are bound, so that none of theirs can be it.
            http_port = port or procs.free_ports(1)[0]
            url = f"http://127.0.0.1:{http_port}"
            # No Service sends traffic here: Ctrl-C closes the HTTP API at once (http_drain_seconds).
            settings = Settings.load(http_host="127.0.0.1", http_port=http_port, public_url=url,
                                     http_drain_seconds=0,
                                     temporal_host=temporal.address, temporal_namespace=temporal.namespace)
            # The only Temporal here speaks plaintext: workers are told so unless their pod says otherwise.
            kubelet = LocalKubelet(control_plane.kubeconfig, state / "kubelet", env={"TEMPORAL_HOST": "temporal:local"},
                                   log=_say)
            with kubelet:
                if EXAMPLES.is_dir():
                    _kubectl(bin_dir, control_plane.kubeconfig, "apply", "-n", "default", "-f", str(EXAMPLES))
                os.environ["KUBECONFIG"] = str(control_plane.kubeconfig)  # kopf's login reads it
                _say(usage(state, http_port, temporal_address=temporal.address,
                           temporal_namespace=temporal.namespace, bin_dir=bin_dir))
                # The operator handles SIGINT/SIGTERM from here on and returns; everything else is stopped after.
                asyncio.run(runner.run(settings, kubeconfig=str(control_plane.kubeconfig)))

    # A terminal closed stops everything as Ctrl-C does: by default SIGHUP killed this process, its
    # children died with it, and the state folder stayed, with the cluster's admin token and etcd.
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        run_until_signal(ControlPlane(state, bin_dir, log=_say), serve)
    except runner.StartupError as exc:  # `--port` taken, say: one line, everything stopped
        _say(f"cannot start: {exc}")
        return 1
    except runner.HandlersStopped as exc:
        _say(f"stopped: its handlers (kopf) gave up: {exc}")
        return 1
    finally:
        # SIGTERM is back to its default here: a late SIGHUP must not cut the state's removal short.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if state_dir is None:
        # Made here, and holding the cluster's admin token and signing key: gone with the cluster.
        # After a failure (an exception above) it stays, with the logs that tell why.
        shutil.rmtree(state, ignore_errors=True)
        _say("stopped; state removed")
    else:
        _say(f"stopped; state kept in {state}")
    return 0
