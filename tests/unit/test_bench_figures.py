"""The benchmark's reading of kube-apiserver's request counter (the scale runs' "API-server writes")."""

from __future__ import annotations

import pytest
from bench import cluster, report, start

METRICS = """\
# HELP apiserver_request_total [STABLE] Counter of apiserver requests
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",dry_run="",group="agentcontrol.dev",\
resource="workerqueues",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 3
apiserver_request_total{code="409",component="apiserver",dry_run="",group="agentcontrol.dev",\
resource="workerqueues",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 1
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="secrets",\
scope="resource",subresource="",verb="POST",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="agentcontrol.dev",\
resource="workerqueues",scope="namespace",subresource="",verb="LIST",version="v1alpha1"} 7
apiserver_request_total_not_this{verb="POST"} 99
"""


def test_request_totals_are_summed_over_codes_by_verb_and_resource() -> None:
    assert cluster.request_totals(METRICS) == {
        "PATCH workerqueues/status": 4, "POST secrets": 2, "LIST workerqueues": 7}


def test_writes_between_keeps_the_writes_made_meanwhile_most_first() -> None:
    before = {"PATCH workerqueues/status": 4, "POST secrets": 2, "LIST workerqueues": 7, "PUT leases": 5}
    after = {"PATCH workerqueues/status": 10, "POST secrets": 20, "LIST workerqueues": 9, "PUT leases": 5,
             "POST events": 1}
    writes = cluster.writes_between(before, after)
    assert list(writes.items()) == [("POST secrets", 18), ("PATCH workerqueues/status", 6), ("POST events", 1)]
    assert report.writes_text(writes, 6) == (
        "POST secrets 18 (3.00 a queue), PATCH workerqueues/status 6 (1.00 a queue), POST events 1 (0.17 a queue)")
    assert report.writes_text({}, 6) == "none"


def test_a_scale_run_is_named_by_its_own_kind_when_only_one_kind_ran() -> None:
    generated = report.Footprint(queues=10, generated=True, ready_seconds=3.0, rss_ready_kib=1024,
                                 rss_after_load_kib=None, peak_rss_kib=2048, idle_cpu=0.0)
    text = report.scale_lines([generated], None, [])
    assert "a token Secret generated per queue: Ready after 3.0s" in text
    assert "shared" not in text


def test_scale_secrets_takes_either_kind_and_refuses_others() -> None:
    assert start.parser().parse_args(["--scale-secrets", "generated"]).scale_secrets == ("generated",)
    assert start.parser().parse_args([]).scale_secrets == ("shared", "generated")
    with pytest.raises(SystemExit):
        start.parser().parse_args(["--scale-secrets", "both"])


def test_the_scale_load_says_what_the_operator_did_in_the_background_meanwhile() -> None:
    # With 10,000 queues the operator checks their Temporal at its steady pace the whole time; with 10,
    # it has long finished: the /start p50 compared without saying so compares unlike loads.
    shared = report.Footprint(queues=10_000, ready_seconds=20.0, rss_ready_kib=1024, rss_after_load_kib=None,
                              peak_rss_kib=2048, idle_cpu=0.25)
    load = report.ScaleLoad(operator_cpu_ms_per_req=0.2, others_cpu_seconds={"kube-apiserver": 3.5},
                            writes={"PATCH workerqueues/status": 500, "POST events": 250}, idle_cpu=0.25)
    text = report.scale_lines([shared], 2.5, [], load=load)
    assert ("the operator's background work, with no /start traffic just before: 25% of a core; API-server "
            "writes during the load: PATCH workerqueues/status 500 (0.05 a queue), POST events 250 (0.03 a queue)"
            in text)
