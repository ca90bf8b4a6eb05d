"""What a request carries: its bearer token and its JSON body, read the one way every route shares.

Hostile input ends here as the documented 4xx answer, never as an exception further in: bytes
that are not a token, JSON nested past the parser's depth, integers past Python's 4,300 digits,
bodies over the limit or that do not arrive in time.
"""

from __future__ import annotations

import asyncio
import json
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from workerqueue_operator.api import errors

MAX_BODY = 1024 * 1024
"""Bytes; a larger body is answered 413 (exactly this many are accepted)."""

M = TypeVar("M", bound=BaseModel)


def bearer_token(request: web.Request) -> str | None:
    """The bearer token of the Authorization header; None without one or when it cannot be a token.

    RFC 6750's b64token, loosened to any visible ASCII: a token Secret may hold any such string,
    while anything else (a non-ASCII byte, a control character) cannot be a token and must not
    reach a hash or a TokenReview.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not _visible_ascii(token):
        return None
    return token


def _visible_ascii(text: str) -> bool:
    # str methods, not a regex: this runs on every request.
    return text.isascii() and text.isprintable() and " " not in text


async def read_body(request: web.Request, model: type[M], *, timeout: float) -> M | web.Response:
    """The body validated as `model`, or the 408/413/422 answer FastAPI-shaped.

    An empty body or JSON null means the model's defaults ({}), as FastAPI treats an optional body.
    """
    if request.content_length is not None and request.content_length > MAX_BODY:
        return errors.detail(413, "Request body too large")
    try:
        if request.content.is_eof():  # all there already, as a small body usually is: no timer to arm
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return errors.detail(413, "Request body too large")
    except TimeoutError:
        # A client that trickles its body holds a connection and a task: it gets no more time.
        answer = errors.detail(408, "Request body not received in time")
        answer.force_close()
        return answer
    if not raw or raw.isspace():
        return model()
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
        return errors.unprocessable(errors.json_invalid_at(0, "body is not UTF-8"))
    except RecursionError:
        return errors.unprocessable(errors.json_invalid_at(0, "nested too deeply"))
    except ValueError:  # an integer of more than 4,300 digits (sys.get_int_max_str_digits)
        return errors.unprocessable(errors.json_invalid_at(0, "number too large"))
    if parsed is None:
        return model()
    try:
        return model.model_validate(parsed)
    except ValidationError as exc:
        return errors.unprocessable(errors.validation_errors(exc))
    except RecursionError:  # JSON that the parser took, but nested too deeply to validate
        return errors.unprocessable(errors.json_invalid_at(0, "nested too deeply"))
