"""`python -m bench --quick` runs end to end and measures something; how fast is not asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench import start

from workerqueue_operator.devcluster import procs

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_its_figures(tmp_path: Path, k8s_assets: Path) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "KUBEBUILDER_ASSETS": str(k8s_assets)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=procs.die_with_parent(os.getpid()))  # also if pytest is SIGKILLed
    try:
        output, _ = proc.communicate()
    finally:
        if proc.poll() is None:  # the test was interrupted: let the benchmark stop what it started
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
                proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text

    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert [(r["queues"], r["concurrency"]) for r in rows] == [
        (q, c) for q in start.QUICK_QUEUES for c in start.QUICK_CONCURRENCY]
    for row in rows:
        for server in ("baseline", "operator"):
            result = row[server]
            assert result["requests"] > 0 and result["rps"] > 0, (server, result)
            assert result["non_200"] == 0 and set(result["statuses"]) == {"200"}, (server, result)
            assert 0 < result["p50_ms"] <= result["p99_ms"], (server, result)
            assert result["response_bytes"] > 0
        assert row["errors"] == 0
        assert isinstance(row["throughput_met"], bool) and isinstance(row["p50_met"], bool)
    (footprint,) = figures["operator"]
    assert footprint["queues"] == start.QUICK_QUEUES[0]
    assert footprint["rss_ready_kib"] > 0 and footprint["rss_after_load_kib"] > 0
    assert "throughput" in text and "p50 ratio" in text  # the table was printed
    spawned = {r["scenario"]: r for r in figures["spawn"]}
    assert set(spawned) == {"one queue at a time", "10 queues created at once"}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] for r in spawned.values())
    assert "spawn latency" in text
    passthrough = figures["passthrough"]
    assert [r["concurrency"] for r in passthrough] == [1, 4]
    for row in passthrough:
        for side in ("direct", "via_operator"):
            assert row[side]["requests"] > 0 and set(row[side]["statuses"]) == {"200"}, (side, row[side])
        assert row["errors"] == 0
        assert row["overhead_p50_ms"] == row["via_operator"]["p50_ms"] - row["direct"]["p50_ms"]
    assert "pass-through latency overhead" in text
    shared, generated = figures["scale"]["runs"]
    assert shared["queues"] == generated["queues"] == 200
    assert shared["ready_seconds"] > 0 and generated["ready_seconds"] > 0 and shared["rss_ready_kib"] > 0
    for run in (shared, generated):  # what bounds the Ready time: whose CPU it took
        spent = run["cpu_until_ready"]
        assert set(spent) == {"operator", "kube-apiserver", "etcd", "kube-controller-manager"}, run
        assert all(spent[name] > 0 for name in ("operator", "kube-apiserver", "etcd")), run
        assert spent["kube-controller-manager"] >= 0, run
    assert not shared.get("generated") and generated["generated"]
    # Each queue's Ready took one status write; each generated token Secret one create.
    assert shared["writes_until_ready"]["PATCH workerqueues/status"] >= 200, shared
    assert generated["writes_until_ready"]["POST secrets"] == 200, generated
    assert "API-server writes: PATCH workerqueues/status" in text
    assert figures["scale"]["start_p50_ms_c16"] > 0 and figures["scale"]["restart"][0] > 0
    load = figures["scale"]["load"]  # what the p50 with many queues is made of
    assert load["operator_cpu_ms_per_req"] > 0 and set(load["others_cpu_seconds"]) == set(spent) - {"operator"}, load
    assert "meanwhile: operator CPU" in text
    (handover,) = figures["handover"]
    assert handover["lifetime_seconds"] is None and len(handover["samples"]) == 1 and handover["p50_s"] > 0
    assert "queues existing at start" in text and "handover after SIGKILL" in text
