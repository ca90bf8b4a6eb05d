"""`workerqueue-operator dev`: a local control plane, the CRD, the examples and the operator on it.

Everything runs until Ctrl-C or SIGTERM; then the operator stops and the control plane's processes
are stopped by PID (they also die with this process if it is SIGKILLed).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from workerqueue_operator.devcluster import assets as assets_
from workerqueue_operator.devcluster.controlplane import ControlPlane, run_until_signal
from workerqueue_operator.models import crd
from workerqueue_operator.models.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _kubectl(bin_dir: Path, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
                            input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def install_crds(bin_dir: Path, kubeconfig: Path) -> None:
    _kubectl(bin_dir, kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crd.render_crd_yaml())
    _kubectl(bin_dir, kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
             "crd/workerqueues.agentcontrol.dev")


def usage(state_dir: Path, port: int) -> str:
    kubeconfig = state_dir / "kubeconfig"
    return f"""
workerqueue-operator dev is running. State and logs: {state_dir}

  export KUBECONFIG={kubeconfig}
  kubectl get --raw /version
  kubectl get workerqueues -o wide
  curl -f http://127.0.0.1:{port}/readyz

Start a worker for the example queue, as the real worker client does:

  TOKEN=$(kubectl get secret minimal-worker-token -o jsonpath='{{.data.token}}' | base64 -d)
  curl -s -X POST -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
       -d '{{"worker_sdk_version": "dev"}}' http://127.0.0.1:{port}/api/v1/worker-queues/minimal-queue/start

Ctrl-C stops everything.
"""


def main(*, state_dir: Path | None, port: int, verbose: bool) -> int:
    from workerqueue_operator import runner

    runner.configure_logging(verbose, plain=True)  # read by a person in a terminal
    state = (state_dir or Path(tempfile.mkdtemp(prefix="workerqueue-dev-"))).resolve()
    state.mkdir(parents=True, exist_ok=True)
    bin_dir = assets_.find_assets()

    def serve(control_plane: ControlPlane) -> None:
        install_crds(bin_dir, control_plane.kubeconfig)
        if EXAMPLES.is_dir():
            _kubectl(bin_dir, control_plane.kubeconfig, "apply", "-n", "default", "-f", str(EXAMPLES))
        os.environ["KUBECONFIG"] = str(control_plane.kubeconfig)  # kopf's login reads it
        settings = Settings.load(http_host="127.0.0.1", http_port=port, public_url=f"http://127.0.0.1:{port}")
        _say(usage(state, port))
        # kopf handles SIGINT/SIGTERM from here on and returns; the control plane is stopped after.
        asyncio.run(runner.run(settings, kubeconfig=str(control_plane.kubeconfig)))

    run_until_signal(ControlPlane(state, bin_dir, log=_say), serve)
    _say("stopped")
    return 0
