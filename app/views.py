"""The job view (JobOut) a client reads, built from a job's stored state.

Links in a view come from the routes themselves (`url_path_for` with the
route names below), so a path is written once, in its route's decorator.
They stay relative paths ("/v1/jobs/{id}/images/0"), as clients have them.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Protocol

import redis

from app.schemas import ImageRef, JobError, JobOut, PreviewRef, Progress
from app.store import records, wait
from app.store.common import parse_json
from bailan.jobs import JobState, RecordField

# Names of the routes a view or a Location header points to; app.routes.jobs
# registers its routes under them.
JOB_ROUTE = "get_job"
PREVIEW_ROUTE = "preview"
IMAGE_ROUTE = "image"


class PathFor(Protocol):
    """Starlette's `app.url_path_for`: a route's path from its name and path parameters."""

    def __call__(self, name: str, /, **path_params: Any) -> str: ...


# Stand-ins for path parameters while a route's path is resolved once (Links).
_INT_SENTINEL = 7_350_912_486_031
_STR_SENTINEL = "\x00{}\x00"


class Links:
    """A PathFor that asks the router for each route's path once and fills it in after.

    Starlette's url_path_for walks every route in turn and raises an
    exception at each one that does not match: on the status path that cost
    more than reading the job from Redis. A route's path is resolved once per
    name and parameter names, with stand-in values of the types first given,
    split around them, and joined with the real values afterwards. A value
    its route's convertor might format differently (not a plain str or
    non-negative int, or not of the type the path was resolved with) goes to
    the router as before.
    """

    def __init__(self, path_for: PathFor) -> None:
        self._path_for = path_for
        # Per (name, parameter names): the literal pieces, and between them each
        # parameter's name and the type it was resolved with; None: ask the router every time.
        self._templates: dict[tuple[str, ...], tuple[list[str], list[tuple[str, type]]] | None] = {}

    def __call__(self, name: str, /, **path_params: Any) -> str:
        key = (name, *path_params)
        try:
            template = self._templates[key]
        except KeyError:
            template = self._templates[key] = self._resolve(name, path_params)
        if template is None:
            return str(self._path_for(name, **path_params))
        pieces, slots = template
        out = pieces[0]
        for (param, kind), piece in zip(slots, pieces[1:]):
            value = path_params[param]
            if type(value) is not kind or not _plain(value):
                return str(self._path_for(name, **path_params))
            out += str(value) + piece
        return out

    def _resolve(self, name: str, path_params: dict[str, Any]) -> tuple[list[str], list[tuple[str, type]]] | None:
        if not all(type(v) in (int, str) and _plain(v) for v in path_params.values()):
            return None
        stand_ins = {
            k: _INT_SENTINEL + i if isinstance(v, int) else _STR_SENTINEL.format(i)
            for i, (k, v) in enumerate(path_params.items())
        }
        try:
            path = str(self._path_for(name, **stand_ins))
        except Exception:  # a convertor that refuses the stand-in, or no such route: the router answers
            return None
        marks = {str(v): k for k, v in stand_ins.items()}
        if any(path.count(mark) != 1 for mark in marks):
            return None
        pattern = "|".join(re.escape(mark) for mark in marks)
        pieces = re.split(pattern, path)
        slots = [(marks[m], type(path_params[marks[m]])) for m in re.findall(pattern, path)]
        return pieces, slots


def _plain(value: int | str) -> bool:
    """An int or str that every convertor accepting it writes as str(value)."""
    if type(value) is int:
        return value >= 0
    return value != "" and "/" not in value and "\x00" not in value


class RenderedViews:
    """Each job's view as JSON bytes, kept with the snapshot answer it was rendered from.

    A client polls a job far more often than it changes while it waits in the
    queue, after it ends, and between the steps of a slow model. A view is a
    function of the snapshot answer alone (records.read_snapshot_async: the
    record, RQ's status, the live previews, the queue position and the wait
    inputs; the links are the app's), so an equal answer is served the bytes
    rendered before. The answer is still read on every poll, and the caller
    does not keep the one view that reads more (needs_rq_failure), so nothing
    here can be stale. The most recently read `max_jobs` jobs are kept, per API process
    (BAILAN_VIEW_CACHE_JOBS; 0 keeps none).
    """

    def __init__(self, max_jobs: int = 4096) -> None:
        self.max_jobs = max_jobs
        self._entries: OrderedDict[str, tuple[records.RawSnapshot, str, bytes]] = OrderedDict()

    def get(self, job_id: str, raw: records.RawSnapshot) -> tuple[str, bytes] | None:
        """(owner, view JSON) if the view was rendered from an answer equal to `raw`."""
        entry = self._entries.get(job_id)
        if entry is None or entry[0] != raw:
            return None
        self._entries.move_to_end(job_id)
        return entry[1], entry[2]

    def put(self, job_id: str, raw: records.RawSnapshot, owner: str, body: bytes) -> None:
        if self.max_jobs == 0:
            return
        self._entries[job_id] = (raw, owner, body)
        self._entries.move_to_end(job_id)
        while len(self._entries) > self.max_jobs:
            self._entries.popitem(last=False)


# A job's few timestamps are formatted again on every poll of it.
@functools.lru_cache(maxsize=4096)
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


def job_view(conn: redis.Redis, snap: records.JobSnapshot, path_for: PathFor) -> JobOut:
    """The view of `snap`; it reads Redis again only when needs_rq_failure(snap). A queued
    job's wait estimate comes from its snapshot when that was read with its base queue."""
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
            code, message = records.rq_failure(conn, job_id)
            error = JobError(code=code.value, message=message)

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
        eta_s=wait.eta_s(snap) if queue_position is not None else None,
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
