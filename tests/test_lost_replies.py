"""Commands that ran on Redis but whose answers were lost (a connection broken after the
server ran them): what a client that sends them again must not do twice. Against the real
server, through tests/lost_reply.py's proxy."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from fastapi.testclient import TestClient

from app import limits
from app.main import create_app, make_redis
from app.settings import ApiSettings
from app.store import idempotency, records
from bailan.jobs import JobParams, JobState, Keys, RecordField, now
from bailan.metrics import field, metrics_key
from bailan.queues import key_digest, key_queue_name
from tests.lost_reply import LostReply, command_with, transaction_with
from tests.test_api import QUEUE, make_settings, start_job


def server_port(redis_url: str) -> int:
    return urlparse(redis_url).port or 6379


def db_of(redis_url: str) -> int:
    return int(urlparse(redis_url).path.lstrip("/") or 0)


@contextmanager
def api_client_losing(redis_url: str, trigger: Callable[[bytes], bool], hold: bool = False,
                      **overrides: Any) -> Iterator[tuple[redis.Redis, ApiSettings]]:
    """The API's Redis client (app.main.make_redis) and settings, through a proxy that loses
    its answer to what `trigger` matches once (with `hold`, keeping the connection open, so
    the client times out); checks that it did."""
    with LostReply(server_port(redis_url), trigger, hold=hold) as proxy:
        settings = make_settings(proxy.url(db_of(redis_url)), **overrides)
        conn = make_redis(settings)
        try:
            yield conn, settings
        finally:
            conn.close()
    assert proxy.fired.is_set(), "no answer was lost: the test did not test it"


def test_the_reaper_never_requeues_a_dead_workers_job_twice(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a job run twice: the API's reaper requeues a dead worker's job in RQ's cleanup
    transaction, and the API's Redis client sent that transaction again when the connection
    broke after it ran, pushing the job's id onto its queue twice. Not sent again, the sweep
    still reads what it did: the requeued job must lose its dead attempt's traces (its view
    read as running) and be waiting again, not be left so for good."""
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
    assert not redis_conn.hexists(Keys.job(job_id), RecordField.started_at)
    assert redis_conn.zscore(Keys.waiting(QUEUE), job_id) is not None
    assert records.snapshot(redis_conn, job_id, QUEUE).state is JobState.queued


def test_a_submit_whose_answer_was_lost_is_queued_once(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a job queued twice: the API's Redis client sent a submit's transaction again when
    the connection broke after it ran. The submit must fail as a Redis error (a 503, which
    its client retries, with its Idempotency-Key if it sent one) with its job queued once."""
    with api_client_losing(redis_url, transaction_with(b"RPUSH", b"rq:queue:"), rate_limit="none") as (conn, settings):
        with pytest.raises(redis.ConnectionError):
            records.submit(settings, conn, JobParams(prompt="x", seed=1), job_id="lost-answer")
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [b"lost-answer"]


def test_an_admission_sent_again_is_charged_once(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a submit charged twice against its key's rate (and, one below a queue cap, refused
    429 by its own place): the admission script, sent again after its answer was lost, ran again."""
    settings = make_settings(redis_url, rate_limit="2/minute")
    rate = settings.rate
    queue = key_queue_name(QUEUE, "alice")
    # The scripts loaded, as on any server that has admitted a submit before.
    limits.admit(redis_conn, QUEUE, "bob", key_queue_name(QUEUE, "bob"), "bob-job", rate, 10, 100)
    with api_client_losing(redis_url, command_with(b"EVALSHA", b"alice-1")) as (conn, _):
        limits.admit(conn, QUEUE, "alice", queue, "alice-1", rate, 10, 100)
    limits.admit(redis_conn, QUEUE, "alice", queue, "alice-2", rate, 10, 100)  # the second of two
    with pytest.raises(limits.Refused):
        limits.admit(redis_conn, QUEUE, "alice", queue, "alice-3", rate, 10, 100)


def test_a_release_sent_again_refunds_once(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a failed submit giving back two submits of its key's rate: the release script,
    sent again after its answer was lost, refunded again."""
    rate = make_settings(redis_url, rate_limit="2/minute").rate
    queue = key_queue_name(QUEUE, "alice")
    admitted = [limits.admit(redis_conn, QUEUE, "alice", queue, f"alice-{i}", rate, 10, 100) for i in range(2)]
    limits.admit(redis_conn, QUEUE, "bob", key_queue_name(QUEUE, "bob"), "bob", rate, 10, 100).release(redis_conn)
    with api_client_losing(redis_url, command_with(b"EVALSHA", b"alice-1")) as (conn, _):
        admitted[1].release(conn)  # its submit failed before its transaction ran
    limits.admit(redis_conn, QUEUE, "alice", queue, "alice-again", rate, 10, 100)  # the one given back
    with pytest.raises(limits.Refused):
        limits.admit(redis_conn, QUEUE, "alice", queue, "alice-more", rate, 10, 100)


def test_a_stream_place_sent_again_is_not_over_the_cap(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a 429 for an event stream that was within its key's cap: the place-taking script,
    sent again after its answer was lost, counted its own place, and the place stayed held
    for its lease."""
    redis_conn.zadd(Keys.streams(key_digest("carol")), {"elsewhere": now() + 60})  # one of two open
    assert limits.open_stream(redis_conn, "dave", "loads-the-script", 2)
    with api_client_losing(redis_url, command_with(b"EVALSHA", b"carol-stream")) as (conn, _):
        assert limits.open_stream(conn, "carol", "carol-stream", 2)


def test_an_admission_whose_answer_never_came_holds_no_place(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a client refused for a job never made: its submit's admission script ran, its
    answer never came (a timeout, which the API's client does not resend) and the submit
    answered 503, but its place stayed held and its rate charged for 30 s, so the retry was
    refused 429 at the key's queue cap and at its rate."""
    settings = make_settings(redis_url, rate_limit="1/minute")
    queue = key_queue_name(QUEUE, "erin")
    limits.admit(redis_conn, QUEUE, "bob", key_queue_name(QUEUE, "bob"), "bob-job", settings.rate, 1, 100)
    with api_client_losing(redis_url, command_with(b"EVALSHA", b"erin-1"), hold=True, redis_timeout_s=0.5) as (conn, _):
        with pytest.raises(redis.TimeoutError):
            limits.admit(conn, QUEUE, "erin", queue, "erin-1", settings.rate, 1, 100)
        assert limits.RELEASES.settle(5.0)
    assert redis_conn.zscore(Keys.reservations(QUEUE), f"{queue}\nerin-1") is None
    limits.admit(redis_conn, QUEUE, "erin", queue, "erin-2", settings.rate, 1, 100)  # the retry: one of one


def test_a_stream_place_whose_answer_never_came_is_not_held(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a 429 for a key's only event stream: the place-taking script ran, its answer
    never came (a timeout), the stream answered 503, and the place stayed held for its 60 s
    lease, so the client's retry found the key at its cap of one."""
    assert limits.open_stream(redis_conn, "dave", "loads-the-script", 1)
    with api_client_losing(redis_url, command_with(b"EVALSHA", b"frank-1"), hold=True, redis_timeout_s=0.5) as (conn, _):
        with pytest.raises(redis.TimeoutError):
            limits.open_stream(conn, "frank", "frank-1", 1)
        assert limits.RELEASES.settle(5.0)
    assert limits.open_stream(redis_conn, "frank", "frank-2", 1)


def test_an_idempotency_claim_sent_again_is_its_own(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a 409 "in flight" for a first request: its Idempotency-Key's SET NX, sent again
    after its answer was lost, found the claim the first one had made and took it for another
    request's."""
    with api_client_losing(redis_url, command_with(b"SET", b":idempotency:")) as (conn, settings):
        claim = idempotency.claim_idempotency(settings, conn, "key-1", "fingerprint", "alice")
    assert claim.fresh
    assert idempotency.names_job(redis_conn.get(claim.redis_key), claim.job_id)


def test_a_cancel_whose_answer_was_lost_ends_the_job_once(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a queued job's cancel counted twice and its `completed` webhook queued twice: the
    transaction that ends it, sent again by the API's client after its answer was lost, ran
    again. The cancel must fail as a Redis error (a 503), the job ended canceled once."""
    settings = make_settings(redis_url)
    job_id = records.submit(settings, redis_conn, JobParams(prompt="x", seed=1, webhook_url="https://example.com/h"))
    snap = records.snapshot(redis_conn, job_id, QUEUE)
    assert snap is not None
    with api_client_losing(redis_url, transaction_with(b"HINCRBYFLOAT", b"canceled")) as (conn, _):
        with pytest.raises(redis.ConnectionError):
            records.cancel(conn, QUEUE, snap, settings.result_ttl_s)
    canceled = field("bailan_jobs_finished_total", {"status": "canceled"})
    assert float(redis_conn.hget(metrics_key(QUEUE), canceled) or 0) == 1
    deliveries = [name for name in (redis_conn.keys("rq:queue:*") or []) if b"webhook" in name]
    assert deliveries and sum(redis_conn.lrange(name, 0, -1).count(f"msg_{job_id}_completed".encode())
                              for name in deliveries) == 1
    assert records.snapshot(redis_conn, job_id, QUEUE).state is JobState.canceled


def test_a_cancel_of_a_queued_job_whose_removal_answer_was_lost_still_cancels_it(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """Guards a queued job's cancel answered 202 "asked to stop", the job left in no queue for
    the reaper to find (10 s or more): its removal from the queue, sent again by the API's
    client after its answer was lost, removed nothing and read as a worker having taken it."""
    settings = make_settings(redis_url)
    params = JobParams(prompt="x", seed=1)
    first = records.submit(settings, redis_conn, params)  # a cancel before: the script is loaded
    records.cancel(redis_conn, QUEUE, records.snapshot(redis_conn, first, QUEUE), settings.result_ttl_s)
    job_id = records.submit(settings, redis_conn, params)
    snap = records.snapshot(redis_conn, job_id, QUEUE)
    removal = job_id.encode()

    def removing(sent: bytes) -> bool:  # the removal from its queue, however it is sent
        return removal in sent and (b"LREM" in sent or b"EVALSHA" in sent) and sent.endswith(b"\r\n")

    with api_client_losing(redis_url, removing) as (conn, _):
        outcome = records.cancel(conn, QUEUE, snap, settings.result_ttl_s)
    assert outcome == records.CancelOutcome.canceled
    assert records.snapshot(redis_conn, job_id, QUEUE).state is JobState.canceled


def test_a_workers_counts_whose_answer_was_lost_are_added_once(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards /metrics against a worker's counts added twice: its heartbeat sent them, the
    connection broke after Redis had added them, and they went out again (redis-py's own
    retry of the pipeline, or the next tick with the counts given back), so images and
    finished jobs read doubled."""
    from worker.liveness import Liveness
    from worker.settings import WorkerSettings

    images = field("bailan_images_total", {"model": "m"})
    with LostReply(server_port(redis_url), command_with(b"EVALSHA", b"bailan_images_total")) as proxy:
        url = proxy.url(db_of(redis_url))
        # As worker.process connects.
        conn = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
        liveness = Liveness(WorkerSettings(redis_url=url, queue_name=QUEUE), conn, slots=[], info={"model": "m"})
        liveness.tally.inc("bailan_images_total", {"model": "m"}, 3)
        try:
            liveness.heartbeat()
        except redis.ConnectionError:
            pass  # the answer lost: the counts stay unsent, for the next tick
        liveness.tally.inc("bailan_images_total", {"model": "m"}, 2)
        liveness.heartbeat()  # the next tick: the batch in doubt, sent again
        liveness.heartbeat()  # and the counts made meanwhile
        conn.close()
        assert proxy.fired.is_set(), "no answer was lost: the test did not test it"
    assert float(redis_conn.hget(metrics_key(QUEUE), images)) == 5
    assert liveness.unsent is None


def test_a_worker_whose_counts_keep_failing_holds_one_batch_in_doubt(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a worker's memory (and each tick's pipeline) while Redis keeps refusing its
    heartbeat: each tick added a new batch of counts, all of them sent again every tick, so
    they piled up for as long as the failure lasted. One batch is in doubt at a time; the
    counts made meanwhile wait in the tally, and all of them arrive, once, when Redis does."""
    from bench.common import free_port
    from worker.liveness import Liveness
    from worker.settings import WorkerSettings

    images = field("bailan_images_total", {"model": "m"})
    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    liveness = Liveness(WorkerSettings(redis_url=redis_url, queue_name=QUEUE), nowhere, slots=[], info={"model": "m"})
    for amount in (1, 2, 4):
        liveness.tally.inc("bailan_images_total", {"model": "m"}, amount)
        with pytest.raises(redis.ConnectionError):
            liveness.heartbeat()
    assert liveness.unsent == (1, {images: 1}) and liveness.batches == 1  # one batch, the first tick's
    liveness.connection = redis_conn  # Redis answers again
    liveness.heartbeat()
    liveness.heartbeat()
    assert float(redis_conn.hget(metrics_key(QUEUE), images)) == 7
    assert liveness.unsent is None
