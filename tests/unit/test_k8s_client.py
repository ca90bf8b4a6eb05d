"""Where the operator finds the API server in a pod."""

from __future__ import annotations

import pytest

from workerqueue_operator.k8s import client


@pytest.mark.parametrize(("environ", "server"), [
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, "https://10.96.0.1:443"),
    ({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}, "https://[fd00::1]:6443"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None),  # half the contract: not in a pod
    ({}, None),
])
def test_in_cluster_server_is_where_the_kubelet_says(environ: dict[str, str], server: str | None):
    assert client.in_cluster_server(environ) == server
