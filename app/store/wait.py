"""A queued job's estimated wait (`eta_s` in its view), estimated by bailan.eta from its snapshot.

The snapshot of a queued job, read with its base queue, carries the inputs in
the same round trip (records.snapshot): the live workers' descriptions (their
measured rates) and the lengths of the queues its workers serve besides its
own. A job that names a model counts that model's workers, and the queues they
serve: the model's and the plain base queue, each with its key queues
(bailan.queues); a job that names none counts every worker and every queue
tree, the plain base queue's and each model's (its workers give those turns too).
"""

from __future__ import annotations

from app.store import records
from app.store.workers import WorkerInfo
from bailan.eta import WorkerRate, estimate_eta, jobs_ahead
from bailan.jobs import JobState, RecordField


def _its_workers(snap: records.JobSnapshot, workers: list[WorkerInfo]) -> list[WorkerInfo]:
    model = snap.record.get(RecordField.model)
    return [w for w in workers if w.model == model] if model else workers


def eta_s(snap: records.JobSnapshot) -> float | None:
    """Seconds until the queued job `snap` is expected to finish; None when it is not queued,
    not read with its base queue, or no live worker of its has measured a rate."""
    if snap.state is not JobState.queued or snap.queue_index is None or snap.live_workers is None:
        return None
    workers = _its_workers(snap, snap.live_workers)
    position = records.queue_position(snap)
    params = snap.params
    if not workers or position is None or params is None:
        return None
    try:
        steps = int(snap.record.get(RecordField.total_steps) or params.steps)
    except ValueError:
        steps = params.steps
    rates = [WorkerRate(w.samples_per_s, w.step_s, w.backlog) for w in workers]
    return estimate_eta(jobs_ahead(position, snap.other_queue_lengths or []), steps, params.num_images, rates)
