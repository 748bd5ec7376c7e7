"""The job view (JobOut) a client reads, built from a job's stored state.

Links in a view come from the routes themselves (`url_path_for` with the
route names below), so a path is written once, in its route's decorator.
They stay relative paths ("/v1/jobs/{id}/images/0"), as clients have them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Protocol

import redis

from app.schemas import ImageRef, JobError, JobOut, PreviewRef, Progress
from app.store import records
from app.store.common import parse_json
from bailan.jobs import ErrorCode, JobState, RecordField

# Names of the routes a view or a Location header points to; app.routes.jobs
# registers its routes under them.
JOB_ROUTE = "get_job"
PREVIEW_ROUTE = "preview"
IMAGE_ROUTE = "image"


class PathFor(Protocol):
    """Starlette's `app.url_path_for`: a route's path from its name and path parameters."""

    def __call__(self, name: str, /, **path_params: Any) -> str: ...


def iso(ts: str | None) -> str | None:
    if not ts:
        return None
    try:
        return datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return None


def job_path(path_for: PathFor, job_id: str) -> str:
    """Where to poll a job (the submit answer's Location header)."""
    return str(path_for(JOB_ROUTE, job_id=job_id))


def needs_rq_failure(snap: records.JobSnapshot) -> bool:
    """Whether building the view reads RQ's failure (a job that failed without writing its own error)."""
    return snap.state is JobState.failed and not snap.record.get(RecordField.error_code)


def job_view(
    conn: redis.Redis, snap: records.JobSnapshot, path_for: PathFor, eta_s: float | None = None
) -> JobOut:
    """The view of `snap`; it reads Redis again only when needs_rq_failure(snap).
    `eta_s`: the caller's wait estimate for a queued job (app.store.wait)."""
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

    queue_position = records.queue_position(snap) if state is JobState.queued else None
    previews = [
        PreviewRef(step=step, url=str(path_for(PREVIEW_ROUTE, job_id=job_id, step=step)))
        for step in snap.preview_steps
    ]

    images = []
    for item in parse_json(record.get(RecordField.images), []):
        if isinstance(item, dict) and isinstance(item.get("index"), int):
            seed = item.get("seed")
            images.append(
                ImageRef(
                    index=item["index"],
                    url=str(path_for(IMAGE_ROUTE, job_id=job_id, index=item["index"])),
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
            error = JobError(code=ErrorCode.internal.value, message=records.rq_failure_message(conn, job_id))

    def as_int(field: str, default: int) -> int:
        try:
            return int(record.get(field) or default)
        except ValueError:
            return default

    total = as_int(RecordField.total_steps, params.steps if params else 0)
    unknown = parse_json(record.get(RecordField.unknown_words), [])
    return JobOut(
        id=job_id,
        status=state,
        progress=Progress(step=as_int(RecordField.step, 0), total_steps=total),
        queue_position=queue_position,
        eta_s=eta_s if queue_position is not None else None,
        cancel_requested=bool(record.get(RecordField.cancel_requested)),
        previews=previews,
        images=images,
        error=error,
        params=params,
        unknown_words=[str(w) for w in unknown] if isinstance(unknown, list) else [],
        model=record.get(RecordField.model) or None,
        waiting_for_worker=state is JobState.queued and snap.model_served is False,
        worker=record.get(RecordField.worker) or None,
        created_at=iso(record.get(RecordField.created_at)),
        started_at=iso(record.get(RecordField.started_at)),
        finished_at=iso(record.get(RecordField.finished_at)),
    )
