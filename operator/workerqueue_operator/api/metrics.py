"""Prometheus text exposition of the few metrics the HTTP API keeps (no client library needed)."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

# Seconds; /start answers from memory, so the interesting range is sub-millisecond to tens of ms.
_LATENCY = "workerqueue_http_request_duration_seconds"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


_UPSTREAM_LATENCY = "workerqueue_upstream_response_seconds"
# Seconds to an upstream's response headers: a network round trip plus the upstream's own work.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


UPSTREAM_FAILURES = ("unreachable", "bad_answer", "timeout", "cut", "busy")
"""Kinds of pass-through failures (cut: the answer broke off after it had begun; busy: refused as its
namespace held its share of the upstream host's connections)."""


def label(value: object) -> str:
    """A label value as the exposition format needs it: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class UpstreamStats:
    """What went through to one upstream (labelled by its origin, which never holds a credential)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = defaultdict(int, dict.fromkeys(("2xx", "4xx", "5xx"), 0))
        """By the status class the worker got (the upstream's, or 5xx for the operator's 502/503/504);
        the usual classes shown from 0, so that `increase()` sees a first 5xx."""
        self.failures: dict[str, int] = dict.fromkeys(UPSTREAM_FAILURES, 0)
        """By kind (UPSTREAM_FAILURES), each shown from 0."""
        self.latency_counts = [0] * (len(UPSTREAM_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0

    def answered(self, status: int, seconds: float) -> None:
        self.requests[status_class(status)] += 1
        self.latency_counts[bisect.bisect_left(UPSTREAM_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def failed(self, kind: str, status: int | None = None) -> None:
        """A failure; `status`: the operator's own answer (502, 504), None once the upstream's has begun."""
        self.failures[kind] += 1
        if status is not None:
            self.requests[status_class(status)] += 1


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


_UPSTREAMS_UNPRUNED = 64
"""Upstreams whose series are kept between scrapes before those no queue uses are looked for."""


class Metrics:
    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._latency_counts: dict[str, list[int]] = {}
        self._latency_sums: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, tuple[str, Callable[[], float], str]] = {}
        self._started: dict[tuple[str, str], int] = defaultdict(int)
        self._help: dict[str, str] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._families: dict[str, tuple[str, str, str, Callable[[], Mapping[str, float]]]] = {}
        self._upstreams: dict[str, UpstreamStats] = {}
        self._upstreams_in_use: Callable[[], set[str]] | None = None
        self._upstreams_pruned_at = _UPSTREAMS_UNPRUNED

    def keep_upstreams(self, in_use: Callable[[], set[str]]) -> None:
        """At each scrape, and whenever they outnumber those in use twice over, the series of an
        upstream no queue uses any more go (its queues deleted or moved elsewhere), so that a
        long-lived replica does not keep one per URL ever configured, scraped or not."""
        self._upstreams_in_use = in_use

    def upstream(self, origin: str) -> UpstreamStats:
        stats = self._upstreams.get(origin)
        if stats is None:
            if len(self._upstreams) >= self._upstreams_pruned_at:
                self._prune_upstreams()
                # Next when they are twice what is kept now: a pruning looks at every queue.
                self._upstreams_pruned_at = max(_UPSTREAMS_UNPRUNED, 2 * len(self._upstreams))
            stats = self._upstreams[origin] = UpstreamStats()
        return stats

    def _prune_upstreams(self) -> set[str]:
        """Forgets the upstreams no queue uses any more; those in use."""
        if self._upstreams_in_use is None:
            return set(self._upstreams)
        in_use = self._upstreams_in_use()
        for origin in [origin for origin in self._upstreams if origin not in in_use]:
            del self._upstreams[origin]
        return in_use

    def gauge(self, name: str, help_text: str, read: Callable[[], float], *, kind: str = "gauge") -> None:
        """A gauge (or a counter kept elsewhere: `kind="counter"`) read at scrape time, so it is never stale."""
        self._gauges[name] = (help_text, read, kind)

    def family(self, name: str, help_text: str, *, kind: str, label: str,
               read: Callable[[], Mapping[str, float]]) -> None:
        """A counter or gauge with one label, its values read at scrape time (label value -> value)."""
        self._families[name] = (help_text, kind, label, read)

    def describe(self, name: str, help_text: str, *, kinds: Sequence[str] = ()) -> None:
        """A counter with one label, `kind`, incremented by count(); `kinds` shown from 0."""
        self._help[name] = help_text
        counts = self._counts.setdefault(name, {})
        for kind in kinds:
            counts.setdefault(kind, 0)

    def count(self, name: str, kind: str) -> None:
        counts = self._counts[name]
        counts[kind] = counts.get(kind, 0) + 1

    def worker_started(self, namespace: str, queue: str) -> None:
        self._started[(namespace, queue)] += 1

    def know_queue(self, namespace: str, queue: str) -> None:
        """A queue known: its counter is shown from 0, so that its first start counts in `increase()`."""
        self._started.setdefault((namespace, queue), 0)

    def forget_queue(self, namespace: str, queue: str) -> None:
        """A queue deleted: its series go (ephemeral queues come and go, one series each would pile up)."""
        self._started.pop((namespace, queue), None)

    def observe(self, route: str, method: str, status: int, seconds: float, *, timed: bool = True) -> None:
        """A request answered; `timed`: its duration is a latency (not a websocket's or a stream's life)."""
        # Any token is a method to aiohttp's pure-Python parser: one series each would pile up.
        self._requests[(route, method if method in KNOWN_METHODS else "other", status)] += 1
        if not timed:
            return
        counts = self._latency_counts.get(route)
        if counts is None:
            counts = self._latency_counts[route] = [0] * (len(BUCKETS) + 1)
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._latency_sums[route] += seconds

    def render(self) -> str:
        lines = [
            "# HELP workerqueue_http_requests_total HTTP requests by route, method and status code.",
            "# TYPE workerqueue_http_requests_total counter",
        ]
        for (route, method, status), count in sorted(self._requests.items()):
            labels = f'route="{label(route)}",method="{label(method)}",code="{status}"'
            lines.append(f"workerqueue_http_requests_total{{{labels}}} {count}")
        lines += [
            "# HELP workerqueue_http_request_duration_seconds HTTP request latency by route.",
            "# TYPE workerqueue_http_request_duration_seconds histogram",
        ]
        for route, counts in sorted(self._latency_counts.items()):
            lines += _histogram(_LATENCY, f'route="{label(route)}"', BUCKETS, counts, self._latency_sums[route])
        lines += [
            "# HELP workerqueue_workers_started_total Successful /start calls by queue.",
            "# TYPE workerqueue_workers_started_total counter",
        ]
        for (namespace, queue), count in sorted(self._started.items()):
            lines.append(f'workerqueue_workers_started_total{{namespace="{label(namespace)}",queue="{label(queue)}"}} '
                         f'{count}')
        for name, kinds in sorted(self._counts.items()):
            lines += [f"# HELP {name} {self._help[name]}", f"# TYPE {name} counter"]
            lines += [f'{name}{{kind="{label(kind)}"}} {count}' for kind, count in sorted(kinds.items())]
        lines += self._render_upstreams()
        for name, (help_text, read, kind) in sorted(self._gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {read()}"]
        for name, (help_text, kind, key, read_family) in sorted(self._families.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{{key}="{label(value)}"}} {count}' for value, count in sorted(read_family().items())]
        return "\n".join(lines) + "\n"

    def _render_upstreams(self) -> list[str]:
        if self._upstreams_in_use is not None:
            for origin in self._prune_upstreams():  # each from 0 before its first request, as the other counters
                self.upstream(origin)
        ups = [(label(origin), stats) for origin, stats in sorted(self._upstreams.items())]
        lines = [
            "# HELP workerqueue_upstream_requests_total Requests passed through, by upstream and the status class "
            "the worker got (5xx includes the operator's own 502, 503 and 504: see "
            "workerqueue_upstream_failures_total).",
            "# TYPE workerqueue_upstream_requests_total counter",
        ]
        for origin, stats in ups:
            for klass, count in sorted(stats.requests.items()):
                lines.append(f'workerqueue_upstream_requests_total{{upstream="{origin}",code="{klass}"}} {count}')
        lines += [
            "# HELP workerqueue_upstream_failures_total Pass-through failures by upstream and kind "
            "(unreachable: 502, bad_answer: 502, timeout: 504, cut: the answer broke off, busy: 503, its "
            "namespace held its share of the host's connections).",
            "# TYPE workerqueue_upstream_failures_total counter",
        ]
        for origin, stats in ups:
            for kind, count in sorted(stats.failures.items()):
                lines.append(f'workerqueue_upstream_failures_total{{upstream="{origin}",kind="{kind}"}} {count}')
        lines += [
            f"# HELP {_UPSTREAM_LATENCY} Time to the upstream's response headers.",
            f"# TYPE {_UPSTREAM_LATENCY} histogram",
        ]
        for origin, stats in ups:
            lines += _histogram(_UPSTREAM_LATENCY, f'upstream="{origin}"', UPSTREAM_BUCKETS, stats.latency_counts,
                                stats.latency_sum)
        lines += [
            "# HELP workerqueue_upstream_bytes_total Body bytes passed through (sent: to the upstream).",
            "# TYPE workerqueue_upstream_bytes_total counter",
        ]
        for origin, stats in ups:
            lines.append(f'workerqueue_upstream_bytes_total{{upstream="{origin}",direction="sent"}} {stats.bytes_sent}')
            lines.append(
                f'workerqueue_upstream_bytes_total{{upstream="{origin}",direction="received"}} {stats.bytes_received}')
        return lines


def _histogram(name: str, labels: str, bounds: Sequence[float], counts: Sequence[int], total: float) -> list[str]:
    """The sample lines of one labelled histogram: cumulative buckets (the last +Inf), sum, count."""
    lines, cumulative = [], 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
    lines += [f"{name}_sum{{{labels}}} {total}", f"{name}_count{{{labels}}} {cumulative}"]
    return lines
