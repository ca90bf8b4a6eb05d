"""`GET /openapi.json`: the endpoints this server serves, named as the reference API names them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from workerqueue_operator.models import wire

_REF = "#/components/schemas/{model}"


def _schema(model: type[BaseModel], components: dict[str, Any]) -> None:
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    components[str(schema.get("title", model.__name__))] = schema


def document(version: str) -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in (wire.WorkerStartRequest, wire.WorkerStartResponse, wire.HTTPValidationError):
        _schema(model, components)
    components[wire.REQUEST_SCHEMA_NAME] = components.pop("WorkerStartRequest")

    def ref(name: str) -> dict[str, str]:
        return {"$ref": _REF.format(model=name)}

    def plain(summary: str) -> dict[str, Any]:
        return {"get": {"summary": summary, "security": [],
                        "responses": {"200": {"description": "Successful Response"}}}}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Agent Control Plane API (workerqueue-operator)",
            "description": "The worker-facing part of the Agent Control Plane API, served in-cluster. Every other "
            "/api/v1/ call (any method, websockets included) from a worker whose queue token leads to an upstream "
            "control plane is passed through to it, with the organization's API key in place of the token "
            "(`Bearer` or `UserKey`, as the worker sent it); 401 without a queue token, 404 when the queue has "
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
                        "422": {"description": "Validation Error",
                                "content": {"application/json": {"schema": ref("HTTPValidationError")}}},
                    },
                }
            },
            "/healthz": plain("Liveness"),
            "/readyz": plain("Readiness: 200 once the watches have listed everything"),
            "/metrics": plain("Prometheus metrics"),
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"BearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
