"""API paths, object helpers (owner references, delete options, times) and the object-level calls
shared by several callers (create if absent, delete exactly that object, patch a queue's status), each
treating 404/409 explicitly. Calls with one caller stay with it."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from workerqueue_operator.k8s import client as client_
from workerqueue_operator.models import spec, times

COMPONENT = "workerqueue-operator"
API_VERSION = f"{spec.GROUP}/{spec.VERSION}"


def queues_path(namespace: str | None = None) -> str:
    if namespace:
        return f"/apis/{spec.GROUP}/{spec.VERSION}/namespaces/{namespace}/{spec.PLURAL}"
    return f"/apis/{spec.GROUP}/{spec.VERSION}/{spec.PLURAL}"


def queue_path(namespace: str, name: str) -> str:
    return f"{queues_path(namespace)}/{name}"


def secrets_path(namespace: str | None = None) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets" if namespace else "/api/v1/secrets"


def leases_path(namespace: str | None = None) -> str:
    base = "/apis/coordination.k8s.io/v1"
    return f"{base}/namespaces/{namespace}/leases" if namespace else f"{base}/leases"
def peerings_path(namespace: str | None = None) -> str:
    """kopf's peering objects: cluster-wide, which the operator uses in every mode (handlers.configure);
    namespaced ones in `namespace`."""
    if namespace:
        return f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings"
    return "/apis/kopf.dev/v1/clusterkopfpeerings"


def pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods"


def now_rfc3339() -> str:
    return times.rfc3339(time.time())


def version_of(body: Mapping[str, Any]) -> str:
    """metadata.resourceVersion ("" if none)."""
    return str((body.get("metadata") or {}).get("resourceVersion") or "")


def owner_reference(body: dict[str, Any], *, controller: bool = True) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": spec.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


async def read_secret(client: client_.KubeClient, namespace: str, name: str) -> dict[str, Any] | None:
    """The Secret, or None if it does not exist (nor can: a name no object can have)."""
    if not re.fullmatch(spec.OBJECT_NAME_PATTERN, name):
        return None
    try:
        return await client.get(f"{secrets_path(namespace)}/{name}")
    except client_.ApiError as exc:
        if exc.not_found:
            return None
        raise


async def read_peering(client: client_.KubeClient, namespace: str, name: str, *,
                       timeout: float) -> dict[str, Any] | None:
    """kopf's peering object (`namespace` "": the cluster-wide one), or None if it does not exist."""
    try:
        return await client.request("GET", f"{peerings_path(namespace)}/{name}", timeout=timeout)
    except client_.ApiError as exc:
        if exc.not_found:
            return None
        raise


STRICT = {"fieldValidation": "Strict"}
"""A field the API server does not know refuses the object: by default it is dropped with a warning
nobody reads (a template's `resource:` for `resources:`, a pod then made without its limits)."""


async def create_if_absent(client: client_.KubeClient, path: str, body: dict[str, Any], *,
                           strict: bool = False) -> bool:
    """Creates the object; False if it already existed (a retried or concurrent create). `strict`:
    refused for a field the API server does not know (STRICT), rather than made without it."""
    return await create(client, path, body, strict=strict) is not None


async def create(client: client_.KubeClient, path: str, body: dict[str, Any], *,
                 strict: bool = False) -> dict[str, Any] | None:
    """Creates the object and returns it as the API server stored it; None if it already existed."""
    try:
        return await client.create(path, body, params=STRICT if strict else None)
    except client_.ApiError as exc:
        if exc.already_exists:
            return None
        raise


async def create_replacing(client: client_.KubeClient, path: str, body: dict[str, Any],
                           *, leftover: Callable[[Mapping[str, Any]], bool]) -> tuple[dict[str, Any], bool]:
    """Creates the object as `create` does, except that one of its name that `leftover` says was left
    by a deleted WorkerQueue (waiting for the garbage collector) is deleted, that very one, and the
    object made anew, once the API server says that queue is gone too (the caller's copy of the
    queues may be behind, a replica's watch, and the object be the live queue's). Returns the object
    there now, and whether this call made it."""
    created = await create(client, path, body)
    if created is not None:
        return created, True
    item = f"{path}/{body['metadata']['name']}"
    try:
        existing = await client.get(item)
    except client_.ApiError as exc:
        if not exc.not_found:
            raise
        # Gone between the two calls (the collector took a leftover): made now, as at first.
        created = await create(client, path, body)
        if created is None:
            raise client_.ApiError(409, "Conflict", f"{item} was made again meanwhile") from exc
        return created, True
    if not leftover(existing) or not await _owner_queue_gone(client, existing):
        return existing, False
    await delete_exact(client, item, existing["metadata"]["uid"])
    created = await create(client, path, body)
    if created is None:
        raise client_.ApiError(409, "Conflict", f"{item} is still being deleted")
    return created, True


async def _owner_queue_gone(client: client_.KubeClient, body: Mapping[str, Any]) -> bool:
    """Whether the WorkerQueue that owns the object is gone, as the API server says now."""
    meta = body.get("metadata") or {}
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("kind") == spec.KIND), None)
    if owner is None:
        return True
    try:
        current = await client.get(queue_path(str(meta.get("namespace", "")), str(owner.get("name", ""))))
    except client_.ApiError as exc:
        if exc.not_found:
            return True
        if exc.status == 403:
            return False  # cannot tell (a Role without `get`): left to the garbage collector
        raise
    return bool((current.get("metadata") or {}).get("uid") != owner.get("uid"))


def delete_options(uid: str) -> dict[str, Any]:
    """Deletes only the object with this uid, not a namesake made since; its dependents in the background."""
    return {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid},
            "propagationPolicy": "Background"}


async def delete_exact(client: client_.KubeClient, path: str, uid: str, *, timeout: float = 30.0) -> None:
    """Deletes the object if it is still the one with this uid; gone, or made again since, is fine."""
    try:
        await client.request("DELETE", path, body=delete_options(uid), timeout=timeout)
    except client_.ApiError as exc:
        if not (exc.not_found or exc.conflict):
            raise


async def patch_queue_status(client: client_.KubeClient, namespace: str, name: str, status: dict[str, Any], *,
                             resource_version: str | None = None) -> str | None:
    """Merge-patches the status subresource; the resourceVersion written, or None if the queue is gone.

    With `resource_version`, only that version of the queue is patched: any other raises the API's
    Conflict, so that a status computed from an older copy never undoes a newer write of another's."""
    body: dict[str, Any] = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        written = await client.patch(f"{queue_path(namespace, name)}/status", body)
    except client_.ApiError as exc:
        if exc.not_found:
            return None
        raise
    return version_of(written)


async def post_event(
    client: client_.KubeClient,
    *,
    involved: dict[str, Any],
    reason: str,
    message: str,
    warning: bool = False,
    count: int = 1,
    instance: str = COMPONENT,
) -> None:
    """A core/v1 Event about an object. Messages are built by the caller and never hold secrets."""
    meta = involved["metadata"]
    now = now_rfc3339()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion", API_VERSION),
            "kind": involved.get("kind", spec.KIND),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
        },
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance[:128],  # the API server's limit; a pod name may be longer
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": count,
    }
    try:
        await client.create(f"/api/v1/namespaces/{meta['namespace']}/events", event)
    except client_.ApiError as exc:
        if not exc.not_found:  # a namespace being deleted refuses events: nothing to tell anyone
            raise
