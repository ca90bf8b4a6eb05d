"""The load generator: `python -m bench.loadgen --base-url URL --targets FILE --concurrency C --out FILE`.

Its own process, so that it never shares an event loop (nor a GIL) with the server it measures.
C coroutines share one keep-alive aiohttp session of at most C connections; each posts /start as the
real worker does, for the next queue of the target list in turn, until the time is up or
`--max-requests` were sent. With `--method GET --path P`, each sends a bodiless GET of P (formatted
with the target's queue_id) instead, as a worker's activity reads its execution. Requests that
start after the warm-up and end before the deadline are measured. The figures are written as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TypedDict

import aiohttp
import yarl

START_PATH = "/api/v1/worker-queues/{queue_id}/start"


class Target(TypedDict):
    queue_id: str
    token: str


class LoadResult(TypedDict):
    """What one run measured; latencies in milliseconds, over the measured window only."""

    concurrency: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    non_200: int
    statuses: dict[str, int]
    first_error: str | None
    total_requests: int
    """Every request sent, warm-up and stragglers included."""
    client_cpu: float
    """CPU time of this process over its wall time: near 1.0, the generator itself is the limit."""
    response_bytes: int


def worker_body(worker: int, control_plane_url: str) -> dict[str, Any]:
    """A /start body like the one the real worker sends, one per simulated worker."""
    return {
        "worker_sdk_version": "0.9.4",
        "system_info": {
            "hostname": f"agent-worker-{worker:04d}",
            "platform": platform.platform(),
            "os_name": platform.system(),
            "os_version": platform.release(),
            "python_version": platform.python_version(),
            "cli_version": "0.9.4",
            "sdk_version": "0.9.4",
            "pid": 10_000 + worker,
            "cwd": "/home/worker/app",
            "supported_runtimes": ["default", "claude_code"],
            "llm_gateway_url": "http://litellm.bench.internal:4000",
            "docker_available": False,
            "docker_version": None,
            "cpu_count": 4,
            "cpu_percent": 12.5,
            "memory_total": 8_589_934_592,
            "memory_used": 2_147_483_648,
            "memory_percent": 25.0,
            "disk_total": 107_374_182_400,
            "disk_used": 21_474_836_480,
            "disk_percent": 20.0,
            "uptime_seconds": 3600.0,
        },
        "control_plane_url": control_plane_url,
    }


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class _Run:
    def __init__(self, args: argparse.Namespace, targets: list[Target]) -> None:
        base = args.base_url.rstrip("/")
        # Parsed once: the client's per-request work should be the request, not URL parsing.
        self.method: str = args.method
        content = {"Content-Type": "application/json"} if self.method == "POST" else {}
        self.requests = [
            (yarl.URL(base + args.path.format(queue_id=t["queue_id"]), encoded=True),
             {"Authorization": f"Bearer {t['token']}", **content})
            for t in targets]
        self.bodies = [json.dumps(worker_body(i, args.control_plane_url)).encode() for i in range(args.concurrency)]
        self.concurrency: int = args.concurrency
        self.max_requests: int = args.max_requests
        self.warmup: float = args.warmup
        self.seconds: float = args.seconds
        self.measure_from = 0.0
        self.deadline = 0.0
        self.next = 0
        self.sent = 0
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.first_error: str | None = None
        self.response_bytes = 0

    async def go(self) -> LoadResult:
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        began_cpu, began = time.process_time(), time.perf_counter()
        self.measure_from = began + self.warmup
        self.deadline = self.measure_from + self.seconds
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, w) for w in range(self.concurrency)))
        wall = time.perf_counter() - began
        ordered = sorted(self.latencies)
        non_200 = sum(n for status, n in self.statuses.items() if status != "200")
        return LoadResult(
            concurrency=self.concurrency,
            seconds=self.seconds,
            requests=len(ordered),
            rps=len(ordered) / self.seconds,
            p50_ms=percentile(ordered, 50) * 1000,
            p90_ms=percentile(ordered, 90) * 1000,
            p99_ms=percentile(ordered, 99) * 1000,
            max_ms=(ordered[-1] if ordered else 0.0) * 1000,
            mean_ms=(sum(ordered) / len(ordered) if ordered else 0.0) * 1000,
            non_200=non_200,
            statuses=dict(self.statuses),
            first_error=self.first_error,
            total_requests=self.sent,
            client_cpu=(time.process_time() - began_cpu) / wall,
            response_bytes=self.response_bytes,
        )

    async def _worker(self, session: aiohttp.ClientSession, worker: int) -> None:
        body = self.bodies[worker] if self.method != "GET" else None
        while self.sent < self.max_requests:
            started = time.perf_counter()
            if started >= self.deadline:
                return
            url, headers = self.requests[self.next]
            self.next = (self.next + 1) % len(self.requests)
            self.sent += 1
            try:
                async with session.request(self.method, url, data=body, headers=headers) as response:
                    payload = await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                payload, status = str(exc).encode(), type(exc).__name__
            ended = time.perf_counter()
            if status == "200":
                self.response_bytes = len(payload)
            elif self.first_error is None:
                self.first_error = f"{status}: {payload[:300].decode(errors='replace')}"
            if started >= self.measure_from and ended <= self.deadline:
                self.latencies.append(ended - started)
                self.statuses[status] += 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080")
    p.add_argument("--targets", type=Path, required=True, help="JSON list of {queue_id, token}")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--method", default="POST", choices=("POST", "GET"), help="POST (with a /start body) or GET")
    p.add_argument("--path", default=START_PATH, help="request path; {queue_id} is the target's (default: /start)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds measured after the warm-up")
    p.add_argument("--max-requests", type=int, default=5_000_000, help="stop after this many in any case")
    p.add_argument("--control-plane-url", default="http://agent-control-plane.bench.internal:8000",
                   help="the control_plane_url the simulated workers send")
    p.add_argument("--out", type=Path, required=True, help="where the JSON result goes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    targets: list[Target] = json.loads(args.targets.read_text())
    if not targets or args.concurrency < 1:
        print("need at least one target and a concurrency of 1 or more", file=sys.stderr)
        return 2
    result = asyncio.run(_Run(args, targets).go())
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
