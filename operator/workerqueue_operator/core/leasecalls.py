"""The registry's writes of one Lease on the API server, and the reads they are made against.

Each call decides what the API server's answer means for the write (AlreadyExists: another claimant
was first; a Conflict: written since it was read, so read again) and tells the caller; what becomes
of a registration then (taken over, ended) is the Registry's to decide (registry.py). Every call is
bounded by API_TIMEOUT, and every write counted (`writes`) for the metrics.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from typing import Any

from workerqueue_operator.core.leases import ENDED_ANNOTATION, Worker, ended_on_purpose, later, worker_from_lease
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources

API_TIMEOUT = 5.0
"""Every API-server call of the registry is bounded by this many seconds."""
DELETE_ATTEMPTS = 3
"""Reads and conditional deletes of a Lease in a row, each meeting a write made since its read."""


class Renewal(enum.Enum):
    """How a renewal went (see LeaseCalls.renew)."""

    WRITTEN = "written"
    """Written, or a renewal at least as recent is there already."""
    GONE = "gone"
    """The Lease is gone."""
    TAKEN = "taken"
    """Its slot went to another worker meanwhile: nothing written."""


class LeaseCalls:
    """The calls, through the registry's client (the Registry and its Refusals share one)."""

    def __init__(self, client: client_.KubeClient, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._clock = clock  # the registry's: a Lease's times far ahead of it are read as none told
        self.writes = 0
        """Lease writes made (creates, renewals, deletions), for the metrics."""
        self.write_failures = 0
        """Writes that did not get through: the API server out of reach or slow, or refusing (429,
        403, 5xx), also in the read a write is made against; a renewal or deletion given up after
        409s (the Lease changed under it each time). Not a 404 or a single 409, which tell how the
        Lease stands, nor a refusal because the namespace is being deleted."""

    async def _write(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        self.writes += 1
        return await self._call(method, path, **options)

    async def _call(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        try:
            return await self._client.request(method, path, timeout=API_TIMEOUT, **options)
        except Exception as exc:
            # A 404 or 409 tells how the Lease stands; a namespace being deleted takes its Leases along.
            if not (isinstance(exc, client_.ApiError) and (exc.not_found or exc.conflict or exc.namespace_terminating)):
                self.write_failures += 1
            raise

    def _given_up(self, exc: client_.ApiError) -> None:
        """A 409 that ends a write's tries: it did not get through (other failures are counted as met)."""
        if exc.conflict:
            self.write_failures += 1

    async def create(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Lease, or None if one of that name exists."""
        try:
            return await self._write("POST", resources.leases_path(body["metadata"]["namespace"]), body=body)
        except client_.ApiError as exc:
            if exc.already_exists:
                return None
            raise

    async def overwrite(self, body: dict[str, Any], current: dict[str, Any]) -> dict[str, Any] | None:
        """Writes `body` over the Lease as it was read; None if it changed meanwhile."""
        meta = body["metadata"]
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            return await self._write("PUT", f"{resources.leases_path(meta['namespace'])}/{meta['name']}", body=body)
        except client_.ApiError as exc:
            if exc.conflict or exc.not_found:
                return None
            raise

    async def read(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The Lease of `body`'s name as the API server holds it now; None if there is none."""
        meta = body["metadata"]
        try:
            return await self._call("GET", f"{resources.leases_path(meta['namespace'])}/{meta['name']}")
        except client_.ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def renew(self, worker: Worker, body: dict[str, Any]) -> Renewal:
        """Writes a renewal over the Lease version known here (and keeps the version it wrote).

        Both replicas write the renewals of the heartbeats they hear: one written since by the other
        replica (the watch has not brought it yet) is read first. A later renewal there stays (the
        watch brings it here); an older one is written over; a slot another worker took is TAKEN."""
        spec = body["spec"]
        # Its owner too: a Lease left without one (its queue deleted with --cascade=orphan, then made
        # again) is no registration to the watch, which would forget the worker at every renewal.
        patch = {"metadata": {"annotations": body["metadata"]["annotations"],
                              "ownerReferences": body["metadata"]["ownerReferences"]},
                 "spec": {"renewTime": spec["renewTime"], "holderIdentity": worker.worker_id,
                          "leaseDurationSeconds": spec["leaseDurationSeconds"]}}
        path = f"{resources.leases_path(worker.namespace)}/{worker.lease}"
        retried = False
        while True:
            if worker.version:
                patch["metadata"]["resourceVersion"] = worker.version
            try:
                written = await self._write("PATCH", path, body=patch, content_type=client_.MERGE_PATCH)
            except client_.ApiError as exc:
                if exc.not_found:
                    return Renewal.GONE
                if not exc.conflict or retried:
                    self._given_up(exc)
                    raise  # twice changed meanwhile: again after the writer's retry delay
                try:
                    current = await self._call("GET", path)
                except client_.ApiError as again:
                    if again.not_found:
                        return Renewal.GONE
                    raise
                stored = worker_from_lease(current, seen_at=0.0, now=self._clock())
                if stored is None or stored.worker_id != worker.worker_id:
                    return Renewal.TAKEN
                worker.version = stored.version
                if not later(worker.renewed_at, stored.renewed_at):
                    return Renewal.WRITTEN  # a renewal at least as recent is there
                retried = True
                continue
            worker.version = version(written)
            return Renewal.WRITTEN

    async def delete(self, worker: Worker, *, unless_renewed: bool = False, mark: str | None = None) -> bool:
        """Deletes the worker's Lease if it still holds it; False if it was gone already. With
        `unless_renewed` (it expired here), not if a heartbeat renewed it elsewhere since: the watch
        brings that renewal, and the worker is registered again from it. With `mark` (its worker's
        life ended), the Lease says so first (ENDED_ANNOTATION), for the replicas that see it go."""
        path = f"{resources.leases_path(worker.namespace)}/{worker.lease}"
        attempt = 0
        while True:
            attempt += 1
            try:
                current = await self._call("GET", path)
                # A time far ahead in the version this replica knew was judged when it came; in a newer
                # one (a replica whose clock runs ahead renewed it since), it is a renewal.
                now = self._clock()
                seen = current["metadata"].get("resourceVersion") == worker.version
                stored = worker_from_lease(current, seen_at=0.0, now=now, far_ahead_as=0.0 if seen else now)
                if stored is None or stored.worker_id != worker.worker_id:
                    return False  # a slot another worker holds now
                # The version known here renewed nowhere else: a later time in it is this replica's own,
                # noted before its clock stepped back (Registry._stepped_back).
                if unless_renewed and not seen and later(stored.renewed_at, worker.renewed_at):
                    return False
                if mark is not None and not ended_on_purpose(current):
                    current = await self._write(
                        "PATCH", path, content_type=client_.MERGE_PATCH,
                        body={"metadata": {"resourceVersion": current["metadata"]["resourceVersion"],
                                           "annotations": {ENDED_ANNOTATION: mark}}})
                await self._write(
                    "DELETE", path,
                    body={"kind": "DeleteOptions", "apiVersion": "v1",
                          "preconditions": {"resourceVersion": current["metadata"]["resourceVersion"]}})
            except client_.ApiError as exc:
                if exc.not_found:
                    return False
                if exc.conflict and attempt < DELETE_ATTEMPTS:
                    continue  # written since it was read (a renewal in flight): read again
                self._given_up(exc)
                raise  # made again later by the caller: a Lease left behind would hold its slot
            return True


def version(body: Mapping[str, Any]) -> str:
    """The resourceVersion of a Lease as the API server answered it ("": none)."""
    return str((body.get("metadata") or {}).get("resourceVersion") or "")
