"""Event streams pushed from Redis: workers publish, streams re-read only when told."""

from __future__ import annotations

import json
import threading
import time

import redis
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from app.main import create_app
from bailan import events
from bailan.jobs import Keys, RecordField, now
from tests.test_api import make_settings, read_events, start_job


def test_notify_publishes_on_the_jobs_channel(redis_conn: redis.Redis) -> None:
    """Guards: writers and streams disagreeing on the channel name (every push lost to the safety poll)."""
    pubsub = redis_conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(Keys.job_events("j1"))
    pipe = redis_conn.pipeline()
    events.notify(pipe, "j1")
    pipe.execute()
    deadline = time.monotonic() + 5
    message = None
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
    pubsub.close()
    assert message is not None and message["channel"] == Keys.job_events("j1").encode()


def test_stream_follows_pushed_changes_without_polling(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: event streams that re-read every job every 0.25 s instead of waiting for a worker's
    notification; with the safety poll at 60 s, every change here must arrive by push alone."""
    with TestClient(create_app(make_settings(redis_url, events_poll_interval_s=60))) as c:
        job_id = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]

        def worker() -> None:
            time.sleep(0.3)
            start_job(redis_conn, job_id)
            redis_conn.hset(Keys.job(job_id), RecordField.step, "7")
            events.notify(redis_conn, job_id)
            time.sleep(0.3)
            redis_conn.hset(Keys.job(job_id), mapping={RecordField.step: "25", RecordField.finished_at: repr(now())})
            Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).set_status(JobStatus.FINISHED)
            events.notify(redis_conn, job_id)

        thread = threading.Thread(target=worker)
        thread.start()
        started = time.monotonic()
        stream = read_events(c, f"/v1/jobs/{job_id}/events", timeout_s=10)
        thread.join()
        assert time.monotonic() - started < 10
        views = [json.loads(data) for name, data in stream if name == "job"]
        assert views[0]["status"] == "queued"
        assert any(v["status"] == "running" and v["progress"]["step"] == 7 for v in views)
        assert views[-1]["status"] == "succeeded"
        # The stream's subscription is dropped with the stream.
        assert c.app.state.job_events.waiters == {}


def test_cancel_of_a_queued_job_is_pushed(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: a cancel by the API itself (no worker involved) reaching streams only on the safety poll."""
    with TestClient(create_app(make_settings(redis_url, events_poll_interval_s=60))) as c:
        job_id = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
        timer = threading.Timer(0.3, lambda: c.post(f"/v1/jobs/{job_id}/cancel"))
        timer.start()
        stream = read_events(c, f"/v1/jobs/{job_id}/events", timeout_s=10)
        timer.join()
        assert json.loads(stream[-1][1])["status"] == "canceled"
