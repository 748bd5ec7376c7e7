"""A queued job's estimated wait (`eta_s` in its view), read from Redis and estimated by bailan.eta.

Read only for queued jobs, on the path that built the view: the live workers'
keys (their measured rates) and the lengths of the other API keys' queues.
"""

from __future__ import annotations

import redis
import redis.asyncio

from app.store import records
from app.store.workers import WorkerInfo, live_workers, live_workers_async
from bailan.eta import WorkerRate, estimate_eta, jobs_ahead
from bailan.jobs import JobState, Keys, RecordField
from bailan.queues import RQ_QUEUE_PREFIX


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _others(base: str, own: str | None, members: set) -> list[str]:
    return [name for name in {base, *(_text(m) for m in members)} if name != own]


def _estimate(snap: records.JobSnapshot, workers: list[WorkerInfo], lengths: list[int]) -> float | None:
    position = records.queue_position(snap)
    params = snap.params
    if position is None or params is None:
        return None
    try:
        steps = int(snap.record.get(RecordField.total_steps) or params.steps)
    except ValueError:
        steps = params.steps
    rates = [WorkerRate(w.samples_per_s, w.step_s, w.backlog) for w in workers]
    return estimate_eta(jobs_ahead(position, lengths), steps, params.num_images, rates)


def eta_s(conn: redis.Redis, base: str, snap: records.JobSnapshot) -> float | None:
    """Seconds until the queued job `snap` is expected to finish; None when not queued or unknown."""
    if snap.state is not JobState.queued or snap.queue_index is None:
        return None
    workers = live_workers(conn)
    if not workers:
        return None
    others = _others(base, snap.origin, conn.smembers(Keys.key_queues(base)))
    pipe = conn.pipeline(transaction=False)
    for name in others:
        pipe.llen(RQ_QUEUE_PREFIX + name)
    return _estimate(snap, workers, [int(n) for n in pipe.execute()] if others else [])


async def eta_s_async(aconn: redis.asyncio.Redis, base: str, snap: records.JobSnapshot) -> float | None:
    """`eta_s` on the event loop."""
    if snap.state is not JobState.queued or snap.queue_index is None:
        return None
    workers = await live_workers_async(aconn)
    if not workers:
        return None
    others = _others(base, snap.origin, await aconn.smembers(Keys.key_queues(base)))
    pipe = aconn.pipeline(transaction=False)
    for name in others:
        pipe.llen(RQ_QUEUE_PREFIX + name)
    return _estimate(snap, workers, [int(n) for n in await pipe.execute()] if others else [])
