"""The local kubelet's reading of watch events, as the kubernetes client hands them over."""

from __future__ import annotations

import json

from kubernetes import watch

from workerqueue_operator.devcluster.kubelet import watched


def event(type_: str, obj: dict[str, object]) -> dict[str, object]:
    unmarshalled = watch.Watch().unmarshal_event(json.dumps({"type": type_, "object": obj}), "V1Pod")
    assert unmarshalled is not None
    return unmarshalled


def test_a_pod_event_gives_its_pod_and_version():
    version, pod = watched(event("ADDED", {"apiVersion": "v1", "kind": "Pod",
                                           "metadata": {"name": "w0", "namespace": "ns", "resourceVersion": "41"}}))
    assert version == "41"
    assert pod is not None and pod.metadata.name == "w0"


def test_a_bookmark_moves_the_version_and_gives_no_pod():
    # The client leaves a BOOKMARK's object a dict: reading it as a Pod failed the watch once a minute.
    version, pod = watched(event("BOOKMARK", {"kind": "Pod", "apiVersion": "v1", "metadata": {
        "resourceVersion": "97", "annotations": {"k8s.io/initial-events-end": "true"}}}))
    assert (version, pod) == ("97", None)
