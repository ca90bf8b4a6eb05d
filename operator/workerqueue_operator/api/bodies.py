"""Request bodies read and validated the way the reference API (FastAPI) does, for every route."""

from __future__ import annotations

import json
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from workerqueue_operator.api import errors

MAX_BODY = 1024 * 1024

M = TypeVar("M", bound=BaseModel)


async def read(request: web.Request, model: type[M]) -> M | web.Response:
    """The body as `model`, or the 413/422 answer FastAPI would give. An empty body means `{}`."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return errors.detail(413, "Request body too large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return errors.detail(413, "Request body too large")
    if not raw.strip():
        return model()  # an empty body means the documented default, {}
    try:
        # The common case in one pass; anything unusual takes the slow path below for its exact errors.
        return model.model_validate_json(raw)
    except ValidationError:
        pass
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        return errors.unprocessable(errors.json_invalid(exc))
    except UnicodeDecodeError:
        return errors.unprocessable([{"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error",
                                      "input": {}, "ctx": {"error": "body is not UTF-8"}}])
    if parsed is None:
        return model()  # JSON null: the default, as FastAPI treats it
    try:
        return model.model_validate(parsed)
    except ValidationError as exc:
        return errors.unprocessable(errors.validation_errors(exc))
