"""A small asynchronous Kubernetes API client on aiohttp.

Credentials come from the `kubernetes` package's loaders (kubeconfig or in-cluster, token refresh
included), but every request is made on the event loop: nothing here blocks it.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import kubernetes

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer of the API server. The message is the server's Status message, never a body."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"


def in_cluster_server(environ: Mapping[str, str]) -> str | None:
    """The API server a pod is told about (KUBERNETES_SERVICE_HOST/PORT, as client-go reads them)."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def load_configuration(kubeconfig: str | None = None) -> Any:
    """The `kubernetes` client configuration: in-cluster if there, else the kubeconfig."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return configuration
        except kubernetes.config.ConfigException:
            pass
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, client_configuration=configuration)
    return configuration


class KubeClient:
    """JSON in, JSON out. One aiohttp session, a connection pool sized for parallel pod creation."""

    def __init__(self, configuration: Any, *, pool_size: int = 64) -> None:
        self._configuration = configuration
        self.base_url = str(configuration.host).rstrip("/")
        self._ssl = self._ssl_context(configuration)
        self._session: aiohttp.ClientSession | None = None
        self._pool_size = pool_size

    @staticmethod
    def _ssl_context(configuration: Any) -> ssl.SSLContext | bool:
        if not str(configuration.host).startswith("https"):
            return False
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
        if not configuration.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        return context

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._pool_size, ssl=self._ssl)
            self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        # auth_settings() runs the loader's refresh hook, so rotated (in-cluster, exec) tokens are used.
        for auth in self._configuration.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"].title()] = auth["value"]
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> JSON:
        session = self._session_or_new()
        data = None if body is None else json.dumps(body)
        async with session.request(
            method,
            self.base_url + path,
            data=data,
            params=params,
            headers=self._headers(content_type if data is not None else None),
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            payload = await response.read()
            if response.status >= 400:
                raise _api_error(response.status, payload)
            result: JSON = json.loads(payload) if payload else {}
            return result

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> JSON:
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, body=body)

    async def patch(self, path: str, body: Any, *, content_type: str = MERGE_PATCH) -> JSON:
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def delete(self, path: str, body: JSON | None = None) -> JSON:
        return await self.request("DELETE", path, body=body)

    async def watch(self, path: str, params: Mapping[str, str], *, timeout: float) -> AsyncIterator[JSON]:
        """The events of one watch request, until the server ends it."""
        session = self._session_or_new()
        async with session.get(
            self.base_url + path,
            params={**params, "watch": "true"},
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout + 30),
        ) as response:
            if response.status >= 400:
                raise _api_error(response.status, await response.read())
            # Lines can be longer than aiohttp's default line limit (large objects), hence readuntil.
            while True:
                try:
                    line = await response.content.readuntil(b"\n")
                except aiohttp.EofStream:
                    return
                except ValueError:  # a partial last line at EOF
                    return
                if not line.strip():
                    if response.content.at_eof():
                        return
                    continue
                yield json.loads(line)


def _api_error(status: int, payload: bytes) -> ApiError:
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = {}
    if not isinstance(parsed, dict):
        parsed = {}
    return ApiError(status, str(parsed.get("reason", "")), str(parsed.get("message", ""))[:500])
