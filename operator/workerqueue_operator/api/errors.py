"""Error bodies exactly as the reference API (FastAPI + pydantic v2) shapes them: `{"detail": ...}`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError


def detail(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": message}, status=status, headers=headers)


def unauthorized(message: str) -> web.Response:
    return detail(401, message, headers={"WWW-Authenticate": "Bearer"})


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors with `loc` starting at "body", as FastAPI's RequestValidationError has them."""
    errors = []
    for error in exc.errors(include_url=False):
        item: dict[str, Any] = {
            "type": error["type"],
            "loc": ["body", *error["loc"]],
            "msg": error["msg"],
            "input": error["input"],
        }
        if "ctx" in error:
            item["ctx"] = {k: v if isinstance(v, str | int | float | bool) else str(v) for k, v in error["ctx"].items()}
        errors.append(item)
    return errors


def json_invalid(exc: json.JSONDecodeError) -> list[dict[str, Any]]:
    """FastAPI's answer to a body that is not JSON: type json_invalid, loc ["body", <offset>]."""
    return json_invalid_at(exc.pos, exc.msg)


def json_invalid_at(position: int, error: str) -> list[dict[str, Any]]:
    return [{
        "type": "json_invalid",
        "loc": ["body", position],
        "msg": "JSON decode error",
        "input": {},
        "ctx": {"error": error},
    }]


def unprocessable(errors: list[dict[str, Any]]) -> web.Response:
    try:
        text = json.dumps({"detail": errors}, allow_nan=False)
    except (RecursionError, ValueError):
        # An input echoed back that JSON cannot carry (nested too deeply, NaN, Infinity): the errors
        # without their inputs, rather than invalid JSON or a 500.
        text = json.dumps({"detail": [{**error, "input": None} for error in errors]}, allow_nan=False)
    return web.Response(text=text, status=422, content_type="application/json")
