"""A queued job's estimated wait (`eta_s` in its view), read from Redis and estimated by bailan.eta.

Read only for queued jobs, on the path that built the view: the live workers'
keys (their measured rates) and the lengths of the queues its workers serve
besides its own. A job that names a model counts that model's workers, and the
queues they serve: the model's and the plain base queue, each with its key
queues (bailan.queues); a job that names none counts every worker and the plain
base queue's tree.
"""

from __future__ import annotations

import redis
import redis.asyncio

from app.store import records
from app.store.workers import WorkerInfo, live_workers, live_workers_async
from bailan.eta import WorkerRate, estimate_eta, jobs_ahead
from bailan.jobs import JobState, Keys, RecordField
from bailan.queues import RQ_QUEUE_PREFIX, model_base


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _roots(base: str, snap: records.JobSnapshot) -> list[str]:
    """The base queues whose trees the job's workers serve."""
    model = snap.record.get(RecordField.model)
    return [base, model_base(base, model)] if model else [base]


def _others(roots: list[str], own: str | None, members: list[set]) -> list[str]:
    names = {*roots, *(_text(m) for group in members for m in group)}
    return sorted(name for name in names if name != own)


def _its_workers(snap: records.JobSnapshot, workers: list[WorkerInfo]) -> list[WorkerInfo]:
    model = snap.record.get(RecordField.model)
    return [w for w in workers if w.model == model] if model else workers


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
    workers = _its_workers(snap, live_workers(conn))
    if not workers:
        return None
    roots = _roots(base, snap)
    pipe = conn.pipeline(transaction=False)
    for root in roots:
        pipe.smembers(Keys.key_queues(root))
    others = _others(roots, snap.origin, pipe.execute())
    pipe = conn.pipeline(transaction=False)
    for name in others:
        pipe.llen(RQ_QUEUE_PREFIX + name)
    return _estimate(snap, workers, [int(n) for n in pipe.execute()] if others else [])


async def eta_s_async(aconn: redis.asyncio.Redis, base: str, snap: records.JobSnapshot) -> float | None:
    """`eta_s` on the event loop."""
    if snap.state is not JobState.queued or snap.queue_index is None:
        return None
    workers = _its_workers(snap, await live_workers_async(aconn))
    if not workers:
        return None
    roots = _roots(base, snap)
    pipe = aconn.pipeline(transaction=False)
    for root in roots:
        pipe.smembers(Keys.key_queues(root))
    others = _others(roots, snap.origin, await pipe.execute())
    pipe = aconn.pipeline(transaction=False)
    for name in others:
        pipe.llen(RQ_QUEUE_PREFIX + name)
    return _estimate(snap, workers, [int(n) for n in await pipe.execute()] if others else [])
