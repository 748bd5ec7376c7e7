"""Reading and writing Bailan's state in Redis on behalf of the HTTP routes.

The routes stay thin; everything that knows the key layout or RQ's internals
lives here. Nothing here imports worker code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from app.schemas import ImageRef, JobError, JobOut, ModelOut, PreviewRef, Progress
from app.settings import ApiSettings
from bailan.jobs import (
    RQ_FUNC,
    SEED_MAX,
    TERMINAL_STATES,
    ErrorCode,
    JobParams,
    JobRequest,
    JobState,
    Keys,
    RecordField,
    decode_record,
    dumps,
    now,
    public_state,
)

log = logging.getLogger("bailan.api")

# A queued job's record must outlive its wait in the queue; the worker resets
# the TTL to result_ttl_s when the job ends.
RECORD_TTL_MARGIN_S = 3600
WORKER_SCAN_COUNT = 200


def new_job_id() -> str:
    return uuid.uuid4().hex


def looks_like_job_id(job_id: str) -> bool:
    # Ids are uuid4 hex; refusing anything else early keeps arbitrary client
    # strings out of Redis key names.
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def make_queue(settings: ApiSettings, conn: redis.Redis) -> Queue:
    return Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)


def iso(ts: str | None) -> str | None:
    if not ts:
        return None
    try:
        return datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return None


def _json(raw: str | None, default: Any) -> Any:
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


# ---------------------------------------------------------------- workers


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    model: str
    width: int | None
    height: int | None
    device: str | None
    dtype: str | None
    max_batch: int | None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def live_workers(conn: redis.Redis) -> list[WorkerInfo]:
    """Workers whose heartbeat key has not expired, as they describe themselves."""
    keys = list(conn.scan_iter(match=Keys.WORKER_PATTERN, count=WORKER_SCAN_COUNT))
    if not keys:
        return []
    workers = []
    for key, raw in zip(keys, conn.mget(keys)):
        if raw is None:  # expired between SCAN and MGET
            continue
        info = _json(raw.decode() if isinstance(raw, bytes) else raw, None)
        if not isinstance(info, dict):
            log.warning("ignoring malformed worker key %r", key)
            continue
        key_name = key.decode() if isinstance(key, bytes) else key
        workers.append(
            WorkerInfo(
                name=str(info.get("worker") or key_name.rsplit(":", 1)[-1]),
                model=str(info.get("model") or "unknown"),
                width=_int_or_none(info.get("width")),
                height=_int_or_none(info.get("height")),
                device=str(info["device"]) if info.get("device") is not None else None,
                dtype=str(info["dtype"]) if info.get("dtype") is not None else None,
                max_batch=_int_or_none(info.get("max_batch")),
            )
        )
    return workers


def models_served(workers: list[WorkerInfo]) -> list[ModelOut]:
    by_model: dict[str, list[WorkerInfo]] = {}
    for w in workers:
        by_model.setdefault(w.model, []).append(w)
    out = []
    for name, group in sorted(by_model.items()):
        sizes = {(w.width, w.height) for w in group if w.width and w.height}
        width, height = sizes.pop() if len(sizes) == 1 else (None, None)
        batches = [w.max_batch for w in group if w.max_batch]
        out.append(
            ModelOut(
                model=name,
                width=width,
                height=height,
                workers=len(group),
                devices=sorted({w.device for w in group if w.device}),
                dtypes=sorted({w.dtype for w in group if w.dtype}),
                max_batch=max(batches) if batches else None,
            )
        )
    return out


def native_size(workers: list[WorkerInfo]) -> tuple[int | None, int | None]:
    """The default size, when every live worker agrees on one.

    Workers of different models share one queue, so when they disagree the
    API cannot know which will run the job; the worker then resolves it.
    """
    sizes = {(w.width, w.height) for w in workers if w.width and w.height}
    if len(sizes) == 1:
        return sizes.pop()
    return None, None


# ---------------------------------------------------------------- submit


class QueueFull(Exception):
    def __init__(self, depth: int) -> None:
        super().__init__(depth)
        self.depth = depth


def resolve_params(request: JobRequest, conn: redis.Redis) -> JobParams:
    """Fill in what the client left to the server: seed and, if known, size."""
    values = request.model_dump()
    if values.get("seed") is None:
        # Leave room for seed + i of every image (see JobRequest).
        values["seed"] = secrets.randbelow(SEED_MAX + 2 - int(values.get("num_images") or 1))
    if values.get("width") is None or values.get("height") is None:
        native_w, native_h = native_size(live_workers(conn))
        if values.get("width") is None:
            values["width"] = native_w
        if values.get("height") is None:
            values["height"] = native_h
    return JobParams.model_validate(values)


def submit(
    settings: ApiSettings, conn: redis.Redis, queue: Queue, params: JobParams, job_id: str | None = None
) -> str:
    """Write the record and enqueue the job in one transaction; returns the id.

    One MULTI/EXEC means a worker never pops a job without its record, and a
    client never gets an id for a job that is not queued.
    """
    depth = queue.count
    if depth >= settings.max_queue_depth:
        raise QueueFull(depth)
    job_id = job_id or new_job_id()
    record: dict[str, str] = {
        RecordField.params: params.model_dump_json(),
        RecordField.created_at: repr(now()),
        RecordField.step: "0",
        RecordField.total_steps: str(params.steps),
    }
    if params.width is not None:
        record[RecordField.width] = str(params.width)
    if params.height is not None:
        record[RecordField.height] = str(params.height)
    pipe = conn.pipeline(transaction=True)
    # Explicit MULTI first: RQ calls multi() itself only on an empty pipeline.
    pipe.multi()
    pipe.hset(Keys.job(job_id), mapping=record)
    pipe.expire(Keys.job(job_id), settings.result_ttl_s + RECORD_TTL_MARGIN_S)
    queue.enqueue_call(
        func=RQ_FUNC,
        args=(job_id,),
        job_id=job_id,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.result_ttl_s,
        timeout=-1,  # a job runs as long as it needs; liveness is the heartbeat's business
        retry=Retry(max=settings.abandoned_retries) if settings.abandoned_retries > 0 else None,
        pipeline=pipe,
    )
    pipe.execute()
    return job_id


# ---------------------------------------------------------------- idempotency

# A claim whose job record is missing is a submit still in flight for this
# long (its MULTI has not run yet); after that the job expired and the key may
# start a new one.
IDEMPOTENCY_IN_FLIGHT_S = 10.0


class IdempotencyMismatch(Exception):
    pass


class IdempotencyInFlight(Exception):
    pass


@dataclass(frozen=True)
class IdempotencyClaim:
    redis_key: str
    job_id: str
    fresh: bool  # False: an earlier request with this key created job_id


def request_fingerprint(request: JobRequest) -> str:
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


def claim_idempotency(
    settings: ApiSettings, conn: redis.Redis, header: str, fingerprint: str
) -> IdempotencyClaim:
    """Bind an Idempotency-Key to a new job id, or return the job it already names."""
    redis_key = Keys.idempotency(hashlib.sha256(header.encode()).hexdigest())
    ttl = settings.result_ttl_s + RECORD_TTL_MARGIN_S
    for _ in range(3):
        job_id = new_job_id()
        value = dumps({"job_id": job_id, "fingerprint": fingerprint, "claimed_at": now()})
        if conn.set(redis_key, value, nx=True, ex=ttl):
            return IdempotencyClaim(redis_key, job_id, fresh=True)
        existing = _json((conn.get(redis_key) or b"").decode(), None)
        if not isinstance(existing, dict) or not looks_like_job_id(str(existing.get("job_id"))):
            conn.delete(redis_key)  # expired meanwhile, or garbage: claim afresh
            continue
        if existing.get("fingerprint") != fingerprint:
            raise IdempotencyMismatch()
        if conn.exists(Keys.job(existing["job_id"])):
            return IdempotencyClaim(redis_key, existing["job_id"], fresh=False)
        if now() - float(existing.get("claimed_at") or 0) < IDEMPOTENCY_IN_FLIGHT_S:
            raise IdempotencyInFlight()
        conn.delete(redis_key)  # its job expired: the key may start a new one
    raise IdempotencyInFlight()


def release_idempotency(conn: redis.Redis, claim: IdempotencyClaim) -> None:
    """Undo a fresh claim whose submit failed, so a retry with the key can succeed."""
    try:
        current = _json((conn.get(claim.redis_key) or b"").decode(), None)
        if isinstance(current, dict) and current.get("job_id") == claim.job_id:
            conn.delete(claim.redis_key)
    except redis.RedisError:
        pass  # a retry gets 409 for IDEMPOTENCY_IN_FLIGHT_S, then claims the key afresh


# ---------------------------------------------------------------- read


@dataclass
class JobSnapshot:
    """Raw state of one job, read in one round trip."""

    job_id: str
    record: dict[str, str]
    rq_status: str | None
    preview_steps: list[int]

    @property
    def state(self) -> JobState:
        return public_state(self.rq_status, self.record)

    @property
    def params(self) -> JobParams | None:
        raw = _json(self.record.get(RecordField.params), None)
        try:
            return JobParams.model_validate(raw) if raw is not None else None
        except ValueError:
            return None


def snapshot(conn: redis.Redis, job_id: str) -> JobSnapshot | None:
    pipe = conn.pipeline(transaction=False)
    pipe.hgetall(Keys.job(job_id))
    pipe.hget(Job.key_for(job_id), "status")
    pipe.zrange(Keys.previews(job_id), 0, -1)
    raw_record, raw_status, raw_steps = pipe.execute()
    if not raw_record:
        return None
    steps = []
    for member in raw_steps:
        try:
            steps.append(int(member))
        except ValueError:
            continue
    return JobSnapshot(
        job_id=job_id,
        record=decode_record(raw_record),
        rq_status=raw_status.decode() if isinstance(raw_status, bytes) else raw_status,
        preview_steps=sorted(steps),
    )


def _failure_from_rq(conn: redis.Redis, job_id: str) -> JobError:
    """The error of a job that died without writing its own (an exception, a timeout)."""
    message = "the job failed"
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        result = job.latest_result()
    except NoSuchJobError:
        result = None
    exc = getattr(result, "exc_string", None) if result is not None else None
    if exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        if lines:
            message = lines[-1]
    return JobError(code=ErrorCode.internal.value, message=message)


def job_view(conn: redis.Redis, queue: Queue, snap: JobSnapshot) -> JobOut:
    record = snap.record
    job_id = snap.job_id
    state = snap.state
    params = snap.params

    if params is not None and (params.width is None or params.height is None):
        # The worker writes the size it resolved; show it in the params.
        updates: dict[str, Any] = {}
        for name, field in (("width", RecordField.width), ("height", RecordField.height)):
            if getattr(params, name) is None and (record.get(field) or "").isdigit():
                updates[name] = int(record[field])
        params = params.model_copy(update=updates)

    queue_position = None
    if state is JobState.queued:
        pos = conn.lpos(queue.key, job_id)
        queue_position = pos + 1 if pos is not None else None

    preview_steps = snap.preview_steps
    if preview_steps:
        pipe = conn.pipeline(transaction=False)
        for step in preview_steps:
            pipe.exists(Keys.preview(job_id, step))
        preview_steps = [s for s, alive in zip(preview_steps, pipe.execute()) if alive]

    images = []
    for item in _json(record.get(RecordField.images), []):
        if isinstance(item, dict) and isinstance(item.get("index"), int):
            seed = item.get("seed")
            images.append(
                ImageRef(
                    index=item["index"],
                    url=f"/v1/jobs/{job_id}/images/{item['index']}",
                    seed=seed if isinstance(seed, int) else None,
                )
            )

    error = None
    if state is JobState.failed:
        if record.get(RecordField.error_code):
            error = JobError(
                code=record[RecordField.error_code],
                message=record.get(RecordField.error_message) or record[RecordField.error_code],
            )
        else:
            error = _failure_from_rq(conn, job_id)

    def as_int(field: str, default: int) -> int:
        try:
            return int(record.get(field) or default)
        except ValueError:
            return default

    total = as_int(RecordField.total_steps, params.steps if params else 0)
    unknown = _json(record.get(RecordField.unknown_words), [])
    return JobOut(
        id=job_id,
        status=state,
        progress=Progress(step=as_int(RecordField.step, 0), total_steps=total),
        queue_position=queue_position,
        cancel_requested=bool(record.get(RecordField.cancel_requested)),
        previews=[PreviewRef(step=s, url=f"/v1/jobs/{job_id}/previews/{s}") for s in preview_steps],
        images=images,
        error=error,
        params=params,
        unknown_words=[str(w) for w in unknown] if isinstance(unknown, list) else [],
        model=record.get(RecordField.model) or None,
        worker=record.get(RecordField.worker) or None,
        created_at=iso(record.get(RecordField.created_at)),
        started_at=iso(record.get(RecordField.started_at)),
        finished_at=iso(record.get(RecordField.finished_at)),
    )


# ---------------------------------------------------------------- cancel


class CancelOutcome:
    canceled = "canceled"  # it was queued and will never run
    requested = "requested"  # it is running; the worker stops it at its next step


class AlreadyEnded(Exception):
    def __init__(self, state: JobState) -> None:
        super().__init__(state.value)
        self.state = state


def cancel(conn: redis.Redis, queue: Queue, snap: JobSnapshot, keep_s: int) -> str:
    """Cancel a job; raises AlreadyEnded when there is nothing to cancel."""
    state = snap.state
    if state in TERMINAL_STATES:
        raise AlreadyEnded(state)
    job_key = Keys.job(snap.job_id)
    stamp = repr(now())
    if state is JobState.queued:
        # LREM is the atomic test: if it removed the id no worker can pop it
        # any more; if not, a worker took it a moment ago and it is running.
        removed = conn.lrem(queue.key, 0, snap.job_id)
        if removed or snap.rq_status in ("deferred", "scheduled", None):
            if snap.rq_status is not None:
                try:
                    rq_job = Job.fetch(snap.job_id, connection=conn, serializer=JSONSerializer)
                    rq_job.cancel()
                    # RQ keeps canceled jobs for ever; Bailan keeps them as long as any result.
                    rq_job.cleanup(keep_s, remove_from_queue=False)
                except (NoSuchJobError, InvalidJobOperation):
                    pass
            pipe = conn.pipeline(transaction=True)
            pipe.hsetnx(job_key, RecordField.cancel_requested, stamp)
            pipe.hsetnx(job_key, RecordField.finished_at, stamp)
            pipe.execute()
            return CancelOutcome.canceled
    # Running: only the worker can stop it, between two steps.
    conn.hsetnx(job_key, RecordField.cancel_requested, stamp)
    return CancelOutcome.requested


# ---------------------------------------------------------------- bytes


def preview_bytes(conn: redis.Redis, job_id: str, step: int) -> bytes | None:
    return conn.get(Keys.preview(job_id, step))


def latest_preview(conn: redis.Redis, snap: JobSnapshot) -> tuple[int, bytes] | None:
    # Newest first, skipping any whose bytes already expired.
    for step in reversed(snap.preview_steps):
        data = preview_bytes(conn, snap.job_id, step)
        if data is not None:
            return step, data
    return None


def image_bytes(conn: redis.Redis, job_id: str, index: int) -> bytes | None:
    return conn.get(Keys.image(job_id, index))
