"""OpenAI-compatible image generation: POST /v1/images/generations.

A service that already speaks OpenAI's images API points its client's
base_url at Bailan. The request becomes an ordinary job, submitted through the
same path as POST /v1/jobs (jobs.submit_job_request: the same queue, batching,
keys and limits), and the call waits for it. `stream: true` sends the job's
previews as `image_generation.partial_image` events, then one
`image_generation.completed` event per image, as OpenAI's streaming API does.

Every error of this route, its dependencies included, is written in OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}` (OpenAIRoute), so
that OpenAI's SDKs raise their usual exceptions with our message.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import redis
from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
# Starlette's, the base of FastAPI's: body parsing raises it too.
from starlette.exceptions import HTTPException

from app import hold, limits, views
from app.deps import AsyncRedisDep, AuthDep, BlobsDep, PathForDep, RedisDep, SettingsDep, WorkerCacheDep
from app.errors import json_safe, unreadable_body
from app.routes import jobs
from app.schemas import JobOut, make_request_model
from app.settings import ApiSettings
from app.store import records
from bailan.blobs import BlobStore
from bailan.jobs import MAX_IMAGES, PREVIEW_FORMAT, TERMINAL_STATES, ErrorCode, JobParams, JobRequest, JobState

log = logging.getLogger("bailan.api")

PATH = "/v1/images/generations"
SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
MAX_PARTIAL_IMAGES = 3
# OpenAI's names for our fields, so an error's `param` is the field the client sent.
PARAM_NAMES = {"width": "size", "height": "size", "num_images": "n"}
# Our images carry no alpha channel and OpenAI's token counts do not apply;
# these are the honest values of the fields OpenAI's events require.
BACKGROUND = "opaque"
QUALITY = "auto"
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
         "output_tokens": 0, "total_tokens": 0}


# ---------------------------------------------------------------- errors


class OpenAIError(Exception):
    """An error answer of this route, already in OpenAI's terms."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        # OpenAI's SDKs retry 408, 409, 429 and 5xx; a retry of a generation would queue
        # the job again, so only the answers where waiting helps (429, 503) allow it.
        retry = status_code in (status.HTTP_429_TOO_MANY_REQUESTS, status.HTTP_503_SERVICE_UNAVAILABLE)
        self.headers = {"x-should-retry": "true" if retry else "false", **(headers or {})}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code, headers=self.headers)


def _from_http(exc: HTTPException) -> OpenAIError:
    """Our HTTPException (auth, limits, Redis) in OpenAI's shape, headers kept."""
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(json_safe(exc.detail))
    kinds: dict[int, tuple[str, str | None]] = {
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "not_found"),
        409: ("invalid_request_error", "conflict"),
        413: ("invalid_request_error", "request_too_large"),
        429: ("requests", "rate_limit_exceeded"),
        503: ("server_error", "service_unavailable"),
    }
    type_, code = kinds.get(exc.status_code, ("server_error" if exc.status_code >= 500 else "invalid_request_error",
                                              None))
    return OpenAIError(exc.status_code, detail, type_, None, code, dict(exc.headers or {}))


def _from_validation(errors: list[dict[str, Any]]) -> OpenAIError:
    """The first validation error, as OpenAI words them: the parameter by OpenAI's name."""
    if not errors:
        return OpenAIError(400, "invalid request")
    error = errors[0]
    loc = [part for part in error.get("loc", ()) if part != "body"]
    name = str(loc[0]) if loc and isinstance(loc[0], str) else None
    param = PARAM_NAMES.get(name, name) if name else None
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unknown parameter: '{name}'.", param=param, code="unknown_parameter")
    if kind == "missing" and name is None:  # no body at all: its first required parameter is missing
        return OpenAIError(400, "Missing required parameter: 'prompt'.", param="prompt",
                           code="missing_required_parameter")
    if kind == "missing":
        return OpenAIError(400, f"Missing required parameter: '{name}'.", param=param,
                           code="missing_required_parameter")
    if kind in ("json_invalid", "model_attributes_type") or name is None:
        message = "We could not parse the JSON body of your request: " + str(error.get("msg", ""))
        return OpenAIError(400, message, code="invalid_json")
    message = f"Invalid value for '{param}': {error.get('msg', 'invalid value')}"
    if "input" in error and kind != "missing":
        message += f" (got {json.dumps(json_safe(error['input']))[:200]})"
    return OpenAIError(400, message, param=param, code="invalid_value")


class OpenAIRoute(APIRoute):
    """A route whose every error, its dependencies' included, is in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return _from_validation(list(exc.errors())).response()
            except HTTPException as exc:
                unreadable = unreadable_body(exc)
                if unreadable is not None:
                    return _from_validation(list(unreadable.errors())).response()
                return _from_http(exc).response()
            except redis.RedisError as exc:
                settings: ApiSettings = request.app.state.settings
                return OpenAIError(
                    503, f"the job store (Redis) is unavailable: {exc}; retry later", "server_error", None,
                    "service_unavailable", {"Retry-After": str(settings.retry_after_s)},
                ).response()
            except Exception:  # noqa: BLE001 - a bug: still answered in OpenAI's shape, and logged
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                return OpenAIError(500, "internal error; it has been logged", "server_error", None,
                                   "internal_error").response()

        return route


# ---------------------------------------------------------------- request


class ImageGenerationRequest(BaseModel):
    """OpenAI's image generation request. Fields that do not apply to Bailan are accepted
    and ignored where OpenAI's own models ignore them, refused where no answer could honour them."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to paint.")
    model: str | None = Field(
        None,
        description=(
            "A model /v1/models lists, which runs the job; omitted, or one of OpenAI's own names "
            "(dall-e-*, gpt-image-*), means this server's default model."
        ),
    )
    n: StrictInt | None = Field(None, ge=1, le=MAX_IMAGES, description=f"Images to generate, 1–{MAX_IMAGES}.")
    size: str | None = Field(
        None, description="'WxH' (each side a multiple of 8, within this server's caps) or 'auto': the model's own."
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None,
        description=(
            "b64_json (the default): the image bytes, base64. url: where to GET the image on this server "
            "(GET needs the same API key; the image is kept BAILAN_RESULT_TTL_S seconds)."
        ),
    )
    output_format: Literal["png", "webp", "jpeg"] | None = Field(None, description="Encoding of the images.")
    stream: StrictBool | None = Field(None, description="Answer with server-sent events instead of one body.")
    partial_images: StrictInt | None = Field(
        None, ge=0, le=MAX_PARTIAL_IMAGES,
        description="With stream: how many previews to send as partial images, 0–3 (fewer if the job is short).",
    )
    user: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = Field(
        None, description="Accepted and ignored: the steps are this server's default."
    )
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted and ignored.")
    moderation: Literal["low", "auto"] | None = Field(None, description="Accepted and ignored.")
    background: Literal["opaque", "auto"] | None = Field(
        None, description="'opaque' or 'auto'; 'transparent' is refused: images have no alpha channel."
    )
    output_compression: StrictInt | None = Field(None, ge=0, le=100, description="Accepted and ignored.")


# OpenAI's own image model names: a client written for OpenAI sends one, meaning "the usual model".
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image")

_request_models: dict[str, type[JobRequest]] = {}


def _request_model(settings: ApiSettings) -> type[JobRequest]:
    """The same narrowed model that validates POST /v1/jobs, built once per settings."""
    key = settings.model_dump_json()
    if key not in _request_models:
        _request_models[key] = make_request_model(settings)
    return _request_models[key]


def _preview_every(steps: int, partial_images: int) -> int:
    """The shortest preview interval giving at most `partial_images` previews (the worker takes
    one every `preview_every` steps, never after the last): the most evenly spaced ones that fit."""
    return 0 if partial_images == 0 else max(1, math.ceil(steps / (partial_images + 1)))


def job_request(body: ImageGenerationRequest, settings: ApiSettings) -> JobRequest:
    """The Bailan job for `body`, checked against this server's caps; raises RequestValidationError."""
    width = height = None
    if body.size is not None and body.size != "auto":
        match = SIZE.match(body.size)
        if match is None:
            raise OpenAIError(
                400, f"Invalid value for 'size': '{body.size}'. Supported values are 'WxH' (e.g. '512x512') or 'auto'.",
                param="size", code="invalid_value",
            )
        width, height = int(match.group(1)), int(match.group(2))
    values: dict[str, Any] = {"prompt": body.prompt, "num_images": body.n or 1, "preview_every": 0}
    if body.model is not None and not body.model.startswith(OPENAI_MODEL_PREFIXES):
        # Clients written for OpenAI send its names; those mean "the default", anything else must exist.
        values["model"] = body.model
    if width is not None:
        values.update(width=width, height=height)
    if body.output_format is not None:
        values["output_format"] = body.output_format
    try:
        request = _request_model(settings).model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    return request


def _spaced_previews(body: ImageGenerationRequest) -> Callable[[JobParams], JobParams] | None:
    """For a stream: previews spread over the steps the job will run (the model's default steps
    are known only once the server resolved them), as many as partial_images asks at most."""
    if not body.stream:
        return None
    partial = body.partial_images if body.partial_images is not None else 0
    return lambda params: params.model_copy(update={"preview_every": _preview_every(params.steps, partial)})


# ---------------------------------------------------------------- the call


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


def _outcome_error(settings: ApiSettings, job_id: str, snap: records.JobSnapshot | None, view: JobOut | None,
                   timeout: bool) -> OpenAIError:
    """Why the job gave no images: it expired, timed out, failed or was canceled."""
    where = {"X-Bailan-Job-Id": job_id, "Location": f"{jobs.PREFIX}/{job_id}"}
    if snap is None or view is None:
        return OpenAIError(500, f"job {job_id} expired before it finished", "server_error", None, "job_expired", where)
    if timeout:
        return OpenAIError(
            504,
            f"job {job_id} did not finish within {settings.openai_timeout_s:g} s (BAILAN_OPENAI_TIMEOUT_S); it goes "
            f"on: follow it at {jobs.PREFIX}/{job_id} and fetch its images from {jobs.PREFIX}/{job_id}/images/0",
            "server_error", None, "timeout", where,
        )
    if view.status is JobState.canceled:
        return OpenAIError(409, f"job {job_id} was canceled", "invalid_request_error", None, "job_canceled", where)
    error = view.error
    code = error.code if error is not None else ErrorCode.internal.value
    message = f"job {job_id} failed: {error.message if error is not None else 'unknown error'}"
    if code == ErrorCode.invalid_for_model.value:
        return OpenAIError(400, message, "invalid_request_error", None, code, where)
    return OpenAIError(500, message, "server_error", None, code, where)


def _size(view: JobOut) -> str:
    params = view.params
    if params is None or params.width is None or params.height is None:
        return "auto"
    return f"{params.width}x{params.height}"


async def _image_b64(blobs: BlobStore, job_id: str, index: int) -> str:
    data = await run_in_threadpool(records.image_bytes, blobs, job_id, index)
    if data is None:
        raise OpenAIError(500, f"job {job_id}: image {index} expired", "server_error", None, "job_expired")
    return base64.b64encode(data).decode()


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.post(
    PATH,
    summary="Generate images (OpenAI-compatible)",
    description=(
        "OpenAI's `images.generate`: the request becomes a Bailan job on the same queue, with the same keys "
        "and limits as POST /v1/jobs, and the call waits for it (at most BAILAN_OPENAI_TIMEOUT_S; past it "
        "the error names the job id, and the job goes on). With `stream: true` the answer is a "
        "`text/event-stream` of `image_generation.partial_image` events (the job's previews, JPEG, at most "
        "`partial_images`) and one `image_generation.completed` event per image. Errors have OpenAI's shape "
        '`{"error": {"message", "type", "param", "code"}}`.'
    ),
    responses={
        200: {"content": {"application/json": {}, "text/event-stream": {}},
              "description": '`{"created", "data": [{"b64_json" | "url"}], "size", "output_format"}`, or the stream.'},
        400: {"description": "Invalid or unknown parameter (OpenAI's error shape; `param` names it)."},
        401: {"description": "Missing or unknown API key."},
        429: {"description": "Over a limit of this API key or the queue; retry after `Retry-After`."},
        500: {"description": "The job failed."},
        504: {"description": "The job did not finish within BAILAN_OPENAI_TIMEOUT_S; it goes on."},
    },
)
async def generate_images(
    body: ImageGenerationRequest,
    request: Request,
    settings: SettingsDep,
    conn: RedisDep,
    aconn: AsyncRedisDep,
    path_for: PathForDep,
    principal: AuthDep,
    blobs: BlobsDep,
    worker_cache: WorkerCacheDep,
) -> Response:
    job = job_request(body, settings)
    # The wait holds a connection like an event stream does, so it counts against the same cap,
    # taken before the job is queued so that a refusal leaves no job behind.
    stream_id = uuid.uuid4().hex
    if not await run_in_threadpool(limits.open_stream, conn, principal.name, stream_id, settings.max_streams_per_key):
        raise OpenAIError(
            429, f"this API key already has {settings.max_streams_per_key} event streams or waiting calls open",
            "requests", None, "rate_limit_exceeded", {"Retry-After": str(settings.retry_after_s)},
        )

    try:
        # The live workers are read in the thread too: a stale cache reads Redis, blocking.
        job_id, _, _ = await run_in_threadpool(
            lambda: jobs.submit_job_request(job, settings, conn, principal, None, _spaced_previews(body),
                                            worker_cache.get(conn))
        )
    except BaseException as exc:
        await hold.give_back_place(conn, principal, stream_id, silent=isinstance(exc, redis.TimeoutError))
        raise
    created = int(time.time())
    deadline = time.monotonic() + settings.openai_timeout_s
    output_format = job.output_format.value

    async def final_view(snap: records.JobSnapshot | None) -> JobOut | None:
        return None if snap is None else await run_in_threadpool(views.job_view, conn, snap, path_for)

    if not body.stream:
        silent = False  # Redis timed out: the place is freed off this answer's path
        try:
            snap = None
            async for snap in hold.snapshots(request.app.state.job_events, settings, conn, aconn, principal,
                                             stream_id, job_id, deadline):
                # A client gone gives back its place now, not at openai_timeout_s (the job goes on).
                if await request.is_disconnected():
                    return Response(status_code=499)
            view = await final_view(snap)
            if view is None or view.status is not JobState.succeeded:
                raise _outcome_error(settings, job_id, snap, view, timeout=view is not None and
                                     view.status not in TERMINAL_STATES)
            if body.response_format == "url":
                # As clients reach the API (behind a proxy, not the address it was asked at), if known.
                base = (settings.public_url or str(request.base_url)).rstrip("/")
                data = [{"url": base + image.url} for image in view.images]
            else:
                data = [{"b64_json": await _image_b64(blobs, job_id, image.index)} for image in view.images]
        except redis.RedisError as exc:
            silent = isinstance(exc, redis.TimeoutError)
            # The job is queued: a 503 that invites a retry (OpenAI's SDKs retry it) would queue it twice.
            raise OpenAIError(
                503, f"job {job_id} was accepted, then the job store (Redis) became unavailable: {exc}; do not "
                f"resubmit: follow it at {jobs.PREFIX}/{job_id}", "server_error", None, "service_unavailable",
                {"X-Bailan-Job-Id": job_id, "Location": f"{jobs.PREFIX}/{job_id}", "x-should-retry": "false",
                 "Retry-After": str(settings.retry_after_s)},
            ) from None
        except (OpenAIError, HTTPException):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug, or a blob store that fails to read
            # As above: the job is queued, and OpenAI's SDKs retry a 500, which would queue it again.
            log.exception("answering job %s failed", job_id)
            raise OpenAIError(
                500, f"job {job_id} was accepted, then its answer failed ({type(exc).__name__}; logged); do not "
                f"resubmit: follow it at {jobs.PREFIX}/{job_id}", "server_error", None, "internal_error",
                {"X-Bailan-Job-Id": job_id, "Location": f"{jobs.PREFIX}/{job_id}", "x-should-retry": "false"},
            ) from None
        finally:
            await hold.give_back_place(conn, principal, stream_id, silent)
        return JSONResponse(
            {"created": created, "data": data, "size": _size(view), "output_format": output_format,
             "background": BACKGROUND},
            headers={"X-Bailan-Job-Id": job_id},
        )

    async def events() -> AsyncIterator[str]:
        try:
            sent: set[int] = set()
            last_sent = time.monotonic()
            snap = None
            async for snap in hold.snapshots(request.app.state.job_events, settings, conn, aconn, principal,
                                             stream_id, job_id, deadline):
                if snap is None:
                    break
                size = f"{snap.params.width}x{snap.params.height}" if snap.params and snap.params.width else "auto"
                # Every preview is sent, those of a job that ended between two reads included.
                for step in snap.preview_steps:
                    if step in sent:
                        continue
                    sent.add(step)
                    data = await run_in_threadpool(records.preview_bytes, blobs, job_id, step)
                    if data is None:  # expired between the read and now
                        continue
                    yield _sse("image_generation.partial_image", {
                        "type": "image_generation.partial_image", "b64_json": base64.b64encode(data).decode(),
                        "created_at": int(time.time()), "size": size, "quality": QUALITY, "background": BACKGROUND,
                        "output_format": PREVIEW_FORMAT, "partial_image_index": len(sent) - 1,
                    })
                    last_sent = time.monotonic()
                if time.monotonic() - last_sent >= jobs.EVENTS_KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    last_sent = time.monotonic()
            view = await final_view(snap)
            if view is None or view.status is not JobState.succeeded:
                error = _outcome_error(settings, job_id, snap, view,
                                       timeout=view is not None and view.status not in TERMINAL_STATES)
                yield _sse("error", error.body)
                return
            for image in view.images:
                yield _sse("image_generation.completed", {
                    "type": "image_generation.completed", "b64_json": await _image_b64(blobs, job_id, image.index),
                    "created_at": int(time.time()), "size": _size(view), "quality": QUALITY,
                    "background": BACKGROUND, "output_format": output_format, "usage": USAGE,
                })
        except OpenAIError as exc:
            yield _sse("error", exc.body)
        except redis.RedisError as exc:
            # The response has started, so a 503 is no longer possible.
            yield _sse("error", OpenAIError(503, f"the job store (Redis) is unavailable: {exc}", "server_error",
                                            None, "service_unavailable").body)

    # The response gives the place back, also when the client left before the stream began.
    return hold.PlacedStream(events(), conn, principal, stream_id,
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", "X-Bailan-Job-Id": job_id})
