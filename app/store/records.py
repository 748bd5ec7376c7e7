"""A job's record and its RQ job: submit, read, cancel, and the bytes of its images and previews."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from app.settings import ApiSettings
from app.store.common import RECORD_TTL_MARGIN_S, new_job_id, parse_json
from app.store.workers import live_workers, native_size
from bailan.jobs import (
    RQ_FUNC,
    SEED_MAX,
    TERMINAL_STATES,
    JobParams,
    JobRequest,
    JobState,
    Keys,
    RecordField,
    decode_record,
    now,
    public_state,
)


def make_queue(settings: ApiSettings, conn: redis.Redis) -> Queue:
    return Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)


# ---------------------------------------------------------------- submit


class QueueFull(Exception):
    def __init__(self, depth: int) -> None:
        super().__init__(depth)
        self.depth = depth


def resolve_params(
    request: JobRequest,
    conn: redis.Redis,
    width: int | None = None,
    height: int | None = None,
    init: Any = None,
    mask: Any = None,
) -> JobParams:
    """Fill in what the client left to the server: seed and, if known, size (an input
    image's, when it sent one: app.inputs). Input images are described, not carried."""
    values = request.model_dump()
    values["width"] = width if width is not None else values.get("width")
    values["height"] = height if height is not None else values.get("height")
    values["init_image"] = init.info.model_dump() if init is not None else None
    values["mask_image"] = mask.info.model_dump() if mask is not None else None
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
    settings: ApiSettings,
    conn: redis.Redis,
    queue: Queue,
    params: JobParams,
    job_id: str | None = None,
    inputs: dict[str, bytes] | None = None,
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
    for name, data in (inputs or {}).items():
        # With the record, in the same transaction: a worker never finds one without the other.
        pipe.set(Keys.input_image(job_id, name), data, ex=settings.result_ttl_s + RECORD_TTL_MARGIN_S)
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
        raw = parse_json(self.record.get(RecordField.params), None)
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


def queue_position(conn: redis.Redis, queue: Queue, job_id: str) -> int | None:
    """1-based place in the queue, or None when the job is not in it."""
    pos = conn.lpos(queue.key, job_id)
    return pos + 1 if pos is not None else None


def stored_preview_steps(conn: redis.Redis, snap: JobSnapshot) -> list[int]:
    """The snapshot's preview steps whose bytes have not expired yet."""
    if not snap.preview_steps:
        return []
    pipe = conn.pipeline(transaction=False)
    for step in snap.preview_steps:
        pipe.exists(Keys.preview(snap.job_id, step))
    return [s for s, alive in zip(snap.preview_steps, pipe.execute()) if alive]


def rq_failure_message(conn: redis.Redis, job_id: str) -> str:
    """Why a job died without writing its own error (an exception, a timeout): the last line RQ kept."""
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
    return message


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
