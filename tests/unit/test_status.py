from __future__ import annotations

import dataclasses

import pytest

from tests.unit.factories import queue
from workerqueue_operator.core import queues, status
from workerqueue_operator.core.store import Store
from workerqueue_operator.models.settings import Settings

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"


def resolution(problem: queues.Problem | None) -> queues.Resolution:
    secrets = problem if problem is not None and problem.reason in queues.SECRET_REASONS else None
    return queues.Resolution(queue=queue(generation=3, queueId="abc"), config=None, problem=problem,
                             secrets_problem=secrets)


def conditions(st: dict) -> dict:
    return {c["type"]: c for c in st["conditions"]}


def test_ready_status_reports_generation_and_queue_id():
    st = status.desired_status(resolution(None), {}, now=NOW)
    assert st["queueId"] == "abc" and st["observedGeneration"] == 3
    assert st["taskQueue"] == "abc"  # none named: the queue id, as /start answers
    named = queues.Resolution(queue=queue(generation=3, queueId="abc", taskQueueName="tq"), config=None, problem=None)
    assert status.desired_status(named, {}, now=NOW)["taskQueue"] == "tq"
    ready = conditions(st)["Ready"]
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "Ready", 3)
    assert conditions(st)["SecretsResolved"]["status"] == "True"


def test_missing_secret_shows_in_both_conditions():
    st = status.desired_status(resolution(queues.Problem("SecretNotFound", "secret x not found")), {}, now=NOW)
    c = conditions(st)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "SecretNotFound")
    assert (c["SecretsResolved"]["status"], c["SecretsResolved"]["message"]) == ("False", "secret x not found")


def test_transition_time_moves_only_when_status_changes():
    first = status.desired_status(resolution(queues.Problem("SecretNotFound", "a")), {}, now=NOW)
    same = status.desired_status(resolution(queues.Problem("SecretKeyNotFound", "b")), first, now=LATER)
    assert conditions(same)["Ready"]["lastTransitionTime"] == NOW
    assert conditions(same)["Ready"]["reason"] == "SecretKeyNotFound"
    healed = status.desired_status(resolution(None), same, now=LATER)
    assert conditions(healed)["Ready"]["lastTransitionTime"] == LATER
    assert not status.differs(healed, {**healed, "other": 1})
    assert status.differs(healed, same)


def test_a_conditions_transition_time_is_its_own_not_a_siblings():
    """In desired_status Ready and SecretsResolved change together, so reading the other's time would
    pass unseen there: here the sibling's status differs from the one set."""
    earlier = [{"type": "SecretsResolved", "status": "True", "reason": "Resolved", "message": "",
                "lastTransitionTime": NOW, "observedGeneration": 1},
               {"type": "TemporalReachable", "status": "False", "reason": "TemporalUnavailable", "message": "",
                "lastTransitionTime": NOW, "observedGeneration": 1}]
    ready = status.set_condition(earlier, type="Ready", status="False", reason="X", message="", generation=1, now=NOW)
    kept = status.set_condition(ready, type="Ready", status="False", reason="Y", message="m", generation=2, now=LATER)
    moved = status.set_condition(ready, type="Ready", status="True", reason="Ready", message="", generation=2,
                                 now=LATER)
    by_type = {c["type"]: c for c in kept}
    assert by_type["Ready"]["lastTransitionTime"] == NOW and by_type["Ready"]["observedGeneration"] == 2
    assert {c["type"]: c for c in moved}["Ready"]["lastTransitionTime"] == LATER
    assert [c["type"] for c in kept] == ["Ready", "SecretsResolved", "TemporalReachable"]
    assert by_type["SecretsResolved"] == earlier[0] and by_type["TemporalReachable"] == earlier[1]


def test_workers_that_cannot_start_make_the_queue_stop_progressing():
    q = queues.Resolution(queue=queue(generation=3, queueId="abc", singleExecution=True, replicas=5), config=None,
                          problem=None)
    workers = {"observedGeneration": 3, "desired": 5, "pending": 4, "running": 1,
               "stuck": [f"q1-w{i}: ImagePullBackOff" for i in range(4)]}
    progressing = conditions(status.desired_status(q, {"workers": workers}, now=NOW))["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", "WorkersNotStarting")
    assert progressing["message"] == ("4 of 5 workers cannot start: q1-w0: ImagePullBackOff; q1-w1: ImagePullBackOff; "
                                      "q1-w2: ImagePullBackOff and 1 more")
    started = conditions(status.desired_status(q, {"workers": {**workers, "stuck": []}}, now=NOW))["Progressing"]
    assert (started["status"], started["reason"]) == ("True", "WorkersAvailable")


def test_a_queue_none_of_whose_workers_can_start_is_not_ready():
    # `kubectl wait --for=condition=Ready` passed on a queue whose every pod waited for an image that
    # cannot be pulled; with one worker running, the queue works.
    q = queues.Resolution(queue=queue(generation=3, queueId="abc", singleExecution=True, replicas=2), config=None,
                          problem=None)
    workers = {"observedGeneration": 3, "desired": 2, "pending": 2, "running": 0,
               "stuck": [f"q1-w{i}: ImagePullBackOff" for i in range(2)]}
    ready = conditions(status.desired_status(q, {"workers": workers}, now=NOW))["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "WorkersNotStarting")
    assert ready["message"] == "no worker runs, and 2 cannot start: q1-w0: ImagePullBackOff; q1-w1: ImagePullBackOff"
    one_runs = {**workers, "pending": 1, "running": 1, "stuck": workers["stuck"][:1]}
    assert conditions(status.desired_status(q, {"workers": one_runs}, now=NOW))["Ready"]["status"] == "True"
    older = {**workers, "observedGeneration": 2}  # stuck pods of an older spec are replaced at once
    assert conditions(status.desired_status(q, {"workers": older}, now=NOW))["Ready"]["status"] == "True"


def test_a_queue_whose_workers_wait_for_it_to_serve_is_not_progressing():
    missing = queues.Problem("SecretNotFound", "secret org not found in namespace team-a")
    held = queues.Resolution(queue=queue(generation=3, queueId="abc", singleExecution=True), config=None,
                             problem=missing)
    workers = {"observedGeneration": 3, "desired": 1, "pending": 0, "running": 0}
    progressing = conditions(status.desired_status(held, {"workers": workers}, now=NOW))["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", "SecretNotFound")
    assert progressing["message"] == ("0 of 1 workers alive; none are started until the queue is Ready "
                                      "(secret org not found in namespace team-a)")
    # Workers already running go on: nothing is missing from what they were asked to do.
    running = conditions(status.desired_status(held, {"workers": {**workers, "running": 1}}, now=NOW))["Progressing"]
    assert (running["status"], running["reason"]) == ("True", "WorkersAvailable")


def test_progressing_quotes_no_plan_of_an_older_spec_under_the_new_generation():
    planned = {"observedGeneration": 3, "desired": 1, "pending": 0, "running": 1}
    q = queues.Resolution(queue=queue(generation=3, queueId="abc", singleExecution=True), config=None, problem=None)
    progressing = conditions(status.desired_status(q, {"workers": planned}, now=NOW))["Progressing"]
    assert (progressing["reason"], progressing["observedGeneration"]) == ("WorkersAvailable", 3)
    # replicas raised (generation 4): until the supervisor plans for it, "1 of 1 alive" is of generation 3.
    changed = queues.Resolution(queue=queue(generation=4, queueId="abc", singleExecution=True, replicas=3),
                                config=None, problem=None)
    progressing = conditions(status.desired_status(changed, {"workers": planned}, now=NOW))["Progressing"]
    assert (progressing["status"], progressing["reason"], progressing["observedGeneration"]) == ("True", "Planning", 4)
    assert progressing["message"] == "1 workers alive; planning the workers of generation 4"
    # Nothing planned yet (a new queue) is no "0 of 0 workers alive" either.
    fresh = conditions(status.desired_status(changed, {}, now=NOW))["Progressing"]
    assert fresh["reason"] == "Planning"
    # Nor once a queue that started no workers becomes one that does: its `live` count is no plan.
    became = conditions(status.desired_status(changed, {"workers": {"live": 2}}, now=NOW))["Progressing"]
    assert (became["reason"], became["message"]) == (
        "Planning", "0 workers alive; planning the workers of generation 4")
    # Counts that do not say (an earlier version wrote them, or the CRD was not upgraded): as they are.
    unsaid = {"desired": 1, "pending": 0, "running": 1}
    assert conditions(status.desired_status(changed, {"workers": unsaid}, now=NOW))["Progressing"]["reason"] == (
        "WorkersAvailable")


def test_a_crash_loop_of_an_older_spec_is_not_reported_against_the_new_one():
    looping = {"desired": 1, "consecutiveFailures": 6, "crashLoopGeneration": 3}
    q = queues.Resolution(queue=queue(generation=3, queueId="abc", singleExecution=True), config=None, problem=None)
    assert conditions(status.desired_status(q, {"workers": looping}, now=NOW))["Ready"]["reason"] == "CrashLooping"
    # The spec changed (generation 4); the supervisor has not reset status.workers yet.
    changed = queues.Resolution(queue=queue(generation=4, queueId="abc", singleExecution=True), config=None,
                                problem=None)
    ready = conditions(status.desired_status(changed, {"workers": looping}, now=NOW))["Ready"]
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "Ready", 4)


def test_a_secret_that_cannot_be_read_shows_in_both_conditions():
    problem = queues.Problem("SecretUnreadable", "secret t in namespace ops could not be read (403 Forbidden)")
    c = conditions(status.desired_status(resolution(problem), {}, now=NOW))
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "SecretUnreadable")
    assert (c["SecretsResolved"]["status"], c["SecretsResolved"]["reason"]) == ("False", "SecretUnreadable")


def test_secrets_resolved_tells_a_missing_secret_whatever_else_the_queue_lacks():
    # Ready names one problem (here the queue id another queue holds, or no Temporal at all), while
    # SecretsResolved said "every referenced Secret key was found" of a Secret that does not exist.
    store = Store(settings=Settings())
    store.upsert_queue(queue("first", queueId="x"))
    store.upsert_queue(queue("second", queueId="x", created="2026-01-02T00:00:00Z",
                             litellm={"apiKeySecretRef": {"name": "nope", "key": "k"}}))
    store.fill_secret(("team-a", "nope"), None)
    for key in (("team-a", "first"), ("team-a", "second")):
        store.fill_secret((key[0], f"{key[1]}-worker-token"), {"token": f"{key[1]}-token"})
    held = store.resolution(("team-a", "second"))
    assert held is not None and held.problem is not None and held.problem.reason == "QueueIdConflict"
    c = conditions(status.desired_status(held, {}, now=NOW))
    assert (c["Ready"]["reason"], c["SecretsResolved"]["status"], c["SecretsResolved"]["reason"]) == (
        "QueueIdConflict", "False", "SecretNotFound")
    nowhere = queues.resolve(queue(temporal={}, litellm={"apiKeySecretRef": {"name": "nope", "key": "k"}}),
                             secrets={("team-a", "q1-worker-token"): {"token": "t"}, ("team-a", "nope"): None},
                             settings=Settings())
    c = conditions(status.desired_status(nowhere, {}, now=NOW))
    assert (c["SecretsResolved"]["status"], c["SecretsResolved"]["reason"]) == ("False", "SecretNotFound")


def test_more_workers_alive_than_wanted_is_scaling_down_not_an_impossible_count():
    # replicas lowered from 3 to 1: the two surplus workers finish their work first.
    q = queues.Resolution(queue=queue(generation=2, queueId="abc", singleExecution=True), config=None, problem=None)
    workers = {"observedGeneration": 2, "desired": 1, "pending": 0, "running": 3}
    progressing = conditions(status.desired_status(q, {"workers": workers}, now=NOW))["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("True", "ScalingDown")
    assert progressing["message"] == "3 workers alive, 1 wanted: the others go once their work is done"


def test_a_queue_whose_pods_the_api_server_refuses_is_not_ready():
    # As in a crash loop: `kubectl wait --for=condition=Ready` must not take it for ready.
    q = queues.Resolution(queue=queue(generation=2, queueId="abc", singleExecution=True), config=None, problem=None)
    workers = {"observedGeneration": 2, "desired": 1, "pending": 0, "running": 0,
               "lastError": "pod q1-w0 was refused: spec.containers[0].image: Required value"}
    ready = conditions(status.desired_status(q, {"workers": workers}, now=NOW))["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "PodCreationFailed")
    assert ready["message"] == "worker pods cannot be created: " + workers["lastError"]
    # Of an older spec: the new one may well be created (the supervisor has not planned it yet).
    changed = dataclasses.replace(q, queue=queue(generation=3, queueId="abc", singleExecution=True))
    assert conditions(status.desired_status(changed, {"workers": workers}, now=NOW))["Ready"]["status"] == "True"
    # A queue running no pods of its own never has one.
    plain = queues.Resolution(queue=queue(generation=2, queueId="abc"), config=None, problem=None)
    assert conditions(status.desired_status(plain, {"workers": workers}, now=NOW))["Ready"]["status"] == "True"


def test_a_spec_the_operator_cannot_take_says_which_fields_and_never_their_values():
    import pydantic

    from workerqueue_operator.models import spec as spec_

    with pytest.raises(pydantic.ValidationError) as caught:
        spec_.parse_spec({"maxWorkers": 5000, "queueId": "has a secret-looking value"})
    message = status.spec_errors(caught.value)
    assert "spec.maxWorkers: Input should be less than or equal to 1000" in message and "spec.queueId" in message
    assert "5000" not in message and "secret-looking" not in message
    st = status.invalid_spec_status({"conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                                                     "message": "", "lastTransitionTime": NOW}]},
                                    generation=4, message=message, now=LATER)
    ready = conditions(st)["Ready"]
    assert (ready["status"], ready["reason"], ready["observedGeneration"], ready["lastTransitionTime"]) == (
        "False", "SpecInvalid", 4, LATER)
    assert st["observedGeneration"] == 4


def test_ready_says_which_pod_settings_a_queue_without_pods_ignores():
    # Accepted by the schema, `scaling: {max: 4}` on a plain queue ran no pod, Ready=True saying nothing.
    token = {("team-a", "q1-worker-token"): {"token": "t0k"}}
    plain = queues.resolve(queue(scaling={"max": 4}, worker={"template": {"spec": {}}}), secrets=token,
                           settings=Settings())
    message = conditions(status.desired_status(plain, {}, now=NOW))["Ready"]["message"]
    assert message.endswith("; spec.scaling, spec.worker.template are ignored: the operator runs worker pods for "
                            "ephemeral or singleExecution queues only")
    pods = queues.resolve(queue(scaling={"max": 4}, singleExecution=True), secrets=token, settings=Settings())
    assert "ignored" not in conditions(status.desired_status(pods, {}, now=NOW))["Ready"]["message"]


def test_ready_says_what_workers_will_lack_for_their_executions():
    # A queue author does not see the operator's log: Ready itself says what the workers will miss.
    settings = Settings(temporal_host="t:7233", temporal_namespace="default")
    token = {("team-a", "q1-worker-token"): {"token": "t0k"}}
    bare = queues.resolve(queue(), secrets=token, settings=settings)
    message = conditions(status.desired_status(bare, {}, now=NOW))["Ready"]["message"]
    assert message.startswith("workers can start; they lack an upstream control plane")
    assert "404" in message and "a LiteLLM URL" in message
    upstream = {"url": "https://cp.example", "apiKeySecretRef": {"name": "org", "key": "k"}}
    strong = {("team-a", "q1-worker-token"): {"token": "x" * queues.SHORT_TOKEN}}
    complete = queues.resolve(queue(upstream=upstream, litellm={"url": "http://llm:4000"}),
                              secrets={**strong, ("team-a", "org"): {"k": "key"}}, settings=settings)
    ready = conditions(status.desired_status(complete, {}, now=NOW))["Ready"]
    assert (ready["status"], ready["message"]) == ("True", "workers can start")
    # A short token of the user's own: worker ids, which anyone reading Events sees, are keyed by it.
    short = queues.resolve(queue(upstream=upstream, litellm={"url": "http://llm:4000"}),
                           secrets={**token, ("team-a", "org"): {"k": "key"}}, settings=settings)
    ready = conditions(status.desired_status(short, {}, now=NOW))["Ready"]
    assert ready["status"] == "True" and ready["message"] == (
        "workers can start; the token in secret q1-worker-token is shorter than 24 characters: worker ids, which "
        "Events and Leases show, let whoever reads them test guesses of it offline (use 32 random bytes, as the "
        "operator's own tokens are)")
    assert "t0k" not in ready["message"]


def test_a_suspended_pool_says_its_workers_are_stopped_not_left_to_finish():
    workers = {"observedGeneration": 3, "desired": 2, "pending": 0, "running": 2}

    def progressing(workers: dict, **spec: object) -> str:
        q = queues.Resolution(queue=queue(generation=3, queueId="abc", suspend=True, **spec), config=None,
                              problem=None)
        return conditions(status.desired_status(q, {"workers": workers}, now=NOW))["Progressing"]["message"]

    assert progressing(workers, singleExecution=True) == "2 workers left to finish; none are started while suspended"
    assert progressing(workers, ephemeral=True) == "2 workers alive, being stopped; none are started while suspended"
    assert progressing({**workers, "running": 0}, ephemeral=True) == (
        "workers stopped; none are started while suspended")


def _pruned(value: object, schema: dict, path: str = "status") -> list[str]:
    """The paths of `value` the API server would drop in silence, its CRD's schema knowing no such field."""
    if isinstance(value, dict) and "properties" in schema:
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += _pruned(item, schema["properties"][key], f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [p for i, item in enumerate(value) for p in _pruned(item, schema["items"], f"{path}[{i}]")]
    return []


def test_every_status_field_written_is_one_the_crd_keeps():
    """The status is spelt by hand here, the schema by the models (models/spec.py): a key renamed on
    one side only would be pruned by the API server without a word, and its reader would find nothing."""
    from workerqueue_operator.models import crd
    from workerqueue_operator.models.spec import WorkersStatus

    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    workers = WorkersStatus(observed_generation=3, desired=2, pending=1, running=1, last_error="refused",
                            stuck=["q1-w0: ImagePullBackOff"], counted=["q1-w1"], surplus_since=NOW,
                            finished_time=NOW, last_failure_time=NOW, last_displaced_time=NOW, live=1)
    pool = queues.Resolution(queue=queue(generation=3, queueId="abc", singleExecution=True, replicas=2), config=None,
                             problem=None)
    written = [
        status.desired_status(resolution(None), {}, now=NOW),
        status.desired_status(resolution(queues.Problem("SecretNotFound", "secret x not found")), {}, now=NOW),
        status.desired_status(pool, {"workers": workers.model_dump(by_alias=True, mode="json")}, now=NOW),
        status.invalid_spec_status({}, generation=3, message="bad", now=NOW),
        {"workers": workers.model_dump(by_alias=True, mode="json")},
    ]
    for st in written:
        assert st and _pruned(st, schema) == []
    assert _pruned({"queueID": "x"}, schema) == ["status.queueID"]  # the check itself finds a misspelling
