"""The sweep for jobs whose worker died, used by the API and by every worker.

A running job's entry in RQ's started registry is a lease its worker renews.
When a worker dies (even kill -9) its leases run out; `reap_abandoned` then
requeues the job while retries are left, or fails it with `worker_lost`.

The worker calls `reap_abandoned` from its liveness loop. The API runs it on
the `Reaper` thread, so a dead worker's jobs fail even when no other worker is
alive to notice. Like the rest of bailan/, this never imports torch.
"""

from __future__ import annotations

import logging
import threading

import redis
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from bailan import events, webhooks
from bailan.jobs import KEY_PREFIX, ErrorCode, Keys, RecordField, now
from bailan.queues import all_queue_names

# The API's thread is what logs here; the name predates this module.
log = logging.getLogger("bailan.api.reaper")


def reap_abandoned(
    connection: redis.Redis, queue_name: str, keep_s: int = 86400, hooks: webhooks.Policy | None = None
) -> list[str]:
    """Fail (or requeue, while retries are left) jobs whose worker stopped heartbeating.

    A running job's entry in RQ's started registry is scored with the time its
    worker's heartbeat expires; RQ's own cleanup moves expired entries on. RQ
    runs it only every ten minutes, so the API and every worker call this on a
    short interval instead. Returns the ids it found abandoned. Also forgets
    canceled jobs older than `keep_s` (RQ never trims that registry). A job it
    fails gets its `completed` webhook, queued by `hooks` (default: the defaults).
    """
    hooks = hooks if hooks is not None else webhooks.Policy.defaults(queue_name, keep_s)
    # One sweeper at a time: two concurrent RQ cleanups would both requeue a job.
    lock = f"{KEY_PREFIX}:reaper-lock:{queue_name}"
    if not connection.set(lock, "1", nx=True, px=30_000):
        return []
    try:
        reaped: list[str] = []
        # Each API key's jobs run from its own queue (bailan.queues), and RQ keeps a
        # started and a canceled registry per queue: visit every one.
        for name in all_queue_names(connection, queue_name):
            reaped += _reap_queue(connection, name, keep_s, hooks)
        return reaped
    finally:
        connection.delete(lock)


def _reap_queue(connection: redis.Redis, queue_name: str, keep_s: int, hooks: webhooks.Policy) -> list[str]:
    connection.zremrangebyscore(CanceledJobRegistry(queue_name, connection=connection).key, 0, now() - keep_s)
    registry = StartedJobRegistry(queue_name, connection=connection, serializer=JSONSerializer)
    expired = registry.get_expired_job_ids(now())
    if not expired:
        return []
    # RQ requeues a job with retries left to its origin: this same queue.
    registry.cleanup()
    check = connection.pipeline()
    for job_id in expired:
        check.hget(f"rq:job:{job_id}", "status")
        check.exists(Keys.job(job_id))
    answers = check.execute()
    pipe = webhooks.transaction(connection)
    lost: list[str] = []
    for job_id, status, exists in zip(expired, answers[::2], answers[1::2]):
        key = Keys.job(job_id)
        if not exists:
            continue  # the record already expired; don't recreate a stub of it
        if status in (b"failed", "failed"):
            pipe.hsetnx(key, RecordField.error_code, ErrorCode.worker_lost.value)
            pipe.hsetnx(key, RecordField.error_message, "the worker running this job stopped responding")
            pipe.hsetnx(key, RecordField.finished_at, str(now()))
            pipe.expire(key, keep_s)
            lost.append(job_id)
        else:
            # Requeued: it runs afresh, so the dead attempt's traces go.
            pipe.hdel(key, RecordField.started_at, RecordField.step, RecordField.worker)
            pipe.delete(Keys.previews(job_id))
        events.notify(pipe, job_id)
    # Queued with the worker_lost end it reports, in the same transaction.
    webhooks.enqueue_completed(connection, pipe, hooks, lost)
    pipe.execute()
    return expired


class Reaper:
    """`reap_abandoned` every `interval_s` seconds on a daemon thread (the API's)."""

    def __init__(
        self,
        conn: redis.Redis,
        queue_name: str,
        interval_s: float,
        keep_s: int = 86400,
        hooks: webhooks.Policy | None = None,
    ) -> None:
        self.conn = conn
        self.hooks = hooks
        self.keep_s = keep_s
        self.queue_name = queue_name
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[str]:
        """One pass; never raises, because a Redis outage must not kill the loop."""
        try:
            reaped = reap_abandoned(self.conn, self.queue_name, self.keep_s, self.hooks)
        except redis.RedisError as exc:
            log.warning("reaper: Redis unavailable (%s); retrying in %.0f s", exc, self.interval_s)
            return []
        except Exception:
            log.exception("reaper: sweep failed")
            return []
        if reaped:
            log.warning("reaper: jobs of dead workers requeued or failed: %s", ", ".join(reaped))
        return reaped

    def _run(self) -> None:
        while True:
            self.sweep()
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
