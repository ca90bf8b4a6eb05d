"""The /start benchmark of issue 3: the operator against a bare aiohttp baseline, same machine, same load.

For each queue count N: a namespace with N WorkerQueues on a local control plane, a fresh operator
process serving them (its VmRSS read once all are Ready, and after the load), a baseline process
serving a real /start answer from memory, and for each concurrency C one load-generator process per
server, baseline and operator alternating so that both meet the same outside noise. The operator is
paused (SIGSTOP) while the baseline is measured, so that its background work costs the baseline
nothing. Everything listens on 127.0.0.1 only, on ports picked at random; every process started is
stopped by PID in `finally`, Ctrl-C included.

On a small machine the load generator needs a core of its own: when its CPU share ("client cpu")
nears 1.0 it, not the server, bounds req/s, and the servers' CPU time per request compares better.

Exit code: 0 when the run completed, whatever the figures (a missed target is printed, not
failed); 1 when it could not run or a request was not answered 200; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bench import cluster, handover, heartbeats, loadgen, procs, report, scaling, spawn
from bench.loadgen import LoadResult, Target
from workerqueue_operator.devcluster import assets as assets_
from workerqueue_operator.devcluster import procs as procs_
from workerqueue_operator.devcluster.controlplane import ControlPlane, ControlPlaneError
from workerqueue_operator.devcluster.temporal import TemporalError, TemporalServer

ROOT = Path(__file__).resolve().parents[1]
QUEUES = (10, 1000)
CONCURRENCY = (1, 16, 128)
QUICK_QUEUES = (3,)
QUICK_CONCURRENCY = (1, 4)
PASSTHROUGH_CONCURRENCY = (1, 16)
MEASURED = ("kube-apiserver", "etcd", "kube-controller-manager")
"""The control plane's processes whose CPU the scale runs report (the garbage collector follows every
owned object, a generated token Secret too)."""
SCALE_KINDS = ("shared", "generated")
"""The scale runs: one token Secret shared by all queues, or one generated per queue by the operator."""
PASSTHROUGH_PATH = "/api/v1/executions/{queue_id}"
"""What a worker's activity reads most: its execution (the stand-in answers any path alike)."""
EXECUTION = {"id": "exec-bench", "status": "running", "agent_id": "agent-bench", "organization_id": "org-bench",
             "prompt": "hi", "execution_type": "AGENT", "created_at": "2026-01-01T00:00:00Z"}
START_TIMEOUT = 120.0
"""Guards against a hang while a server starts; not a speed requirement."""


class BenchError(RuntimeError):
    """The benchmark could not run (a process died, a server never answered, ...)."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ints(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    if not kinds or any(kind not in SCALE_KINDS for kind in kinds):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(SCALE_KINDS)}, got {text!r}")
    return kinds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", type=_ints, default=QUEUES, help="queue counts, e.g. 10,1000 (default)")
    p.add_argument("--concurrency", type=_ints, default=CONCURRENCY, help="e.g. 1,16,128 (default)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per load run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before them (default 1)")
    p.add_argument("--max-requests", type=int, default=5_000_000, help="cap per load run (default 5000000)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK_QUEUES} queues, concurrency {QUICK_CONCURRENCY}, 1s (+0.5s warm-up)")
    p.add_argument("--spawn-samples", type=int, default=20,
                   help="queues created one at a time for the spawn latency (default 20; 0: skip it)")
    p.add_argument("--spawn-burst", type=int, default=100,
                   help="queues created at once for the spawn latency (default 100)")
    p.add_argument("--scaling-samples", type=int, default=20,
                   help="workflows started one at a time on a scaling queue (default 20; 0: skip scaling)")
    p.add_argument("--scaling-burst", type=int, default=100,
                   help="workflows started at once on a scaling queue (default 100)")
    p.add_argument("--heartbeat-workers", type=int, default=1000,
                   help="simulated workers heartbeating against one queue (default 1000; 0: skip it)")
    p.add_argument("--heartbeat-interval", type=int, default=10,
                   help="their heartbeat interval in seconds (default 10)")
    p.add_argument("--passthrough", type=_ints, default=PASSTHROUGH_CONCURRENCY,
                   help="concurrencies of the pass-through latency benchmark (default 1,16)")
    p.add_argument("--no-passthrough", action="store_true", help="skip the pass-through latency benchmark")
    p.add_argument("--scale", type=int, default=10_000,
                   help="queues that exist before the operator starts, for Ready time and RSS, once with a "
                        "shared token Secret and once with one generated per queue (default 10000; 0: skip)")
    p.add_argument("--scale-secrets", type=_kinds, default=SCALE_KINDS,
                   help="which of the scale runs: shared, generated or both (default shared,generated)")
    p.add_argument("--handover-samples", type=int, default=3,
                   help="SIGKILLs of the active replica of two under peering (default 3; 0: skip)")
    p.add_argument("--no-handover-baseline", action="store_true",
                   help="skip the one handover sample with kopf's default peering lifetime (60 s)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--work-dir", type=Path,
                   help="folder for logs and the control plane's state (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work folder afterwards (it is always kept, without etcd's data, after a failure)")
    return p


# --- HTTP helpers (loopback only) ----------------------------------------------------------------

def _request(method: str, url: str, *, body: bytes | None = None, token: str | None = None) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answers."""
    request = urllib.request.Request(url, data=body, method=method)  # loopback URLs only
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, b""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


@dataclass
class Server:
    """A server process under test: the operator or the baseline."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with code {code}; tail of {self.log_path}:\n{_tail(self.log_path)}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while _request("GET", f"{self.url}/readyz")[0] != 200:
            self.alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} /readyz did not answer 200 within {START_TIMEOUT:.0f}s")
            time.sleep(0.2)

    def cpu_seconds(self) -> float | None:
        return procs.cpu_seconds(self.popen.pid)


class Loaded(NamedTuple):
    """One load run: the generator's figures, the server's CPU seconds, the control plane's CPU seconds
    and the API-server writes meanwhile."""

    result: LoadResult
    cpu: float | None
    others: dict[str, float]
    writes: dict[str, int]


def _cpu_since(pids: Mapping[str, int], before: Mapping[str, float | None]) -> dict[str, float]:
    """CPU seconds each process used since `before` (since its start when it has no entry there)."""
    spent: dict[str, float] = {}
    for name, pid in pids.items():
        now = procs.cpu_seconds(pid)
        if now is not None:
            spent[name] = now - (before.get(name) or 0.0)
    return spent


class Bench:
    def __init__(self, args: argparse.Namespace, *, kubectl: cluster.Kubectl, kubeconfig: Path,
                 children: procs.Children, work_dir: Path, servers: Mapping[str, int] | None = None) -> None:
        self.args = args
        self.servers = dict(servers or {})
        """pid by name of the control plane's processes whose CPU the scale runs report."""
        self.kubectl = kubectl
        self.kubeconfig = kubeconfig
        self.children = children
        self.work_dir = work_dir
        self.rows: list[report.Row] = []
        self.footprints: list[report.Footprint] = []
        self.spawn: list[spawn.SpawnResult] = []
        self.scaling: list[scaling.ScalingResult] = []
        self.heartbeats: heartbeats.HeartbeatResult | None = None
        self.passthrough: list[report.PassthroughRow] = []
        self.scale: list[report.Footprint] = []
        self.scale_p50: float | None = None
        self.scale_load: report.ScaleLoad | None = None
        self.scale_restart: tuple[float, int | None] | None = None
        self.handover: list[handover.HandoverResult] = []

    def measure_passthrough(self, concurrencies: Sequence[int]) -> None:
        """Latency the pass-through adds (issue 10): a stand-in upstream (the baseline server,
        answering any /api/v1/ path from memory) called directly, and through a fresh operator whose
        one queue has it as its upstream. The operator is paused while the direct runs are measured."""
        body_file = self.work_dir / "execution.json"
        body_file.write_bytes(json.dumps(EXECUTION).encode())
        upstream = self._start_baseline(body_file, "upstream")
        upstream.name = "upstream"
        upstream.wait_ready()
        namespace = "bench-passthrough"
        targets = cluster.create_upstream_queue(self.kubectl, namespace, upstream.url)
        targets_file = self.work_dir / "targets-passthrough.json"
        targets_file.write_text(json.dumps(targets))
        operator = self._start_operator("passthrough")
        operator.wait_ready()
        cluster.wait_ready(self.kubectl, namespace, 1, say=say, alive=operator.alive, timeout=START_TIMEOUT)
        say(f"measuring pass-through latency: operator pid {operator.popen.pid} -> stand-in pid {upstream.popen.pid}")
        request = ("--method", "GET", "--path", PASSTHROUGH_PATH)
        for concurrency in concurrencies:
            with procs.paused(operator.popen):
                direct = self._load(upstream, targets_file, concurrency, "passthrough", request).result
            via = self._load(operator, targets_file, concurrency, "passthrough", request).result
            self.passthrough.append(report.passthrough_row(concurrency, direct, via))
        self.children.stop(operator.popen)
        self.children.stop(upstream.popen)

    def measure_scale(self, count: int, kinds: Sequence[str] = SCALE_KINDS) -> None:
        """`count` queues made before the operator starts: its Ready time and memory (issue 11)."""
        if count <= 0:
            return
        for generated in [kind == "generated" for kind in kinds]:
            namespace = f"bench-scale-{'generated' if generated else 'shared'}"
            say(f"creating {count} WorkerQueues in {namespace} "
                f"({'a token Secret generated per queue' if generated else 'one shared token Secret'})")
            began = time.monotonic()
            targets = cluster.create_queues(self.kubectl, namespace, count, generated=generated)
            say(f"  created in {time.monotonic() - began:.1f}s")
            spent_before = {name: procs.cpu_seconds(pid) for name, pid in self.servers.items()}
            requests_before = cluster.api_requests(self.kubectl)
            operator = self._start_operator(count)
            began = time.monotonic()
            operator.wait_ready()
            cluster.wait_ready(self.kubectl, namespace, count, say=say, alive=operator.alive,
                               timeout=START_TIMEOUT + count)
            ready_seconds = time.monotonic() - began
            spent = _cpu_since({"operator": operator.popen.pid, **self.servers}, spent_before)
            rss = procs.rss_kib(operator.popen.pid)
            writes = cluster.writes_between(requests_before, cluster.api_requests(self.kubectl))
            say(f"  all Ready after {ready_seconds:.1f}s; operator VmRSS {rss} KiB; CPU meanwhile "
                + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in spent.items())
                + "; API-server writes meanwhile " + report.writes_text(writes, count))
            idle = self._idle_cpu(operator)
            if targets:
                targets_file = self.work_dir / f"targets-scale-{count}.json"
                targets_file.write_text(json.dumps(targets))
                result, cpu, others, load_writes = self._load(operator, targets_file, 16, count)
                self.scale_p50 = result["p50_ms"]
                # What the p50 is made of: the operator's CPU per request, and what the rest of the
                # machine (the control plane) spent meanwhile, out of the same two cores.
                self.scale_load = {"operator_cpu_ms_per_req": report.cpu_ms_per_request(cpu, result),
                                   "others_cpu_seconds": others,
                                   "writes": load_writes, "idle_cpu": idle}
            self.scale.append(report.Footprint(
                queues=count, generated=generated, ready_seconds=ready_seconds, rss_ready_kib=rss,
                rss_after_load_kib=procs.rss_kib(operator.popen.pid),
                peak_rss_kib=procs.peak_rss_kib(operator.popen.pid), idle_cpu=idle, cpu_until_ready=spent,
                writes_until_ready=writes))
            self.children.stop(operator.popen)
            if not generated:
                # The common start: a restart (upgrade, rescheduling) over queues that are Ready already.
                operator = self._start_operator(count, name=f"{count}-restart")
                began = time.monotonic()
                operator.wait_ready()
                cluster.wait_ready(self.kubectl, namespace, count, say=say, alive=operator.alive,
                                   timeout=START_TIMEOUT + count)
                self.scale_restart = (time.monotonic() - began, procs.rss_kib(operator.popen.pid))
                say(f"  restarted over {count} Ready queues: ready after {self.scale_restart[0]:.1f}s")
                self.children.stop(operator.popen)
            # Waited for: the namespace controller's deletions would otherwise load the API server
            # during the next measurement.
            say(f"  deleting the {count} queues")
            began = time.monotonic()
            self.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=900s", timeout=960)
            say(f"  deleted in {time.monotonic() - began:.1f}s")

    def measure_handover(self) -> None:
        """Two replicas under peering; the active one SIGKILLed (issue 11)."""
        if self.args.handover_samples <= 0:
            return
        handover.prepare(self.kubectl, str(ROOT))
        runs: list[int | None] = [None] if self.args.no_handover_baseline else [None, handover.KOPF_DEFAULT_LIFETIME]
        for lifetime in runs:
            samples = self.args.handover_samples if lifetime is None else 1
            say(f"measuring handover ({samples} samples, peering lifetime {lifetime or 'default'})")
            self.handover.append(handover.measure(self.kubectl, start=self._start_replica, kill=self._kill,
                                                  samples=samples, lifetime=lifetime, say=say))

    def _start_replica(self, name: str, priority: int, env: dict[str, str]) -> handover.Replica:
        server = self._start_operator(0, name=name, args=["--peering", handover.PEERING, "--priority", str(priority)],
                                      env=env)
        server.wait_ready()
        return handover.Replica(url=server.url, pid=server.popen.pid, alive=server.alive)

    def _kill(self, replica: handover.Replica) -> None:
        for popen in self.children.running():
            if popen.pid == replica.pid:
                if popen.poll() is None:
                    os.killpg(popen.pid, signal.SIGKILL)  # no goodbye to the peering object
                self.children.stop(popen)

    def measure_spawn(self) -> None:
        """Worker-pod spawn latency against a fresh operator (issue 4)."""
        if self.args.spawn_samples <= 0:
            return
        operator = self._start_operator(0)
        operator.wait_ready()
        say("measuring worker-pod spawn latency")
        self.spawn = spawn.measure(self.kubeconfig, one_by_one=self.args.spawn_samples,
                                   at_once=self.args.spawn_burst, say=say)
        self.children.stop(operator.popen)

    def measure_scaling(self) -> None:
        """From a workflow's start to its worker pod, on the real Temporal dev server (issue 9)."""
        if self.args.scaling_samples <= 0:
            return
        temporal = TemporalServer(self.work_dir / "temporal", log=lambda m: say(f"  {m}"))
        try:
            temporal.start()
            task_queue = "bench-scaling"
            operator = self._start_operator("scaling")
            operator.wait_ready()
            scaling.create_queue(self.kubectl, temporal, task_queue)
            say("measuring scale-up latency")
            self.scaling = scaling.measure(self.kubeconfig, temporal, task_queue,
                                           one_by_one=self.args.scaling_samples, at_once=self.args.scaling_burst,
                                           say=say)
            self.children.stop(operator.popen)
        finally:
            temporal.stop()

    def measure_heartbeats(self) -> None:
        """Lease writes and operator CPU under a fleet of heartbeating workers (issue 8)."""
        if self.args.heartbeat_workers <= 0:
            return
        queue_id, token = heartbeats.create_queue(self.kubectl, "bench-heartbeats", self.args.heartbeat_interval)
        operator = self._start_operator("heartbeats")
        operator.wait_ready()
        say(f"measuring {self.args.heartbeat_workers} heartbeating workers")
        self.heartbeats = heartbeats.measure(
            operator.url, operator.popen.pid, queue_id, token, workers=self.args.heartbeat_workers,
            interval=self.args.heartbeat_interval, measure=3 * self.args.heartbeat_interval, say=say)
        self.children.stop(operator.popen)

    def run(self, queue_counts: Sequence[int], concurrencies: Sequence[int]) -> None:
        for index, count in enumerate(queue_counts):
            namespace = f"bench-{count}"
            say(f"creating {count} WorkerQueues in namespace {namespace}")
            began = time.monotonic()
            targets = cluster.create_queues(self.kubectl, namespace, count)
            say(f"  created in {time.monotonic() - began:.1f}s")
            targets_file = self.work_dir / f"targets-{count}.json"
            targets_file.write_text(json.dumps(targets))
            # The next operator must not see these queues; deleted while this one runs, should it
            # hold a finalizer on them.
            last = index == len(queue_counts) - 1
            self._measure(count, namespace, targets, targets_file, concurrencies, delete_after=not last)

    def _measure(self, count: int, namespace: str, targets: list[Target], targets_file: Path,
                 concurrencies: Sequence[int], *, delete_after: bool) -> None:
        operator = self._start_operator(count)
        say(f"operator pid {operator.popen.pid} on {operator.url}; waiting for {count} queues to be Ready")
        began = time.monotonic()
        operator.wait_ready()
        cluster.wait_ready(self.kubectl, namespace, count, say=say, alive=operator.alive,
                           timeout=START_TIMEOUT + count)
        ready_seconds = time.monotonic() - began
        rss_ready = procs.rss_kib(operator.popen.pid)
        say(f"  all Ready after {ready_seconds:.1f}s; operator VmRSS {rss_ready} KiB")
        idle_cpu = self._idle_cpu(operator)
        say(f"  operator CPU with no /start traffic: {idle_cpu:.0%} of one core")

        template = self._template(operator, targets[0])
        body_file = self.work_dir / f"start-response-{count}.json"
        body_file.write_bytes(template)
        baseline = self._start_baseline(body_file, count)
        baseline.wait_ready()
        say(f"baseline pid {baseline.popen.pid} on {baseline.url}, serving {len(template)} bytes")

        # The idle baseline costs the operator nothing; the paused operator costs the baseline nothing.
        for concurrency in concurrencies:
            with procs.paused(operator.popen):
                base, base_cpu, _, _ = self._load(baseline, targets_file, concurrency, count)
            oper, oper_cpu, _, _ = self._load(operator, targets_file, concurrency, count)
            self.rows.append(report.make_row(count, concurrency, base, oper, base_cpu, oper_cpu))

        self.footprints.append(report.Footprint(
            queues=count, ready_seconds=ready_seconds, rss_ready_kib=rss_ready,
            rss_after_load_kib=procs.rss_kib(operator.popen.pid),
            peak_rss_kib=procs.peak_rss_kib(operator.popen.pid), idle_cpu=idle_cpu))
        self.children.stop(baseline.popen)
        if delete_after:
            cluster.delete_queues(self.kubectl, namespace)
        self.children.stop(operator.popen)

    def _idle_cpu(self, server: Server) -> float:
        """The server's CPU share, in cores, over one load run's time with no load."""
        window = self.args.warmup + self.args.seconds
        before = server.cpu_seconds()
        time.sleep(window)
        after = server.cpu_seconds()
        server.alive()
        return (after - before) / window if before is not None and after is not None else 0.0

    def _start_operator(self, count: int | str, *, name: str = "", args: Sequence[str] = (),
                        env: dict[str, str] | None = None) -> Server:
        port = procs.free_port()
        # Every /start of the load is a new worker that never heartbeats: a flood by construction, which
        # the registry's bounds would answer 503 once they are reached. Out of the way here.
        env = {**os.environ, "WQ_HTTP_HOST": "127.0.0.1", "WQ_HTTP_PORT": str(port),
               "WQ_ORGANIZATION_ID": "org-bench", "KUBECONFIG": str(self.kubeconfig), "WQ_HTTP_DRAIN_SECONDS": "0",
               **{f"WQ_REGISTRY_MAX_{bound}": "100000000" for bound in (
                   "PENDING", "PENDING_PER_QUEUE", "PENDING_PER_NAMESPACE", "WORKERS", "WORKERS_PER_QUEUE",
                   "WORKERS_PER_NAMESPACE")}, **(env or {})}
        log_path = self.work_dir / f"operator-{name or count}.log"
        popen = self.children.spawn(
            [sys.executable, "-m", "workerqueue_operator.cli", "run", "--kubeconfig", str(self.kubeconfig), *args],
            log_path=log_path, env=env)
        return Server("operator", popen, f"http://127.0.0.1:{port}", log_path)

    def _start_baseline(self, body_file: Path, count: int | str) -> Server:
        port = procs.free_port()
        log_path = self.work_dir / f"baseline-{count}.log"
        popen = self.children.spawn(
            [sys.executable, "-m", "bench.baseline", "--port", str(port), "--body", str(body_file)],
            log_path=log_path, cwd=ROOT)
        return Server("baseline", popen, f"http://127.0.0.1:{port}", log_path)

    def _template(self, operator: Server, target: Target) -> bytes:
        """A real /start answer of the operator: the baseline serves its bytes."""
        body = json.dumps(loadgen.worker_body(0, "http://agent-control-plane.bench.internal:8000")).encode()
        url = f"{operator.url}{loadgen.START_PATH.format(queue_id=target['queue_id'])}"
        status, answer = _request("POST", url, body=body, token=target["token"])
        if status != 200:
            raise BenchError(f"/start for queue {target['queue_id']} answered {status}: {answer[:500]!r}")
        return answer

    def _load(self, server: Server, targets_file: Path, concurrency: int,
              count: int | str, request: Sequence[str] = ()) -> Loaded:
        """One load run against `server`."""
        out = self.work_dir / f"load-{server.name}-{count}-c{concurrency}.json"
        log_path = out.with_suffix(".log")
        # What the control plane spent meanwhile, out of the same two cores: the operator's writes.
        # (Its CPU read after the scrape of its request counts, which it spends too.)
        requests_before = cluster.api_requests(self.kubectl)
        others_before = {name: procs.cpu_seconds(pid) for name, pid in self.servers.items()}
        cpu_before = server.cpu_seconds()
        popen = self.children.spawn(
            [sys.executable, "-m", "bench.loadgen", "--base-url", server.url, "--targets", str(targets_file),
             "--concurrency", str(concurrency), "--warmup", str(self.args.warmup),
             "--seconds", str(self.args.seconds), "--max-requests", str(self.args.max_requests), "--out", str(out),
             *request],
            log_path=log_path, cwd=ROOT)
        try:
            # The generator stops by itself; this bound only guards against a hang.
            code = popen.wait(self.args.warmup + self.args.seconds + START_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"the load generator against {server.name} did not stop; see {log_path}") from exc
        finally:
            self.children.stop(popen)
        cpu_after = server.cpu_seconds()
        others = _cpu_since(self.servers, others_before)
        writes = cluster.writes_between(requests_before, cluster.api_requests(self.kubectl))
        server.alive()
        if code != 0:
            raise BenchError(f"the load generator exited with {code}:\n{_tail(log_path)}")
        result: LoadResult = json.loads(out.read_text())
        say(f"  {server.name}, {count}, concurrency {concurrency}: {result['rps']:.0f} req/s, "
            f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, non-200 {result['non_200']}; "
            + "meanwhile " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in others.items())
            + "; API-server writes " + (", ".join(f"{key} {n}" for key, n in list(writes.items())[:4]) or "none"))
        cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
        return Loaded(result, cpu, others, writes)


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.queues, args.concurrency, args.seconds, args.warmup = QUICK_QUEUES, QUICK_CONCURRENCY, 1.0, 0.5
        args.spawn_samples, args.spawn_burst = 3, 10
        args.scaling_samples, args.scaling_burst = 3, 10
        args.heartbeat_workers = 20
        args.passthrough = (1, 4)
        args.scale, args.handover_samples, args.no_handover_baseline = 200, 1, True
    began = time.monotonic()
    procs_.bypass_proxies_for_loopback()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="wq-bench-", dir=args.work_dir))
    children = procs.Children()
    control_plane: ControlPlane | None = None
    bench: Bench | None = None
    failed = True
    with procs.interruptible():
        try:
            bin_dir = assets_.find_assets()
            control_plane = ControlPlane(work_dir / "control-plane", bin_dir, log=lambda m: say(f"  {m}"))
            say(f"starting a control plane in {control_plane.state_dir}")
            control_plane.start()
            kubectl = cluster.Kubectl(bin_dir / "kubectl", control_plane.kubeconfig)
            cluster.install_crd(kubectl)
            bench = Bench(args, kubectl=kubectl, kubeconfig=control_plane.kubeconfig, children=children,
                          work_dir=work_dir, servers={name: control_plane.pid(name) for name in MEASURED})
            bench.run(args.queues, args.concurrency)
            bench.measure_spawn()
            bench.measure_scaling()
            bench.measure_heartbeats()
            if not args.no_passthrough:
                bench.measure_passthrough(args.passthrough)
            bench.measure_scale(args.scale, args.scale_secrets)
            bench.measure_handover()
            failed = False
        except procs.Interrupted:
            say(f"interrupted: stopping everything; logs: {work_dir}")
            return 130
        except (BenchError, cluster.ClusterError, ControlPlaneError, assets_.AssetsError, TemporalError,
                RuntimeError) as exc:
            say(f"benchmark failed: {exc}\nlogs: {work_dir}")
            return 1
        finally:
            procs.ignore_interrupts()  # the clean-up must not be cut short; restored on leaving the block
            children.stop_all()
            if control_plane is not None:
                control_plane.stop()
            if not failed and not args.keep:
                shutil.rmtree(work_dir, ignore_errors=True)
            elif failed and control_plane is not None:  # the logs tell what happened, etcd's data does not
                shutil.rmtree(control_plane.state_dir / "etcd", ignore_errors=True)
    assert bench is not None
    wall = time.monotonic() - began
    _print(bench, wall, args, work_dir)
    errors = sum(r["errors"] for r in bench.rows) + sum(r["errors"] for r in bench.passthrough)
    return 1 if errors else 0


def _print(bench: Bench, wall: float, args: argparse.Namespace, work_dir: Path) -> None:
    print()
    print(report.table(bench.rows))
    print()
    print(report.legend())
    print(report.footprint_lines(bench.footprints))
    print(report.verdict(bench.rows))
    if bench.spawn:
        print()
        print(spawn.lines(bench.spawn))
    if bench.scaling:
        print()
        print(scaling.lines(bench.scaling))
    if bench.heartbeats is not None:
        print()
        print(heartbeats.lines(bench.heartbeats))
    if bench.passthrough:
        print()
        print(report.passthrough_lines(bench.passthrough, PASSTHROUGH_PATH.format(queue_id="{id}")))
    if bench.scale:
        print()
        print(report.scale_lines(bench.scale, bench.scale_p50, bench.rows, bench.scale_restart, bench.scale_load))
    if bench.handover:
        print()
        print(handover.lines(bench.handover))
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; {args.warmup:g}s warm-up + "
          f"{args.seconds:g}s measured per run; benchmark wall time {wall:.1f}s")
    if args.keep:
        print(f"work folder kept: {work_dir}")
    if args.json is not None:
        figures = {"machine": _machine(), "wall_seconds": wall,
                   "parameters": {"queues": list(args.queues), "concurrency": list(args.concurrency),
                                  "seconds": args.seconds, "warmup": args.warmup},
                   "targets": {"min_throughput_ratio": report.MIN_THROUGHPUT_RATIO,
                               "max_p50_ratio": report.MAX_P50_RATIO},
                   "rows": bench.rows, "operator": bench.footprints, "spawn": bench.spawn, "scaling": bench.scaling,
                   "heartbeats": bench.heartbeats, "passthrough": bench.passthrough,
                   "scale": {"runs": bench.scale, "start_p50_ms_c16": bench.scale_p50, "load": bench.scale_load,
                             "restart": bench.scale_restart},
                   "handover": bench.handover}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")

