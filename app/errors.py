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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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
