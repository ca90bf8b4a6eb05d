"""Request bodies read and validated the way the reference API (FastAPI) does, for every route.

Hostile input ends here as the documented 4xx answer, never as an exception further in: JSON
nested past the parser's depth, integers past Python's 4,300 digits, bodies over the limit or that
do not arrive in time. A lone surrogate escape (`"\\udce9"`, what Python makes of a file name that is
not UTF-8, such as the worker's cwd) is valid JSON but cannot be written out again as UTF-8: it is
read as U+FFFD, so the worker still starts.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar, cast

from aiohttp import web
from pydantic import BaseModel, ValidationError

from workerqueue_operator.api import errors
from workerqueue_operator.api.keys import SETTINGS

MAX_BODY = 1024 * 1024
"""Bytes; a larger body is answered 413 (exactly this many are accepted)."""

M = TypeVar("M", bound=BaseModel)

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read(request: web.Request, model: type[M]) -> M | web.Response:
    """The body validated as `model`, or the 400/408/413/422 answer FastAPI-shaped.

    An empty body means the model's defaults ({}), as FastAPI treats a body with a default (the
    reference's `body: WorkerStartRequest = WorkerStartRequest()`); JSON null or whitespace is no
    body there but an invalid one (422), and bytes that are not UTF-8 are 400. The body must arrive
    within the `http_body_timeout_seconds` setting.
    """
    if request.content_length is not None and request.content_length > MAX_BODY:
        return errors.detail(413, "Request body too large")
    try:
        if request.content.is_eof():  # all there already, as a small body usually is: no timer to arm
            raw = await request.read()
        else:
            async with asyncio.timeout(request.app[SETTINGS].http_body_timeout_seconds):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return errors.detail(413, "Request body too large")
    except TimeoutError:
        # A client that trickles its body holds a connection and a task: it gets no more time.
        answer = errors.detail(408, "Request body not received in time")
        answer.force_close()
        return answer
    if not raw:
        return model()
    try:
        # The common case in one pass (the validator itself: model_validate_json's wrapper costs a
        # quarter as much again); anything unusual takes the slow path below for its exact errors.
        return cast(M, model.__pydantic_validator__.validate_json(raw))
    except ValidationError:
        pass
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        return errors.unprocessable(errors.json_invalid(exc))
    except UnicodeDecodeError:
        return errors.detail(400, "There was an error parsing the body")  # FastAPI's words for it
    except RecursionError:
        return errors.unprocessable(errors.json_invalid_at(0, "nested too deeply"))
    except ValueError:  # an integer of more than 4,300 digits (sys.get_int_max_str_digits)
        return errors.unprocessable(errors.json_invalid_at(0, "number too large"))
    try:
        if _SURROGATE_ESCAPE.search(raw):
            parsed = _without_lone_surrogates(parsed)
        return model.model_validate(parsed, from_attributes=True)  # as FastAPI validates: its error types
    except ValidationError as exc:
        return errors.unprocessable(errors.validation_errors(exc))
    except RecursionError:  # JSON that the parser took, but nested too deeply to validate
        return errors.unprocessable(errors.json_invalid_at(0, "nested too deeply"))


def _without_lone_surrogates(value: Any) -> Any:
    """The parsed JSON with each lone surrogate (a valid pair is one character by now) as U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item) for key, item in value.items()}
    return value
