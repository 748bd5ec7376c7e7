"""Change notifications for a job: whoever changes what a client sees of a job publishes here.

Event streams (GET /v1/jobs/{id}/events) subscribe to the job's channel
(Keys.job_events) and re-read the job only when told, instead of every
stream re-reading every job several times a second. The message is a
single byte: it says "look again", never what changed, so a lost one costs
at most the stream's slow safety poll.

Writers call `notify` in the same pipeline as the write where they have one,
so the notification never overtakes the change it announces.
"""

from __future__ import annotations

from typing import Any

from bailan.jobs import Keys

MESSAGE = b"1"


def notify(conn_or_pipeline: Any, job_id: str) -> None:
    """PUBLISH "look again" on `job_id`'s channel (a redis.Redis or a pipeline, sync or async)."""
    conn_or_pipeline.publish(Keys.job_events(job_id), MESSAGE)
