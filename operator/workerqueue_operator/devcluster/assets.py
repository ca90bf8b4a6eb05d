"""Locate the control-plane binaries (etcd, kube-apiserver, kube-controller-manager, kubectl, helm)."""

from __future__ import annotations

import os
import pathlib

from workerqueue_operator.devcluster import procs

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")

# operator/workerqueue_operator/devcluster/assets.py -> the repo root is three folders above this one.
ASSETS_SCRIPT = pathlib.Path(__file__).resolve().parents[3] / "hack" / "k8s-assets.sh"


class AssetsError(RuntimeError):
    """The binaries could not be found nor built."""


def missing_binaries(folder: pathlib.Path) -> list[str]:
    """Names of the binaries that are not executable files in `folder`."""
    return [b for b in BINARIES if not (folder / b).is_file() or not os.access(folder / b, os.X_OK)]


def find_assets() -> pathlib.Path:
    """The folder holding the binaries.

    KUBEBUILDER_ASSETS wins when it holds them all; otherwise hack/k8s-assets.sh is run,
    which builds them once per machine (minutes when cold) and prints the cached folder.
    """
    env = os.environ.get("KUBEBUILDER_ASSETS")
    if env and not missing_binaries(pathlib.Path(env)):
        return pathlib.Path(env)

    script = ASSETS_SCRIPT
    if not script.is_file():
        raise AssetsError(
            f"control-plane binaries not found: KUBEBUILDER_ASSETS={env!r} does not hold"
            f" {', '.join(BINARIES)} and {script} does not exist (not running from a source checkout?)"
        )
    code, out = procs.run_script(["bash", str(script)])
    lines = out.strip().splitlines()
    if code != 0 or not lines:
        raise AssetsError(f"{script} failed (exit code {code}); see its output above")
    folder = pathlib.Path(lines[-1].strip())
    missing = missing_binaries(folder)
    if missing:
        raise AssetsError(f"{script} printed {folder}, which lacks {', '.join(missing)}")
    return folder
