"""The figures of a run: one row per (queues, concurrency), the targets of issue 3, the table."""

from __future__ import annotations

from typing import NotRequired, TypedDict

from bench.loadgen import LoadResult

# Issue 3: the operator's /start within reach of a bare aiohttp server on the same machine.
MIN_THROUGHPUT_RATIO = 0.8
"""operator req/s over baseline req/s must be at least this."""
MAX_P50_RATIO = 1.3
"""operator p50 over baseline p50 must be at most this."""
# Issue 11: on 2 cores req/s is bounded by the load generator; the server's CPU per request is the
# figure that says what the operator costs over bare aiohttp.
MAX_CPU_RATIO = 1.2
"""operator CPU per request over baseline CPU per request: the goal (reported, not a target row check)."""


class Row(TypedDict):
    queues: int
    concurrency: int
    baseline: LoadResult
    operator: LoadResult
    baseline_cpu_ms_per_req: float | None
    """Server CPU time per request sent, warm-up included (from /proc/<pid>/stat)."""
    operator_cpu_ms_per_req: float | None
    cpu_ratio: float | None
    """operator_cpu_ms_per_req over baseline_cpu_ms_per_req."""
    throughput_ratio: float
    p50_ratio: float
    throughput_met: bool
    p50_met: bool
    errors: int
    """Non-200 answers and failed requests, baseline and operator together: must be 0."""


class Footprint(TypedDict):
    """The operator process with N queues."""

    queues: int
    ready_seconds: float
    """From the operator's start until every queue reported Ready=True."""
    rss_ready_kib: int | None
    """VmRSS once every queue is Ready, before any load."""
    rss_after_load_kib: int | None
    peak_rss_kib: int | None
    """VmHWM at the end of the load."""
    idle_cpu: float
    """CPU it used with no /start traffic, in cores, over one run's time right after every queue was Ready."""
    cpu_until_ready: NotRequired[dict[str, float]]
    """CPU seconds each process used from the operator's start until every queue was Ready (the scale
    runs): the operator, kube-apiserver, etcd. Which of them bounds the Ready time."""
    writes_until_ready: NotRequired[dict[str, int]]
    """Write requests the API server served meanwhile, by "VERB resource[/subresource]" (the scale runs):
    what the API server's CPU went to."""


class PassthroughRow(TypedDict):
    """One concurrency of the pass-through benchmark: the stand-in upstream called directly, and via the operator."""

    concurrency: int
    direct: LoadResult
    via_operator: LoadResult
    overhead_p50_ms: float
    overhead_p99_ms: float
    errors: int


def passthrough_row(concurrency: int, direct: LoadResult, via: LoadResult) -> PassthroughRow:
    return PassthroughRow(concurrency=concurrency, direct=direct, via_operator=via,
                          overhead_p50_ms=via["p50_ms"] - direct["p50_ms"],
                          overhead_p99_ms=via["p99_ms"] - direct["p99_ms"],
                          errors=direct["non_200"] + via["non_200"])


def passthrough_lines(rows: list[PassthroughRow], path: str) -> str:
    lines = [f"pass-through latency overhead: GET {path}, operator -> stand-in upstream vs the stand-in directly",
             f"{'concurrency':>11} | {'direct p50/p99 ms':>18} | {'via operator p50/p99 ms':>24} | "
             f"{'overhead p50/p99 ms':>20} | {'req/s direct/via':>17} | errors"]
    for r in rows:
        d, v = r["direct"], r["via_operator"]
        lines.append(f"{r['concurrency']:>11} | {d['p50_ms']:>8.2f} / {d['p99_ms']:<7.2f} | "
                     f"{v['p50_ms']:>11.2f} / {v['p99_ms']:<10.2f} | "
                     f"{r['overhead_p50_ms']:>+8.2f} / {r['overhead_p99_ms']:<+9.2f} | "
                     f"{d['rps']:>7.0f} / {v['rps']:<7.0f} | {r['errors']}")
    return "\n".join(lines)


def make_row(queues: int, concurrency: int, baseline: LoadResult, operator: LoadResult,
             baseline_cpu: float | None, operator_cpu: float | None) -> Row:
    throughput_ratio = operator["rps"] / baseline["rps"] if baseline["rps"] else 0.0
    base_cpu, op_cpu = _per_request(baseline_cpu, baseline), _per_request(operator_cpu, operator)
    p50_ratio = operator["p50_ms"] / baseline["p50_ms"] if baseline["p50_ms"] else float("inf")
    return Row(
        queues=queues, concurrency=concurrency, baseline=baseline, operator=operator,
        baseline_cpu_ms_per_req=base_cpu, operator_cpu_ms_per_req=op_cpu,
        cpu_ratio=op_cpu / base_cpu if op_cpu is not None and base_cpu else None,
        throughput_ratio=throughput_ratio, p50_ratio=p50_ratio,
        throughput_met=throughput_ratio >= MIN_THROUGHPUT_RATIO, p50_met=p50_ratio <= MAX_P50_RATIO,
        errors=baseline["non_200"] + operator["non_200"],
    )


def _per_request(cpu_seconds: float | None, result: LoadResult) -> float | None:
    if cpu_seconds is None or not result["total_requests"]:
        return None
    return cpu_seconds / result["total_requests"] * 1000


def _mark(met: bool) -> str:
    return "met" if met else "NOT MET"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(rows: list[Row]) -> str:
    header = ("queues", "conc", "base req/s", "op req/s", "ratio", "base p50", "base p99", "op p50", "op p99",
              "p50 ratio", "errors", "base cpu", "op cpu", "cpu ratio", "client cpu b/o", "throughput", "p50")
    lines = [[str(r["queues"]), str(r["concurrency"]),
              f"{r['baseline']['rps']:.0f}", f"{r['operator']['rps']:.0f}", f"{r['throughput_ratio']:.2f}",
              f"{r['baseline']['p50_ms']:.2f}", f"{r['baseline']['p99_ms']:.2f}",
              f"{r['operator']['p50_ms']:.2f}", f"{r['operator']['p99_ms']:.2f}", f"{r['p50_ratio']:.2f}",
              str(r["errors"]), _cpu(r["baseline_cpu_ms_per_req"]), _cpu(r["operator_cpu_ms_per_req"]),
              "-" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}",
              f"{r['baseline']['client_cpu']:.2f}/{r['operator']['client_cpu']:.2f}",
              _mark(r["throughput_met"]), _mark(r["p50_met"])]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def legend() -> str:
    return (f"Targets (issue 3): operator req/s >= {MIN_THROUGHPUT_RATIO:.1f} x baseline, operator p50 <= "
            f"{MAX_P50_RATIO:.1f} x baseline. Latencies in ms, measured by the client; 'cpu' is the server's "
            "CPU ms per request;\n'client cpu' is the load generator's CPU share (near 1.00: the generator, "
            "not the server, bounds req/s).")


def footprint_lines(footprints: list[Footprint]) -> str:
    def mib(kib: int | None) -> str:
        return "-" if kib is None else f"{kib / 1024:.1f} MiB"

    return "\n".join(
        f"operator with {f['queues']} queues: Ready after {f['ready_seconds']:.1f}s; VmRSS {mib(f['rss_ready_kib'])} "
        f"when Ready, {mib(f['rss_after_load_kib'])} after the load (peak {mib(f['peak_rss_kib'])}); "
        f"CPU with no /start traffic {f['idle_cpu']:.0%} of a core"
        for f in footprints)


def verdict(rows: list[Row]) -> str:
    missed = [r for r in rows if not (r["throughput_met"] and r["p50_met"])]
    errors = sum(r["errors"] for r in rows)
    lines = []
    if errors:
        lines.append(f"ERRORS: {errors} requests were not answered 200 (see the JSON for statuses)")
    if missed:
        which = ", ".join(f"{r['queues']}q/c{r['concurrency']}" for r in missed)
        lines.append(f"TARGETS NOT MET in {len(missed)} of {len(rows)} rows: {which}")
    else:
        lines.append(f"all targets met in {len(rows)} rows")
    ratios = [r["cpu_ratio"] for r in rows if r["cpu_ratio"] is not None]
    if ratios:
        lines.append(f"server CPU per request, operator over baseline: {min(ratios):.2f}-{max(ratios):.2f} "
                     f"(goal <= {MAX_CPU_RATIO:.1f})")
    return "\n".join(lines)


def writes_text(writes: dict[str, int], queues: int, most: int = 4) -> str:
    """`PATCH workerqueues/status 10000 (1.00 a queue), ...`: the heaviest first."""
    shown = [f"{key} {n} ({n / queues:.2f} a queue)" for key, n in list(writes.items())[:most]]
    return ", ".join(shown) or "none"


def scale_lines(runs: list[Footprint], p50_ms: float | None, rows: list[Row],
                restart: tuple[float, int | None] | None = None) -> str:
    """The 10,000-queue runs (issue 11): goals Ready <= 30 s after start, RSS <= 300 MiB, /start p50 flat."""
    def mib(kib: int | None) -> str:
        return "-" if kib is None else f"{kib / 1024:.0f} MiB"

    kinds = ("one shared token Secret", "a token Secret generated per queue")
    def cpu(f: Footprint) -> str:
        spent = f.get("cpu_until_ready")
        if not spent:
            return ""
        text = "; CPU until then: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in spent.items())
        writes = f.get("writes_until_ready")
        return text + (f"; API-server writes: {writes_text(writes, f['queues'])}" if writes is not None else "")

    out = [f"{f['queues']} queues existing at start, {kind}: Ready after {f['ready_seconds']:.1f}s; "
           f"VmRSS {mib(f['rss_ready_kib'])} when Ready (peak {mib(f['peak_rss_kib'])}){cpu(f)}"
           for f, kind in zip(runs, kinds, strict=False)]
    if restart is not None and runs:
        out.append(f"{runs[0]['queues']} queues Ready already (an operator restart): ready after {restart[0]:.1f}s; "
                   f"VmRSS {mib(restart[1])}")
    if p50_ms is not None:
        same = [r for r in rows if r["concurrency"] == 16]
        others = ", ".join(f"{r['queues']} queues {r['operator']['p50_ms']:.2f} ms" for r in same)
        out.append(f"/start p50 at concurrency 16 with {runs[0]['queues']} queues: {p50_ms:.2f} ms"
                   + (f" (table above: {others})" if others else ""))
    out.append("Goals (issue 11): Ready <= 30 s after start, VmRSS <= 300 MiB, /start p50 flat.")
    return "\n".join(out)
