"""With tls_cert_file/tls_key_file the HTTP API is served over HTTPS only."""

from __future__ import annotations

import ssl
import subprocess
import urllib.error
from pathlib import Path

import pytest

from tests.integration.conftest import Kube, OperatorProcess, http


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_https_only_when_a_certificate_is_configured(kubeconfig: Path, crd_installed: None, kube: Kube,
                                                     namespace: str, tmp_path: Path, operator: OperatorProcess):
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    https = OperatorProcess(kubeconfig, tmp_path / "tls.log", context=context,
                            env={"WQ_TLS_CERT_FILE": str(cert), "WQ_TLS_KEY_FILE": str(key),
                                 "WQ_NAMESPACES": namespace})
    with operator.paused():
        try:
            https.start()
            kube.create_queue(namespace, "tls", queueId=f"tls-{namespace}", temporal={"host": "t:1", "namespace": "n"})
            kube.wait_condition(namespace, "tls", "True")
            r = https.start_worker(f"tls-{namespace}", kube.queue_token(namespace, "tls"))
            assert r.status == 200 and r.json()["control_plane_url"] == https.url  # https, from the request
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                http("GET", f"http://127.0.0.1:{https.port}/healthz", timeout=2)
        finally:
            https.stop()
