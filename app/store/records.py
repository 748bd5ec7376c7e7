"""A job's record and its RQ job: submit, read, cancel; and the bytes of its images and previews (from the blob store)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from rq import Queue, Retry
from rq.exceptions import AbandonedJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from app import limits
from app.settings import ApiSettings
from app.store import idempotency
from app.store.common import RECORD_TTL_MARGIN_S, new_job_id
from app.store.workers import WorkerInfo, agreed_defaults, live_workers, native_size, parse_worker, serving
from bailan.jobs import (
    RQ_FUNC,
    SEED_MAX,
    TERMINAL_STATES,
    WORKER_LOST_MESSAGE,
    ErrorCode,
    JobParams,
    JobRequest,
    JobState,
    Keys,
    RecordField,
    decode_record,
    now,
    public_state,
)
from bailan import events, presence, webhooks
from bailan.blobs import BlobStore, image_key, preview_key
from bailan.keys import ANONYMOUS
from bailan.metrics import field, metrics_key
from bailan.queues import MODEL_QUEUE_INFIX, RQ_QUEUE_PREFIX, key_queue_name, model_base, registered_models


# ---------------------------------------------------------------- submit


def resolve_params(
    request: JobRequest,
    conn: redis.Redis,
    width: int | None = None,
    height: int | None = None,
    init: Any = None,
    mask: Any = None,
    workers: list[WorkerInfo] | None = None,
) -> JobParams:
    """Fill in what the client left to the server: seed and, if known, size (an input
    image's, when it sent one: app.inputs) and the model's own defaults for steps,
    guidance and scheduler. Input images are described, not carried."""
    values = request.model_dump()
    # Sizes and defaults are the named model's, whatever other models the workers serve.
    workers = serving(workers if workers is not None else live_workers(conn), request.model)
    for name, value in agreed_defaults(workers).model_dump(exclude_none=True).items():
        if name not in request.model_fields_set:
            values[name] = value
    values["width"] = width if width is not None else values.get("width")
    values["height"] = height if height is not None else values.get("height")
    values["init_image"] = init.info.model_dump() if init is not None else None
    values["mask_image"] = mask.info.model_dump() if mask is not None else None
    if values.get("seed") is None:
        # Leave room for seed + i of every image (see JobRequest).
        values["seed"] = secrets.randbelow(SEED_MAX + 2 - int(values.get("num_images") or 1))
    if values.get("width") is None or values.get("height") is None:
        native_w, native_h = native_size(workers)
        if values.get("width") is None:
            values["width"] = native_w
        if values.get("height") is None:
            values["height"] = native_h
    return JobParams.model_validate(values)


def new_record(params: JobParams, owner: str) -> dict[str, str]:
    """A job's record as its submit writes it."""
    record: dict[str, str] = {
        RecordField.params: params.model_dump_json(),
        RecordField.created_at: repr(now()),
        RecordField.step: "0",
        RecordField.total_steps: str(params.steps),
        RecordField.owner: owner,
    }
    if params.width is not None:
        record[RecordField.width] = str(params.width)
    if params.height is not None:
        record[RecordField.height] = str(params.height)
    if params.model is not None:
        # Its queue is the model's: the model that will run it (the view's notice reads it).
        record[RecordField.model] = params.model
    return record


def accepted_snapshot(job_id: str, params: JobParams, owner: str) -> JobSnapshot:
    """A job just queued, as its submit wrote it: its view when Redis cannot be read back."""
    return JobSnapshot(job_id=job_id, record=new_record(params, owner), rq_status="queued", preview_steps=[])


def submit(
    settings: ApiSettings,
    conn: redis.Redis,
    params: JobParams,
    owner: str = ANONYMOUS,
    job_id: str | None = None,
    inputs: dict[str, bytes] | None = None,
    claim_key: str | None = None,
) -> str:
    """Admit the job against `owner`'s limits, then write its record and enqueue it in one
    transaction on `owner`'s own queue; returns the id. Raises limits.Refused.

    With `claim_key` (an Idempotency-Key's claim naming `job_id`), the transaction runs only
    while the claim still names this job: a retry that took the key over after the claim's
    in-flight window (this submit was that slow) made the job already; raises ClaimLost.

    One MULTI/EXEC means a worker never pops a job without its record, and a
    client never gets an id for a job that is not queued. The place admission
    reserved is released in that same MULTI, so the caps hold at every instant.
    """
    job_id = job_id or new_job_id()
    base = model_base(settings.queue_name, params.model)
    queue_name = key_queue_name(base, owner)
    admission = limits.admit(
        conn, base, owner, queue_name, job_id,
        settings.rate, settings.max_queued_per_key, settings.max_queue_depth,
    )
    sent = False
    pipe = conn.pipeline(transaction=True)
    try:
        record = new_record(params, owner)
        queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
        # Watched always: redis-py sends an unwatched transaction again after a lost connection,
        # and again after one that ran queues the job twice. Watched, it raises instead
        # (execute_watched). The claim's change before EXEC fails it too (ClaimLost).
        pipe.watch(Keys.job(job_id), *([claim_key] if claim_key is not None else []))
        if claim_key is not None and not idempotency.names_job(pipe.get(claim_key), job_id):
            raise ClaimLost(job_id)
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
        if queue_name != base:
            # Workers find key queues here (bailan.queues.fair_order).
            pipe.sadd(Keys.key_queues(base), queue_name)
        # Should a worker take it off the queue and never start it, the reaper finds it here.
        pipe.zadd(Keys.waiting(queue_name), {job_id: now()})
        admission.release_in(pipe)
        sent = True
        try:
            execute_watched(pipe)  # a lost answer: a Redis error, whose 503 keeps the claim for a retry
        except redis.WatchError:
            sent = False  # EXEC refused it (the claim changed): nothing was queued
            raise ClaimLost(job_id) from None
    except BaseException as exc:
        # A transaction sent whose answer never came may have queued the job: its submit counts.
        admission.release(conn, refund=not sent, later=isinstance(exc, redis.TimeoutError))
        raise
    finally:
        pipe.reset()
    return job_id


class ClaimLost(Exception):
    """An Idempotency-Key's claim no longer names the job being submitted (records.submit)."""


def execute_watched(pipe: redis.client.Pipeline) -> list[Any]:
    """EXEC a transaction that WATCHes its keys, which redis-py never sends twice. Raises
    WatchError where a watched key changed (the transaction did not run), and a Redis error
    where the connection broke: redis-py says WatchError for that too, yet the transaction may
    have run, its answer lost."""
    try:
        return pipe.execute()
    except redis.WatchError as exc:
        if isinstance(exc.__context__, redis.RedisError):
            raise redis.ConnectionError(str(exc)) from exc
        raise


# ---------------------------------------------------------------- read

# A job's whole state in one round trip: its record, RQ's status and queue,
# the previews whose blobs have not expired (scored by expiry), and its place in its queue.
# For a queued job that names its model, also whether a live worker serves that model; for a
# queued job whose base queue is given, what its wait estimate needs (app.store.wait): the
# live workers' descriptions, and the lengths of the other queues served with its own (its
# base queues, the model's and the plain one, and their API keys' queues: bailan.queues).
# KEYS: record, RQ job hash, preview steps. ARGV: job id, now (unix s), base queue ("": no
# wait inputs). The key layout's fixed parts are written into the source (_lua_constants):
# each argument costs the API's client an encoding on every poll.
_SNAPSHOT_SOURCE = """
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then return false end
local rq = redis.call('HMGET', KEYS[2], 'status', 'origin')
local alive = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '+inf')
local position = false
local served = false
local waiting = false
if rq[1] == 'queued' and rq[2] then
  position = redis.call('LPOS', RQ_QUEUE_PREFIX .. rq[2], ARGV[1])
  local model = redis.call('HGET', KEYS[1], 'model')
  if model then served = redis.call('EXISTS', MODEL_LIVE_PREFIX .. model) end
  if position and ARGV[3] ~= '' then
    local workers = {}
    -- Presence is the key's TTL; the scores (both on Redis' clock) only narrow the names
    -- down (bailan.presence).
    for _, name in ipairs(redis.call('ZRANGEBYSCORE', WORKERS_KEY, presence_since(), '+inf')) do
      local description = redis.call('GET', WORKER_PREFIX .. name)
      if description then
        table.insert(workers, name)
        table.insert(workers, description)
      end
    end
    local roots = {ARGV[3]}
    if model then
      table.insert(roots, ARGV[3] .. MODEL_QUEUE_INFIX .. model)
    else
      -- Every worker counts for a job that names no model, and each splits its turns between
      -- the plain queue and its model's: every model's queue is work ahead of it too.
      for _, name in ipairs(redis.call('SMEMBERS', MODELS_PREFIX .. ARGV[3])) do
        table.insert(roots, ARGV[3] .. MODEL_QUEUE_INFIX .. name)
      end
    end
    local seen = {[rq[2]] = true}
    local lengths = {}
    local function count(name)
      if not seen[name] then
        seen[name] = true
        table.insert(lengths, redis.call('LLEN', RQ_QUEUE_PREFIX .. name))
      end
    end
    for _, root in ipairs(roots) do
      count(root)
      for _, name in ipairs(redis.call('SMEMBERS', KEY_QUEUES_PREFIX .. root)) do count(name) end
    end
    waiting = {workers, lengths}
  end
end
return {record, rq[1], rq[2], alive, position, served, waiting}
"""


def _lua_constants(**values: str) -> str:
    """`local NAME = "value"` lines (JSON's string syntax is Lua's for plain ASCII)."""
    lines = []
    for name, value in values.items():
        literal = json.dumps(value)
        if not value.isascii() or "\\u" in literal:
            raise ValueError(f"{name}: {value!r} cannot be written into the snapshot script")
        lines.append(f"local {name} = {literal}")
    return "\n".join(lines) + "\n"


_SNAPSHOT = _lua_constants(
    RQ_QUEUE_PREFIX=RQ_QUEUE_PREFIX,
    MODEL_LIVE_PREFIX=Keys.model_live(""),
    KEY_QUEUES_PREFIX=Keys.key_queues(""),
    MODEL_QUEUE_INFIX=MODEL_QUEUE_INFIX,
    WORKERS_KEY=Keys.workers(),
    WORKER_PREFIX=Keys.worker(""),
    MODELS_PREFIX=Keys.models(""),
) + presence.LUA_PRESENCE_SINCE + _SNAPSHOT_SOURCE


@dataclass
class JobSnapshot:
    """Raw state of one job, read in one round trip."""

    job_id: str
    record: dict[str, str]
    rq_status: str | None
    preview_steps: list[int]  # steps whose preview blobs had not expired, ascending
    origin: str | None = None  # the RQ queue it was enqueued on (its key's)
    queue_index: int | None = None  # 0-based place in that queue, when it is in it
    # Queued for a named model: whether a live worker serves it (None when not asked).
    model_served: bool | None = None
    # Queued, read with its base queue: the live workers, and the lengths of the other
    # queues its workers serve (app.store.wait); None when not read.
    live_workers: list[WorkerInfo] | None = None
    other_queue_lengths: list[int] | None = None

    @property
    def state(self) -> JobState:
        return public_state(self.rq_status, self.record)

    @property
    def owner(self) -> str:
        return self.record.get(RecordField.owner) or ANONYMOUS

    @property
    def params(self) -> JobParams | None:
        raw = self.record.get(RecordField.params)
        return _parse_params(raw) if raw else None


# A job's params never change once written, and each poll of it would parse them again.
# JobParams is frozen, so one parsed copy can serve every reader.
@functools.lru_cache(maxsize=1024)
def _parse_params(raw: str) -> JobParams | None:
    try:
        return JobParams.model_validate_json(raw)
    except ValueError:
        return None


# The snapshot script's answer as the client decoded it: nested lists of bytes, ints and None.
RawSnapshot = Any


def _snapshot_args(job_id: str, base: str | None) -> tuple[list[str], list[str]]:
    return [Keys.job(job_id), Job.key_for(job_id), Keys.previews(job_id)], [job_id, repr(now()), base or ""]


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def parse_snapshot(job_id: str, raw: RawSnapshot) -> JobSnapshot | None:
    if not raw:
        return None
    flat, rq_status, origin, alive, position, served, waiting = raw
    steps = []
    for member in alive:
        try:
            steps.append(int(member))
        except ValueError:
            continue
    workers = lengths = None
    if waiting:
        pairs, lengths = waiting
        found = (parse_worker(Keys.worker(_text(name) or ""), value) for name, value in zip(pairs[::2], pairs[1::2]))
        workers = [w for w in found if w is not None]
        lengths = [int(n) for n in lengths]
    return JobSnapshot(
        job_id=job_id,
        record=decode_record(dict(zip(flat[::2], flat[1::2]))),
        rq_status=_text(rq_status),
        preview_steps=sorted(steps),
        origin=_text(origin),
        queue_index=int(position) if position is not None else None,
        model_served=bool(served) if served is not None else None,
        live_workers=workers,
        other_queue_lengths=lengths,
    )


# EVALSHA names the script by this; Redis learns its source on the first NOSCRIPT.
_SNAPSHOT_SHA = hashlib.sha1(_SNAPSHOT.encode()).hexdigest()


def snapshot(conn: redis.Redis, job_id: str, base: str | None = None) -> JobSnapshot | None:
    """The job's state; with `base` (its service's base queue, BAILAN_QUEUE), a queued job's
    also carries what its wait estimate needs (app.store.wait)."""
    keys, args = _snapshot_args(job_id, base)
    try:
        raw = conn.evalsha(_SNAPSHOT_SHA, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:  # a new or restarted Redis
        conn.script_load(_SNAPSHOT)
        raw = conn.evalsha(_SNAPSHOT_SHA, len(keys), *keys, *args)
    return parse_snapshot(job_id, raw)


async def snapshot_async(conn: redis.asyncio.Redis, job_id: str, base: str | None = None) -> JobSnapshot | None:
    """`snapshot` on the event loop: the status path never waits for a thread, and reads that
    arrive together share one pipeline (SnapshotBatch)."""
    return parse_snapshot(job_id, await read_snapshot_async(conn, job_id, base))


async def read_snapshot_async(conn: redis.asyncio.Redis, job_id: str, base: str | None = None) -> RawSnapshot:
    """The script's answer for `job_id` as Redis gave it, unparsed (parse_snapshot): equal
    answers make equal snapshots, so a reader can keep what it built from one (views.RenderedViews)."""
    batch = _batches.get(conn)
    if batch is None:
        batch = _batches[conn] = SnapshotBatch(conn)
    return await batch.read(job_id, base)


# Reads per pipeline: a larger batch goes as several, one after the other, so that no reader
# waits for Redis to run more scripts than this ahead of its own.
MAX_BATCH = 128


class SnapshotBatch:
    """Snapshot reads on one asyncio client, sent together: every read issued while the event
    loop works through one round of ready tasks goes out as one pipeline of EVALSHAs.

    A read on redis-py's asyncio client costs tens of microseconds of the
    API's CPU on top of Redis' own work (a pooled connection taken and given
    back, a write and a read); under polling load that was the largest part of
    GET /v1/jobs/{id}. Each read is still one round trip, and a lone read waits
    for nothing: the flush runs as soon as the loop has started the tasks that
    were ready with it.
    """

    def __init__(self, conn: redis.asyncio.Redis) -> None:
        # Weakly: the batch lives in a WeakKeyDictionary keyed by this client.
        self._conn = weakref.ref(conn)
        self.pending: list[tuple[list[str], list[str], asyncio.Future[Any]]] = []
        # The flush that will take `pending` when it starts; None once it has (or before any).
        self._next: asyncio.Task[None] | None = None
        # The loop holds tasks weakly: a flush nobody referenced could vanish mid-read.
        self._flushing: set[asyncio.Task[None]] = set()

    @property
    def conn(self) -> redis.asyncio.Redis:
        conn = self._conn()
        if conn is None:  # only while the client is being collected, with no reader left
            raise RuntimeError("the snapshot batch's Redis client is gone")
        return conn

    async def read(self, job_id: str, base: str | None) -> Any:
        """The script's raw answer for `job_id`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        keys, args = _snapshot_args(job_id, base)
        self.pending.append((keys, args, future))
        if self._next is None or self._next.done():
            # None waiting to start, or the one that was died with its event loop before it ran.
            self._next = task = loop.create_task(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        return await future

    async def _flush(self) -> None:
        self._next = None
        batch, self.pending = self.pending, []
        # A reader from an event loop that has ended (the client outlived it) is nobody's now.
        loop = asyncio.get_running_loop()
        batch = [entry for entry in batch if entry[2].get_loop() is loop]
        try:
            for start in range(0, len(batch), MAX_BATCH):
                await self._send(batch[start : start + MAX_BATCH])
        finally:
            # Cancelled (the app shutting down): no reader is left waiting for ever.
            for _, _, future in batch:
                future.cancel()

    async def _send(self, batch: list[tuple[list[str], list[str], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._evalsha_all(batch)
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                # A restarted (or flushed) Redis lost the script: load it and read again.
                await self.conn.script_load(_SNAPSHOT)
                results = await self._evalsha_all(batch)
        except Exception as exc:  # every reader gets it: a 503 each
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results):
            if future.done():  # its reader was cancelled (the client went away)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _evalsha_all(self, batch: list[tuple[list[str], list[str], asyncio.Future[Any]]]) -> list[Any]:
        pipe = self.conn.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(_SNAPSHOT_SHA, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)


_batches: weakref.WeakKeyDictionary[Any, SnapshotBatch] = weakref.WeakKeyDictionary()


def queue_position(snap: JobSnapshot) -> int | None:
    """1-based place in its API key's own queue, or None when the job is not in it.

    Each key's jobs wait in their own queue, served round robin with the other
    keys' (bailan.queues); the place is among the key's own jobs.
    """
    return snap.queue_index + 1 if snap.queue_index is not None else None


def rq_failure(conn: redis.Redis, job_id: str) -> tuple[ErrorCode, str]:
    """Why a job died without writing its own error, from what RQ kept: the error code and
    message. A job whose worker stopped renewing its lease (RQ failed it as abandoned, and the
    reaper has yet to write worker_lost into its record) is worker_lost already; anything else
    (an exception, a timeout) is internal, with the last line of RQ's traceback."""
    message = "the job failed"
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        result = job.latest_result()
    except NoSuchJobError:
        result = None
    exc = getattr(result, "exc_string", None) if result is not None else None
    if exc and AbandonedJobError.__name__ in str(exc):
        return ErrorCode.worker_lost, WORKER_LOST_MESSAGE
    if exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        if lines:
            message = lines[-1]
    return ErrorCode.internal, message


# ---------------------------------------------------------------- cancel


class CancelOutcome:
    canceled = "canceled"  # it was queued and will never run
    requested = "requested"  # it is running; the worker stops it at its next step


# Tries at ending a canceled job's record while something else writes it.
CANCEL_TRIES = 5
# How long a cancel that finds another one ending the job waits for that end (milliseconds,
# normally); should the other fail, the job's worker ends it canceled instead.
CANCEL_WAIT_S = 1.0

# KEYS: the job's queue, its record. ARGV: the job's id, this cancel's stamp. How many ids it
# removed: 1 also where this cancel's own first sending removed it (the answer lost, the call
# sent again), which a plain LREM would answer 0, as if a worker had taken the job.
_TAKE_OFF_QUEUE = f"""
if redis.call('HGET', KEYS[2], '{RecordField.taken_off_queue}') == ARGV[2] then return 1 end
local removed = redis.call('LREM', KEYS[1], 0, ARGV[1])
if removed > 0 then redis.call('HSET', KEYS[2], '{RecordField.taken_off_queue}', ARGV[2]) end
return removed
"""


class AlreadyEnded(Exception):
    def __init__(self, state: JobState) -> None:
        super().__init__(state.value)
        self.state = state


def _end_canceled(conn: redis.Redis, base: str, snap: JobSnapshot, keep_s: int, hooks: webhooks.Policy | None,
                  stamp: str) -> None:
    """End a job taken off its queue (cancel): RQ's status, then the record, its news and webhook."""
    if snap.rq_status is not None:
        try:
            rq_job = Job.fetch(snap.job_id, connection=conn, serializer=JSONSerializer)
            rq_job.cancel()
            # RQ keeps canceled jobs for ever; Bailan keeps them as long as any result.
            rq_job.cleanup(keep_s, remove_from_queue=False)
        except (NoSuchJobError, InvalidJobOperation):
            pass
    # Watched, so never sent twice (its webhook queued twice, the cancel counted twice).
    key = Keys.job(snap.job_id)
    model = snap.record.get(RecordField.model)
    policy = hooks if hooks is not None else webhooks.Policy.defaults(base, keep_s)
    with conn.pipeline(transaction=True) as pipe:
        for _ in range(CANCEL_TRIES):
            pipe.watch(key)
            if pipe.hexists(key, RecordField.finished_at):
                return  # another cancel of it ended it, and counted it
            pipe.multi()
            pipe.hsetnx(key, RecordField.finished_at, stamp)
            # Kept as long as any ended job's (its submit's TTL ran from then, maybe hours ago).
            pipe.expire(key, keep_s)
            # The client's input images (megabytes, possibly) are spent: the job never runs.
            pipe.delete(*Keys.input_images(snap.job_id))
            events.notify(pipe, snap.job_id)
            # No worker ever sees this job: the API counts its final state (bailan.metrics).
            # Labelled with the model the job named, as a worker labels what it ends; none named, none.
            pipe.hincrbyfloat(metrics_key(base), field("bailan_jobs_finished_total",
                                                       {"status": "canceled", **({"model": model} if model else {})}), 1)
            webhooks.enqueue(conn, pipe, policy, snap.job_id, webhooks.WebhookEvent.completed, snap.params)
            try:
                execute_watched(pipe)
                return
            except redis.WatchError:
                continue  # the record changed before EXEC: look again
    # Never seen: cancel() puts a job it took off its queue back, for its worker to end canceled.
    raise redis.WatchError(f"job {snap.job_id}'s record kept changing while it was being ended canceled")


def _taken_by_another_cancel(conn: redis.Redis, job_key: str) -> bool:
    """Whether another cancel took the queued job off its queue a moment ago (its stamp is on
    the record): it ends the job canceled. Waits for that end, at most CANCEL_WAIT_S, so that
    this cancel's answer shows it."""
    if conn.hget(job_key, RecordField.taken_off_queue) is None:
        return False
    deadline = time.monotonic() + CANCEL_WAIT_S
    while not conn.hexists(job_key, RecordField.finished_at) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def cancel(
    conn: redis.Redis, base: str, snap: JobSnapshot, keep_s: int, hooks: webhooks.Policy | None = None
) -> str:
    """Cancel a job; raises AlreadyEnded when there is nothing to cancel.

    A queued job ends here, so its `completed` webhook is queued here (by `hooks`,
    default: the defaults); a running one's comes from its worker when it stops.
    """
    state = snap.state
    if state in TERMINAL_STATES:
        raise AlreadyEnded(state)
    job_key = Keys.job(snap.job_id)
    stamp = repr(now())
    if state is JobState.queued:
        # The request first: should a step below fail, the worker that takes the job ends it canceled.
        conn.hsetnx(job_key, RecordField.cancel_requested, stamp)
        # LREM is the atomic test: if it removed the id no worker can pop it
        # any more; if not, a worker took it a moment ago and it is running.
        queue_key = RQ_QUEUE_PREFIX + (snap.origin or base)
        removed = conn.register_script(_TAKE_OFF_QUEUE)(keys=[queue_key, job_key], args=[snap.job_id, stamp])
        if not removed and _taken_by_another_cancel(conn, job_key):
            return CancelOutcome.canceled
        if removed or snap.rq_status in ("deferred", "scheduled", None):
            try:
                _end_canceled(conn, base, snap, keep_s, hooks, stamp)
            except BaseException:
                if removed:
                    # Out of its queue, yet queued to RQ: nothing would ever end it. Back at the
                    # head, a worker takes it at once and ends it canceled (the request above).
                    with contextlib.suppress(redis.RedisError):
                        conn.lpush(queue_key, snap.job_id)
                raise
            return CancelOutcome.canceled
    # Running: only the worker can stop it, between two steps.
    pipe = conn.pipeline(transaction=True)
    pipe.hsetnx(job_key, RecordField.cancel_requested, stamp)
    events.notify(pipe, snap.job_id)
    pipe.execute()
    return CancelOutcome.requested


# ---------------------------------------------------------------- bytes


# The bytes live in the blob store (bailan.blobs), written by the worker.


def preview_bytes(blobs: BlobStore, job_id: str, step: int) -> bytes | None:
    return blobs.get(preview_key(job_id, step))


def latest_preview(blobs: BlobStore, snap: JobSnapshot) -> tuple[int, bytes] | None:
    # Newest first, skipping any whose blob already expired.
    for step in reversed(snap.preview_steps):
        data = preview_bytes(blobs, snap.job_id, step)
        if data is not None:
            return step, data
    return None


def image_bytes(blobs: BlobStore, job_id: str, index: int) -> bytes | None:
    return blobs.get(image_key(job_id, index))


# ---------------------------------------------------------------- models


def known_models(conn: redis.Redis, base: str, workers: list[WorkerInfo] | None = None) -> list[str]:
    """Names a request may pick: every model a worker serves or ever served (bailan.queues).
    `workers`: the live workers if the caller has read them (app.store.workers.WorkerCache)."""
    workers = workers if workers is not None else live_workers(conn)
    return sorted({*registered_models(conn, base), *(w.model for w in workers)})
