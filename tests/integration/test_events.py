"""Events a new queue gets: no Warning about the token Secret the operator is creating."""

from __future__ import annotations

import time

from tests.integration.conftest import Kube, OperatorProcess, wait_for
from workerqueue_operator.devcluster.temporal import TemporalServer


def test_a_new_queue_gets_no_spurious_warning(operator: OperatorProcess, kube: Kube, namespace: str,
                                              temporal: TemporalServer):
    # A reachable Temporal: an unreachable one is a Warning worth having (TemporalUnavailable).
    for i in range(5):
        kube.create_queue(namespace, f"q{i}", queueId=f"q{i}-{namespace}",
                          temporal={"host": temporal.address, "namespace": temporal.namespace})
    for i in range(5):
        kube.wait_condition(namespace, f"q{i}", "True")
    wait_for(lambda: sum(e.reason == "TokenSecretCreated" for e in kube.events(namespace)) == 5,
             what="the TokenSecretCreated Events")
    time.sleep(1)  # a negative: give a late Warning the time to arrive
    warnings = [(e.involved_object.name, e.reason, e.message) for e in kube.events(namespace) if e.type == "Warning"]
    assert warnings == []
    for i in range(5):  # Ready from the first status written: never "not found" on the way
        assert kube.condition(namespace, f"q{i}", "SecretsResolved")["status"] == "True"
        assert kube.condition(namespace, f"q{i}")["lastTransitionTime"] is not None


def test_routine_kopf_messages_stay_out_of_the_log(operator: OperatorProcess, kube: Kube, namespace: str):
    kube.create_queue(namespace, "quiet", queueId=f"quiet-{namespace}", singleExecution=True,
                      temporal={"host": "temporal:7233", "namespace": "agents"})
    wait_for(lambda: kube.pod_names(namespace, "quiet") == ["quiet-w0"], what="a worker pod")
    logs = operator.logs()
    assert "registry.<locals>" not in logs
    assert "succeeded." not in logs
