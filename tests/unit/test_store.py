from __future__ import annotations

import dataclasses
from typing import Any, cast

from tests.unit.factories import UID, queue, queue_body, secret_body
from workerqueue_operator.core import queues, reconciler
from workerqueue_operator.core.store import Store, WorkerCredential
from workerqueue_operator.models.settings import Settings


def store() -> tuple[Store, list]:
    s = Store(settings=Settings())
    changed: list = []
    s.subscribe(changed.append)
    return s, changed


def test_queue_is_served_once_its_secrets_are_known():
    s, changed = store()
    missing = s.upsert_queue(queue(queueId="abc"))
    assert missing == {("team-a", "q1-worker-token")}
    assert s.serving("abc").problem.reason == "SecretPending"
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    assert s.serving("abc").ready
    assert s.opens(s.serving("abc"), queues.digest("t"))
    assert not s.opens(s.serving("abc"), queues.digest("u"))
    assert s.is_queue_token(queues.digest("t"))
    assert ("team-a", "q1") in changed


def test_unused_secrets_are_never_kept():
    s, _ = store()
    s.upsert_secret(("team-a", "helm-release"), {"release": "x" * 1000})
    assert s.secret_count == 0
    s.upsert_queue(queue())
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    assert s.secret_count == 1
    s.remove_queue(("team-a", "q1"))
    assert s.secret_count == 0 and not s.is_used(("team-a", "q1-worker-token"))
    assert not s.is_queue_token(queues.digest("t"))


def test_a_used_secrets_version_is_kept_until_nobody_uses_it():
    s, _ = store()
    name = ("team-a", "q1-worker-token")
    s.upsert_secret(name, {"token": "t"}, "7")
    assert s.secret_version(name) == ""  # nobody used it yet
    s.upsert_queue(queue(queueId="abc"))
    s.upsert_secret(name, {"token": "t"}, "8")
    s.upsert_secret(name, {"token": "t"}, "9")  # the same data, a new version (a label changed, say)
    assert s.secret_version(name) == "9"
    s.upsert_secret(name, None, "10")
    assert s.secret_version(name) == ""
    s.upsert_secret(name, {"token": "t"}, "11")
    s.remove_queue(("team-a", "q1"))
    assert s.secret_version(name) == ""


def test_fill_secret_never_overwrites_what_the_watch_saw():
    s, _ = store()
    s.upsert_queue(queue(queueId="abc"))
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "new"})
    s.fill_secret(("team-a", "q1-worker-token"), {"token": "old"})
    assert s.opens(s.serving("abc"), queues.digest("new"))


def test_rotation_replaces_the_token():
    s, _ = store()
    s.upsert_queue(queue(queueId="abc"))
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "one"})
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "two"})
    assert not s.is_queue_token(queues.digest("one"))
    assert s.opens(s.serving("abc"), queues.digest("two"))


def test_a_queue_whose_id_is_taken_starts_no_worker_while_its_token_secret_is_made():
    """Its generated token Secret not made yet, the loser of a queueId looked like a queue waiting only
    for that: its pods were started, each answered 403 by the queue holding the id, each a crash."""
    s, _ = store()
    s.upsert_queue(queue("old", queueId="same", created="2026-01-01T00:00:00Z"))
    s.upsert_secret(("team-a", "old-worker-token"), {"token": "old"})
    s.upsert_queue(queue("new", queueId="same", created="2026-02-01T00:00:00Z", singleExecution=True))
    s.fill_secret(("team-a", "new-worker-token"), None)  # being made
    loser = s.resolution(("team-a", "new"))
    assert loser is not None and loser.problem is not None and loser.problem.reason == "QueueIdConflict"
    assert not loser.starts_workers and loser.probe_target is None


def test_the_earlier_queue_keeps_a_conflicting_id():
    s, _ = store()
    s.upsert_queue(queue("old", queueId="same", created="2026-01-01T00:00:00Z"))
    s.upsert_queue(queue("new", queueId="same", created="2026-02-01T00:00:00Z"))
    for name in ("old", "new"):
        s.upsert_secret(("team-a", f"{name}-worker-token"), {"token": name})
    assert s.serving("same").queue.name == "old" and s.serving("same").ready
    loser = s.resolution(("team-a", "new"))
    assert loser.problem.reason == "QueueIdConflict" and "team-a/old" in loser.problem.message
    assert not s.is_queue_token(queues.digest("new"))  # a loser's token opens nothing
    assert s.conflict_of_token(queues.digest("new")) == (
        "WorkerQueue team-a/new is not served: its queue id same is held by team-a/old")  # ...but is told so
    assert s.conflict_of_token(queues.digest("old")) is None and s.conflict_of_token(queues.digest("x")) is None
    s.remove_queue(("team-a", "old"))
    assert s.serving("same").queue.name == "new" and s.serving("same").ready
    assert s.conflict_of_token(queues.digest("new")) is None


def test_a_conflicting_id_held_in_another_namespace_does_not_name_its_queue():
    s, _ = store()
    s.upsert_queue(queue("private-project", queueId="same", created="2026-01-01T00:00:00Z"))
    s.upsert_queue(queue("mine", namespace="team-b", queueId="same", created="2026-02-01T00:00:00Z"))
    s.upsert_secret(("team-b", "mine-worker-token"), {"token": "mine"})
    loser = s.resolution(("team-b", "mine"))
    assert loser.problem.message == "queue id same is already used by a WorkerQueue in another namespace"
    told = s.conflict_of_token(queues.digest("mine"))
    assert told is not None and "team-a" not in told and "private-project" not in told


def test_a_queue_made_in_the_same_second_never_takes_the_id_from_the_one_holding_it():
    # creationTimestamp has a one-second grain: by name alone, "a-new" would win over "b-old".
    holding = queue_body("b-old", queueId="same", created="2026-01-01T00:00:00Z")
    holding["status"] = {"queueId": "same", "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    for order in ((holding, queue_body("a-new", queueId="same")), (queue_body("a-new", queueId="same"), holding)):
        s, _ = store()
        for body in order:
            s.upsert_queue(queues.QueueObject.from_body(body))
        assert s.serving("same").queue.name == "b-old"
        assert s.resolution(("team-a", "a-new")).problem.reason == "QueueIdConflict"
    # Neither says it holds the id (both new, or the loser's status says so): the name decides, as before.
    s, _ = store()
    lost = queue_body("a-new", queueId="same")
    lost["status"] = {"queueId": "same", "conditions": [{"type": "Ready", "status": "False",
                                                          "reason": "QueueIdConflict"}]}
    s.upsert_queue(queues.QueueObject.from_body(lost))
    s.upsert_queue(queue("b-other", queueId="same"))
    assert s.serving("same").queue.name == "a-new"


def test_an_earlier_queue_that_comes_into_view_takes_no_id_from_the_queue_serving_it():
    """A namespace watched from now on holds an earlier queue of the same id: by creation alone it took
    the id, and the serving queue's workers were refused from their next call (401), its pool drained."""
    serving = queue_body("b", "team-b", queueId="same", created="2026-02-01T00:00:00Z")
    serving["status"] = {"queueId": "same", "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    s, _ = store()
    s.upsert_queue(queues.QueueObject.from_body(serving))
    s.upsert_secret(("team-b", "b-worker-token"), {"token": "tb"})
    s.upsert_queue(queue("a", "team-a", queueId="same", created="2026-01-01T00:00:00Z"))
    assert s.serving("same").queue.name == "b" and s.is_queue_token(queues.digest("tb"))
    assert s.resolution(("team-a", "a")).problem.reason == "QueueIdConflict"


def test_a_queue_whose_spec_could_not_be_taken_takes_no_id_back_from_the_queue_that_took_it_over():
    earlier = queue_body("a", queueId="same", created="2026-01-01T00:00:00Z")
    earlier["status"] = {"queueId": "same", "conditions": [{"type": "Ready", "status": "False",
                                                             "reason": "SpecInvalid"}]}
    later = queue_body("b", queueId="same", created="2026-02-01T00:00:00Z")
    later["status"] = {"queueId": "same", "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    s, _ = store()
    s.upsert_queue(queues.QueueObject.from_body(later))
    s.upsert_queue(queues.QueueObject.from_body(earlier))  # its spec can be taken again
    assert s.serving("same").queue.name == "b"


def test_a_status_that_settles_a_same_second_tie_judges_every_claimant_again():
    # B was alone and is being made Ready; A (same second, name first) came before that status's echo
    # and won on its name. The echo says B holds the id: both are judged again, B keeps it, A loses.
    s, _ = store()
    b = queue_body("b", queueId="same")
    s.upsert_queue(queues.QueueObject.from_body(b))
    s.upsert_queue(queue("a", queueId="same"))
    assert s.serving("same").queue.name == "a"
    b["status"] = {"queueId": "same", "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    s.refresh_queue(queues.QueueObject.from_body(b))
    assert s.serving("same").queue.name == "b"
    assert s.resolution(("team-a", "a")).problem.reason == "QueueIdConflict"
    assert s.resolution(("team-a", "b")).problem is None or s.resolution(("team-a", "b")).problem.reason != (
        "QueueIdConflict")


def test_changing_the_id_moves_the_queue():
    s, _ = store()
    s.upsert_queue(queue(queueId="a"))
    s.upsert_queue(queue(queueId="b"))
    assert s.serving("a") is None and s.serving("b") is not None


def test_deleted_secret_makes_the_queue_not_ready():
    s, _ = store()
    s.upsert_queue(queue(queueId="abc"))
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    s.upsert_secret(("team-a", "q1-worker-token"), None)
    assert s.serving("abc").problem.reason == "SecretNotFound"
    assert s.secret_state(("team-a", "q1-worker-token")) == (True, None)
    assert s.not_ready_count == 1


def test_queue_of_token_only_for_exactly_one_queue():
    s, _ = store()
    s.upsert_queue(queue("a", queueId="a"))
    s.upsert_secret(("team-a", "a-worker-token"), {"token": "ta"})
    s.upsert_queue(queue("b", queueId="b"))
    s.upsert_secret(("team-a", "b-worker-token"), {"token": "tb"})
    assert s.queue_of_token(queues.digest("ta")) == ("team-a", "a")
    assert s.queue_of_token(queues.digest("nobody")) is None
    s.upsert_secret(("team-a", "b-worker-token"), {"token": "ta"})  # both queues now accept one token
    assert s.queue_of_token(queues.digest("ta")) is None and s.is_queue_token(queues.digest("ta"))


def test_passes_through_once_some_queue_has_an_upstream():
    s, _ = store()
    s.upsert_queue(queue("a", queueId="a"))
    assert not s.passes_through
    s.upsert_queue(queue("a", queueId="a", upstream={"url": "http://u", "apiKeySecretRef": {"name": "o", "key": "k"}}))
    assert s.passes_through
    s.remove_queue(("team-a", "a"))
    assert not s.passes_through


def test_per_worker_tokens_name_their_pod_and_queue_and_go_with_their_secret():
    s, _ = store()
    s.upsert_queue(queue("q1", queueId="q-1"))
    w0 = WorkerCredential(queue=("team-a", "q1"), pod="q1-w0", queue_uid=UID)
    s.upsert_worker_credential(("team-a", "q1-w0-token"), w0, "tok-0")
    q2_w0 = WorkerCredential(queue=("team-a", "q2"), pod="q2-w0", queue_uid=UID)
    s.upsert_worker_credential(("team-a", "q2-w0-token"), q2_w0, "tok-q2")
    assert s.worker_credential(queues.digest("tok-0")) == w0
    assert s.queue_of_token(queues.digest("tok-0")) == ("team-a", "q1")
    assert s.queue_of_token(queues.digest("tok-q2")) is None  # no such queue
    # A queue made again under the name (`kubectl replace --force`) is not the old pod token's.
    s.upsert_queue(queue("q1", queueId="q-1", uid="another-uid"))
    assert s.queue_of_token(queues.digest("tok-0")) is None
    s.upsert_queue(queue("q1", queueId="q-1"))
    assert s.worker_credential_secrets(("team-a", "q1")) == {"q1-w0": ("team-a", "q1-w0-token")}
    # Rotated in place: the old token opens nothing any more.
    s.upsert_worker_credential(("team-a", "q1-w0-token"), w0, "tok-0b")
    assert s.worker_credential(queues.digest("tok-0")) is None
    assert s.worker_credential(queues.digest("tok-0b")) == w0
    s.remove_worker_credential(("team-a", "q1-w0-token"))
    assert s.worker_credential(queues.digest("tok-0b")) is None
    assert s.worker_credential_secrets(("team-a", "q1")) == {}
    assert s.worker_credential_secrets(("team-a", "q2")) == {"q2-w0": ("team-a", "q2-w0-token")}
def test_a_status_only_update_keeps_the_resolution_and_is_told():
    from tests.unit.factories import queue_body

    s, changed = store()
    first = queue(queueId="abc")
    s.upsert_queue(first)
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    before = s.serving("abc")
    body = {**queue_body(queueId="abc"), "status": {"observedGeneration": 1}}
    assert first.same_spec(body)
    assert not first.same_spec({**body, "metadata": {**body["metadata"], "generation": 2}})
    assert not first.same_spec({**body, "metadata": {**body["metadata"], "uid": "other"}})
    changed.clear()
    s.refresh_queue(first.with_body(body))
    after = s.serving("abc")
    assert changed == [("team-a", "q1")]
    assert after.config is before.config and after.queue.status == {"observedGeneration": 1}
    assert s.queue(("team-a", "q1")).status == {"observedGeneration": 1}
    deleting = {**body, "metadata": {**body["metadata"], "deletionTimestamp": "2026-01-01T00:00:01Z"}}
    assert first.with_body(deleting).deleting


def test_a_secret_this_replica_created_serves_at_once_unless_the_watch_told_first():
    s, _ = store()
    s.upsert_queue(queue(queueId="abc"))
    name = ("team-a", "q1-worker-token")
    s.fill_secret(name, None)  # listed: absent
    s.creating_secret(name)
    s.created_secret(name, {"token": "made"})
    assert s.opens(s.serving("abc"), queues.digest("made"))

    s.creating_secret(name)
    s.upsert_secret(name, None)  # the watch: deleted meanwhile
    s.created_secret(name, {"token": "again"})
    assert s.secret_state(name) == (True, None)

    s.creating_secret(name)
    s.created_secret(name, None)  # someone else made it: the watch will tell
    assert s.secret_state(name) == (True, None)


def test_a_secret_seen_again_with_the_same_data_resolves_nothing_again():
    s, changed = store()
    s.upsert_queue(queue(queueId="abc"))
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    changed.clear()
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})  # e.g. the echo of our own create
    assert changed == []
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "u"})
    assert changed == [("team-a", "q1")]


def test_a_generated_token_of_a_deleted_namesake_is_not_served_to_the_queue_made_again():
    """`kubectl replace --force`: until the garbage collector runs, the old queue's token Secret is
    still there under the name the new queue uses."""
    s, _ = store()
    old = queue(uid="old-uid", queueId="abc")
    s.upsert_queue(old)
    leftover = reconciler.token_secret_body(old, "old-token")
    s.upsert_secret(("team-a", "q1-worker-token"), s.secret_data(leftover))
    assert s.opens(s.serving("abc"), queues.digest("old-token"))

    # Seen as a change of uid (a watch that listed again missed the deletion): the Secret is read again.
    assert s.upsert_queue(queue(uid="new-uid", queueId="abc")) == {("team-a", "q1-worker-token")}
    assert s.namesakes_token(leftover) and s.secret_data(leftover) is None
    s.fill_secret(("team-a", "q1-worker-token"), s.secret_data(leftover))
    assert s.secret_state(("team-a", "q1-worker-token")) == (True, None)  # to be generated anew
    assert not s.is_queue_token(queues.digest("old-token"))

    fresh = reconciler.token_secret_body(s.queue(("team-a", "q1")), "new-token")
    assert not s.namesakes_token(fresh)
    s.upsert_secret(("team-a", "q1-worker-token"), s.secret_data(fresh))
    assert s.opens(s.serving("abc"), queues.digest("new-token"))
    # A Secret of that name that is no generated token is served as it is.
    assert s.secret_data(secret_body("q1-worker-token", token="own")) == {"token": "own"}


def test_a_spec_the_operator_cannot_read_is_not_served_by_the_one_before_it():
    # An update the operator's model refuses (a CRD older than the operator) may have revoked a token
    # the previous spec listed: the previous one is not served meanwhile.
    from typing import cast

    from workerqueue_operator.core.feed import Feed
    from workerqueue_operator.core.reconciler import Reconciler
    from workerqueue_operator.core.supervisor import Supervisor

    store = Store(settings=Settings())
    before = queue("q1", queueId="q-1")
    store.upsert_queue(before)
    class Told:
        def __init__(self) -> None:
            self.invalid: list[str] = []

        def spec_invalid(self, body: dict[str, object], message: str) -> None:
            self.invalid.append(message)

    told = Told()
    feed = Feed(store, cast(Reconciler, told), cast(Supervisor, object()))  # not called here
    feed.queue_upserted(queue_body("q1", queueId="q-1", generation=2, replicas="many"))
    assert store.queue(before.key) is None and store.serving("q-1") is None
    assert len(told.invalid) == 1 and "spec.replicas" in told.invalid[0] and "many" not in told.invalid[0]


def test_a_relist_tells_of_its_queues_once_it_is_whole():
    # Page one brings "new", claiming the id of "old"; only the end of the list shows "old" gone.
    # Told at once, the status writer would write a QueueIdConflict (and its Warning) in between.
    s, changed = store()
    s.upsert_queue(queue("old", queueId="same", created="2026-01-01T00:00:00Z"))
    s.upsert_secret(("team-a", "old-worker-token"), {"token": "old"})
    changed.clear()
    told: list = []
    s.subscribe(lambda key: told.append((key, s.resolution(key))))
    with s.holding_news():
        with s.holding_news():  # one relist per watched namespace, at the same time
            s.upsert_queue(queue("new", queueId="same", created="2026-02-01T00:00:00Z"))
        assert changed == []
        s.remove_queue(("team-a", "old"))
        assert changed == []
    assert sorted(changed) == [("team-a", "new"), ("team-a", "old")]
    (new,) = [resolution for key, resolution in told if key == ("team-a", "new")]
    assert new.problem is None or new.problem.reason != "QueueIdConflict"
    changed.clear()
    s.upsert_secret(("team-a", "new-worker-token"), {"token": "new"})
    assert changed == [("team-a", "new")]  # told at once again


def test_a_namespaces_relist_holds_its_own_news_and_id_conflicts_only():
    """One namespace's relist (pages of up to 30 s each) held every namespace's news: a new queue in
    another namespace got no token Secret, and no Ready, until it ended. A queue of another namespace
    that loses its id to one of the relisting namespace waits for the end all the same: what the
    rest of the list brings may give it back."""
    s, changed = store()
    s.upsert_queue(queue("old", "team-a", queueId="same", created="2026-01-01T00:00:00Z"))
    changed.clear()
    with s.holding_news("team-a"):
        s.upsert_queue(queue("q1", "team-b", queueId="b-1"))
        assert changed == [("team-b", "q1")]  # told at once
        s.upsert_queue(queue("new", "team-b", queueId="same", created="2026-02-01T00:00:00Z"))
        s.upsert_queue(queue("q2", "team-a", queueId="a-2"))
        assert changed == [("team-b", "q1")]  # team-a's relist and a conflict with one of its queues wait
        s.remove_queue(("team-a", "old"))  # the end of the list: the id is team-b's now, and it is told so
        assert changed == [("team-b", "q1"), ("team-b", "new")]
    assert sorted(changed[2:]) == [("team-a", "old"), ("team-a", "q2")]
    assert s.serving("same").queue.key == ("team-b", "new")
    changed.clear()
    with s.holding_news():  # a cluster-wide relist holds all
        s.upsert_queue(queue("q3", "team-c", queueId="c-3"))
        assert changed == []
    assert changed == [("team-c", "q3")]


def test_a_token_secret_listed_before_its_queue_came_is_read_not_taken_for_absent():
    """The Secret list passes by a Secret no queue uses; a queue that comes meanwhile (made, or its
    tokenSecretRefs removed) uses its generated token Secret, which the list did bring: taken for
    absent, every standby refused that queue's token (401) until the Secret changed."""
    from workerqueue_operator.core.feed import Feed
    from workerqueue_operator.core.reconciler import Reconciler
    from workerqueue_operator.core.supervisor import Supervisor

    store, reads = Store(settings=Settings()), _Reads()
    told = _Told()
    feed = Feed(store, cast(Reconciler, reads), cast(Supervisor, told))
    token = ("team-a", "q1-worker-token")
    feed.secret_upserted(secret_body("q1-worker-token", token="real-token"))  # listed: no queue's yet
    feed.queue_upserted(queue_body("q1", queueId="abc"))  # then its queue comes
    assert not told.synced
    feed.secrets_synced(listed=lambda key: key == token)
    assert told.synced
    assert reads.asked == {token} and store.secret_state(token) == (False, None)  # read, not absent
    # One the list did not bring is absent, without a read.
    feed.queue_upserted(queue_body("q2", queueId="def"))
    other = Feed(store, cast(Reconciler, _Reads()), cast(Supervisor, _Told()))
    other.secrets_synced(listed=lambda key: key == token)
    assert store.secret_state(("team-a", "q2-worker-token")) == (True, None)


def test_a_read_begun_before_its_secret_was_forgotten_and_used_again_is_dropped():
    """Read, rotated (the watch tells), unused (forgotten), used again (no second read: one is under
    way), then the first read's answer comes: the old token was served again until the next change."""
    s = Store(settings=Settings())
    name = ("team-a", "mine")
    refs = {"auth": {"tokenSecretRefs": [{"name": "mine", "key": "token"}]}}
    s.upsert_queue(queue("q1", queueId="abc", **refs))
    news = s.secret_news(name)  # the read begins
    s.upsert_secret(name, {"token": "NEW"})  # rotated
    s.upsert_queue(queue("q1", queueId="abc", generation=2))  # unused: forgotten
    s.upsert_queue(queue("q1", queueId="abc", generation=3, **refs))  # used again
    assert s.fill_secret(name, {"token": "OLD"}, news=news) is False  # read again, not served
    assert s.secret_state(name) == (False, None) and not s.is_queue_token(queues.digest("OLD"))
    again = s.secret_news(name)
    assert s.fill_secret(name, {"token": "NEW"}, news=again) is True
    assert s.is_queue_token(queues.digest("NEW"))


def test_a_suspended_queue_counts_as_not_ready_only_when_something_else_is_wrong():
    """Its owner stopped it: an alert on the not-Ready count fired for as long as any queue stayed suspended."""
    s, _ = store()
    s.upsert_queue(queue(queueId="abc", suspend=True))
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    assert s.serving("abc").problem.reason == "Suspended"
    suspended = {"conditions": [{"type": "Ready", "status": "False", "reason": "Suspended"}]}
    s.refresh_queue(dataclasses.replace(s.queue(("team-a", "q1")), status=suspended))
    assert (s.not_ready_count, s.suspended_count) == (0, 1)
    s.upsert_secret(("team-a", "q1-worker-token"), None)  # its token Secret deleted too
    assert (s.not_ready_count, s.suspended_count) == (1, 1)
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    looping = {"conditions": [{"type": "Ready", "status": "False", "reason": "CrashLooping"}]}
    s.refresh_queue(dataclasses.replace(s.queue(("team-a", "q1")), status=looping))
    assert s.not_ready_count == 1
    s.upsert_queue(queue(queueId="abc"))
    s.refresh_queue(dataclasses.replace(s.queue(("team-a", "q1")), status={}))
    assert (s.not_ready_count, s.suspended_count) == (0, 0)


def test_a_queue_whose_status_says_not_ready_counts_as_not_ready_though_it_can_be_served():
    """CrashLooping, PodCreationFailed: judged from its worker pods, written on its status; an alert on
    the not-Ready count stayed silent for exactly the queues that cannot start workers."""
    s, _ = store()
    s.upsert_queue(queue(queueId="abc"))
    s.upsert_secret(("team-a", "q1-worker-token"), {"token": "t"})
    assert s.serving("abc").ready and s.not_ready_count == 0
    looping = {"conditions": [{"type": "Ready", "status": "False", "reason": "CrashLooping"}]}
    s.refresh_queue(dataclasses.replace(s.queue(("team-a", "q1")), status=looping))
    assert s.not_ready_count == 1
    ready = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    s.refresh_queue(dataclasses.replace(s.queue(("team-a", "q1")), status=ready))
    assert s.not_ready_count == 0


class _Reads:
    """The reconciler's reads of Secrets, as asked for."""

    def __init__(self) -> None:
        self.asked: set[tuple[str, str]] = set()

    def fetch_secrets(self, names: set[tuple[str, str]]) -> None:
        self.asked |= set(names)

    def spec_valid(self, key: tuple[str, str]) -> None:
        pass


class _Told:
    """What the worker supervisor is told, in order."""

    def __init__(self) -> None:
        self.told: list[tuple[str, object]] = []

    def queue_changed(self, queue: object) -> None:
        self.told.append(("changed", getattr(queue, "uid", None)))

    def queue_deleted(self, key: object) -> None:
        self.told.append(("deleted", key))

    synced = False

    def secrets_synced(self) -> None:
        self.synced = True  # the supervisor plans pods from now on (see Supervisor.secrets_synced)


def _feed() -> tuple[Store, _Reads, Any]:
    from workerqueue_operator.core.feed import Feed
    from workerqueue_operator.core.reconciler import Reconciler
    from workerqueue_operator.core.supervisor import Supervisor

    store, reads = Store(settings=Settings()), _Reads()
    feed = Feed(store, cast(Reconciler, reads), cast(Supervisor, _Told()))
    feed.secrets_listed = True
    return store, reads, feed


SHARES_A = {"auth": {"tokenSecretRefs": [{"name": "a-worker-token", "key": "token"}]}}
OWN_TOKEN = {"auth": {"tokenSecretRefs": [{"name": "a-own", "key": "token"}]}}


def test_a_token_secret_shared_with_a_queue_made_again_is_read_again_and_its_deletion_counts():
    """Queue b lists a's generated token; a is made again (a new uid) with a token of its own: the
    old token Secret was forgotten for a's sake, nothing read it again, and once the garbage collector
    deleted it, its deletion was not counted: its token opened b for good."""
    store, reads, feed = _feed()
    feed.queue_upserted(queue_body("a", uid="uid-a1", queueId="qa"))
    generated = reconciler.token_secret_body(store.queue(("team-a", "a")), "T-old")  # owned by a (uid-a1)
    feed.secret_upserted(generated)
    feed.queue_upserted(queue_body("b", uid="uid-b", queueId="qb", **SHARES_A))
    assert store.opens(store.serving("qb"), queues.digest("T-old"))
    reads.asked.clear()
    feed.queue_deleted(("team-a", "a"), queue_body("a", uid="uid-a1", queueId="qa"))
    feed.queue_upserted(queue_body("a", uid="uid-a2", queueId="qa", **OWN_TOKEN))
    token = ("team-a", "a-worker-token")
    assert token in reads.asked  # read again, for b
    news = store.secret_news(token)  # the read begins
    assert not store.opens(store.serving("qb"), queues.digest("T-old"))  # not served meanwhile
    feed.secret_deleted(token, generated)  # the garbage collector's
    assert store.fill_secret(token, None, news=news)  # the read: 404
    assert store.secret_state(token) == (True, None)
    assert store.serving("qb").problem.reason == "SecretNotFound"


def test_a_user_made_secret_named_like_a_new_queues_token_is_read_again_for_the_queue_that_uses_it():
    """b uses a Secret it made, named a-worker-token; a queue a (with a token of its own) is made: the
    Secret was forgotten with no read asked for, and b, once resolved again, stayed SecretPending."""
    store, reads, feed = _feed()
    feed.queue_upserted(queue_body("b", uid="uid-b", queueId="qb", **SHARES_A))
    feed.secret_upserted(secret_body("a-worker-token", token="T"))
    reads.asked.clear()
    feed.queue_upserted(queue_body("a", uid="uid-a", queueId="qa", **OWN_TOKEN))
    assert ("team-a", "a-worker-token") in reads.asked
    feed.secret_upserted(secret_body("a-worker-token", token="T"))  # the read's answer
    assert store.serving("qb").ready and store.opens(store.serving("qb"), queues.digest("T"))


def test_each_queue_claiming_a_held_id_resolves_itself_not_every_claimant(monkeypatch: Any):
    """Anyone may make queues claiming one queue id: each newcomer resolved every claimant, and each of
    those resolutions judged every claimant again (400 of them blocked the event loop for 28 s)."""
    s = Store(settings=Settings())
    resolved: list[tuple[str, str]] = []
    resolve = queues.resolve

    def counted(queue: queues.QueueObject, **kwargs: Any) -> queues.Resolution:
        resolved.append(queue.key)
        return resolve(queue, **kwargs)

    monkeypatch.setattr(queues, "resolve", counted)
    for i in range(60):
        s.upsert_queue(queue(f"q{i:02d}", queueId="shared", created=f"2026-01-01T00:{i:02d}:00Z"))
    assert len(resolved) == 60  # each itself: the first holds the id throughout
    assert s.serving("shared").queue.name == "q00"
    resolved.clear()
    s.remove_queue(("team-a", "q00"))  # the holder goes: every loser's problem named it
    assert sorted(resolved) == [("team-a", f"q{i:02d}") for i in range(1, 60)]
    assert s.serving("shared").queue.name == "q01"
    assert s.serving("shared").problem.reason == "SecretPending"  # its token, no longer a loser's
    assert s.resolution(("team-a", "q02")).problem.message == "queue id shared is already used by team-a/q01"


def test_queues_whose_temporal_is_unreachable_are_counted_apart_from_ready():
    s, _ = store()
    s.upsert_queue(queue(queueId="abc"))
    s.upsert_queue(queue("q2", queueId="def"))
    assert s.temporal_unreachable_count == 0
    down = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"},
                           {"type": "TemporalReachable", "status": "False", "reason": "TemporalUnavailable"}]}
    s.refresh_queue(dataclasses.replace(s.queue(("team-a", "q1")), status=down))
    unknown = {"conditions": [{"type": "TemporalReachable", "status": "Unknown", "reason": "TemporalNotResolved"}]}
    s.refresh_queue(dataclasses.replace(s.queue(("team-a", "q2")), status=unknown))
    assert s.temporal_unreachable_count == 1


def test_the_supervisor_forgets_a_deleted_queue_also_when_its_deletion_was_unseen():
    """It keeps a refused create's back-off, pod bookkeeping and Temporal readings per queue: kept
    past the queue's deletion, a queue made again under the name inherited them, and the deleted one's
    Temporal endpoint was probed for good."""
    _, _, feed = _feed()
    told = feed._supervisor
    feed.queue_upserted(queue_body("a", uid="uid-a1", queueId="qa"))
    feed.queue_deleted(("team-a", "a"), None)
    feed.queue_upserted(queue_body("a", uid="uid-a2", queueId="qa"))
    feed.queue_upserted(queue_body("a", uid="uid-a3", queueId="qa"))  # a relist: its deletion unseen
    assert told.told == [("changed", "uid-a1"), ("deleted", ("team-a", "a")), ("changed", "uid-a2"),
                         ("deleted", ("team-a", "a")), ("changed", "uid-a3")]


def test_a_deleted_queues_token_secret_going_leaves_its_successors_token():
    """A queue made again at once (`kubectl replace --force`) gets a new token Secret while the old one
    waits for the garbage collector. The old one's deletion comes after the new token is known (from
    the create's answer): taken for its successor's, its workers were turned away (401) and the queue
    shown SecretNotFound until the new Secret's own event came."""
    token = ("team-a", "a-worker-token")
    store, _, feed = _feed()
    feed.queue_upserted(queue_body("a", uid="uid-a1", queueId="qa"))
    old = reconciler.token_secret_body(store.queue(("team-a", "a")), "T-old")  # owned by a (uid-a1)
    feed.secret_upserted(old)
    feed.queue_deleted(("team-a", "a"), None)
    feed.queue_upserted(queue_body("a", uid="uid-a2", queueId="qa"))
    store.creating_secret(token)
    store.created_secret(token, {"token": "T-new"})
    feed.secret_deleted(token, old)  # the garbage collector's
    served = store.serving("qa")
    assert served is not None and served.ready
    assert store.opens(served, queues.digest("T-new")) and not store.opens(served, queues.digest("T-old"))


def test_no_secret_is_read_before_the_secret_list_is_in():
    """Listed before the Secrets, each queue's Secrets come with their list: a read each (10,000 queues
    at start-up) would be thousands of GETs at once for nothing."""
    _, reads, feed = _feed()
    feed.secrets_listed = False
    feed.queue_upserted(queue_body("a", uid="uid-a", queueId="qa", **OWN_TOKEN))
    assert reads.asked == set()
    feed.secrets_synced(lambda _: True)  # the list brought it, before its queue came
    assert reads.asked == {("team-a", "a-own")}
