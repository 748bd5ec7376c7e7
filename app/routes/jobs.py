"""Jobs: submit, read, follow, cancel, and fetch previews and images.

Every route here is module-level except POST /v1/jobs, whose body type is the
request model narrowed by this server's caps: `submit_router(settings)` builds
it, and create_app includes it.

No `from __future__ import annotations` here: the request body's type is built
from the settings at run time, and FastAPI must see it as a real class.
"""

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, NamedTuple

import redis
from fastapi import APIRouter, Body, Header, HTTPException, Path, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from app import hold, inputs, limits, views
from app.deps import AuthDep, JobAccessDep, WorkerCacheDep
from app.schemas import Detail, JobOut, make_request_model
from app.settings import ApiSettings
from app.store import idempotency, records
from app.store.common import looks_like_job_id
from app.store.events import JobEvents
from app.store.workers import WorkerCache, WorkerInfo, device_refusal, live_workers, serving
from bailan.webhooks import Policy
from bailan.keys import Principal
from bailan.logs import job_id_var
from bailan.jobs import (
    CONTENT_TYPES,
    DEFAULT_STEPS,
    MAX_IMAGES,
    PREVIEW_FORMAT,
    TERMINAL_STATES,
    JobParams,
    JobRequest,
    JobState,
    img2img_run_steps,
)

PREFIX = "/v1/jobs"
# A comment line this often keeps an event stream open while a job waits in the queue.
EVENTS_KEEPALIVE_S = hold.KEEPALIVE_S

JobId = Annotated[str, Path(description="Job id as returned by POST /v1/jobs.")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description=(
            "Makes retries safe: a repeat of the same request with the same key returns the job the "
            "first one created (200, header Idempotent-Replayed: true) instead of queuing another. "
            "The same key with a different body is refused (422)."
        ),
    ),
]

PreferHeader = Annotated[str | None, Header(alias="Prefer", description=hold.PREFER_DESCRIPTION)]

SUBMIT_EXAMPLES: dict[str, Any] = {
    "minimal": {"summary": "Just a prompt", "value": {"prompt": "a watercolor lighthouse at dawn"}},
    "full": {
        "summary": "Every option",
        "value": {
            "prompt": "a watercolor lighthouse at dawn",
            "negative_prompt": "blurry",
            "width": 512,
            "height": 512,
            "steps": DEFAULT_STEPS,
            "guidance_scale": 7.5,
            "seed": 1234,
            "scheduler": "dpmpp_2m",
            "num_images": 1,
            "preview_every": 5,
            "output_format": "png",
        },
    },
}

# Every route that takes a key can answer these; documented once, for /docs and schema checks.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Detail, "description": "Missing or unknown API key (header `WWW-Authenticate: Bearer`)."},
    503: {"model": Detail, "description": "Redis unavailable; retry after `Retry-After` seconds."},
}
NOT_FOUND = {404: {"model": Detail, "description": "Unknown or expired job, or another API key's job."}}

log = logging.getLogger("bailan.api")

# Every route here takes JobAccessDep, which also names the job on each line the request logs.
router = APIRouter(prefix=PREFIX, tags=["jobs"], responses=AUTH_RESPONSES)


def _not_found(settings: ApiSettings, job_id: str) -> HTTPException:
    # The same answer for another key's job: its existence is not revealed.
    return HTTPException(
        status.HTTP_404_NOT_FOUND,
        f"job {job_id} not found: no such job, or it expired (jobs and their images are kept "
        f"{settings.result_ttl_s} s after they end)",
    )


def _may_see(principal: Principal, owner: str) -> bool:
    """Its own jobs, or any job for an admin key."""
    return principal.admin or owner == principal.name


def _visible(snap: records.JobSnapshot | None, principal: Principal) -> records.JobSnapshot | None:
    """`snap` if `principal` may see it."""
    return snap if snap is None or _may_see(principal, snap.owner) else None


def _load(
    settings: ApiSettings, conn: redis.Redis, job_id: str, principal: Principal, for_view: bool = False
) -> records.JobSnapshot:
    """The job's snapshot, or 404. `for_view`: read a queued job's wait inputs too (its view's
    eta_s); previews and images need none of them."""
    base = settings.queue_name if for_view else None
    snap = records.snapshot(conn, job_id, base) if looks_like_job_id(job_id) else None
    snap = _visible(snap, principal)
    if snap is None:
        raise _not_found(settings, job_id)
    return snap


async def _load_async(
    settings: ApiSettings, aconn: Any, job_id: str, principal: Principal
) -> records.JobSnapshot:
    """The job's snapshot without its wait inputs, or 404 (the event stream's first check)."""
    snap = await records.snapshot_async(aconn, job_id) if looks_like_job_id(job_id) else None
    snap = _visible(snap, principal)
    if snap is None:
        raise _not_found(settings, job_id)
    return snap


async def _view_async(conn: redis.Redis, snap: records.JobSnapshot, path_for: views.PathFor) -> JobOut:
    """The view without a thread, unless it must read RQ's failure (a blocking call)."""
    if views.needs_rq_failure(snap):
        return await run_in_threadpool(views.job_view, conn, snap, path_for)
    return views.job_view(conn, snap, path_for)


def _size_field(request: JobRequest, side: str) -> str:
    """The field to blame for a size: the side the client sent, else the picture it came from."""
    if getattr(request, side) is None and request.init_image is not None:
        return "init_image"
    return side


def _check_sides(settings: ApiSettings, request: JobRequest, params: JobParams) -> None:
    """BAILAN_MAX_WIDTH/HEIGHT hold for a size taken from an init_image too (the request model
    checked only the sides the client sent). A side left to the workers' native size is theirs
    to serve, as before."""
    for side, value, cap in (("width", params.width, settings.max_width),
                             ("height", params.height, settings.max_height)):
        if value is not None and value > cap and _size_field(request, side) == "init_image":
            raise inputs.refuse(
                "init_image",
                f"the picture's {side} of {value} exceeds the limit of {cap}; send width and height to resize it",
            )


def _check_pixels(settings: ApiSettings, request: JobRequest, width: int | None, height: int | None) -> None:
    """The one cap that spans two fields, checked after defaults are known."""
    if width is None or height is None or width * height <= settings.max_pixels:
        return
    # Blame the field the client sent, so the error points at what to change.
    field = "height" if request.width is None and request.height is not None else _size_field(request, "width")
    raise RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("body", field),
                "msg": (
                    f"Value error, width × height = {width} × {height} = {width * height} pixels "
                    f"exceeds the limit of {settings.max_pixels}"
                ),
                "input": getattr(request, field) if field != "init_image" else None,
                "ctx": {"max_pixels": settings.max_pixels},
            }
        ]
    )


def _check_default_steps(settings: ApiSettings, request: JobRequest, params: JobParams) -> None:
    """A model's own default steps (bailan_defaults.json) count against BAILAN_MAX_STEPS too: the
    request model checked only what the client sent."""
    if params.steps > settings.max_steps:
        raise inputs.refuse(
            "steps",
            f"the model's default of {params.steps} steps exceeds the limit of {settings.max_steps}; send steps",
            request.steps,
        )


def _check_img2img_steps(request: JobRequest, params: JobParams) -> None:
    """An image-to-image job must run at least one step (the last int(strength x steps)): the
    worker would fail it, after it had waited its turn in the queue."""
    if params.init_image is not None and img2img_run_steps(params.steps, params.strength) < 1:
        raise inputs.refuse(
            "strength",
            f"strength {params.strength} of {params.steps} steps runs no step (image to image runs the "
            f"last int(strength x steps)); raise strength or steps",
            request.strength,
        )


def _check_device_caps(workers: list[WorkerInfo], request: JobRequest, params: JobParams) -> None:
    """A 422 for a job no live worker would take (bailan.caps: a CPU worker's size and steps caps;
    more images than any worker's batch, which a worker with less GPU memory keeps small)."""
    refusal = device_refusal(workers, params.width, params.height, params.steps, params.num_images)
    if refusal is None:
        return
    field, reason = refusal
    if field == "width" and request.width is None and request.height is not None:
        field = "height"
    raise RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": f"Value error, {reason}",
          "input": getattr(request, field)}]
    )


def _claim(
    settings: ApiSettings, conn: redis.Redis, body: JobRequest, idempotency_key: str | None, owner: str
) -> idempotency.IdempotencyClaim | None:
    if idempotency_key is None:
        return None
    try:
        return idempotency.claim_idempotency(
            settings, conn, idempotency_key, idempotency.request_fingerprint(body), owner
        )
    except idempotency.IdempotencyMismatch:
        raise RequestValidationError(
            [
                {
                    "type": "idempotency_key_reused",
                    "loc": ("header", "Idempotency-Key"),
                    "msg": "this Idempotency-Key was already used with a different request body",
                    "input": idempotency_key,
                }
            ]
        ) from None
    except idempotency.IdempotencyInFlight:
        raise _key_in_flight() from None


def _key_in_flight() -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        "a request with this Idempotency-Key is still being processed; retry in a moment",
        headers={"Retry-After": "1"},
    )


def _no_preview_reason(snap: records.JobSnapshot, step: int | None) -> str:
    params = snap.params
    if params is not None and params.preview_every == 0:
        return f"job {snap.job_id} was submitted with preview_every=0: it has no previews"
    if step is None:
        return f"job {snap.job_id} has no preview yet"
    return f"job {snap.job_id} has no preview for step {step} (not reached yet, not a preview step, or expired)"


# ---------------------------------------------------------------- submit


def _refusal(settings: ApiSettings, exc: limits.Refused) -> HTTPException:
    """The 429 for a submit over one of its key's limits or the queue's."""
    if exc.reason == "rate":
        detail = f"too many submits for this API key (limit {settings.rate_limit}); retry in {exc.retry_after_s} s"
        retry_after = exc.retry_after_s
    elif exc.reason == "key":
        detail = (
            f"this API key already has {int(exc.number)} jobs queued (limit {settings.max_queued_per_key}); "
            "retry once some have started"
        )
        retry_after = settings.retry_after_s
    else:
        detail = f"the queue is full ({int(exc.number)} jobs waiting, limit {settings.max_queue_depth}); retry later"
        retry_after = settings.retry_after_s
    return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail, headers={"Retry-After": str(retry_after)})


def _pick_model(
    settings: ApiSettings, conn: redis.Redis, body: JobRequest, workers: list[WorkerInfo] | None = None
) -> JobRequest:
    """The request with its model named: its own, the server's default, or none (any worker)."""
    if body.model is None:
        if settings.default_model is None:
            return body
        return body.model_copy(update={"model": settings.default_model})
    known = records.known_models(conn, settings.queue_name, workers)
    if body.model not in known:
        names = ", ".join(known) if known else "none yet (no worker has started)"
        raise inputs.refuse("model", f"unknown model {body.model!r}; the models here: {names}", body.model)
    return body


class Submitted(NamedTuple):
    job_id: str
    replayed: bool  # an earlier request with the same Idempotency-Key made it
    params: JobParams | None  # as resolved; None for a replay, which resolves nothing


def submit_job_request(
    body: JobRequest,
    settings: ApiSettings,
    conn: redis.Redis,
    principal: Principal,
    idempotency_key: str | None = None,
    finish: Callable[[JobParams], JobParams] | None = None,
    workers: list[WorkerInfo] | None = None,
) -> Submitted:
    """Check, admit and queue a validated request: the one submit path of every route that
    starts jobs (POST /v1/jobs, the OpenAI-compatible endpoint). Returns the job id and
    whether it is a replay of an earlier request with the same Idempotency-Key.

    `finish`, if given, makes a last change to the params once the server has resolved them
    (the model's defaults applied). `workers`: the live workers, as the route last read them
    (app.store.workers.WorkerCache); read afresh when not given. Raises RequestValidationError
    (a field), HTTPException (409 key in flight, 429 limits).
    """
    workers = workers if workers is not None else live_workers(conn)
    # First the key, fingerprinted on the body as sent: a retry finds its job before anything
    # that may have changed since (the live workers, the default model the server names) can
    # refuse it or tell its body from the first one's.
    sent = body
    claim = _claim(settings, conn, sent, idempotency_key, principal.name)
    if claim is not None and not claim.fresh:
        return Submitted(claim.job_id, True, None)
    submitting = False
    try:
        body = _pick_model(settings, conn, body, workers)
        init, mask, width, height = inputs.check_inputs(
            body.init_image, body.mask_image, body.width, body.height, settings.max_image_bytes,
            settings.max_image_pixels,
        )
        params = records.resolve_params(body, conn, width, height, init, mask, workers)
        if finish is not None:
            params = finish(params)
        _check_sides(settings, body, params)
        _check_pixels(settings, body, params.width, params.height)
        _check_default_steps(settings, body, params)
        _check_img2img_steps(body, params)
        _check_device_caps(serving(workers, body.model), body, params)
        submitting = True
        job_id = records.submit(
            settings, conn, params, principal.name, job_id=claim.job_id if claim else None,
            inputs={name: d.data for name, d in (("init_image", init), ("mask_image", mask)) if d is not None},
            claim_key=claim.redis_key if claim else None,
        )
    except records.ClaimLost:
        # This submit was slow enough that a retry with the key took it over and made the job:
        # that one is this request's job (idempotency), and nothing was queued twice.
        again = _claim(settings, conn, sent, idempotency_key, principal.name)
        if again is None or again.fresh:
            if again is not None:
                idempotency.release_idempotency(conn, again)
            raise _key_in_flight() from None
        return Submitted(again.job_id, True, None)
    except Exception as exc:
        # A Redis error out of the submit may come after Redis ran it (its reply timed out):
        # the claim then stays, so a retry replays the job if it was made, and claims the key
        # afresh after IDEMPOTENCY_IN_FLIGHT_S if not. Released, the retry queued it twice.
        if claim is not None and not (submitting and isinstance(exc, redis.RedisError)):
            idempotency.release_idempotency(conn, claim)
        if isinstance(exc, limits.Refused):
            raise _refusal(settings, exc) from None
        raise
    return Submitted(job_id, False, params)


def _submit(
    body: JobRequest,
    response: Response,
    settings: ApiSettings,
    conn: redis.Redis,
    path_for: views.PathFor,
    idempotency_key: str | None,
    principal: Principal,
    worker_cache: WorkerCache,
) -> tuple[JobOut, bool]:
    """POST /v1/jobs once FastAPI has validated the body against this server's request model;
    with whether Redis answered the job's read-back (if not, the view is as the submit wrote it)."""
    job_id, replayed, params = submit_job_request(body, settings, conn, principal, idempotency_key,
                                                  workers=worker_cache.get(conn))
    if replayed:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    job_id_var.set(job_id)
    log.info("job accepted for %s%s", principal.name, " (idempotent replay)" if replayed else "")
    response.headers["Location"] = views.job_path(path_for, job_id)
    try:
        snap = records.snapshot(conn, job_id, settings.queue_name)
    except redis.RedisError:
        if replayed:
            raise  # a 503: the retry, with its key, finds the job again
        # Accepted already: its view as written, not a 503 that would invite a resubmit.
        assert params is not None  # not a replay
        return views.job_view(conn, records.accepted_snapshot(job_id, params, principal.name), path_for), False
    if snap is None:  # only if Redis lost it within milliseconds
        raise _not_found(settings, job_id)
    return views.job_view(conn, snap, path_for), True


def submit_router(settings: ApiSettings) -> APIRouter:
    """POST /v1/jobs, whose body type (and so its 422s and OpenAPI schema) carries `settings`' caps."""
    submit = APIRouter(prefix=PREFIX, tags=["jobs"])
    request_model = make_request_model(settings)
    limits = (
        f"Limits on this server: width ≤ {settings.max_width}, height ≤ {settings.max_height}, "
        f"width × height ≤ {settings.max_pixels}, steps ≤ {settings.max_steps}, prompt ≤ "
        f"{settings.max_prompt_chars} characters, num_images 1–{MAX_IMAGES}, body ≤ {settings.max_body_bytes} bytes, "
        f"at most {settings.max_queue_depth} queued jobs, {settings.max_queued_per_key} per API key, "
        f"and {settings.rate_limit} submits per API key (`none`: no rate limit)."
    )

    @submit.post(
        "",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=JobOut,
        summary="Submit a generation job",
        description=(
            "Queues a job and answers 202 with its view and a `Location` header to poll. "
            "With `Prefer: wait=N`, the answer (still 202) comes once the job has ended, or after N "
            "seconds, with the view as it then is. "
            "The seed, when omitted, is chosen by the server and reported in `params.seed`; "
            "width and height, when omitted, default to the native size of the model the live "
            "workers serve. " + limits
        ),
        responses={
            200: {"model": JobOut, "description": "Replay of an earlier request with the same Idempotency-Key."},
            # FastAPI's own answer when the bytes cannot even be decoded (not UTF-8, nested too deeply);
            # malformed JSON text is a 422 like any invalid field.
            400: {"model": Detail, "description": "The body could not be read (not UTF-8 text)."},
            409: {"model": Detail, "description": "A request with this Idempotency-Key is still in flight."},
            413: {"model": Detail, "description": "Body too large."},
            429: {
                "model": Detail,
                "description": (
                    "Over this API key's submit rate or queued-job cap, or the queue is full; "
                    "retry after `Retry-After` seconds."
                ),
            },
            **AUTH_RESPONSES,
        },
    )
    async def submit_job(
        request: Request,
        body: Annotated[request_model, Body(openapi_examples=SUBMIT_EXAMPLES)],  # type: ignore[valid-type]
        response: Response,
        jobs: JobAccessDep,
        principal: AuthDep,
        worker_cache: WorkerCacheDep,
        idempotency_key: IdempotencyKey = None,
        prefer: PreferHeader = None,
    ) -> JobOut:
        settings, conn, path_for = jobs.settings, jobs.redis, jobs.links
        view, read_back = await run_in_threadpool(
            _submit, body, response, settings, conn, path_for, idempotency_key, principal, worker_cache
        )
        job_id_var.set(view.id)  # set in the thread's copy of the context; the hold logs here
        wait = hold.prefer_wait(prefer, settings.max_wait_s) if prefer else None
        # Redis failed just now: a hold would fail too, and on a Redis that stopped answering it
        # would wait out the timeout again (its place, its reads) before the same answer.
        if wait is None or not read_back:
            return view
        if view.status in TERMINAL_STATES:
            response.headers["Preference-Applied"] = f"wait={wait}"  # ended already: the answer is the end
            return view
        if not await hold.until_ended(request, jobs, principal, view.id, wait):
            return view
        try:
            snap = await records.snapshot_async(jobs.aredis, view.id, settings.queue_name)
            ended = await _view_async(conn, snap, path_for) if snap is not None else view
        except redis.RedisError:
            return view  # accepted already: the view from the submit, not a 503 that invites a resubmit
        response.headers["Preference-Applied"] = f"wait={wait}"
        return ended

    return submit


# ---------------------------------------------------------------- read


@router.get(
    "/{job_id}",
    name=views.JOB_ROUTE,
    response_model=JobOut,
    summary="A job's status, progress, previews and images",
    description="With `Prefer: wait=N`, answered once the job has ended or after N seconds (app.hold).",
    responses=NOT_FOUND,
)
async def get_job(
    request: Request, job_id: JobId, jobs: JobAccessDep, principal: AuthDep, prefer: PreferHeader = None
) -> Response:
    # The status path that clients poll: one Redis round trip (records.read_snapshot_async), no
    # thread, three dependency solves in all (JobAccess), and the view rendered again only when
    # the job's snapshot changed (views.RenderedViews).
    if not looks_like_job_id(job_id):
        raise _not_found(jobs.settings, job_id)
    raw = await records.read_snapshot_async(jobs.aredis, job_id, jobs.settings.queue_name)
    headers: dict[str, str] = {}
    wait = hold.prefer_wait(prefer, jobs.settings.max_wait_s) if prefer else None
    if wait is not None:
        snap = _visible(records.parse_snapshot(job_id, raw), principal)
        if snap is None:
            raise _not_found(jobs.settings, job_id)
        if snap.state in TERMINAL_STATES:
            headers["Preference-Applied"] = f"wait={wait}"  # ended already: the answer is the end
        elif await hold.until_ended(request, jobs, principal, job_id, wait):
            headers["Preference-Applied"] = f"wait={wait}"
            raw = await records.read_snapshot_async(jobs.aredis, job_id, jobs.settings.queue_name)
    kept = jobs.views.get(job_id, raw)
    if kept is not None:
        owner, body = kept
        if not _may_see(principal, owner):
            raise _not_found(jobs.settings, job_id)
        return Response(body, media_type="application/json", headers=headers)
    snap = _visible(records.parse_snapshot(job_id, raw), principal)
    if snap is None:
        raise _not_found(jobs.settings, job_id)
    view = await _view_async(jobs.redis, snap, jobs.links)
    # Written here rather than by FastAPI, which would validate the model it was just built from.
    body = view.model_dump_json().encode()
    if not views.needs_rq_failure(snap):  # that view also read RQ, outside the snapshot answer
        jobs.views.put(job_id, raw, snap.owner, body)
    return Response(body, media_type="application/json", headers=headers)


@router.get(
    "/{job_id}/events",
    summary="Follow a job as a server-sent event stream",
    description=(
        "A `text/event-stream` that sends `event: job` with the job view (as GET /v1/jobs/{id}) "
        "whenever it changes: queue position, step, new preview, status. It ends after the "
        "view with a final status (succeeded, failed, canceled). `event: gone` means the job "
        "expired; `event: error` that the job store became unreachable. Comment lines keep "
        f"the connection alive every {EVENTS_KEEPALIVE_S:.0f} s. Each API key may hold "
        "BAILAN_MAX_STREAMS_PER_KEY streams open at once (429 beyond)."
    ),
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        **NOT_FOUND,
        429: {"model": Detail, "description": "This API key already holds its cap of open event streams."},
    },
)
async def job_events(request: Request, job_id: JobId, jobs: JobAccessDep, principal: AuthDep) -> StreamingResponse:
    settings, conn, aconn, path_for = jobs.settings, jobs.redis, jobs.aredis, jobs.links
    await _load_async(settings, aconn, job_id, principal)  # 404 before any stream is counted
    stream_id = uuid.uuid4().hex
    opened = await run_in_threadpool(
        limits.open_stream, conn, principal.name, stream_id, settings.max_streams_per_key
    )
    if not opened:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"this API key already has {settings.max_streams_per_key} event streams open; close one, "
            "or poll GET /v1/jobs/{id}",
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    job_events: JobEvents = request.app.state.job_events

    async def stream() -> AsyncIterator[str]:
        last_data = ""
        last_sent = time.monotonic()
        try:
            # Woken by the worker's notifications, the safety poll, and often enough for keepalives.
            async for found in hold.snapshots(job_events, settings, conn, aconn, principal, stream_id, job_id,
                                              base=settings.queue_name):
                snap = _visible(found, principal)
                if snap is None:
                    yield f"event: gone\ndata: {_not_found(settings, job_id).detail}\n\n"
                    return
                data = (await _view_async(conn, snap, path_for)).model_dump_json()
                if data != last_data:
                    yield f"event: job\ndata: {data}\n\n"
                    last_data, last_sent = data, time.monotonic()
                elif time.monotonic() - last_sent >= EVENTS_KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    last_sent = time.monotonic()
        except redis.RedisError as exc:
            # The response has started, so a 503 is no longer possible.
            yield f"event: error\ndata: the job store (Redis) is unavailable: {exc}\n\n"

    # The response gives the place back, also when the client left before the stream began.
    return hold.PlacedStream(stream(), conn, principal, stream_id,
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- cancel


def _nothing_to_cancel(job_id: str, state: JobState) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already ended ({state.value}); nothing to cancel")


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    description=(
        "A queued job is removed from the queue and never runs: 200, status `canceled`. "
        "A running job is asked to stop; its worker does so at its next step: 202, "
        "status still `running` with `cancel_requested: true` until it stops. "
        "A job that already ended: 409, nothing changes. The code follows the job as it is "
        "after the request: 200 whenever it is canceled (a second cancel racing the first), "
        "409 when it ended otherwise meanwhile."
    ),
    responses={
        202: {"model": JobOut, "description": "Running job asked to stop."},
        **NOT_FOUND,
        409: {"model": Detail, "description": "The job already ended."},
    },
)
def cancel_job(job_id: JobId, jobs: JobAccessDep, principal: AuthDep) -> Any:
    settings, conn = jobs.settings, jobs.redis
    snap = _load(settings, conn, job_id, principal)
    try:
        outcome = records.cancel(conn, settings.queue_name, snap, settings.result_ttl_s, Policy.of(settings))
    except records.AlreadyEnded as exc:
        raise _nothing_to_cancel(job_id, exc.state) from None
    view = views.job_view(conn, _load(settings, conn, job_id, principal, for_view=True), jobs.links)
    # The answer is what the job is now, not which branch this request took: a second cancel
    # racing the first finds the job off its queue and asks its (nonexistent) worker to stop,
    # yet the job is canceled; a running job may have ended meanwhile, by the cancel or not.
    if outcome == records.CancelOutcome.canceled or view.status is JobState.canceled:
        code = status.HTTP_200_OK
    elif view.status in TERMINAL_STATES:
        raise _nothing_to_cancel(job_id, view.status)
    else:
        code = status.HTTP_202_ACCEPTED
    return JSONResponse(view.model_dump(mode="json"), status_code=code)


# ---------------------------------------------------------------- previews and images


@router.get(
    "/{job_id}/previews/latest",
    summary="The newest preview of a job",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "JPEG; header X-Bailan-Step names its step."},
        404: {"model": Detail, "description": "Unknown job (or another API key's), or no preview yet."},
    },
)
def latest_preview(job_id: JobId, jobs: JobAccessDep, principal: AuthDep) -> Response:
    snap = _load(jobs.settings, jobs.redis, job_id, principal)
    found = records.latest_preview(jobs.blobs, snap)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, _no_preview_reason(snap, None))
    step, data = found
    return Response(
        data,
        media_type=CONTENT_TYPES[PREVIEW_FORMAT],
        headers={"X-Bailan-Step": str(step), "Cache-Control": "no-store"},
    )


@router.get(
    "/{job_id}/previews/{step}",
    name=views.PREVIEW_ROUTE,
    summary="The preview taken after a given step",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "JPEG preview."},
        404: {"model": Detail, "description": "Unknown job, or no preview for that step (yet or any more)."},
    },
)
def preview(
    job_id: JobId,
    step: Annotated[int, Path(ge=0, description="Step number, as listed in the job's previews.")],
    jobs: JobAccessDep,
    principal: AuthDep,
) -> Response:
    settings = jobs.settings
    snap = _load(settings, jobs.redis, job_id, principal)
    data = records.preview_bytes(jobs.blobs, job_id, step)
    if data is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, _no_preview_reason(snap, step))
    return Response(
        data,
        media_type=CONTENT_TYPES[PREVIEW_FORMAT],
        headers={"X-Bailan-Step": str(step), "Cache-Control": f"private, max-age={settings.preview_ttl_s}"},
    )


@router.get(
    "/{job_id}/images/{index}",
    name=views.IMAGE_ROUTE,
    summary="A final image",
    response_class=Response,
    responses={
        200: {
            "content": {ct: {} for ct in CONTENT_TYPES.values()},
            "description": "Image bytes, encoded as the job's output_format.",
        },
        404: {
            "model": Detail,
            "description": "Unknown job, index out of range, job failed or canceled, or image expired.",
        },
        409: {"model": Detail, "description": "Job still queued or running: the image is not ready yet."},
    },
)
def image(
    job_id: JobId,
    index: Annotated[int, Path(ge=0, description="0-based image index, below num_images.")],
    jobs: JobAccessDep,
    principal: AuthDep,
) -> Response:
    settings, blobs = jobs.settings, jobs.blobs
    snap = _load(settings, jobs.redis, job_id, principal)
    params = snap.params
    if params is not None and index >= params.num_images:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"job {job_id} has {params.num_images} image(s); no index {index}"
        )
    data = records.image_bytes(blobs, job_id, index)
    if data is not None:
        fmt = params.output_format.value if params is not None else "png"
        return Response(
            data,
            media_type=CONTENT_TYPES[fmt],
            headers={
                "Cache-Control": f"private, max-age={settings.result_ttl_s}, immutable",
                "Content-Disposition": f'inline; filename="{job_id}-{index}.{fmt}"',
            },
        )
    state = snap.state
    if state in (JobState.queued, JobState.running):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id} is {state.value}: image {index} is not ready yet"
        )
    if state is JobState.succeeded:
        raise _not_found(settings, job_id)
    raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} {state.value}: it has no images")
