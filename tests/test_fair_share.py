"""A fair share for every API key: rate and queue caps (atomic), per-key queues served round
robin by real slot workers, the reaper and cancel on key queues. Against a real Redis."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from app import limits
from app.main import create_app
from app.settings import ApiSettings
from app.store import records
from bailan.jobs import JobParams, Keys, RecordField, now
from bailan.keys import hash_key
from bailan.queues import fair_order, key_digest, key_queue_name, model_base, round_robin
from bailan.reaper import Reaper
from tests.test_api import QUEUE, make_settings
from worker.slots import SlotWorker

KEYS = {"alice": "bl_alice", "bob": "bl_bob", "carol": "bl_carol"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text("".join(f"{name} {hash_key(key)}\n" for name, key in KEYS.items()))
    return path


def keyed(redis_url: str, keys_file: Path, **overrides: Any) -> TestClient:
    return TestClient(create_app(make_settings(redis_url, api_keys_file=keys_file, **overrides)))


def post(client: TestClient, name: str, **body: Any) -> Any:
    return client.post("/v1/jobs", json={"prompt": "x", **body}, headers={"Authorization": f"Bearer {KEYS[name]}"})


def submit_as(client: TestClient, name: str) -> str:
    r = post(client, name)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def queue_key(name: str) -> str:
    return f"rq:queue:{key_queue_name(QUEUE, name)}"


# ---------------------------------------------------------------- parsing and ordering (pure)


@pytest.mark.parametrize(("text", "count", "period"), [("120/minute", 120, 60), ("10/second", 10, 1),
                                                       ("5/10minutes", 5, 600), ("1000 / hour", 1000, 3600),
                                                       ("2/days", 2, 86400)])
def test_rate_parsing(text: str, count: int, period: float) -> None:
    """Guards: BAILAN_RATE_LIMIT read as another rate than the one written."""
    rate = limits.parse_rate(text)
    assert rate is not None and (rate.count, rate.period_s) == (count, period)


@pytest.mark.parametrize("text", ["120", "x/minute", "0/minute", "10/fortnight", "-1/second"])
def test_bad_rate_stops_the_api_at_start(text: str) -> None:
    """Guards: a mistyped BAILAN_RATE_LIMIT accepted at start-up and failing (or ignored) at the first submit."""
    with pytest.raises(ValueError, match="rate_limit"):
        ApiSettings(rate_limit=text)
    assert limits.parse_rate("none") is None


def test_round_robin_starts_after_the_last_served() -> None:
    """Guards: a fixed queue order (the first key always first), or a cursor on a vanished queue
    restarting the ring instead of moving on."""
    assert round_robin(["c", "a", "b"], None) == ["a", "b", "c"]
    assert round_robin(["c", "a", "b"], "a") == ["b", "c", "a"]
    assert round_robin(["a", "b", "c"], "c") == ["a", "b", "c"]
    assert round_robin(["a", "c"], "b") == ["c", "a"]  # b is gone: c is next after it
    assert key_queue_name("q", "anonymous") == "q"
    assert key_queue_name("q", "alice") == f"q:k:{key_digest('alice')}" != key_queue_name("q", "bob")


# ---------------------------------------------------------------- the limits


def test_rate_limit_is_429_with_retry_after(redis_url: str, redis_conn: redis.Redis, keys_file: Path) -> None:
    """Guards: one key submitting without limit; its 429 lacking a Retry-After that says when; another
    key paying for it."""
    with keyed(redis_url, keys_file, rate_limit="3/minute") as c:
        for _ in range(3):
            submit_as(c, "alice")
        r = post(c, "alice")
        assert r.status_code == 429 and "too many submits" in r.json()["detail"]
        assert 15 <= int(r.headers["retry-after"]) <= 21  # one submit's worth of 3/minute
        submit_as(c, "bob")
        # Time passing, written rather than slept: the key's state says its last submit was long ago.
        redis_conn.set(Keys.rate(key_digest("alice")), repr(now() - 3600))
        submit_as(c, "alice")


def test_a_submit_that_queued_nothing_gives_its_rate_back(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards a submit that failed after admission (here its Idempotency-Key's claim was taken over
    before the transaction ran, so nothing was queued) still counting against its key's rate: the
    client's next submit was refused 429 for a job that was never made. A place or a submit given
    back must give back only its own: the key's other submits still count."""
    settings = make_settings(redis_url, rate_limit="2/minute")
    params = JobParams(prompt="x", seed=1)
    claim = "test:claim-taken-over"
    redis_conn.set(claim, "another-job")
    try:
        records.submit(settings, redis_conn, params, "alice")  # one of alice's two
        with pytest.raises(records.ClaimLost):
            records.submit(settings, redis_conn, params, "alice", job_id="mine", claim_key=claim)
        assert redis_conn.zcard(Keys.reservations(QUEUE)) == 0
        records.submit(settings, redis_conn, params, "alice")  # the second: the failed one gave its back
        with pytest.raises(limits.Refused) as refused:
            records.submit(settings, redis_conn, params, "alice")
        assert refused.value.reason == "rate"
    finally:
        redis_conn.delete(claim)


def test_a_connection_lost_while_watching_the_claim_is_a_redis_error_that_keeps_its_submit(
    redis_url: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards a submit whose connection died between WATCH on its Idempotency-Key's claim and EXEC:
    redis-py reports that as a WatchError, which was taken for the claim's takeover. The submit
    then gave its rate back for a transaction that may have run, and the route, told a retry had
    made the job, answered 404 for a job never queued rather than a 503 to retry."""
    settings = make_settings(redis_url, rate_limit="2/minute")
    params = JobParams(prompt="x", seed=1)
    claim = "test:claim-cut-off"
    redis_conn.set(claim, json.dumps({"job_id": "cut"}))
    submitting = redis.Redis.from_url(redis_url, client_name="cut-off-submit")
    names_job = records.idempotency.names_job

    def cut_off(raw: bytes | None, job_id: str) -> bool:
        for client in redis_conn.client_list():
            if client.get("name") == "cut-off-submit":
                redis_conn.client_kill(client["addr"])
        return names_job(raw, job_id)

    try:
        records.submit(settings, redis_conn, params, "alice")  # one of alice's two
        monkeypatch.setattr(records.idempotency, "names_job", cut_off)
        with pytest.raises(redis.ConnectionError):
            records.submit(settings, submitting, params, "alice", job_id="cut", claim_key=claim)
        monkeypatch.undo()
        assert redis_conn.zcard(Keys.reservations(QUEUE)) == 0  # its place went back
        with pytest.raises(limits.Refused) as refused:  # its submit did not: it may have been queued
            records.submit(settings, redis_conn, params, "alice")
        assert refused.value.reason == "rate"
    finally:
        submitting.close()
        redis_conn.delete(claim)


def test_a_submit_cut_off_while_watching_fails_cleanly(
    redis_url: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards what a submit whose connection is cut between WATCH and EXEC leaves behind: it
    fails as a Redis error (a 503, for its client to retry), with nothing queued and its
    admission's place given back at once, not held for its lease. (Its transaction is watched
    so that redis-py never sends it twice: tests/test_lost_replies.py.)"""
    settings = make_settings(redis_url, rate_limit="none")
    submitting = redis.Redis.from_url(redis_url, client_name="resent-submit")
    release_in = limits.Admission.release_in

    def cut_off(self: limits.Admission, pipe: Any) -> None:
        for client in redis_conn.client_list():
            if client.get("name") == "resent-submit":
                redis_conn.client_kill(client["addr"])
        release_in(self, pipe)

    monkeypatch.setattr(limits.Admission, "release_in", cut_off)
    try:
        with pytest.raises(redis.ConnectionError):
            records.submit(settings, submitting, JobParams(prompt="x", seed=1), "alice", job_id="resent")
    finally:
        submitting.close()
    assert not redis_conn.exists(Keys.job("resent"))
    assert redis_conn.zcard(Keys.reservations(QUEUE)) == 0


def test_queued_per_key_cap_is_429(redis_url: str, redis_conn: redis.Redis, keys_file: Path) -> None:
    """Guards: one key filling the whole queue; the cap must count only its own queued jobs and free
    up as they leave the queue."""
    with keyed(redis_url, keys_file, max_queued_per_key=2) as c:
        first = submit_as(c, "alice")
        submit_as(c, "alice")
        r = post(c, "alice")
        assert r.status_code == 429 and "already has 2 jobs queued" in r.json()["detail"]
        assert int(r.headers["retry-after"]) > 0
        submit_as(c, "bob")
        assert c.post(f"/v1/jobs/{first}/cancel", headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 200
        submit_as(c, "alice")
        assert redis_conn.llen(queue_key("alice")) == 2


def test_total_depth_counts_every_key_queue(redis_url: str, redis_conn: redis.Redis, keys_file: Path) -> None:
    """Guards: BAILAN_MAX_QUEUE_DEPTH counting only one queue once jobs are spread over key queues."""
    with keyed(redis_url, keys_file, max_queue_depth=3) as c:
        submit_as(c, "alice")
        submit_as(c, "alice")
        submit_as(c, "bob")
        r = post(c, "carol")
        assert r.status_code == 429 and "queue is full" in r.json()["detail"]


def test_concurrent_submits_never_overshoot_the_caps(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: the cap checked, then the job enqueued, so concurrent submits all saw room and the
    queue overshot its caps (6-18 % measured); 60 submits race here from 12 threads."""
    settings = make_settings(redis_url, max_queue_depth=20, max_queued_per_key=8, rate_limit="none")
    params = JobParams(prompt="x", seed=1)
    barrier = threading.Barrier(12)

    def attempt(i: int) -> str | None:
        conn = redis.Redis.from_url(redis_url)
        try:
            if i < 12:
                barrier.wait()
            return records.submit(settings, conn, params, ["alice", "bob", "carol"][i % 3])
        except limits.Refused:
            return None
        finally:
            conn.close()

    with ThreadPoolExecutor(12) as pool:
        accepted = [j for j in pool.map(attempt, range(60)) if j]
    depths = {name: redis_conn.llen(queue_key(name)) for name in ("alice", "bob", "carol")}
    assert sum(depths.values()) == len(accepted) == 20
    assert max(depths.values()) <= 8
    assert redis_conn.zcard(Keys.reservations(QUEUE)) == 0  # every place taken was released


def test_stale_reservation_expires(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards: an API process that died between admission and enqueue holding its place for ever."""
    settings = make_settings(redis_url, max_queue_depth=1)
    redis_conn.zadd(Keys.reservations(QUEUE), {f"{QUEUE}\nghost": now() + 30})
    with pytest.raises(limits.Refused):
        records.submit(settings, redis_conn, JobParams(prompt="x", seed=1))
    redis_conn.zadd(Keys.reservations(QUEUE), {f"{QUEUE}\nghost": now() - 1})  # its lease ran out
    assert records.submit(settings, redis_conn, JobParams(prompt="x", seed=1))


def test_stream_cap_per_key_is_429(redis_url: str, redis_conn: redis.Redis, keys_file: Path) -> None:
    """Guards: one key opening event streams without limit (500 streams once pushed the API's p50 from
    4 ms to 1.5 s); and streams of a crashed API process holding their places for ever."""
    with keyed(redis_url, keys_file, max_streams_per_key=2) as c:
        job = submit_as(c, "alice")
        streams = Keys.streams(key_digest("alice"))
        # Two streams open elsewhere (another API process), leases running.
        redis_conn.zadd(streams, {"s1": now() + 60, "s2": now() + 60})
        r = c.get(f"/v1/jobs/{job}/events", headers={"Authorization": f"Bearer {KEYS['alice']}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        redis_conn.zadd(streams, {"s1": now() - 1})  # one lease ran out
        Job.fetch(job, connection=redis_conn, serializer=JSONSerializer).set_status(JobStatus.CANCELED)
        redis_conn.hset(Keys.job(job), RecordField.finished_at, repr(now()))
        r = c.get(f"/v1/jobs/{job}/events", headers={"Authorization": f"Bearer {KEYS['alice']}"})
        assert r.status_code == 200 and "event: job" in r.text  # ended at once: the job had ended
        assert redis_conn.zrange(streams, 0, -1) == [b"s2"]  # its own place was given back


# ---------------------------------------------------------------- fair dequeue, reaper, cancel


def run_slot(conn: redis.Redis, order: list[str], count: int, model: str | None = None) -> None:
    """A real slot worker on the base queue (and `model`'s, as a worker of it listens), running
    `count` jobs one at a time, recording their order."""
    stop = threading.Event()

    def runner(job_id: str) -> dict[str, Any]:
        order.append(job_id)
        if len(order) >= count:
            stop.set()
        return {"images": 1}

    bases = [QUEUE] if model is None else [QUEUE, model_base(QUEUE, model)]
    slot = SlotWorker([Queue(name, connection=conn, serializer=JSONSerializer) for name in bases], name="fair-test.0",
                      connection=conn, serializer=JSONSerializer, worker_ttl=20, runner=runner, stop=stop)
    thread = threading.Thread(target=slot.work, kwargs={"logging_level": "WARNING"}, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), f"the slot ran {len(order)} of {count} jobs"


def test_slots_serve_key_queues_round_robin(redis_url: str, redis_conn: redis.Redis, keys_file: Path) -> None:
    """Guards: one FIFO for every client, so a key that floods the queue delays everyone behind it;
    a lone job of another key must wait for one turn at most."""
    with keyed(redis_url, keys_file, rate_limit="none") as c:
        flood = [submit_as(c, "alice") for _ in range(6)]
        lone = submit_as(c, "bob")
        pair = [submit_as(c, "carol") for _ in range(2)]
    owner = {**{j: "alice" for j in flood}, lone: "bob", **{j: "carol" for j in pair}}
    order: list[str] = []
    run_slot(redis_conn, order, 9)
    owners = [owner[j] for j in order]
    assert sorted(owners[:3]) == ["alice", "bob", "carol"], owners  # one turn each first
    assert owners[3:5] == sorted(owners[3:5]) and set(owners[3:5]) == {"alice", "carol"}, owners
    assert owners[5:] == ["alice"] * 4, owners
    assert [j for j in order if owner[j] == "alice"] == flood  # FIFO within a key


def test_every_key_queue_is_listened_on(redis_conn: redis.Redis, redis_url: str, keys_file: Path) -> None:
    """Guards: workers listening on the base queue alone, so keyed jobs were never run."""
    with keyed(redis_url, keys_file) as c:
        submit_as(c, "alice")
    assert set(fair_order(redis_conn, [QUEUE])) == {QUEUE, key_queue_name(QUEUE, "alice")}


def test_reaper_requeues_into_the_key_queue(redis_url: str, redis_conn: redis.Redis, keys_file: Path) -> None:
    """Guards: a dead worker's keyed job never requeued (the reaper swept only the base queue's
    registry) or requeued into another key's queue."""
    with keyed(redis_url, keys_file) as c:
        job_id = submit_as(c, "alice")
        origin = key_queue_name(QUEUE, "alice")
        job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
        assert job.origin == origin
        Queue(origin, connection=redis_conn, serializer=JSONSerializer).remove(job)
        job.set_status(JobStatus.STARTED)
        redis_conn.hset(Keys.job(job_id), RecordField.started_at, repr(now()))
        redis_conn.zadd(f"rq:wip:{origin}", {f"{job_id}:exec1": time.time() - 100})  # its lease ran out
        assert Reaper(redis_conn, QUEUE, 1).sweep() == [job_id]
        assert redis_conn.lrange(queue_key("alice"), 0, -1) == [job_id.encode()]
        view = c.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEYS['alice']}"}).json()
        assert view["status"] == "queued" and view["queue_position"] == 1


def test_cancel_and_position_use_the_key_queue(redis_url: str, redis_conn: redis.Redis, keys_file: Path) -> None:
    """Guards: a canceled keyed job left in its queue (to run anyway), and queue_position counting
    other keys' jobs (it is the place among the key's own)."""
    with keyed(redis_url, keys_file) as c:
        a1, a2 = submit_as(c, "alice"), submit_as(c, "alice")
        b1 = submit_as(c, "bob")
        headers = {"Authorization": f"Bearer {KEYS['alice']}"}
        assert c.get(f"/v1/jobs/{a2}", headers=headers).json()["queue_position"] == 2
        assert c.get(f"/v1/jobs/{b1}", headers={"Authorization": f"Bearer {KEYS['bob']}"}).json()["queue_position"] == 1
        assert c.post(f"/v1/jobs/{a1}/cancel", headers=headers).status_code == 200
        assert redis_conn.lrange(queue_key("alice"), 0, -1) == [a2.encode()]
        assert c.get(f"/v1/jobs/{a2}", headers=headers).json()["queue_position"] == 1


def test_a_models_worker_takes_its_models_jobs_and_no_others(
    redis_url: str, redis_conn: redis.Redis, keys_file: Path
) -> None:
    """Guards: a worker taking another model's jobs (which its UNet cannot run), or never
    taking its own model's keyed jobs, or those that name no model."""
    redis_conn.sadd(Keys.models(QUEUE), "a", "b")
    with keyed(redis_url, keys_file, rate_limit="none") as c:
        mine = [post(c, "alice", model="a").json()["id"], post(c, "bob", model="a").json()["id"]]
        theirs = post(c, "alice", model="b").json()["id"]
        anyone = submit_as(c, "carol")
    order: list[str] = []
    run_slot(redis_conn, order, 3, model="a")
    assert sorted(order) == sorted([*mine, anyone])
    assert redis_conn.lrange(f"rq:queue:{key_queue_name(model_base(QUEUE, 'b'), 'alice')}", 0, -1) == [theirs.encode()]
    assert set(fair_order(redis_conn, [QUEUE, model_base(QUEUE, "a")])).isdisjoint(
        {model_base(QUEUE, "b"), key_queue_name(model_base(QUEUE, "b"), "alice")})
