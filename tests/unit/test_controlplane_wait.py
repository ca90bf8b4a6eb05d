"""Waiting for a CRD to serve, as `dev`, the bench and the test fixtures do (kubectl given as a function)."""

from __future__ import annotations

import json

from workerqueue_operator.devcluster import controlplane


def test_a_crd_without_conditions_yet_is_waited_for_not_an_error():
    # Just created: no status.conditions at all (a jsonpath filter on them made kubectl fail here).
    answers = [{"status": {"conditions": None}}, {"status": {}},
               {"status": {"conditions": [{"type": "NamesAccepted", "status": "True"}]}},
               {"status": {"conditions": [{"type": "NamesAccepted", "status": "True"},
                                          {"type": "Established", "status": "True"}]}}]
    asked: list[tuple[str, ...]] = []

    def kubectl(*args: str) -> str:
        asked.append(args)
        return json.dumps(answers[len(asked) - 1])

    controlplane.wait_established(kubectl, "workerqueues.agentcontrol.dev", timeout=5)
    assert len(asked) == 4 and asked[0] == ("get", "crd/workerqueues.agentcontrol.dev", "-o", "json")
