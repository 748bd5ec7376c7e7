"""The sweep for jobs whose worker died, used by the API and by every worker.

A running job's entry in RQ's started registry is a lease its worker renews.
When a worker dies (even kill -9) its leases run out; `reap_abandoned` then
requeues the job while retries are left, or fails it with `worker_lost`.

The worker calls `reap_abandoned` from its liveness loop. The API runs it on
the `Reaper` thread, so a dead worker's jobs fail even when no other worker is
alive to notice. A job whose worker died after writing its outcome to the record,
before telling RQ, is not run again: it ends in RQ as its record says
(`end_in_rq`, which the worker's slots use too). Like the rest of bailan/, this
never imports torch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import as_text

from bailan import events, webhooks
from bailan.blobs import BlobStore
from bailan.jobs import WORKER_LOST_MESSAGE, ErrorCode, JobState, Keys, RecordField, decode_record, ended_state, now
from bailan.metrics import field, metrics_key
from bailan.queues import RQ_QUEUE_PREFIX, all_queue_names

# The API's thread is what logs here; the name predates this module.
log = logging.getLogger("bailan.api.reaper")


def reap_abandoned(
    connection: redis.Redis,
    queue_name: str,
    keep_s: int = 86400,
    hooks: webhooks.Policy | None = None,
    interval_s: float = 10.0,
    after_outage: bool = False,
) -> list[str]:
    """Fail (or requeue, while retries are left) jobs whose worker stopped heartbeating.

    A running job's entry in RQ's started registry is scored with the time its
    worker's heartbeat expires; RQ's own cleanup moves expired entries on. RQ
    runs it only every ten minutes, so the API and every worker call this every
    `interval_s` instead. Returns the ids it found abandoned. Also forgets
    canceled jobs older than `keep_s` (RQ never trims that registry). A job it
    fails gets its `completed` webhook, queued by `hooks` (default: the defaults).

    After an outage, sweeping waits one interval: leases ran out meanwhile
    while their workers still ran the jobs, and the workers renew them within a
    second of reaching Redis again. An outage is seen two ways: the caller saw
    Redis fail itself (`after_outage`), or Redis says nobody swept for two
    intervals (it was down or unreachable for all, or every process was
    stopped). The hold is a key in Redis, so every sweeper obeys it, including
    a process that started after the outage and never saw it.
    """
    hooks = hooks if hooks is not None else webhooks.Policy.defaults(queue_name, keep_s)
    # One sweeper at a time: two concurrent RQ cleanups would both requeue a job.
    lock = Keys.reaper_lock(queue_name)
    token = uuid.uuid4().hex
    if not connection.set(lock, token, nx=True, px=30_000):
        return []
    try:
        if _holding_back(connection, queue_name, interval_s, after_outage):
            return []
        reaped: list[str] = []
        # Each API key's jobs run from its own queue (bailan.queues), and RQ keeps a
        # started and a canceled registry per queue: visit every one.
        for name in all_queue_names(connection, queue_name):
            reaped += _reap_queue(connection, name, keep_s, hooks, queue_name)
            recovered = _recover_lost(connection, name, queue_name)
            if recovered:
                log.warning("reaper: jobs taken off queue %s but never started put back: %s", name,
                            ", ".join(recovered))
        return reaped
    finally:
        # Only our own: a sweep slower than the lock's 30 s would free another sweeper's.
        _release(keys=[lock], args=[token], client=connection)


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_release = redis.client.Script(None, _RELEASE.encode())  # type: ignore[arg-type]


# Whether sweeps hold back (reap_abandoned): 0 no; 1 yes, a hold is on; 2 yes, a silence just
# ended (or the caller saw an outage itself, ARGV[3]). Redis' own clock, so sweepers on hosts
# whose clocks disagree read the same silence.
_HOLD_BACK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local previous = tonumber(redis.call('GET', KEYS[1]))
redis.call('SET', KEYS[1], string.format('%.6f', now))
local silence = previous ~= nil and now - previous > tonumber(ARGV[1])
if silence or ARGV[3] == '1' then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  return {2, tostring(previous ~= nil and now - previous or 0)}
end
return {redis.call('EXISTS', KEYS[2]), '0'}
"""
# Bytes, so no client is needed to encode it; each call names its client.
_hold_back = redis.client.Script(None, _HOLD_BACK.encode())  # type: ignore[arg-type]


def _holding_back(connection: redis.Redis, queue_name: str, interval_s: float, after_outage: bool) -> bool:
    """Whether sweeps wait for workers to renew their leases after a silence or an outage (reap_abandoned)."""
    verdict, silence = _hold_back(
        keys=[Keys.reaper_seen(queue_name), Keys.reaper_hold(queue_name)],
        args=[2 * interval_s, max(1, int(interval_s * 1000)), int(after_outage)],
        client=connection,
    )
    if int(verdict) == 2:
        why = "Redis was unreachable from here" if after_outage else f"no sweep by anyone for {float(silence):.0f} s"
        log.warning("reaper: %s; sweeping again in %.0f s, once workers renewed their leases", why, interval_s)
    return int(verdict) != 0


def _reap_queue(
    connection: redis.Redis, queue_name: str, keep_s: int, hooks: webhooks.Policy, base: str
) -> list[str]:
    connection.zremrangebyscore(CanceledJobRegistry(queue_name, connection=connection).key, 0, now() - keep_s)
    registry = StartedJobRegistry(queue_name, connection=connection, serializer=JSONSerializer)
    # One cutoff for every step: a lease that ran out after it is left to the next sweep, and
    # never reaches RQ's cleanup without passing _end_as_recorded first.
    cutoff = now()
    expired = registry.get_expired_job_ids(cutoff)
    if not expired:
        return []
    settled = _end_as_recorded(connection, registry, expired, keep_s, cutoff)
    if settled:
        expired = [job_id for job_id in expired if job_id not in settled]
        if not expired:
            return []
    # RQ requeues a job with retries left to its origin: this same queue.
    try:
        registry.cleanup(timestamp=cutoff)
    except redis.ConnectionError as exc:
        # Its answer may be lost after it ran, and it is never sent again (a requeue twice runs the
        # job twice): what it did is read back below, so the requeued job still loses its dead
        # attempt's traces. A Redis that is down fails the read too, and the sweep with it.
        log.warning("reaper: RQ's cleanup of %s got no answer (%s); reading what it did", queue_name, exc)
    check = connection.pipeline()
    for job_id in expired:
        check.hget(f"rq:job:{job_id}", "status")
        check.hmget(Keys.job(job_id), RecordField.params, RecordField.model)  # params in every record
    answers = check.execute()
    pipe = webhooks.transaction(connection)
    lost: list[str] = []
    for job_id, status, (params, model) in zip(expired, answers[::2], answers[1::2]):
        key = Keys.job(job_id)
        if params is None:
            continue  # the record already expired; don't recreate a stub of it
        status = as_text(status) if status is not None else None
        # No RQ hash: RQ's cleanup could neither requeue nor fail it; its worker is gone all the same.
        if status in (JobStatus.FAILED.value, None):
            pipe.hsetnx(key, RecordField.error_code, ErrorCode.worker_lost.value)
            pipe.hsetnx(key, RecordField.error_message, WORKER_LOST_MESSAGE)
            pipe.hsetnx(key, RecordField.finished_at, str(now()))
            pipe.expire(key, keep_s)
            # The model its worker ran it on (written at its start), as that worker labels its ends.
            labels = {"status": "failed", "error": ErrorCode.worker_lost.value,
                      **({"model": as_text(model)} if model else {})}
            pipe.hincrbyfloat(metrics_key(base), field("bailan_jobs_finished_total", labels), 1)
            lost.append(job_id)
        elif status == JobStatus.QUEUED.value:
            pipe.hincrbyfloat(metrics_key(base), "bailan_jobs_requeued_total", 1)
            pipe.zadd(Keys.waiting(queue_name), {job_id: now()})  # waiting again (_recover_lost)
            # Requeued: it runs afresh, so the dead attempt's traces go; and the model its worker
            # wrote, unless the job named it: any model's worker may take it now (its view's
            # waiting_for_worker and eta_s read it).
            # An end written after _end_as_recorded looked (the worker finished as it was reaped)
            # goes too: the job's next start would otherwise read as ended (public_state).
            traces = [RecordField.started_at, RecordField.step, RecordField.worker, RecordField.finished_at,
                      RecordField.images]
            if not _names_a_model(params):
                traces.append(RecordField.model)
            pipe.hdel(key, *traces)
            pipe.delete(Keys.previews(job_id))
        events.notify(pipe, job_id)
    # Queued with the worker_lost end it reports, in the same transaction.
    webhooks.enqueue_completed(connection, pipe, hooks, lost)
    pipe.execute()
    return expired


_RQ_STATUS = {JobState.succeeded: JobStatus.FINISHED, JobState.failed: JobStatus.FAILED,
              JobState.canceled: JobStatus.CANCELED}


def end_in_rq(job: Job, state: JobState, ttl: int, pipe: redis.client.Pipeline, exc_string: str = "") -> None:
    """Queue on `pipe` a job's final RQ status and its registry, both kept `ttl` seconds (RQ
    keeps canceled jobs for ever; Bailan as long as any result). The worker's ending, and the
    reaper's for a job whose worker recorded its end and died; leases are the caller's."""
    registry = {JobState.succeeded: FinishedJobRegistry, JobState.failed: FailedJobRegistry,
                JobState.canceled: CanceledJobRegistry}[state](job.origin, connection=job.connection,
                                                               serializer=job.serializer)
    job.set_status(_RQ_STATUS[state], pipeline=pipe)
    if state is JobState.succeeded:
        job.save(pipeline=pipe, include_meta=False, include_result=False)
        registry.add(job, ttl, pipeline=pipe)
    elif state is JobState.failed:
        registry.add(job, ttl, exc_string=exc_string, pipeline=pipe)  # saves the job too
    else:
        registry.add(job, pipeline=pipe)
    job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
_ENDED_IN_RQ = {status.value for status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED,
                                            JobStatus.STOPPED)}


def _end_as_recorded(connection: redis.Redis, registry: StartedJobRegistry, job_ids: list[str],
                     keep_s: int, cutoff: float) -> list[str]:
    """End in RQ, as their records say, the jobs among `job_ids` (leases run out) whose worker
    wrote their outcome and stopped before RQ's bookkeeping, drop the leases of jobs RQ
    already ended, and the stale leases of jobs no dead worker holds; returns their ids, which
    RQ's cleanup must not see.

    Their clients saw them end (bailan.jobs.public_state) and their `completed` webhook went
    with the record: RQ's cleanup would run them again, or fail a job that succeeded.
    RQ's cleanup acts on a job for any lease of it that ran out, whatever holds the job now.
    """
    check = connection.pipeline(transaction=False)
    for job_id in job_ids:
        check.hget(f"rq:job:{job_id}", "status")
        check.hgetall(Keys.job(job_id))
    answers = check.execute()
    members = [as_text(m) for m in connection.zrangebyscore(registry.key, 0, cutoff)]
    # Leases still running: the job's holder is alive.
    live = {as_text(m).partition(":")[0] for m in connection.zrangebyscore(registry.key, f"({cutoff}", "+inf")}
    ended: list[str] = []
    stale: list[str] = []
    for job_id, status, raw in zip(job_ids, answers[::2], answers[1::2]):
        record = decode_record(raw)
        leases = [m for m in members if m.partition(":")[0] == job_id]  # one per execution, "id:execution"
        status = as_text(status) if status is not None else None
        if status in _ENDED_IN_RQ:
            # Ended in RQ, its lease left behind (its worker's last transaction failed after RQ
            # forgot the execution): RQ's cleanup does not look at the status and would run it again.
            if leases:
                connection.zrem(registry.key, *leases)
            ended.append(job_id)
            continue
        if status == JobStatus.QUEUED.value or (status is not None and job_id in live):
            # Queued: the lease's worker died after RQ leased the job but before it marked it
            # started (and it is back in its queue, or _recover_lost puts it back). A live lease
            # beside it: another worker runs the job now (given back, or requeued by a sweep).
            # RQ's cleanup would requeue it once more or fail it under its new holder.
            if leases:
                connection.zrem(registry.key, *leases)
            stale.append(job_id)
            continue
        if status != JobStatus.STARTED.value or not record.get(RecordField.finished_at):
            continue
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            continue
        state = ended_state(record)
        ttl = job.failure_ttl if state is JobState.failed else job.result_ttl
        ttl = keep_s if ttl is None or ttl < 0 else ttl
        with connection.pipeline() as pipe:
            # Its leases, so RQ's cleanup never sees it.
            if leases:
                pipe.zrem(registry.key, *leases)
            end_in_rq(job, state, ttl, pipe, exc_string=record.get(RecordField.error_message, ""))
            pipe.execute()
        ended.append(job_id)
    if ended:
        log.warning("reaper: jobs whose worker stopped after storing their outcome (or a lease left by one "
                    "RQ had ended) ended as recorded: %s", ", ".join(ended))
    if stale:
        log.warning("reaper: leases left by attempts that no longer hold their job dropped: %s", ", ".join(stale))
    return ended + stale


# A worker starts a job within milliseconds of taking it off its queue (RQ's BLPOP, then its
# started registry): one found in neither for this long, twice, was lost in between.
LOST_AFTER_S = 10.0

# KEYS: RQ's job hash, its queue, waiting, lost, RQ's intermediate list of the queue. ARGV: job
# id, now, and the slot giving it back ("" for a sweep). Put back only if still queued to RQ and
# in no queue: a job a worker started meanwhile stays its. A slot giving back a job it took may
# find it started by itself (RQ's start reached Redis, its reply did not): queued again. RQ's
# own list of jobs taken by a one-queue worker gives it up, or its cleanup would later fail it
# as stuck.
_PUT_BACK = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' then
  if ARGV[3] == '' or status ~= 'started' or redis.call('HGET', KEYS[1], 'worker_name') ~= ARGV[3] then
    return 0
  end
  redis.call('HSET', KEYS[1], 'status', 'queued')
end
if redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
redis.call('LREM', KEYS[5], 0, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""
_put_back = redis.client.Script(None, _PUT_BACK.encode())  # type: ignore[arg-type]


def put_back(connection: redis.Redis, queue_name: str, job_id: str, by: str = "") -> bool:
    """Put a job taken off `queue_name` and never run back at the head of that queue, at
    once and only once: unless it is in the queue already or RQ shows it in other hands (a
    job started by the slot `by`, the one giving it back, is queued again). True if pushed."""
    queue_key = RQ_QUEUE_PREFIX + queue_name
    keys = [f"rq:job:{job_id}", queue_key, Keys.waiting(queue_name), Keys.lost(queue_name),
            f"{queue_key}:intermediate"]
    return bool(_put_back(keys=keys, args=[job_id, now(), by], client=connection))


def _recover_lost(connection: redis.Redis, queue_name: str, base: str) -> list[str]:
    """Put back at the head of its queue each job a worker took off it but never started
    (the worker died, or its connection broke, between RQ's pop and its start): RQ would
    show it queued for ever, in no queue and no registry. Returns their ids."""
    waiting, lost, queue_key = Keys.waiting(queue_name), Keys.lost(queue_name), RQ_QUEUE_PREFIX + queue_name
    cutoff = now() - LOST_AFTER_S
    candidates = [as_text(j) for j in connection.zrangebyscore(waiting, "-inf", cutoff)]
    if not candidates:
        connection.delete(lost)
        return []
    read = connection.pipeline(transaction=False)
    for job_id in candidates:
        read.hget(f"rq:job:{job_id}", "status")
    read.lrange(queue_key, 0, -1)
    read.zrange(lost, 0, -1, withscores=True)
    *statuses, in_queue_raw, suspects_raw = read.execute()
    in_queue = {as_text(j) for j in in_queue_raw}
    suspects = {as_text(j): float(score) for j, score in suspects_raw}
    gone, now_lost = [], []
    for job_id, status in zip(candidates, statuses):
        if status is None or as_text(status) != "queued":
            gone.append(job_id)  # started, ended or expired: no longer waiting
        elif job_id not in in_queue:
            now_lost.append(job_id)
    recovered: list[str] = []
    write = connection.pipeline(transaction=False)
    if gone:
        write.zrem(waiting, *gone)
    # Suspects no longer lost are cleared; new ones are noted, and put back a sweep later.
    cleared = [j for j in suspects if j not in now_lost]
    if cleared:
        write.zrem(lost, *cleared)
    for job_id in now_lost:
        if job_id not in suspects:
            write.zadd(lost, {job_id: now()})
    write.execute()
    for job_id in now_lost:
        if job_id in suspects and suspects[job_id] <= cutoff and put_back(connection, queue_name, job_id):
            recovered.append(job_id)
    if recovered:
        connection.hincrbyfloat(metrics_key(base), "bailan_jobs_recovered_total", len(recovered))
    return recovered


def _names_a_model(params: bytes | str | None) -> bool:
    try:
        return bool(params) and bool(json.loads(params).get("model"))  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        return False



class Reaper:
    """`reap_abandoned` every `interval_s` seconds on a daemon thread (the API's), and
    every `blob_sweep_interval_s` a sweep of the blob store: images and previews
    expire with their records, and the sweep deletes their files."""

    def __init__(
        self,
        conn: redis.Redis,
        queue_name: str,
        interval_s: float,
        keep_s: int = 86400,
        hooks: webhooks.Policy | None = None,
        blobs: BlobStore | None = None,
        blob_sweep_interval_s: float = 300.0,
    ) -> None:
        self.conn = conn
        self.hooks = hooks
        self.blobs = blobs
        self.blob_sweep_interval_s = blob_sweep_interval_s
        self._next_blob_sweep = 0.0
        self.keep_s = keep_s
        self.queue_name = queue_name
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saw_outage = False

    def sweep(self) -> list[str]:
        """One pass; never raises, because a Redis outage must not kill the loop (after
        one, reap_abandoned holds back while workers renew their leases)."""
        try:
            reaped = reap_abandoned(self.conn, self.queue_name, self.keep_s, self.hooks, self.interval_s,
                                    after_outage=self._saw_outage)
            self._saw_outage = False
        except redis.RedisError as exc:
            log.warning("reaper: Redis unavailable (%s); retrying in %.0f s", exc, self.interval_s)
            self._saw_outage = True
            return []
        except Exception:
            log.exception("reaper: sweep failed")
            return []
        if reaped:
            log.warning("reaper: jobs of dead workers requeued or failed: %s", ", ".join(reaped))
        return reaped

    def sweep_blobs(self, now: float | None = None) -> int:
        """Delete expired blobs; never raises (a full or unmounted disk must not kill the loop).

        Every API process runs a reaper, and they share the blob store: one sweep per
        interval among them all (a lock that expires with the interval), not one each. With
        Redis down, each sweeps on its own, as the files need no Redis.
        """
        if self.blobs is None:
            return 0
        lock = Keys.blob_sweep_lock(self.queue_name)
        try:
            if not self.conn.set(lock, "1", nx=True, px=max(1, int(self.blob_sweep_interval_s * 1000))):
                return 0  # another process swept within the interval
        except redis.RedisError:
            pass
        try:
            removed = self.blobs.sweep(now)
        except Exception:
            log.exception("reaper: blob sweep failed")
            return 0
        if removed:
            log.info("reaper: %d expired images and previews deleted", removed)
        return removed

    def _run(self) -> None:
        while True:
            self.sweep()
            if time.monotonic() >= self._next_blob_sweep:
                self._next_blob_sweep = time.monotonic() + self.blob_sweep_interval_s
                self.sweep_blobs()
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        # A thread, not an asyncio task: the Redis client blocks.
        self._thread = threading.Thread(target=self._run, name="bailan-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
