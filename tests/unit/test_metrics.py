"""The /metrics exposition: what Prometheus parses."""

from __future__ import annotations

import re

import pytest

from workerqueue_operator.api.metrics import BUCKETS, UPSTREAM_BUCKETS, Metrics


def samples(text: str, name: str) -> dict[str, float]:
    """Label text -> value of the samples of one metric name."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) + 1:].rpartition("} ")
            found[labels] = float(value)
    return found


def test_metric_families_render_one_line_per_label_value():
    m = Metrics()
    m.family("workerqueue_watch_failures_total", "Failed watches.", kind="counter", label="resource",
             read=lambda: {"secrets/*": 2, "workerqueues/*": 0})
    text = m.render()
    assert "# TYPE workerqueue_watch_failures_total counter" in text
    assert 'workerqueue_watch_failures_total{resource="secrets/*"} 2' in text
    assert 'workerqueue_watch_failures_total{resource="workerqueues/*"} 0' in text



def test_a_method_no_standard_knows_is_counted_as_other():
    """aiohttp's pure-Python parser takes any token for a method: each one a series of its own."""
    m = Metrics()
    for method in ("XYZ123", "FOO", "GET"):
        m.observe("/api/v1/{tail}", method, 400, 0.001)
    found = samples(m.render(), "workerqueue_http_requests_total")
    assert {labels.split(",")[1] for labels in found} == {'method="other"', 'method="GET"'}
    assert sum(found.values()) == 3


def test_latency_histograms_are_cumulative_and_end_in_their_count_and_sum():
    m = Metrics()
    for seconds in (0.0001, 0.003, 0.003, 7.0):
        m.observe("/start", "POST", 200, seconds)
    m.observe("/healthz", "GET", 200, 0.02)
    upstream = m.upstream("http://up.example")
    for seconds in (0.002, 0.2, 100.0):
        upstream.answered(200, seconds)
    text = m.render()

    start = samples(text, "workerqueue_http_request_duration_seconds_bucket")
    buckets = [start[f'route="/start",le="{b!r}"'] for b in BUCKETS] + [start['route="/start",le="+Inf"']]
    assert buckets[0] == 1  # 0.1 ms
    assert buckets[BUCKETS.index(0.005)] == 3
    assert buckets[-2:] == [3, 4]  # 7 s only in +Inf
    assert buckets == sorted(buckets)
    assert samples(text, "workerqueue_http_request_duration_seconds_count") == {'route="/healthz"': 1,
                                                                               'route="/start"': 4}
    assert samples(text, "workerqueue_http_request_duration_seconds_sum")['route="/start"'] == pytest.approx(7.0061)

    up = samples(text, "workerqueue_upstream_response_seconds_bucket")
    ups = [up[f'upstream="http://up.example",le="{b!r}"'] for b in UPSTREAM_BUCKETS]
    assert ups[0] == 1 and ups[-1] == 2
    assert up['upstream="http://up.example",le="+Inf"'] == 3
    assert samples(text, "workerqueue_upstream_response_seconds_count") == {'upstream="http://up.example"': 3}
    total = samples(text, "workerqueue_upstream_response_seconds_sum")
    assert total == {'upstream="http://up.example"': pytest.approx(100.202)}


def test_label_values_are_escaped_so_that_the_whole_scrape_still_parses():
    # One odd value (a quote in an upstream's host) made the text invalid: Prometheus drops the scrape.
    m = Metrics()
    m.upstream('http://a"b\\c').answered(502, 0.1)
    m.family("workerqueue_x_total", "X.", kind="counter", label="kind", read=lambda: {"line\nbreak": 1})
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\\n]|\\["\\n])*",?)*\})? [0-9.e+Inf-]+$')
    lines = [line for line in m.render().splitlines() if not line.startswith("#")]
    assert lines and all(sample.match(line) for line in lines), [line for line in lines if not sample.match(line)]
    assert 'workerqueue_upstream_requests_total{upstream="http://a\\"b\\\\c",code="5xx"} 1' in lines
    assert 'workerqueue_x_total{kind="line\\nbreak"} 1' in lines


async def test_a_deleted_queues_series_go_with_it():
    # Ephemeral queues come and go by the thousand: a series each for the process's life would pile up.
    from tests.unit import apps
    from tests.unit.factories import queue
    from workerqueue_operator.api.keys import METRICS
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.models.settings import Settings

    store = Store(settings=Settings())
    q = queue("gone", queueId="g-1")
    store.upsert_queue(q)
    m = apps.make_app(store)[METRICS]
    m.worker_started("team-a", "gone")
    m.worker_started("team-a", "stays")
    store.remove_queue(q.key)
    text = m.render()
    assert 'queue="stays"' in text and 'queue="gone"' not in text


async def test_an_upstream_no_queue_uses_any_more_loses_its_series():
    # Upstream URLs change with the queues: a series per URL ever configured would pile up.
    from tests.unit import apps
    from tests.unit.factories import queue
    from workerqueue_operator.api.keys import METRICS
    from workerqueue_operator.core.store import Store
    from workerqueue_operator.models.settings import Settings

    store = Store(settings=Settings())
    ref = {"apiKeySecretRef": {"name": "org", "key": "k"}}
    moved = queue("moved", queueId="m-1", upstream={"url": "http://old.example:8080/base", **ref})
    store.upsert_queue(moved)
    store.upsert_queue(queue("stays", queueId="s-1", upstream={"url": "http://kept.example", **ref}))
    store.upsert_secret(("team-a", "org"), {"k": "org-key"})
    m = apps.make_app(store)[METRICS]
    for origin in ("http://old.example:8080", "http://kept.example"):
        m.upstream(origin).answered(200, 0.01)
    assert 'upstream="http://old.example:8080"' in m.render()

    store.upsert_queue(queue("moved", queueId="m-1", upstream={"url": "http://new.example", **ref}))
    text = m.render()
    assert 'upstream="http://old.example:8080"' not in text
    assert samples(text, "workerqueue_upstream_requests_total") == {
        'upstream="http://kept.example",code="2xx"': 1, 'upstream="http://kept.example",code="4xx"': 0,
        'upstream="http://kept.example",code="5xx"': 0, 'upstream="http://new.example",code="2xx"': 0,
        'upstream="http://new.example",code="4xx"': 0, 'upstream="http://new.example",code="5xx"': 0}


def test_upstreams_no_queue_uses_go_also_without_scrapes():
    """With nothing scraping /metrics, each origin a queue's spec.upstream ever named kept its series
    for good: they go once they outnumber those in use twice over."""
    m = Metrics()
    in_use = {"http://up-0"}
    m.keep_upstreams(lambda: set(in_use))
    for i in range(1000):
        in_use = {f"http://up-{i}"}  # each queue moved on to the next upstream
        m.upstream(f"http://up-{i}").failed("timeout", 504)
    assert 1 <= len(m._upstreams) <= 2 * 64 and "http://up-999" in m._upstreams
    assert samples(m.render(), "workerqueue_upstream_requests_total").keys() == {
        f'upstream="http://up-999",code="{code}"' for code in ("2xx", "4xx", "5xx")}
