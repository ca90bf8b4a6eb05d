"""Every file under examples/ applies cleanly and its queues become Ready."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import ROOT, Kube

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.usefixtures("operator")
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_applies_and_becomes_ready(example: Path, kubectl, kube: Kube, namespace: str):
    kubectl("apply", "-n", namespace, "-f", str(example))
    documents = [d for d in yaml.safe_load_all(example.read_text()) if d]
    queues = [d["metadata"]["name"] for d in documents if d["kind"] == "WorkerQueue"]
    assert queues
    for name in queues:
        kube.wait_condition(namespace, name, "True")
