"""workerqueue-operator: WorkerQueue resources, the worker /start API and worker pods, in-cluster."""

from importlib import metadata

try:
    __version__ = metadata.version("workerqueue-operator")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
