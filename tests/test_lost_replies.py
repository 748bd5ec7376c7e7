"""Commands that ran on Redis but whose answers were lost (a connection broken after the
server ran them): what a client that sends them again must not do twice. Against the real
server, through tests/lost_reply.py's proxy."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest
import redis
from fastapi.testclient import TestClient

from app.main import create_app, make_redis
from app.store import records
from bailan.jobs import JobParams
from tests.lost_reply import LostReply, transaction_with
from tests.test_api import QUEUE, make_settings, start_job


def server_port(redis_url: str) -> int:
    return urlparse(redis_url).port or 6379


def db_of(redis_url: str) -> int:
    return int(urlparse(redis_url).path.lstrip("/") or 0)


def test_the_reaper_never_requeues_a_dead_workers_job_twice(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a job run twice: the API's reaper requeues a dead worker's job in RQ's cleanup
    transaction, and the API's Redis client sent that transaction again when the connection
    broke after it ran, pushing the job's id onto its queue twice."""
    job_id = records.submit(make_settings(redis_url), redis_conn, JobParams(prompt="x", seed=1))
    start_job(redis_conn, job_id, execution_score=time.time() - 100)  # its worker died long ago
    with LostReply(server_port(redis_url), transaction_with(b"RPUSH", b"rq:queue:")) as proxy:
        settings = make_settings(proxy.url(db_of(redis_url)), reap_interval_s=3600)
        with TestClient(create_app(settings)):  # its reaper sweeps once as the app starts
            deadline = time.monotonic() + 10
            while not (proxy.fired.is_set() and redis_conn.lpos(f"rq:queue:{QUEUE}", job_id) is not None):
                assert time.monotonic() < deadline, "the reaper never requeued the job"
                time.sleep(0.05)
            time.sleep(0.3)  # a second push, if one comes, comes now
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1).count(job_id.encode()) == 1


def test_a_submit_whose_answer_was_lost_is_queued_once(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a job queued twice: the API's Redis client sent a submit's transaction again when
    the connection broke after it ran. The submit must fail as a Redis error (a 503, which
    its client retries, with its Idempotency-Key if it sent one) with its job queued once."""
    with LostReply(server_port(redis_url), transaction_with(b"RPUSH", b"rq:queue:")) as proxy:
        settings = make_settings(proxy.url(db_of(redis_url)), rate_limit="none")
        conn = make_redis(settings)  # the API's client, as every route has it
        try:
            with pytest.raises(redis.ConnectionError):
                records.submit(settings, conn, JobParams(prompt="x", seed=1), job_id="lost-answer")
        finally:
            conn.close()
    assert proxy.fired.is_set()
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [b"lost-answer"]
