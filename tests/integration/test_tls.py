"""With tls_cert_file/tls_key_file the HTTP API is served over HTTPS only."""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
import urllib.error
from pathlib import Path

import pytest

from tests.integration.conftest import Kube, OperatorProcess, free_port, http, wait_for


def self_signed(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_https_only_when_a_certificate_is_configured(kubeconfig: Path, crd_installed: None, kube: Kube,
                                                     namespace: str, tmp_path: Path, operator: OperatorProcess):
    """With /metrics on a port of its own (its labels name every queue), over HTTPS there too."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    metrics_port = free_port()
    https = OperatorProcess(kubeconfig, tmp_path / "tls.log", context=context,
                            env={"WQ_TLS_CERT_FILE": str(cert), "WQ_TLS_KEY_FILE": str(key),
                                 "WQ_NAMESPACES": namespace, "WQ_METRICS_PORT": str(metrics_port)})
    with operator.paused():
        try:
            https.start()
            kube.create_queue(namespace, "tls", queueId=f"tls-{namespace}", temporal={"host": "t:1", "namespace": "n"})
            kube.wait_condition(namespace, "tls", "True")
            r = https.start_worker(f"tls-{namespace}", kube.queue_token(namespace, "tls"))
            assert r.status == 200 and r.json()["control_plane_url"] == https.url  # https, from the request
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                http("GET", f"http://127.0.0.1:{https.port}/healthz", timeout=2)
            scraped = http("GET", f"https://127.0.0.1:{metrics_port}/metrics", context=context)
            assert scraped.status == 200
            text = scraped.body.decode()
            assert f'namespace="{namespace}",queue="tls"' in text and "workerqueue_queues 1" in text
            assert https.call("GET", "/metrics", None).status == 404  # not on the port workers reach
        finally:
            https.stop()


def mount(folder: Path, cert: Path, key: Path) -> None:
    """The files as the kubelet mounts a Secret, and updates them when the Secret changes (cert-manager
    renews it): tls.crt -> ..data/tls.crt, ..data -> a folder of this version, swapped in one rename."""
    folder.mkdir(exist_ok=True)
    version = folder / f"..{secrets.token_hex(4)}"
    version.mkdir()
    shutil.copy(cert, version / "tls.crt")
    shutil.copy(key, version / "tls.key")
    link = folder / "..data_tmp"
    link.symlink_to(version.name)
    os.replace(link, folder / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")


def served(port: int) -> str:
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port))))


def test_a_renewed_certificate_is_served_without_a_restart(kubeconfig: Path, crd_installed: None, namespace: str,
                                                            tmp_path: Path, operator: OperatorProcess):
    """cert-manager renews the Secret before it expires and the kubelet updates the mounted files: the
    operator must serve the new certificate, or every worker is cut off once the old one expires."""
    old, new = self_signed(tmp_path / "old"), self_signed(tmp_path / "new")
    trusted = tmp_path / "ca.pem"
    trusted.write_text(old[0].read_text() + new[0].read_text())
    mounted = tmp_path / "tls"
    mount(mounted, *old)
    env = {"WQ_TLS_CERT_FILE": str(mounted / "tls.crt"), "WQ_TLS_KEY_FILE": str(mounted / "tls.key"),
           "WQ_TLS_RELOAD_SECONDS": "1", "WQ_NAMESPACES": namespace}
    https = OperatorProcess(kubeconfig, tmp_path / "tls.log", context=ssl.create_default_context(cafile=str(trusted)),
                            env=env)
    pem = {name: ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(pair[0].read_text()))
           for name, pair in (("old", old), ("new", new))}
    with operator.paused():
        try:
            https.start()
            assert served(https.port) == pem["old"]
            mount(mounted, *new)
            wait_for(lambda: served(https.port) == pem["new"], timeout=15, what="the renewed certificate served")
            renewed = ssl.create_default_context(cafile=str(new[0]))
            assert http("GET", f"{https.url}/healthz", context=renewed).status == 200
            assert https.process is not None and https.process.poll() is None, "no restart"
        finally:
            https.stop()
