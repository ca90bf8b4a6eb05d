"""Watch-fed, in-memory state that /start serves from: queues, the Secrets they use, resolutions.

Everything here is synchronous and fast: it runs on the event loop, fed by the informers, and a
/start request only reads dictionaries. Only Secrets that some queue refers to are kept, so a
cluster's other Secrets (Helm release Secrets are large) cost nothing but a pass through the watch.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from workerqueue_operator.core import queues
from workerqueue_operator.core import status as status_
from workerqueue_operator.core.queues import QueueKey, QueueObject, Resolution, SecretData, SecretName
from workerqueue_operator.models import settings as settings_

Listener = Callable[[QueueKey], None]


@dataclass(frozen=True)
class WorkerCredential:
    """A per-worker token: the operator-run pod it was made for, and that pod's queue."""

    queue: QueueKey
    pod: str
    queue_uid: str
    """The uid of the queue it was made for: a queue made again under the name is not opened by it."""
    since: float | None = None
    """When the token was made, just before its pod (epoch seconds; see workers.made_at)."""
    hostname: str | None = None
    """The hostname its pod was given, by which its executions are known (None: its pod's name, see
    workers.pod_hostname)."""
    interval: float | None = None
    """The heartbeat interval its pod was given (None: not known)."""


class Store:
    def __init__(self, *, settings: settings_.Settings) -> None:
        self._settings = settings
        self._queues: dict[QueueKey, QueueObject] = {}
        self._uses: dict[QueueKey, frozenset[SecretName]] = {}
        self._users: dict[SecretName, set[QueueKey]] = {}
        self._secrets: dict[SecretName, SecretData] = {}
        self._secret_versions: dict[SecretName, str] = {}  # used Secrets' resourceVersions
        self._claimants: dict[str, set[QueueKey]] = {}
        self._holders: dict[str, QueueKey] = {}
        """The claimant that holds each queue id (see _winner), judged when its claimants change."""
        self._resolutions: dict[QueueKey, Resolution] = {}
        self._token_owners: dict[bytes, set[QueueKey]] = {}
        self._token_digests: dict[QueueKey, tuple[bytes, ...]] = {}
        # The same of queues that lost their queue id: their tokens open nothing, but are told apart
        # from wrong ones (a 409 that names the conflict, not a TokenReview and a 401).
        self._losers_of: dict[bytes, set[QueueKey]] = {}
        self._loser_digests: dict[QueueKey, tuple[bytes, ...]] = {}
        self._listeners: list[Listener] = []
        self._worker_tokens: dict[bytes, WorkerCredential] = {}
        self._worker_token_secrets: dict[SecretName, tuple[bytes, WorkerCredential]] = {}
        self._worker_secrets_of: dict[QueueKey, dict[str, SecretName]] = {}
        self._with_upstream: set[QueueKey] = set()
        # Secrets this replica is creating -> whether the watch has told of them since.
        self._creating: dict[SecretName, bool] = {}
        self._holding: collections.Counter[str | None] = collections.Counter()
        """Relists under way by namespace, None for all namespaces at once (see `holding_news`)."""
        self._secret_news: dict[SecretName, int] = {}  # used Secrets: how often told of (see `secret_news`)
        self._uses_begun = 0  # each time a Secret comes into use, its news count starts from anew
        self._held: dict[QueueKey, None] = {}  # queues changed meanwhile, in order

    # --- feeding -----------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(key)` whenever a queue's resolution may have changed (or it was removed)."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def holding_news(self, namespace: str | None = None) -> Iterator[None]:
        """Listeners hear of the queues of `namespace` (None: all) changed inside only at the end, each
        once, and so of any queue that says QueueIdConflict meanwhile. A relist comes in pages: a queue
        on the first page may claim the id of one that only the end of the list shows gone, and its
        status must not say QueueIdConflict (with a Warning) meanwhile. Other namespaces' news is not
        held: one namespace's slow relist (pages of up to 30 s each) held a new queue's token Secret
        and Ready in every other namespace."""
        self._holding[namespace] += 1
        try:
            yield
        finally:
            self._holding[namespace] -= 1
            if not self._holding[namespace]:
                del self._holding[namespace]
            released = [key for key in self._held if not self._held_back(key)]
            for key in released:
                del self._held[key]
            self._notify(released)

    def _held_back(self, key: QueueKey) -> bool:
        if not self._holding:
            return False
        if None in self._holding or key[0] in self._holding:
            return True
        resolution = self._resolutions.get(key)
        return resolution is not None and resolution.problem is not None and \
            resolution.problem.reason == "QueueIdConflict"

    def upsert_queue(self, queue: QueueObject) -> set[SecretName]:
        """Add or replace a queue. Returns the Secrets to read: those it uses whose content is not known
        yet, and its name's token Secret when forgotten here (see below) while another queue lists it."""
        key = queue.key
        previous = self._queues.get(key)
        self._queues[key] = queue
        if queue.spec.upstream is not None:
            self._with_upstream.add(key)
        else:
            self._with_upstream.discard(key)
        affected = {key}
        token = (queue.namespace, queues.token_secret_name(queue.name))
        forgotten = (previous is None or previous.uid != queue.uid) and token in self._secrets
        if forgotten:
            # Made again under the same name (its deletion seen or not): the token Secret known so far
            # may be the old queue's, kept for another queue that lists it and waiting for the garbage
            # collector. Read again, it is judged against this queue; whoever else lists it waits for
            # that read rather than keep serving what may be gone.
            del self._secrets[token]
            self._secret_versions.pop(token, None)
            affected |= self._users.get(token, set())
        uses = queue.secret_names(self._settings)
        self._set_uses(key, uses)
        if previous is not None and previous.queue_id != queue.queue_id:
            self._unclaim(previous.queue_id, key)
            affected |= self._rejudge(previous.queue_id)
        self._claimants.setdefault(queue.queue_id, set()).add(key)
        affected |= self._rejudge(queue.queue_id)
        self._recompute(affected)
        unknown = {name for name in uses if name not in self._secrets}
        return unknown | {token} if forgotten and token in self._users else unknown

    def refresh_queue(self, queue: QueueObject) -> None:
        """A queue whose spec is unchanged (see `QueueObject.same_spec`): its status or deletion moved.
        The resolution stands; listeners still hear of it (a status may call for a status)."""
        key = queue.key
        if key not in self._queues:
            self.upsert_queue(queue)
            return
        previous, self._queues[key] = self._queues[key], queue
        claimants = self._claimants.get(queue.queue_id, set())
        if len(claimants) > 1 and previous.holds_queue_id != queue.holds_queue_id:
            # Its status now says otherwise whether it holds the id, which breaks a same-second tie
            # (_winner): judged again, and every claimant resolved again if the holder changed.
            changed = self._rejudge(queue.queue_id)
            if changed:
                self._recompute(changed)
                return
        resolution = self._resolutions.get(key)
        if resolution is not None:
            self._resolutions[key] = replace(resolution, queue=queue)
        self._notify([key])

    def remove_queue(self, key: QueueKey) -> None:
        queue = self._queues.pop(key, None)
        if queue is None:
            return
        self._with_upstream.discard(key)
        self._set_uses(key, frozenset())
        self._unclaim(queue.queue_id, key)
        affected = self._rejudge(queue.queue_id)
        self._resolutions.pop(key, None)
        self._set_token_digests(key, ())
        _index(self._loser_digests, self._losers_of, key, ())
        self._recompute(affected)
        self._notify([key])

    def is_used(self, name: SecretName) -> bool:
        return name in self._users

    def upsert_secret(self, name: SecretName, data: SecretData, version: str = "") -> None:
        """A Secret was seen (data, at resourceVersion `version`) or deleted (None) by the watch.
        Ignored unless some queue uses it."""
        if name in self._creating:
            self._creating[name] = True
        users = self._users.get(name)
        if users is None:
            return
        self._secret_news[name] = self._secret_news.get(name, 0) + 1
        self._secret_versions[name] = version if data is not None else ""
        if name in self._secrets and self._secrets[name] == data:
            return  # the echo of our own create, or a change beside the data: nothing resolves otherwise
        self._secrets[name] = data
        self._recompute(users)

    def secret_data(self, body: Mapping[str, Any]) -> SecretData:
        """What a Secret brings to the queues that use it: its data, or nothing (as if absent) when
        it is the generated token of a deleted queue of the name a queue has now."""
        return None if self.namesakes_token(body) else queues.decode_secret_data(body)

    def namesakes_token(self, body: Mapping[str, Any]) -> bool:
        """Whether a Secret is the generated token of a deleted queue of the name a queue has now."""
        owner = queues.queue_owner(body)
        queue = self._queues.get(owner[0]) if owner is not None else None
        return queue is not None and queues.namesakes_token(body, queue)

    def secret_state(self, name: SecretName) -> tuple[bool, SecretData]:
        """(known, data): whether the Secret's state is known, and its data (None: absent)."""
        if name in self._secrets:
            return True, self._secrets[name]
        return False, None

    def secret_version(self, name: SecretName) -> str:
        """The resourceVersion of a used Secret as last told ("" if absent or not known)."""
        return self._secret_versions.get(name, "")

    def secret_news(self, name: SecretName) -> int:
        """How many times a used Secret was told of since it came into use, from a start of its own
        each time: a read whose answer comes after a newer word (the watch's) must not overwrite it."""
        return self._secret_news.get(name, 0)

    def users_of(self, name: SecretName) -> set[QueueKey]:
        """The queues that use a Secret."""
        return set(self._users.get(name, ()))

    def secrets_of(self, key: QueueKey) -> frozenset[SecretName]:
        """The Secrets a queue uses."""
        return self._uses.get(key, frozenset())

    def used_secrets(self) -> set[SecretName]:
        return set(self._users)

    def unknown_secrets(self) -> set[SecretName]:
        """Secrets some queue uses whose state the watch has not told (yet)."""
        return {name for name in self._users if name not in self._secrets}

    def generated_token_secrets(self) -> set[SecretName]:
        """The token Secrets the operator generates (for queues that name none of their own)."""
        return {(q.namespace, queues.token_secret_name(q.name)) for q in self._queues.values()
                if not q.spec.auth.token_secret_refs}

    def fill_secret(self, name: SecretName, data: SecretData, version: str = "", *, news: int | None = None) -> bool:
        """A Secret read on demand: kept only if still used and the watch has not been faster. With
        `news` (secret_news as the read began): a Secret forgotten and used again meanwhile may have
        changed in between, which the watch told and was forgotten with it (a rotated-out token
        would be served again): the answer is dropped, and False says to read it again."""
        if name not in self._users or name in self._secrets:
            return True
        if news is not None and self.secret_news(name) != news:
            return False
        self.upsert_secret(name, data, version)
        return True

    def creating_secret(self, name: SecretName) -> None:
        """This replica is about to create the Secret: see `created_secret`."""
        self._creating[name] = False

    def created_secret(self, name: SecretName, data: SecretData, version: str = "") -> None:
        """The create of `creating_secret` ended: `data` if it made the Secret (None if it did not).
        Kept, as if the watch had told, unless the watch has told of the Secret meanwhile (its word
        is newer): the queue need not wait for the echo of our own create to be served."""
        told = self._creating.pop(name, True)
        if data is not None and not told:
            self.upsert_secret(name, data, version)

    def upsert_worker_credential(self, secret: SecretName, credential: WorkerCredential, token: str | None) -> None:
        """A per-worker token Secret was seen (an empty one opens nothing)."""
        self.remove_worker_credential(secret)
        if token:
            token_digest = queues.digest(token)
            self._worker_tokens[token_digest] = credential
            self._worker_token_secrets[secret] = (token_digest, credential)
            self._worker_secrets_of.setdefault(credential.queue, {})[credential.pod] = secret

    def remove_worker_credential(self, secret: SecretName) -> None:
        previous = self._worker_token_secrets.pop(secret, None)
        if previous is None:
            return
        token_digest, credential = previous
        if self._worker_tokens.get(token_digest) == credential:
            del self._worker_tokens[token_digest]
        pods = self._worker_secrets_of.get(credential.queue, {})
        if pods.get(credential.pod) == secret:
            del pods[credential.pod]
            if not pods:
                del self._worker_secrets_of[credential.queue]

    def worker_credential_in(self, secret: SecretName) -> WorkerCredential | None:
        """The per-worker token a Secret holds, if it is one."""
        held = self._worker_token_secrets.get(secret)
        return held[1] if held is not None else None

    def pod_interval(self, queue: QueueKey, pod: str) -> float | None:
        """The heartbeat interval a pod of the queue was given, as its per-worker token says."""
        secret = self._worker_secrets_of.get(queue, {}).get(pod)
        held = self._worker_token_secrets.get(secret) if secret is not None else None
        return held[1].interval if held is not None else None

    def worker_credential_secrets(self, queue: QueueKey) -> dict[str, SecretName]:
        """pod name -> the Secret holding its token, for a queue's per-worker tokens."""
        return dict(self._worker_secrets_of.get(queue, {}))

    # --- reading (the /start hot path) -------------------------------------------------------------

    def serving(self, queue_id: str) -> Resolution | None:
        """The resolution of the queue that owns `queue_id`, if any queue claims it."""
        claimants = self._claimants.get(queue_id)
        if not claimants:
            return None
        if len(claimants) == 1:  # the usual case, on every /start
            for only in claimants:
                return self._resolutions.get(only)
        return self._resolutions.get(self._holders[queue_id])

    def resolution(self, key: QueueKey) -> Resolution | None:
        return self._resolutions.get(key)

    def queue(self, key: QueueKey) -> QueueObject | None:
        return self._queues.get(key)

    def opens(self, resolution: Resolution, token_digest: bytes) -> bool:
        """Whether a queue token opens this queue, compared in constant time."""
        matched = False
        for candidate in self._token_digests.get(resolution.queue.key, ()):
            matched |= hmac.compare_digest(candidate, token_digest)
        return matched

    def worker_credential(self, token_digest: bytes) -> WorkerCredential | None:
        """The pod and queue of a per-worker token, if it is one."""
        return self._worker_tokens.get(token_digest)

    def is_queue_token(self, token_digest: bytes) -> bool:
        """Whether the token is a queue token of any queue (then it is never sent to a TokenReview)."""
        return bool(self._token_owners.get(token_digest))

    def conflict_of_token(self, token_digest: bytes) -> str | None:
        """What to tell the caller of a token that belongs only to queues whose queue id another queue
        holds (QueueIdConflict); None for any other token."""
        losers = self._losers_of.get(token_digest)
        if not losers or self._token_owners.get(token_digest):
            return None
        loser = self._queues[min(losers)]
        winner = self._holders[loser.queue_id]
        return (f"WorkerQueue {loser.namespace}/{loser.name} is not served: its queue id {loser.queue_id} "
                f"is held by {_holder(winner, loser.namespace)}")

    def queue_of_token(self, token_digest: bytes) -> QueueKey | None:
        """The one queue a worker's token belongs to; None for a token of no queue, or of several
        (queues sharing a token Secret), where the caller's queue cannot be told.

        The only place that maps a credential to a queue, so other kinds of worker tokens join here.
        """
        credential = self._worker_tokens.get(token_digest)
        if credential is not None:
            queue = self._queues.get(credential.queue)
            return credential.queue if queue is not None and queue.uid == credential.queue_uid else None
        owners = self._token_owners.get(token_digest)
        if owners is None or len(owners) != 1:
            return None
        return next(iter(owners))

    @property
    def passes_through(self) -> bool:
        """Whether any queue has an upstream (else unknown paths are plain 404s, as without one)."""
        return bool(self._settings.upstream_url or self._with_upstream)

    def upstream_origins(self) -> set[str]:
        """The origins the queues pass calls through to now."""
        urls = {r.upstream.url for r in self._resolutions.values() if r.upstream is not None}
        return {queues.origin_of(url) for url in urls}

    def queue_keys(self) -> list[QueueKey]:
        return list(self._queues)

    @property
    def secrets(self) -> Mapping[SecretName, SecretData]:
        """The Secrets in use, read-only."""
        return MappingProxyType(self._secrets)

    @property
    def queue_count(self) -> int:
        return len(self._queues)

    @property
    def not_ready_count(self) -> int:
        """Queues that cannot be served, or whose status says Ready=False: what only the status knows
        counts too (CrashLooping, PodCreationFailed: judged from the worker pods, not resolved here).
        Not a suspended one that has nothing else wrong: its owner stopped it, and an alert on this
        count would fire for as long as any queue anywhere stays suspended."""
        return sum(1 for key, queue in self._queues.items()
                   if self._unready_reason(key) not in (None, queues.SUSPENDED)
                   or _says_not_ready(status_.ready_condition(queue.status)))

    @property
    def suspended_count(self) -> int:
        return sum(1 for queue in self._queues.values() if queue.spec.suspend)

    @property
    def temporal_unreachable_count(self) -> int:
        """Queues whose status says TemporalReachable=False (Ready leaves Temporal out: README, Status)."""
        return sum(1 for queue in self._queues.values()
                   if (status_.condition(queue.status, "TemporalReachable") or {}).get("status") == "False")

    def _unready_reason(self, key: QueueKey) -> str | None:
        resolution = self._resolutions.get(key)
        if resolution is None:
            return "NotResolved"
        return resolution.problem.reason if resolution.problem is not None else None

    @property
    def secret_count(self) -> int:
        return len(self._secrets)

    # --- internals ---------------------------------------------------------------------------------

    def _set_uses(self, key: QueueKey, uses: frozenset[SecretName]) -> None:
        old = self._uses.get(key, frozenset())
        for name in old - uses:
            users = self._users.get(name)
            if users is not None:
                users.discard(key)
                if not users:
                    del self._users[name]
                    self._secrets.pop(name, None)  # nobody uses it: forget its content
                    self._secret_versions.pop(name, None)
                    self._secret_news.pop(name, None)
        for name in uses - old:
            if name not in self._users:
                self._uses_begun += 1
                self._secret_news[name] = self._uses_begun << 32  # no read begun before matches it
            self._users.setdefault(name, set()).add(key)
        if uses:
            self._uses[key] = uses
        else:
            self._uses.pop(key, None)

    def _unclaim(self, queue_id: str, key: QueueKey) -> None:
        claimants = self._claimants.get(queue_id)
        if claimants is None:
            return
        claimants.discard(key)
        if not claimants:
            del self._claimants[queue_id]

    def _rejudge(self, queue_id: str) -> set[QueueKey]:
        """Judges who holds `queue_id` now; returns the claimants to resolve again: all of them when
        the holder changed (a loser's problem names it), else none. Only that, so that many queues
        claiming one id (anyone may make them) cost each new one a look at the claimants, not a
        resolution of every one: that was cubic, seconds of a blocked event loop for a few hundred."""
        claimants = self._claimants.get(queue_id)
        before = self._holders.pop(queue_id, None)
        if not claimants:
            return set()
        holder = self._holders[queue_id] = self._winner(claimants)
        return set(claimants) if holder != before else set()

    def _winner(self, claimants: Iterable[QueueKey]) -> QueueKey:
        # The queue whose status says it holds the id keeps it, so that no other can take over a
        # serving queue and cut its workers off: not a newcomer, nor an earlier queue that comes into
        # view (a namespace watched from now on, a spec that could not be taken and now can). Else
        # the earliest claim; made in the same second (creationTimestamp has no finer grain), the name.
        return min(claimants, key=lambda k: (not self._queues[k].holds_queue_id, self._queues[k].created, k))

    def _recompute(self, keys: Iterable[QueueKey]) -> None:
        changed = []
        for key in keys:
            queue = self._queues.get(key)
            if queue is None:
                continue
            resolution = queues.resolve(queue, secrets=self._secrets, settings=self._settings)
            winner = self._holders[queue.queue_id]
            if winner != key:
                problem = queues.Problem("QueueIdConflict", f"queue id {queue.queue_id} is already used by "
                                         f"{_holder(winner, queue.namespace)}")
                # Nothing of it serves: no worker is started for it (its token Secret in the making
                # included: they would be answered 403 by the queue that holds the id), nor probed.
                resolution = replace(resolution, config=None, problem=problem, awaiting_generated_token=False,
                                     temporal=None)
            self._resolutions[key] = resolution
            self._set_token_digests(key, resolution.token_digests if winner == key else ())
            _index(self._loser_digests, self._losers_of, key, () if winner == key else resolution.token_digests)
            changed.append(key)
        self._notify(changed)

    def _set_token_digests(self, key: QueueKey, digests: tuple[bytes, ...]) -> None:
        _index(self._token_digests, self._token_owners, key, digests)

    def _notify(self, keys: Iterable[QueueKey]) -> None:
        for key in keys:
            if self._held_back(key):
                self._held[key] = None
                continue
            self._held.pop(key, None)  # told now: not again at the end
            for listener in self._listeners:
                listener(key)


def _says_not_ready(ready: Mapping[str, Any] | None) -> bool:
    return ready is not None and ready.get("status") == "False" and ready.get("reason") != queues.SUSPENDED


def _index(digests_of: dict[QueueKey, tuple[bytes, ...]], keys_of: dict[bytes, set[QueueKey]], key: QueueKey,
           digests: tuple[bytes, ...]) -> None:
    """Files the queue's token digests both ways, in place of those it had."""
    for old in digests_of.pop(key, ()):
        keys = keys_of.get(old)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del keys_of[old]
    if digests:
        digests_of[key] = digests
        for new in digests:
            keys_of.setdefault(new, set()).add(key)


def _holder(winner: QueueKey, namespace: str) -> str:
    """The queue holding an id, as told to a queue of `namespace` (its status, its token's callers):
    another namespace's is not named, as its names are another team's to know."""
    return f"{winner[0]}/{winner[1]}" if winner[0] == namespace else "a WorkerQueue in another namespace"
