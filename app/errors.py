"""Error bodies that can always be written, whatever the client sent.

FastAPI's 422 echoes each offending input back. Some inputs cannot be written
as JSON at all: NaN and the infinities (Python's json reads them, and reads
1e400 as inf, but Starlette refuses to write them), and strings holding lone
surrogates ("\\ud800", valid JSON escapes that are not UTF-8). Echoed as they
are, the 422 itself failed and the client got a 500. Here they become text.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException


def json_safe(value: Any) -> Any:
    """`value` with every part JSON cannot carry replaced by a readable string."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # backslashreplace keeps the offending code point visible (\ud800).
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    return value


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 body (a list of {loc, msg, type, input, ctx}), made JSON-safe."""
    # jsonable_encoder turns exceptions in ctx and other objects into plain
    # values first; json_safe then handles what it leaves as NaN or surrogates.
    return JSONResponse({"detail": json_safe(jsonable_encoder(json_safe(exc.errors())))}, status_code=422)


def unreadable_body(exc: HTTPException) -> RequestValidationError | None:
    """FastAPI's bare 400 "There was an error parsing the body" for a body Python's json refused
    with a ValueError other than its JSONDecodeError (an integer of more than 4300 digits,
    Python's limit on int parsing; bytes that are not UTF-8), as the 422 `json_invalid` that any
    other malformed JSON gets, saying why. None for any other HTTPException."""
    cause = exc.__cause__
    if exc.status_code != 400 or not isinstance(cause, ValueError):
        return None
    # Python's advice (sys.set_int_max_str_digits) is for the server's code, not the client.
    reason = str(cause).split("; use sys.")[0]
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {reason}",
                                    "input": {}, "ctx": {"error": reason}}])


async def http_error(request: Request, exc: HTTPException) -> Response:
    """FastAPI's own answer to an HTTPException, but an unreadable body's as a 422 saying why."""
    unreadable = unreadable_body(exc)
    if unreadable is not None:
        return await validation_error(request, unreadable)
    return await http_exception_handler(request, exc)
