"""A local stand-in for the kubelet: runs the operator's worker pods as local processes.

The dev cluster has no kubelet, scheduler or container runtime. `LocalKubelet` watches the pods
labelled `app.kubernetes.io/managed-by=workerqueue-operator` and, for each new one, starts the test
worker (`python -m workerqueue_operator.devcluster.worker`, whatever the pod's image and command)
with the environment of the pod's first container (`value`, and `valueFrom` a Secret, a ConfigMap
or the pod's name/namespace), `HOSTNAME` set to the pod's hostname (`spec.hostname`, else its name,
cut to 63 characters) as in a container, and where it may (CAP_SYS_ADMIN, as root) the process's own
hostname too, in a UTS namespace of its own: software that reads gethostname(), as the real worker
does for its Temporal identity, sees the pod's. It reports what a kubelet would: Running (with a
running container status and podIP 127.0.0.1) once started, then Succeeded or Failed with the exit
code when the process ends (every pod is treated as `restartPolicy: Never`, which is what the
operator sets). A deleted pod's process gets SIGTERM,
then SIGKILL after a grace period, as a container would.

Children run in their own process groups, die with this process (PR_SET_PDEATHSIG, tied to the
long-lived watch thread that starts them), log to `<state_dir>/<namespace>_<pod>.log`, and are
stopped by PID on `stop()`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from workerqueue_operator.devcluster import procs
from workerqueue_operator.models import times

LogFn = Callable[[str], None]
LABEL_SELECTOR = "app.kubernetes.io/managed-by=workerqueue-operator"
WORKER_COMMAND = (sys.executable, "-m", "workerqueue_operator.devcluster.worker")
DELETE_GRACE_SECONDS = 5.0
HOSTNAME_MAX = 63
RETRY_SECONDS = 2.0
"""How often a pod whose Secret or ConfigMap was missing (or not read: the API server away) is tried
again, and an exit not reported (same reason) reported again."""
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


class EnvError(Exception):
    """A container's environment cannot be resolved (the kubelet's CreateContainerConfigError)."""


@dataclass
class PodProcess:
    namespace: str
    name: str
    uid: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    container: str
    image: str
    started_at: str
    reported_exit: bool = False
    report_again_at: float = 0.0
    deleted: bool = False


@dataclass
class _Waiting:
    """A pod whose environment could not be resolved yet: retried, as a kubelet does."""

    pod: Any
    reason: str
    since: float = field(default_factory=time.monotonic)


def watched(event: dict[str, Any]) -> tuple[str, Any | None]:
    """The resource version a watch event moves to, and its Pod (None for a BOOKMARK: the client
    leaves that one a dict, as it is only a resource version)."""
    if event["type"] == "BOOKMARK":
        return str(event["raw_object"]["metadata"]["resourceVersion"]), None
    pod = event["object"]
    return str(pod.metadata.resource_version), pod


class LocalKubelet(procs.Service):
    """Runs the operator's worker pods as local processes. Sync API; the work happens in two threads."""

    def __init__(
        self,
        kubeconfig: Path,
        state_dir: Path,
        *,
        namespaces: Sequence[str] = (),
        command: Sequence[str] = WORKER_COMMAND,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, str] | None = None,
        grace: float = DELETE_GRACE_SECONDS,
        log: LogFn | None = None,
    ) -> None:
        """`env`: given to every process before the pod's own; `overrides`: after it (e.g. a local URL)."""
        self.state_dir = state_dir.resolve()
        self.namespaces = tuple(namespaces)
        self.command = tuple(command)
        self.base_env = {k: os.environ[k] for k in _INHERITED if k in os.environ} | dict(env or {})
        self.overrides = dict(overrides or {})
        self.grace = grace
        self._api = k8s_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self._core = k8s.CoreV1Api(self._api)
        self._log = log
        self._lock = threading.Lock()
        self._procs: dict[str, PodProcess] = {}  # by pod UID
        self._waiting: dict[str, _Waiting] = {}  # by pod UID; only the runner thread touches it
        self._deleted: set[str] = set()  # UIDs of deleted pods not started yet
        self._to_run: queue.Queue[Any] = queue.Queue()
        self._stopping = threading.Event()
        self._listed = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._threads: list[threading.Thread] = []
        self.sets_hostname = False
        """Whether each process gets its pod's hostname as its own (known once started)."""

    # -- public API ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start watching; returns once the pods that exist already were seen."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.sets_hostname = procs.can_own_hostname()
        for target, name in ((self._run_loop, "kubelet-run"), (self._watch_loop, "kubelet-watch"),
                             (self._reap_loop, "kubelet-reap")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self._listed.wait(timeout):
            self.stop()
            raise RuntimeError(f"the local kubelet could not list pods within {timeout:.0f}s")

    def stop(self) -> None:
        """Stop watching and stop every child (SIGTERM, SIGKILL after the grace). Idempotent."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]
        # Children first, while the thread that started them lives on (see _run_loop).
        for proc in self.processes():
            procs.terminate(proc.popen, self.grace)
        self._to_run.put(None)
        for thread in self._threads:
            # The watch thread may sit in a read until the next event: it is a daemon, not waited for.
            thread.join(timeout=1.0 if thread.name == "kubelet-watch" else self.grace + 15)
        self._threads.clear()
        # A child the run thread was starting while the loop above ran was not in it: the end of that
        # thread killed it (PR_SET_PDEATHSIG); reaped here, so that no process is left unwaited for.
        for proc in self.processes():
            procs.terminate(proc.popen, self.grace)
        self._api.close()

    def processes(self) -> list[PodProcess]:
        """The pods' processes, running or ended, oldest first."""
        with self._lock:
            return list(self._procs.values())

    def process(self, namespace: str, name: str) -> PodProcess | None:
        """The newest process of a pod name."""
        found = [p for p in self.processes() if (p.namespace, p.name) == (namespace, name)]
        return found[-1] if found else None

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.processes() if p.popen.poll() is None]

    # -- the watch: new pods start, deleted pods stop -----------------------------------------

    def _watch_loop(self) -> None:
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    listed = self._list()
                    resource_version = listed.metadata.resource_version
                    for pod in listed.items:
                        self._on_pod("ADDED", pod)
                    self._listed.set()
                self._watch = k8s_watch.Watch()  # type: ignore[no-untyped-call]
                func, *args = self._list_call()
                for event in self._watch.stream(  # type: ignore[no-untyped-call]
                        func, *args, label_selector=LABEL_SELECTOR, resource_version=resource_version,
                        timeout_seconds=60, allow_watch_bookmarks=True):
                    if self._stopping.is_set():
                        break
                    if event["type"] == "ERROR":  # a Status, e.g. 410 Expired: list again
                        resource_version = None
                        break
                    resource_version, pod = watched(event)
                    if pod is not None:
                        self._on_pod(event["type"], pod)
            except ApiException as e:
                if e.status == 410:  # the resource version is too old: list again
                    resource_version = None
                    continue
                self._say(f"watch failed: {e.status} {e.reason}")
                self._stopping.wait(1.0)
            except Exception as e:
                if self._stopping.is_set():
                    break
                self._say(f"watch failed: {e}")
                self._stopping.wait(1.0)

    def _list_call(self) -> list[Any]:
        """The list function and its positional arguments (the watch reads the type from its docstring)."""
        if len(self.namespaces) == 1:
            return [self._core.list_namespaced_pod, self.namespaces[0]]
        return [self._core.list_pod_for_all_namespaces]

    def _list(self) -> Any:
        func, *args = self._list_call()
        return func(*args, label_selector=LABEL_SELECTOR)

    def _on_pod(self, kind: str, pod: Any) -> None:
        meta = pod.metadata
        if self.namespaces and meta.namespace not in self.namespaces:
            return
        with self._lock:
            proc = self._procs.get(meta.uid)
        if kind == "DELETED" or meta.deletion_timestamp is not None:
            with self._lock:
                self._deleted.add(meta.uid)
            if proc is not None and not proc.deleted:
                proc.deleted = True
                self._say(f"pod {meta.namespace}/{meta.name} deleted: stopping pid {proc.popen.pid}")
                threading.Thread(target=self._stop_deleted, args=(proc, kind != "DELETED"), daemon=True).start()
            return
        if proc is None and (pod.status.phase or "Pending") == "Pending":
            self._to_run.put(pod)

    def _run_loop(self) -> None:
        # This thread starts every child and outlives them all: PR_SET_PDEATHSIG fires when the
        # *thread* that started a child ends, so children are started nowhere else.
        while True:
            try:
                pod = self._to_run.get(timeout=RETRY_SECONDS)
            except queue.Empty:
                pod = False
            if pod is None or self._stopping.is_set():
                return
            if pod is False:  # now and then, the pods whose environment could not be resolved
                # Each stays listed while it is tried (_run takes it out): the reason it waited for
                # is what tells whether a failure is new (said) or the same again (not said).
                for w in list(self._waiting.values()):
                    self._run_or_wait(w.pod)
                continue
            self._run_or_wait(pod)

    def _run_or_wait(self, pod: Any) -> None:
        # Whatever goes wrong (the API server away), this thread must live on: its end would kill
        # every child (PR_SET_PDEATHSIG). The pod is tried again, as the kubelet's sync loop does.
        before = self._waiting.get(pod.metadata.uid)
        try:
            self._run(pod)
        except Exception as e:  # a failed try is retried, never the end of this thread
            reason = f"{type(e).__name__}: {e}"
            self._waiting[pod.metadata.uid] = _Waiting(pod, reason)
            if before is None or before.reason != reason:  # said once, not at every try
                self._say(f"pod {pod.metadata.namespace}/{pod.metadata.name} not started, tried again: {reason}")

    def _run(self, pod: Any) -> None:
        meta = pod.metadata
        before = self._waiting.pop(meta.uid, None)
        with self._lock:
            if meta.uid in self._procs or meta.uid in self._deleted:
                return
        container = pod.spec.containers[0]
        try:
            pod_env = self._resolve_env(pod, container)
        except EnvError as e:
            self._waiting[meta.uid] = _Waiting(pod, str(e))
            if before is None or before.reason != str(e):  # written and said once, not at every try
                waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                self._patch_status(pod, {"containerStatuses": [self._container_status(container, ready=False,
                                                                                      state=waiting)]})
                self._say(f"pod {meta.namespace}/{meta.name}: {e}")
            return
        # A container's hostname, as the kubelet makes it: spec.hostname, else the pod's name; cut to 63
        # characters less a trailing '-' or '.'.
        hostname = pod.spec.hostname or meta.name
        hostname = hostname if len(hostname) <= HOSTNAME_MAX else hostname[:HOSTNAME_MAX].rstrip("-.")
        env = {**self.base_env, **pod_env, **self.overrides, "HOSTNAME": hostname}
        log_path = self.state_dir / f"{meta.namespace}_{meta.name}.log"
        try:
            with log_path.open("ab") as log_file:
                popen = subprocess.Popen(
                    list(self.command), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    env=env, cwd=self.state_dir,
                    start_new_session=True,  # own process group: SIGTERM reaches the whole "container"
                    preexec_fn=procs.chain(procs.die_with_parent(os.getpid()),
                                           *([procs.own_hostname(hostname)] if self.sets_hostname else [])),
                )
        except OSError as e:
            if not _cannot_start(e):
                raise  # a fork that failed for want of memory or processes: tried again (_run_or_wait)
            # No such command, say: the container cannot start, as a kubelet reports it.
            now = times.rfc3339(time.time())
            terminated = {"exitCode": 128, "reason": "StartError", "message": str(e), "startedAt": now,
                          "finishedAt": now}
            if not self._patch_status(pod, {"phase": "Failed", "containerStatuses": [self._container_status(
                    container, ready=False, state={"terminated": terminated})]}):
                self._waiting[meta.uid] = _Waiting(pod, f"StartError: {e}")  # its status written next time
            if before is None or before.reason != f"StartError: {e}":
                self._say(f"pod {meta.namespace}/{meta.name} failed to start: {e}")
            return
        proc = PodProcess(meta.namespace, meta.name, meta.uid, popen, log_path, env, container.name,
                          container.image or "", times.rfc3339(time.time()))
        with self._lock:
            self._procs[meta.uid] = proc
        self._say(f"pod {meta.namespace}/{meta.name}: started pid {popen.pid}")
        started = proc.started_at
        self._patch_status(pod, {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": started,
            "conditions": [_condition(t, "True", started) for t in ("Initialized", "ContainersReady", "Ready",
                                                                   "PodScheduled")],
            "containerStatuses": [self._container_status(container, ready=True,
                                                         state={"running": {"startedAt": started}})],
        })

    def _resolve_env(self, pod: Any, container: Any) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in container.env or []:
            if var.value_from is None:
                env[var.name] = var.value or ""
                continue
            source = var.value_from
            if source.secret_key_ref is not None:
                value = self._key_of(pod.metadata.namespace, "Secret", source.secret_key_ref)
            elif source.config_map_key_ref is not None:
                value = self._key_of(pod.metadata.namespace, "ConfigMap", source.config_map_key_ref)
            elif source.field_ref is not None:
                value = {"metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace,
                         "metadata.uid": pod.metadata.uid, "status.podIP": "127.0.0.1",
                         "status.hostIP": "127.0.0.1", "spec.nodeName": pod.spec.node_name or "local",
                         "spec.serviceAccountName": pod.spec.service_account_name or "default",
                         }.get(source.field_ref.field_path)
            else:
                value = None
            if value is not None:
                env[var.name] = value
        return env

    def _key_of(self, namespace: str, kind: str, ref: Any) -> str | None:
        try:
            if kind == "Secret":
                data = self._core.read_namespaced_secret(ref.name, namespace).data or {}
                raw = data.get(ref.key)
                value = base64.b64decode(raw).decode() if raw is not None else None
            else:
                value = (self._core.read_namespaced_config_map(ref.name, namespace).data or {}).get(ref.key)
        except ApiException as e:
            if e.status != 404:
                raise EnvError(f'{kind.lower()} "{ref.name}" not read: {e.status} {e.reason}') from None
            if ref.optional:
                return None
            raise EnvError(f'{kind.lower()} "{ref.name}" not found') from None
        except Exception as e:  # the API server unreachable: tried again later
            raise EnvError(f'{kind.lower()} "{ref.name}" not read: {type(e).__name__}') from None
        if value is None and not ref.optional:
            raise EnvError(f"couldn't find key {ref.key} in {kind} {namespace}/{ref.name}")
        return value

    def _stop_deleted(self, proc: PodProcess, force_delete: bool) -> None:
        procs.terminate(proc.popen, self.grace)
        if force_delete:  # graceful deletion: the kubelet confirms once the containers are gone
            with contextlib.suppress(ApiException):
                self._core.delete_namespaced_pod(proc.name, proc.namespace, grace_period_seconds=0,
                                                 body=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(
                                                     uid=proc.uid)))

    # -- the reaper: ended processes end their pods -------------------------------------------

    def _reap_loop(self) -> None:
        while not self._stopping.wait(0.2):
            for proc in self.processes():
                code = procs.reap(proc.popen)
                if code is None or proc.reported_exit or time.monotonic() < proc.report_again_at:
                    continue
                if proc.deleted:
                    proc.reported_exit = True
                    continue
                exit_code = code if code >= 0 else 128 - code  # killed by a signal, as a container reports it
                if not proc.report_again_at:
                    self._say(f"pod {proc.namespace}/{proc.name}: pid {proc.popen.pid} exited with {exit_code}")
                proc.reported_exit = self._report_exit(proc, exit_code)
                proc.report_again_at = time.monotonic() + RETRY_SECONDS

    def _report_exit(self, proc: PodProcess, exit_code: int) -> bool:
        """Whether the exit is reported (or needs no report: the pod is gone)."""
        finished = times.rfc3339(time.time())
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                      "startedAt": proc.started_at, "finishedAt": finished}
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [_condition(t, "False", finished, "PodCompleted") for t in ("ContainersReady", "Ready")],
            "containerStatuses": [{"name": proc.container, "image": proc.image, "imageID": "", "ready": False,
                                   "started": False, "restartCount": 0, "state": {"terminated": terminated}}],
        }
        try:
            self._core.patch_namespaced_pod_status(proc.name, proc.namespace, {"status": status})
        except ApiException as e:
            if e.status == 404:
                return True
            final = 400 <= e.status < 500 and e.status not in (409, 429)  # refused for good (RBAC, invalid)
            if final or not proc.report_again_at:  # said once
                self._say(f"pod {proc.namespace}/{proc.name}: exit not reported{'' if final else ', tried again'}: "
                          f"{e.status} {e.reason}")
            return final
        except Exception as e:  # the API server unreachable: tried again
            if not proc.report_again_at:  # said once
                self._say(f"pod {proc.namespace}/{proc.name}: exit not reported, tried again: {type(e).__name__}")
            return False
        return True

    # -- helpers --------------------------------------------------------------------------------

    def _container_status(self, container: Any, *, ready: bool, state: dict[str, Any]) -> dict[str, Any]:
        return {"name": container.name, "image": container.image or "", "imageID": "", "ready": ready,
                "started": ready, "restartCount": 0, "state": state}

    def _patch_status(self, pod: Any, status: dict[str, Any]) -> bool:
        """Whether the status is written (or needs not be: the pod is gone)."""
        try:
            self._core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:
                self._say(f"pod {pod.metadata.namespace}/{pod.metadata.name}: status not written: "
                          f"{e.status} {e.reason}")
                return False
        except Exception as e:  # the API server unreachable: a status lost, as a kubelet's may be
            self._say(f"pod {pod.metadata.namespace}/{pod.metadata.name}: status not written: {type(e).__name__}")
            return False
        return True

    def _say(self, message: str) -> None:
        if self._log is not None:
            self._log(f"kubelet: {message}")


def _cannot_start(error: OSError) -> bool:
    """Whether starting the container's command fails for good (as it would at every try)."""
    return isinstance(error, (FileNotFoundError, PermissionError, NotADirectoryError)) or \
        error.errno == errno.ENOEXEC


def _condition(type_: str, status: str, when: str, reason: str | None = None) -> dict[str, Any]:
    condition = {"type": type_, "status": status, "lastTransitionTime": when}
    if reason:
        condition["reason"] = reason
    return condition


__all__ = ["LABEL_SELECTOR", "EnvError", "LocalKubelet", "PodProcess"]
