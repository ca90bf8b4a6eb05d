"""`GET /openapi.json`: the endpoints this server serves, named as the reference API names them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from workerqueue_operator.models import wire

_REF = "#/components/schemas/{model}"


HTTP_ERROR = "HTTPError"

# Every answer of /start besides 200 and 422, as `{"detail": "<sentence>"}`.
START_ERRORS: dict[int, tuple[str, str]] = {
    400: ("The worker queue is suspended or being deleted, or the body is not UTF-8 "
          "(\"There was an error parsing the body\")",
          "Worker queue is not active (status: suspended)"),
    401: ("No bearer token, or one that neither is a queue token nor passes a TokenReview",
          "Invalid authentication credentials"),
    403: ("The token may not start workers on this worker queue (another queue's token, or RBAC)",
          "This token may not start workers on this worker queue"),
    404: ("No worker queue has this queue id", "Worker queue not found"),
    408: ("The request body did not arrive within http_body_timeout_seconds", "Request body not received in time"),
    409: ("The worker queue already runs its maxWorkers workers, or the token is of a WorkerQueue whose queue id "
          "another one holds (QueueIdConflict)", "Worker queue 'agents' is full (maxWorkers=10)"),
    413: ("The request body is over 1 MiB", "Request body too large"),
    503: ("The queue is not Ready (the detail names the missing Secret or key), or the API server could not "
          "review a Kubernetes token in time (with Retry-After when every review slot was busy), or too many "
          "workers wait for their first heartbeat or are registered (registry_max_*, with Retry-After), or a "
          "per-worker token is not known while the Secret watch is down (Worker credentials are being loaded) or "
          "too many such tokens are awaited already (Too many worker credentials are awaited), "
          "or the operator has just started and its watches have not listed within 45 s (with Retry-After)",
          "Worker queue is not ready: secret llm not found in namespace team-a"),
}


def _schema(model: type[BaseModel], components: dict[str, Any]) -> None:
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    components[str(schema.get("title", model.__name__))] = schema


def document(version: str, *, metrics: bool = True) -> dict[str, Any]:
    """`metrics`: /metrics is served on this port (not on settings.metrics_port)."""
    components: dict[str, Any] = {}
    for model in (wire.WorkerStartRequest, wire.WorkerStartResponse, wire.HTTPValidationError,
                  wire.WorkerHeartbeatRequest, wire.WorkerDisconnectRequest, wire.WorkerInfo, wire.ExecutionInfo):
        _schema(model, components)
    components[wire.REQUEST_SCHEMA_NAME] = components.pop("WorkerStartRequest")
    # FastAPI's HTTPException body, which the reference API answers with but does not list.
    components[HTTP_ERROR] = {"title": HTTP_ERROR, "type": "object", "required": ["detail"],
                              "properties": {"detail": {"type": "string", "title": "Detail"}}}

    def ref(name: str) -> dict[str, str]:
        return {"$ref": _REF.format(model=name)}

    def error(description: str, example: str, status: int) -> dict[str, Any]:
        response: dict[str, Any] = {"description": description, "content": {"application/json": {
            "schema": ref(HTTP_ERROR), "example": {"detail": example}}}}
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}
        if status == 503:
            response["headers"] = {"Retry-After": {"description": "Seconds; sent when the operator sheds load",
                                                   "schema": {"type": "integer"}}}
        return response

    def json_of(schema: dict[str, Any], description: str = "Successful Response") -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def failures(*codes: int, validated: bool = True) -> dict[str, Any]:
        """The error answers of a route; `validated`: it reads a body or a query (422)."""
        said = {400: "Bad request (a body that is not UTF-8 or not well chunked)", 401: "Not authenticated",
                403: "Not allowed", 404: "Not found", 408: "Request body not received in time",
                409: "Conflict", 413: "Request body too large",
                503: "A dependency (the API server, Temporal) is unavailable, or the operator is starting: try again"}
        answers = {str(c): json_of(ref(HTTP_ERROR), said[c]) for c in codes}
        if validated:
            answers["422"] = json_of(ref("HTTPValidationError"), "Validation Error")
        return answers

    def path_param(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True,
                "schema": {"type": "string", "title": name.replace("_", " ").title()}}

    def operation(summary: str, description: str, param: str, responses: dict[str, Any],
                  body: str | None = None, query: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        op: dict[str, Any] = {"summary": summary, "description": description,
                              "parameters": [path_param(param), *(query or [])], "responses": responses}
        if body is not None:
            op["requestBody"] = {"content": {"application/json": {"schema": {**ref(body), "default": {}}}}}
        return op

    def plain(summary: str) -> dict[str, Any]:
        return {"get": {"summary": summary, "security": [],
                        "responses": {"200": {"description": "Successful Response"}}}}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Agent Control Plane API (workerqueue-operator)",
            "description": "The worker-facing part of the Agent Control Plane API, served in-cluster. Every other "
            "/api/v1/ call (any method, websockets included) from a worker whose queue or pod token leads to an "
            "upstream control plane is passed through to it, with the organization's API key in place of the token "
            "(`Bearer` or `UserKey`, as the worker sent it), and so is a ServiceAccount's whose worker is "
            "registered in one queue of its namespace (no websocket); 401 without a valid token, 403 for a "
            "ServiceAccount registered in no queue (or several) of its namespace or a user, 404 when the queue has "
            "no upstream, 502 when the upstream cannot be reached, 504 when it does not answer in time.",
            "version": version,
        },
        "security": [{"BearerAuth": []}],
        "paths": {
            "/api/v1/worker-queues/{queue_id}/start": {
                "post": {
                    "summary": "Start Worker For Queue",
                    "description": "Start a worker for a specific queue. Returns all configuration needed "
                    "for the worker to connect to Temporal.",
                    "operationId": wire.START_OPERATION_ID,
                    "parameters": [{"name": "queue_id", "in": "path", "required": True,
                                    "schema": {"type": "string", "title": "Queue Id"}}],
                    "requestBody": {"content": {"application/json": {
                        "schema": {**ref(wire.REQUEST_SCHEMA_NAME), "default": {}}}}},
                    "responses": {
                        "200": {"description": "Successful Response",
                                "content": {"application/json": {"schema": ref("WorkerStartResponse")}}},
                        **{str(status): error(description, example, status)
                           for status, (description, example) in START_ERRORS.items()},
                        "422": {"description": "Validation Error",
                                "content": {"application/json": {"schema": ref("HTTPValidationError")}}},
                    },
                }
            },
            "/api/v1/workers/{worker_id}/heartbeat": {"post": operation(
                "Worker Heartbeat", "Renews the worker's registration and records its state. `logs` are "
                "accepted and dropped; `system_info` is kept size-bounded. A worker whose registration is "
                "not known (it expired, or is not seen yet) is registered again when its id is one its "
                "queue issued; 404 otherwise, 409 when the queue's maxWorkers slots are all taken.", "worker_id",
                {"200": json_of({"type": "object"}), **failures(400, 401, 403, 404, 408, 409, 413, 503)},
                body="WorkerHeartbeatRequest")},
            "/api/v1/workers/{worker_id}/disconnect": {"post": operation(
                "Worker Disconnect", "Ends the worker's registration at once (its slot is free); the reason "
                "and exit code become an Event on the queue.", "worker_id",
                {"200": json_of({"type": "object"}), **failures(400, 401, 403, 404, 408, 409, 413, 503)},
                body="WorkerDisconnectRequest")},
            "/api/v1/worker-queues/{queue_id}/workers": {"get": operation(
                "List Live Workers", "The queue's registered workers whose heartbeats are current.", "queue_id",
                {"200": json_of({"type": "array", "items": ref("WorkerInfo")}),
                 **failures(401, 403, 404, 409, 503, validated=False)})},
            "/api/v1/worker-queues/{queue_id}/executions": {"get": operation(
                "List Executions", "The workflows of the queue's Temporal task queue, newest first. A worker "
                "with its own (per-worker) token sees only the executions it holds, folded into one entry that "
                "reads `running` while any of them runs; a shared queue token sees none. A Kubernetes identity "
                "allowed to start workers on the queue sees the execution of its one registration in the queue, "
                "none with several or none; one allowed only to `get` the WorkerQueue sees all (unless it has a "
                "registration there, or its token is bound to a pod).", "queue_id",
                {"200": json_of({"type": "array", "items": ref("ExecutionInfo")}), **failures(401, 403, 404, 409, 503)},
                query=[{"name": "limit", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}},
                       {"name": "status", "in": "query", "required": False,
                        "schema": {"type": "string", "default": "all",
                                   "enum": ["all", "running", "completed", "failed", "cancelled",
                                            "waiting_for_input"]}}])},
            "/api/v1/worker-queues/{queue_id}": {"delete": operation(
                "Delete Worker Queue", "Deletes the WorkerQueue (its pods and registrations go with it): with a "
                "token of the queue when it is ephemeral, or as a Kubernetes identity allowed to `delete` it.",
                "queue_id", {"204": {"description": "Deleted"}, **failures(401, 403, 404, 409, 503, validated=False)})},
            "/healthz": plain("Liveness"),
            "/readyz": plain("Readiness: 200 once the watches have listed everything"),
            **({"/metrics": plain("Prometheus metrics")} if metrics else {}),
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"BearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
