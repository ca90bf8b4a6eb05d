"""Keeps every WorkerQueue's status, Events and generated token Secret in step with the Store.

The Store says which queues changed; this writes what changed, in the background, with bounded
concurrency, and only when the status would actually differ. Every replica keeps its Store, but
only the active one writes (statuses, token Secrets, Events); on becoming active it checks every
queue again against what the watch says, since the other replica wrote meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from workerqueue_operator.core import pace, pacedlog, queues, workers
from workerqueue_operator.core import status as status_
from workerqueue_operator.core.activity import Activity
from workerqueue_operator.core.events import EventPoster
from workerqueue_operator.core.queues import QueueKey, QueueObject, SecretName
from workerqueue_operator.core.registry import Registry
from workerqueue_operator.core.store import Store
from workerqueue_operator.core.workqueue import WorkQueue, together
from workerqueue_operator.k8s import client as client_
from workerqueue_operator.k8s import resources

logger = logging.getLogger(__name__)

FETCH_BACKOFF_MAX_SECONDS = 30.0
"""A Secret that cannot be read is read again after 1 s, doubling up to this."""
FOREIGN_CONDITIONS = ("TemporalReachable",)
"""Conditions another component writes (core/probes.py)."""
CONFLICT_RETRY_SECONDS = 1.0
"""A status write refused for a newer queue is tried again this much later, if the watch has not
brought that queue back sooner; doubling while refused again, up to CONFLICT_RETRY_MAX_SECONDS (a
queue the watch cannot bring, e.g. one whose newer body this operator cannot read)."""
CONFLICT_RETRY_MAX_SECONDS = 60.0
LIVE_RETRY_MAX_SECONDS = 300.0
"""The longest wait before a queue's live worker count is written again after failed writes."""
FAILED_RETRY_SECONDS = (2.0, 60.0)
"""A SpecInvalid status whose write failed is tried again after the first, doubling up to the second."""
REFUSED_RETRY_SECONDS = (10.0, LIVE_RETRY_MAX_SECONDS)
"""The same for one the API server refused (RBAC, a policy): it stays refused until someone mends it."""


class Conflicts:
    """Status writes refused in a row per queue (the queue was newer than the copy written from), for
    the back-off: the status writer's and the worker supervisor's alike."""

    def __init__(self) -> None:
        self._refused: dict[QueueKey, int] = {}

    def __contains__(self, key: QueueKey) -> bool:
        return key in self._refused

    def refused(self, key: QueueKey) -> float:
        """One more refusal; the seconds to wait before writing again."""
        refused = self._refused[key] = self._refused.get(key, 0) + 1
        return pace.doubling(refused, CONFLICT_RETRY_SECONDS, CONFLICT_RETRY_MAX_SECONDS)

    def forget(self, key: QueueKey) -> None:
        """Written at last, or the queue is gone."""
        self._refused.pop(key, None)

LABELS = {"app.kubernetes.io/managed-by": resources.COMPONENT, "app.kubernetes.io/part-of": "agentcontrol"}


def _own(status: Mapping[str, Any]) -> dict[str, Any]:
    """A status without the conditions another component writes (they move on their own)."""
    conditions = [c for c in status.get("conditions") or [] if c.get("type") not in FOREIGN_CONDITIONS]
    return {**status, "conditions": conditions}


def queue_ref_body(queue: QueueObject) -> dict[str, Any]:
    """Enough of a queue's body to own objects and to be named in Events."""
    return {
        "apiVersion": resources.API_VERSION,
        "kind": "WorkerQueue",
        "metadata": {"name": queue.name, "namespace": queue.namespace, "uid": queue.uid},
    }


def token_secret_body(queue: QueueObject, token: str) -> dict[str, Any]:
    """The queue-token Secret the operator generates: owned by the queue, so it goes with it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": queues.token_secret_name(queue.name),
            "namespace": queue.namespace,
            "labels": {**LABELS, "app.kubernetes.io/component": queues.TOKEN_COMPONENT,
                       workers.QUEUE_LABEL: workers.queues_label(queue)},
            "ownerReferences": [resources.owner_reference(queue_ref_body(queue))],
        },
        "data": {queues.TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


class Reconciler:
    def __init__(
        self,
        *,
        store: Store,
        client: client_.KubeClient,
        resync_seconds: float,
        events: EventPoster,
        activity: Activity,
        watched_namespaces: tuple[str, ...] = (),
        ignored_secret_types: tuple[str, ...] = (),
        concurrency: int = 32,
        now: Callable[[], str] = resources.now_rfc3339,
    ) -> None:
        self._store = store
        self._client = client
        self._events = events
        self._activity = activity
        self._resync_seconds = resync_seconds
        self._now = now
        self._queue: WorkQueue[QueueKey] = WorkQueue(self.reconcile, name="status", concurrency=concurrency)
        self._written: dict[QueueKey, tuple[str, dict[str, Any], str]] = {}
        """The status last written per queue, with the uid of the queue it was written to and the
        resourceVersion the write made."""
        self._token_seen: dict[QueueKey, str] = {}
        """Queue -> the uid of the queue whose generated token Secret was seen here: made again, it was deleted."""
        self._conflicts = Conflicts()
        self._token_refusals = Conflicts()  # the same back-off, for a token Secret the API server refuses
        self._fetching: set[SecretName] = set()
        self._fetches: set[asyncio.Task[None]] = set()
        self._watched = frozenset(watched_namespaces)  # empty: the whole cluster is watched
        self._ignored_types = frozenset(ignored_secret_types)
        self._unwatched: set[SecretName] = set()  # used Secrets of a type the watch leaves out
        self._unreadable: dict[SecretName, str] = {}
        """Secrets whose last read on demand failed, and why (no value: the error's kind and status)."""
        self._invalid: dict[QueueKey, tuple[dict[str, Any], str]] = {}
        """Queues whose stored spec the operator cannot take (not in the Store): body, what is wrong."""
        self._invalid_retries: dict[QueueKey, asyncio.TimerHandle] = {}
        """The pending retry of each one's status write that failed."""
        store.subscribe(self.schedule)
        activity.subscribe(self._activity_changed)

    def schedule(self, key: QueueKey) -> None:
        self._queue.add(key)

    def behind(self) -> bool:
        """Whether queues wait for their status (e.g. 10,000 at start-up)."""
        return self._queue.behind

    @property
    def failed(self) -> int:
        """Status passes that failed, in all (a metric)."""
        return self._queue.failed

    def _activity_changed(self, active: bool) -> None:
        self._written.clear()  # the other replica may have written since
        if active:
            for key in self._store.queue_keys():
                self.schedule(key)
            for body, message in list(self._invalid.values()):
                self._spawn(self._show_invalid(body, message))

    def spec_invalid(self, body: dict[str, Any], message: str) -> None:
        """A queue whose stored spec cannot be taken: said on it, as Ready=False SpecInvalid and a
        Warning Event, rather than dropped in silence under the Ready=True an earlier run wrote."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        self._invalid[key] = (body, message)
        self._cancel_invalid_retry(key)
        self._spawn(self._show_invalid(body, message))

    def invalid_count(self) -> int:
        """Queues whose stored spec cannot be taken (a metric)."""
        return len(self._invalid)

    def spec_valid(self, key: QueueKey) -> None:
        """The queue is valid again, or gone."""
        self._invalid.pop(key, None)
        self._cancel_invalid_retry(key)

    def _cancel_invalid_retry(self, key: QueueKey) -> None:
        retry = self._invalid_retries.pop(key, None)
        if retry is not None:
            retry.cancel()

    async def _show_invalid(self, body: dict[str, Any], message: str, *, tries: int = 1) -> None:
        if not self._activity.is_active():
            return  # the active replica says so; this one will when it becomes active
        meta = body.get("metadata") or {}
        current = body.get("status") or {}
        desired = status_.invalid_spec_status(current, generation=int(meta.get("generation") or 0), message=message,
                                              now=self._now())
        if not status_.differs(desired, current):
            return
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        try:
            await resources.patch_queue_status(self._client, namespace, name, desired,
                                               resource_version=meta.get("resourceVersion"))
        except client_.ApiError as exc:
            if not exc.conflict:  # a conflict: the watch brings the newer copy, and it back here
                logger.warning("writing the status of %s/%s failed: %s", namespace, name, exc)
                self._show_invalid_later((namespace, name), tries, refused=exc.refused)
            return
        except client_.ERRORS as exc:
            logger.warning("writing the status of %s/%s failed: %s", namespace, name, type(exc).__name__)
            self._show_invalid_later((namespace, name), tries)
            return
        self._events.post(involved={"apiVersion": resources.API_VERSION, "kind": "WorkerQueue",
                                    "metadata": {"name": name, "namespace": namespace, "uid": meta.get("uid", "")}},
                          reason="SpecInvalid", message=message, warning=True)

    def _show_invalid_later(self, key: QueueKey, tries: int, *, refused: bool = False) -> None:
        """Tries the SpecInvalid status again after a failed write, 2 s doubling to a minute: such a
        queue is not in the Store, so no resync would, and it would show Ready=True meanwhile. A
        refusal (RBAC, a policy) lasts until someone mends it: 10 s doubling to 5 minutes, a warning each."""

        def again() -> None:
            self._invalid_retries.pop(key, None)
            invalid = self._invalid.get(key)  # the latest copy, should it have changed since
            if invalid is not None:
                self._spawn(self._show_invalid(*invalid, tries=tries + 1))

        self._cancel_invalid_retry(key)
        wait = pace.doubling(tries, *REFUSED_RETRY_SECONDS if refused else FAILED_RETRY_SECONDS)
        self._invalid_retries[key] = asyncio.get_running_loop().call_later(wait, again)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)
        task.add_done_callback(_said_if_failed)

    def fetch_secrets(self, names: set[SecretName], *, refresh: bool = False) -> None:
        """Reads Secrets a queue just started to use (the watch only keeps used ones), or, with
        `refresh`, Secrets no watch covers, so that their rotation is seen too."""
        for name in names - self._fetching:
            self._spawn_fetch(name, refresh=refresh, wait=1.0)

    def _spawn_fetch(self, name: SecretName, *, refresh: bool, wait: float) -> None:
        self._fetching.add(name)
        task = asyncio.create_task(self._fetch(name, refresh=refresh, wait=wait))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def run(self) -> None:
        try:
            await together(self._queue.run(), self._resync())
        finally:
            for task in self._fetches:
                task.cancel()
            await asyncio.gather(*self._fetches, return_exceptions=True)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._resync_seconds)
            for key in self._store.queue_keys():
                self.schedule(key)
            # Operator-wide default Secrets may live outside the watched namespaces, and a queue may
            # refer to a Secret of a type the watch leaves out: no watch tells their changes.
            used = self._store.used_secrets()
            self._unwatched &= used
            absent: set[SecretName] = set()
            if self._ignored_types:
                # One read absent and made since with a type the watch leaves out: nothing else tells.
                absent = {n for n in used if self._store.secret_state(n) == (True, None)}
                absent -= self._store.generated_token_secrets()  # ours: Opaque, the watch brings them
            self.fetch_secrets({n for n in used if (self._watched and n[0] not in self._watched)
                                or n in self._unwatched} | absent, refresh=True)

    async def _fetch(self, name: SecretName, *, refresh: bool, wait: float) -> None:
        news = self._store.secret_news(name)
        try:
            body = await resources.read_secret(self._client, *name)
        except Exception as exc:  # any failure: the name must not stay in _fetching
            # Again after a back-off (a 403 may last: a Role short of a Secret), while a queue uses it.
            # The error's kind only: an unexpected one's text could quote what was read.
            why = str(exc) if isinstance(exc, client_.ERRORS) else type(exc).__name__
            logger.warning("reading secret %s/%s failed, again in %gs: %s", name[0], name[1], wait, why)
            if name not in self._unreadable:
                self._unreadable[name] = why or type(exc).__name__
                for key in self._store.users_of(name):
                    self.schedule(key)  # shown on the queue, not only in this log
            await asyncio.sleep(wait)
            self._fetching.discard(name)
            if self._store.is_used(name):
                self._spawn_fetch(name, refresh=refresh, wait=min(wait * 2, FETCH_BACKOFF_MAX_SECONDS))
            else:
                self._unreadable.pop(name, None)
            return
        self._fetching.discard(name)
        self._unreadable.pop(name, None)
        if body is not None and body.get("type") in self._ignored_types:
            self._unwatched.add(name)
        data = None if body is None else self._store.secret_data(body)
        version = "" if body is None else resources.version_of(body)
        if refresh and self._store.secret_news(name) == news:
            self._store.upsert_secret(name, data, version)
        elif not self._store.fill_secret(name, data, version, news=news) and self._store.is_used(name):
            # Forgotten and used again while it was read: this answer may be older than what the
            # watch told in between. Read again.
            self._spawn_fetch(name, refresh=refresh, wait=1.0)

    async def reconcile(self, key: QueueKey) -> None:
        resolution = self._store.resolution(key)
        if resolution is None:
            # Also on a standby: a queue deleted while it stood by is never seen again once it is active.
            self._written.pop(key, None)
            self._token_seen.pop(key, None)
            self._conflicts.forget(key)
            self._token_refusals.forget(key)
            return
        if not self._activity.is_active():
            return  # a standby only serves; it is told when it becomes active
        refusal: queues.Problem | None = None
        try:
            if await self._ensure_token_secret(resolution):
                # Not "SecretNotFound" about the Secret being created right now: its arrival through
                # the watch brings the queue back here, with whatever is then true.
                self._token_refusals.forget(key)
                return
        except client_.ApiError as exc:
            if exc.namespace_terminating:
                return  # the queue goes with its namespace
            if not exc.refused:
                # The work queue's retry (a status write would not get through either), logged
                # without the server's text.
                raise exc.quiet(f"creating Secret {queues.token_secret_name(resolution.queue.name)} "
                                f"for the queue token failed ({exc.status} {exc.reason})") from None
            # A quota, an admission webhook, a Role short of `create secrets`: said on the queue (an
            # earlier Ready=True would be a lie) and tried again, ever less often, until it is let in.
            # The status and reason only: a webhook's message may quote the object, the token with it.
            refusal = queues.Problem(
                "TokenSecretNotCreated", f"creating Secret {queues.token_secret_name(resolution.queue.name)} "
                f"for the queue token was refused ({exc.status} {exc.reason}); tried again with a back-off")
            self._queue.add_after(key, self._token_refusals.refused(key))
        else:
            self._token_refusals.forget(key)
        resolution = self._store.resolution(key)  # the token Secret just made is known now
        if resolution is None:
            return
        if refusal is not None:
            resolution = dataclasses.replace(resolution, problem=refusal, secrets_problem=refusal)
        queue = resolution.queue
        if queue.deleting:
            # Going (a foreground deletion waits for its dependents): its generated token Secret is
            # collected first, and Ready=False with a Warning about it would be noise on its way out.
            return
        if resolution.problem is not None and resolution.problem.reason == "SecretPending":
            unreadable = sorted(n for n in self._store.secrets_of(key) if n in self._unreadable)
            if not unreadable:
                return  # a read is under way and will bring the queue back here
            # Its reads fail (a Role short of a Secret no watch covers): said on the queue, which
            # must not keep showing what an earlier run wrote.
            (namespace, name), *_ = unreadable
            unreadable_problem = queues.Problem(
                "SecretUnreadable", f"secret {name} in namespace {namespace} could not be read "
                f"({self._unreadable[(namespace, name)]}); read again with a back-off")
            resolution = dataclasses.replace(resolution, problem=unreadable_problem,
                                             secrets_problem=unreadable_problem)

        # What we wrote last is newer than what the watch may have delivered so far; once the watch
        # has caught up, it is forgotten (10,000 copies of every status add up).
        # Kept by name, it is this queue's only if the uid matches: a queue deleted and made again
        # under the same name (both events in before a pass here, or across a relist) has no status.
        uid, written, written_version = self._written.get(key, ("", None, ""))
        if written is not None and (uid != queue.uid or not status_.differs(_own(written), _own(queue.status))):
            del self._written[key]
            written = None
        current = {**queue.status, **(written or {})}
        # TemporalReachable is the worker supervisor's: always as the watch shows it, never an old copy.
        theirs = [c for c in queue.status.get("conditions") or [] if c.get("type") in FOREIGN_CONDITIONS]
        current["conditions"] = sorted(_own(current)["conditions"] + theirs,
                                       key=lambda c: str(c.get("type")))
        desired = status_.desired_status(resolution, current, now=self._now())
        if not status_.differs(desired, current):
            return
        # The conditions are one list: a merge patch of it made from an older copy would undo what
        # the supervisor wrote since (TemporalReachable). Written only over the version it was made from.
        try:
            version = await resources.patch_queue_status(
                self._client, queue.namespace, queue.name, desired,
                resource_version=written_version if written is not None else queue.resource_version)
        except client_.ApiError as exc:
            if not exc.conflict:
                raise
            # Changed since: the watch brings the newer queue, and it back here (a retry, should it not).
            logger.debug("the status of %s/%s changed meanwhile; written again from the newer one", *key)
            self._written.pop(key, None)
            self._queue.add_after(key, self._conflicts.refused(key))
            return
        self._conflicts.forget(key)
        if version is None:
            self._written.pop(key, None)
            return
        self._written[key] = (queue.uid, desired, version)
        self._announce(queue, status_.ready_condition(current), status_.ready_condition(desired))
        self._announce_secrets(queue, status_.condition(current, status_.SECRETS_RESOLVED),
                               status_.condition(desired, status_.SECRETS_RESOLVED), status_.ready_condition(desired))

    async def _ensure_token_secret(self, resolution: queues.Resolution) -> bool:
        """Generates the queue token when the queue names none and the watch knows there is none.
        True: the queue waits for its token Secret to come through the watch."""
        queue = resolution.queue
        if queue.spec.auth.token_secret_refs or queue.deleting:
            return False  # a queue being deleted (foreground) must not get back what the collector took
        name = queues.token_secret_name(queue.name)
        secret = (queue.namespace, name)
        known, data = self._store.secret_state(secret)
        if known and data is not None:
            self._token_seen[queue.key] = queue.uid
        if not known or data is not None:
            return False
        body = token_secret_body(queue, secrets.token_urlsafe(32))  # 256 random bits
        # What is there now is known at once, so that the status is written in this same pass rather
        # than after the watch's echo (one made by someone else, the watch may have told already, or
        # its list left out as unused then: it would never tell again).
        there: dict[str, Any] | None = None
        made = False
        self._store.creating_secret(secret)
        try:
            # One left by a deleted queue of this name (`kubectl replace --force`) goes: its token is
            # the old queue's, and the collector would take it from under this one's workers.
            there, made = await resources.create_replacing(
                self._client, resources.secrets_path(queue.namespace), body,
                leftover=lambda existing: queues.namesakes_token(existing, queue))
        finally:
            self._store.created_secret(secret, None if there is None else self._store.secret_data(there),
                                       "" if there is None else resources.version_of(there))
        if made and (self._token_seen.get(queue.key) == queue.uid or _token_was_there(queue)):
            # It was there, and was deleted. The new token is no mistake to mend (deleting the Secret is
            # how a generated token is revoked), but every worker that holds the old one is turned away
            # from now on: said where alerting looks.
            self._events.post(involved=queue_ref_body(queue), reason="TokenSecretRecreated", warning=True,
                              message=f"Secret {name} was deleted and is made again with a new queue token: "
                                      "workers holding the old one are refused (401) until started with the new one")
        elif made:
            self._events.post(involved=queue_ref_body(queue), reason="TokenSecretCreated",
                              message=f"created Secret {name} holding the queue token")
        return self._store.secret_state(secret)[1] is None

    def _announce_secrets(self, queue: QueueObject, before: Any, after: Any, ready: Any) -> None:
        """A Secret missing (or its key) where Ready says something else first (a queue id another
        queue holds, say): Ready's Event would never tell of it."""
        if after is None or after["status"] != "False" or (ready is not None and ready["reason"] == after["reason"]):
            return
        if before is not None and (before["status"], before["reason"], before.get("message")) == (
                after["status"], after["reason"], after.get("message")):
            return
        self._events.post(involved=queue_ref_body(queue), reason=after["reason"], message=after["message"],
                          warning=True)

    def _announce(self, queue: QueueObject, before: Any, after: Any) -> None:
        if after is None:
            return
        # The same reason about something else (another Secret missing once the first is there) is
        # news too; a Ready queue's message changing is not.
        if (before is not None and before.get("status") == after["status"] and before.get("reason") == after["reason"]
                and (after["status"] == "True" or before.get("message") == after["message"])):
            return
        if before is None and after["status"] == "True":
            return  # a queue that is Ready from the start needs no Event saying so
        if after["reason"] in ("CrashLooping", "PodCreationFailed"):
            return  # the worker supervisor has said so, with the details
        ready = after["status"] == "True"
        # Suspended is what its user asked for: routine, not a Warning for alerting to page on.
        self._events.post(involved=queue_ref_body(queue), reason=after["reason"] if not ready else "Ready",
                          message=after["message"], warning=not ready and after["reason"] != "Suspended")


class LiveStatus:
    """Keeps `status.workers.live` of each queue equal to its live registrations, coalesced: a queue
    is written at most every `per_queue` seconds and the replica makes at most `rate` such writes a
    second, however many workers come and go (a burst of /start calls on 1,000 queues must not
    become 1,000 status writes a second). Every `audit` seconds each queue's count is compared with
    what its status shows, so that a change no registration tells of is written too: a worker that
    left while the replica before this one stopped (or stood by) has no Lease left to say so."""

    def __init__(self, *, store: Store, registry: Registry, client: client_.KubeClient, activity: Activity,
                 period: float = 1.0, per_queue: float = 5.0, rate: float = 20.0, audit: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, listed: Callable[[], bool] = lambda: True) -> None:
        self._store = store
        self._listed = listed
        """Whether the queues and the Leases have been listed: before, a count is of a registry half filled."""
        self._was_listed = False
        self._activity = activity
        self._registry = registry
        self._client = client
        self._period = period
        self._per_queue = per_queue
        self._rate = rate
        self._clock = clock
        self._audit_every = audit
        self._audited_at = clock()  # not at once: the Lease watch fills the registry first
        self._dirty: dict[QueueKey, None] = {}  # insertion-ordered: the longest waiting first
        self._written_at: dict[QueueKey, float] = {}  # only within per_queue: older ones are dropped
        self._failures: dict[QueueKey, int] = {}
        """Writes failed in a row, by queue: its next one waits longer (a 403 of a namespace whose
        RoleBinding was removed lasts; retried every `per_queue`, it took the budget of every other)."""
        self._log = pacedlog.PacedLog(logger)
        # The count last written, until the watch shows it, with the uid of the queue it was written to.
        self._sent: dict[QueueKey, tuple[str, int]] = {}
        # Only the active replica writes: a standby marking every queue a worker came or went from
        # would keep them all (deleted ones too) for as long as it stands by. It audits every queue
        # once it is told it is the active one instead. As told, not asked: asked, the peering is
        # read again, and this is on the path of every /start.
        self._marking = activity.is_active()
        self._audit_due = False  # due once the Leases are listed (see tick)
        activity.subscribe(self._activity_changed)
        registry.subscribe(self._changed)

    def _activity_changed(self, active: bool) -> None:
        self._marking = self._audit_due = active
        # A count written before standing by may never show: the other replica wrote over it. Kept,
        # it would mark its queue dirty at every pass for good, waiting for the watch to show it.
        self._sent.clear()

    def _changed(self, key: QueueKey) -> None:
        if self._marking:
            self._dirty[key] = None

    def due(self) -> list[QueueKey]:
        """The queues to write now: dirty, not written within `per_queue`, at most a period's budget."""
        now, budget = self._clock(), max(1, int(self._rate * self._period))
        chosen = []
        for key in self._dirty:
            if now - self._written_at.get(key, float("-inf")) >= self._per_queue:
                chosen.append(key)
                if len(chosen) >= budget:
                    break
        return chosen

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            await self.tick()

    async def tick(self) -> None:
        """One period's writes."""
        if not self._activity.is_active() or not self._listed():
            return  # a replica active from its start (a peering won at once) has not listed its Leases yet
        if not self._was_listed:
            # What changed before the Leases were all listed was marked on a registry half filled.
            self._was_listed = self._audit_due = True
        if self._audit_due or self._clock() - self._audited_at >= self._audit_every:
            self._audit_due = False  # what changed while it stood by was not marked
            self.audit()
        for key in self.due():
            self._dirty.pop(key, None)
            self._written_at[key] = self._clock()
            try:
                await self._write(key)
            except client_.ERRORS as exc:
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                wait = pace.doubling(failures, self._per_queue, LIVE_RETRY_MAX_SECONDS)
                self._log.warning("live_write_failed", "writing the live worker count of %s/%s failed "
                                  "(again in %.0fs): %s", *key, wait, exc)
                self._written_at[key] = self._clock() + wait - self._per_queue  # due() waits `wait`
                self._dirty[key] = None
            else:
                self._failures.pop(key, None)
        self._log.settle()
        self._forget(self._clock())

    def audit(self) -> None:
        """Marks the queues whose status shows another live count than their registrations."""
        self._audited_at = self._clock()
        for key in self._store.queue_keys():
            queue = self._store.queue(key)
            shown = (queue.status.get("workers") or {}).get("live", 0) if queue is not None else None
            if shown is not None and shown != self._registry.live_count(key):
                self._dirty[key] = None

    def _forget(self, now: float) -> None:
        """What no longer holds a write back (queues come and go: ephemeral ones by the thousand)."""
        for key in [k for k, at in self._written_at.items() if now - at >= self._per_queue]:
            del self._written_at[key]
        for key in [k for k in self._sent if self._store.queue(k) is None]:
            del self._sent[key]
        for key in [k for k in self._failures if self._store.queue(k) is None]:
            del self._failures[key]

    async def _write(self, key: QueueKey) -> None:
        queue = self._store.queue(key)
        if queue is None:
            self._written_at.pop(key, None)
            return
        live = self._registry.live_count(key)
        shown = (queue.status.get("workers") or {}).get("live", 0)
        # Written to a queue deleted since and made again under its name, it will never show.
        uid, sent = self._sent.get(key, (queue.uid, None))
        if live != shown:
            await resources.patch_queue_status(self._client, queue.namespace, queue.name, {"workers": {"live": live}})
            self._sent[key] = (queue.uid, live)
        elif sent is not None and sent != shown and uid == queue.uid:
            # The watch has not brought the last write yet: what it shows is older, and equal to the
            # count now only by chance. Looked at again once it has.
            self._dirty[key] = None
        else:
            self._sent.pop(key, None)


def _said_if_failed(task: asyncio.Task[None]) -> None:
    """A background write that failed in a way its own handling did not foresee is logged, not left
    to the collector's "exception was never retrieved"."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("a background write failed", exc_info=exc)


def _token_was_there(queue: QueueObject) -> bool:
    """Whether the queue's status, written for its spec as it is, says its Secrets were all there: its
    generated token Secret too. Memory alone (`_token_seen`) forgets across a restart or a handover,
    and a token Secret deleted meanwhile was then announced as a routine creation."""
    resolved = status_.condition(queue.status, status_.SECRETS_RESOLVED)
    return resolved is not None and resolved.get("status") == "True" and \
        resolved.get("observedGeneration") == queue.generation
