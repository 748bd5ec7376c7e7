"""Log lines of every Bailan process: text by default, one JSON object per line with
BAILAN_LOG_FORMAT=json, and the job id on every line about a job.

The job id travels in a context variable (`job_context`): a worker slot sets it
around the job it runs, the API around a job route, so every line logged in
that context (Bailan's, RQ's, uvicorn's error lines) carries it without each
call passing it. Lines logged elsewhere about a job (the engine thread) pass
`extra={"job_id": ...}`. uvicorn's access lines get it from the request path.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

job_id_var: ContextVar[str | None] = ContextVar("bailan_job_id", default=None)

# A job route's path in an access line: /v1/jobs/<32 hex>[/...].
_JOB_PATH = re.compile(r"/v1/jobs/([0-9a-f]{32})\b")
# uvicorn configures these itself; in JSON mode they must go through the root handler.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Every line logged in this context names `job_id`."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


class JobIdFilter(logging.Filter):
    """Sets `record.job_id` (None when the line is about no job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            job_id = job_id_var.get()
            if job_id is None and record.name == "uvicorn.access":
                found = _JOB_PATH.search(record.getMessage())
                job_id = found.group(1) if found else None
            record.job_id = job_id
        return True


class TextFormatter(logging.Formatter):
    """The text default, with `[job <id>]` on job lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        return f"{line} [job {job_id}]" if job_id else line


def configure(fmt: LogFormat, level: int = logging.INFO) -> None:
    """Send every logger's lines to stderr in `fmt`; idempotent (tests build many apps)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "bailan", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.bailan = True  # type: ignore[attr-defined]
    handler.addFilter(JobIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(job_id)s",
                rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
            )
        )
        # uvicorn's own handlers print text; route its lines through this one.
        for name in UVICORN_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
