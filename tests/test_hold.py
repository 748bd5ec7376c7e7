"""`Prefer: wait=N` (app.hold): a request held until its job ends, against a real Redis."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from app.hold import prefer_wait
from app.main import create_app
from bailan import events
from bailan.jobs import Keys, RecordField, now
from bailan.queues import key_digest
from tests.browser import ApiProcess
from tests.test_api import make_settings, start_job
from tests.test_e2e import wait_for


@pytest.mark.parametrize(
    ("header", "cap", "wanted"),
    [
        ("wait=10", 60, 10),
        ("respond-async, wait=10", 60, 10),
        ('WAIT = "5"; foo=bar', 60, 5),
        ("wait=600", 60, 60),  # capped
        ("wait=0", 60, None),
        ("wait=soon", 60, None),  # unreadable: ignored (RFC 7240)
        ("wait=-3", 60, None),
        ("wait=\u00b2", 60, None),  # a digit to str.isdigit, not to int(): was a 500
        ("wait=" + "9" * 5000, 60, None),
        ("wait", 60, None),
        ("return=minimal", 60, None),
        ("wait=10", 0, None),  # holding off on this server
        ("", 60, None),
    ],
)
def test_prefer_wait_reads_rfc_7240(header: str, cap: int, wanted: int | None) -> None:
    """Guards against a preference misread: a wait beyond the server's cap, or a hold
    granted for a value that is no number of seconds."""
    assert prefer_wait(header, cap) == wanted


def finish_later(conn: redis.Redis, job_id: str, after_s: float) -> threading.Thread:
    """Start the job, then end it `after_s` later, as a worker does (RQ status, record, notification)."""

    def work() -> None:
        start_job(conn, job_id)
        events.notify(conn, job_id)
        time.sleep(after_s)
        conn.hset(Keys.job(job_id), mapping={RecordField.step: "25", RecordField.finished_at: repr(now()),
                                             RecordField.images: '[{"index": 0, "seed": 1}]'})
        Job.fetch(job_id, connection=conn, serializer=JSONSerializer).set_status(JobStatus.FINISHED)
        events.notify(conn, job_id)

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def finish_the_next_job(conn: redis.Redis) -> tuple[threading.Thread, list[threading.Thread]]:
    """Take the next job submitted, as a worker takes it from the queue, and end it (finish_later)."""
    done: list[threading.Thread] = []

    def worker() -> None:
        # The job id is known once the submit wrote it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ids = [k.decode().rsplit(":", 1)[-1] for k in conn.scan_iter(Keys.job("*"))]
            if ids:
                done.append(finish_later(conn, ids[0], 0.3))
                return
            time.sleep(0.02)

    taker = threading.Thread(target=worker)
    taker.start()
    return taker, done


def test_a_held_poll_answers_when_the_job_ends(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against `Prefer: wait` answering at once (a client's poll loop again) or only on
    the safety poll: with that at 60 s, the end must arrive by the worker's notification."""
    with TestClient(create_app(make_settings(redis_url, events_poll_interval_s=60))) as c:
        job_id = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
        worker = finish_later(redis_conn, job_id, 0.5)
        started = time.monotonic()
        r = c.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=20"})
        held = time.monotonic() - started
        worker.join()
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
        assert r.headers["preference-applied"] == "wait=20"
        assert 0.4 < held < 10
        # Asked again once ended: the end at once, the preference still applied (the README says so).
        started = time.monotonic()
        again = c.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=20"})
        assert again.json()["status"] == "succeeded" and again.headers["preference-applied"] == "wait=20"
        assert time.monotonic() - started < 2
        assert c.app.state.job_events.waiters == {}  # the subscription went with the request
        assert redis_conn.zcard(Keys.streams(_digest("anonymous"))) == 0  # its stream place too


def test_a_held_submit_answers_with_the_ended_job(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against POST with `Prefer: wait` holding nothing, or answering without the
    finished view: one request from submit to `succeeded`."""
    with TestClient(create_app(make_settings(redis_url, events_poll_interval_s=60))) as c:
        taker, done = finish_the_next_job(redis_conn)
        r = c.post("/v1/jobs", json={"prompt": "x"}, headers={"Prefer": "wait=20"})
        taker.join()
        done[0].join()
        assert r.status_code == 202
        assert r.json()["status"] == "succeeded" and r.headers["preference-applied"] == "wait=20"
        assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"


def test_a_hold_ends_after_its_seconds_with_the_job_as_it_is(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against a hold that outlives its N seconds (a client's timeout, a proxy's)."""
    with TestClient(create_app(make_settings(redis_url, events_poll_interval_s=60))) as c:
        job_id = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
        started = time.monotonic()
        r = c.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=1"})
        assert 0.9 < time.monotonic() - started < 5
        assert r.json()["status"] == "queued" and r.headers["preference-applied"] == "wait=1"


def test_a_hold_beyond_the_keys_stream_places_is_answered_at_once(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against held requests escaping BAILAN_MAX_STREAMS_PER_KEY (each holds a
    connection and a subscription): with no place free the answer comes at once and says
    no preference was applied; an ended job is never held (answered at once, as its end)."""
    with TestClient(create_app(make_settings(redis_url, max_streams_per_key=1))) as c:
        job_id = c.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
        redis_conn.zadd(Keys.streams(_digest("anonymous")), {"someone-else": time.time() + 60})
        started = time.monotonic()
        r = c.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=20"})
        assert time.monotonic() - started < 2
        assert r.json()["status"] == "queued" and "preference-applied" not in r.headers
        redis_conn.delete(Keys.streams(_digest("anonymous")))  # the place is free again
        c.post(f"/v1/jobs/{job_id}/cancel")
        r = c.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=20"})
        assert r.json()["status"] == "canceled" and r.headers["preference-applied"] == "wait=20"  # the end
        assert redis_conn.zcard(Keys.streams(_digest("anonymous"))) == 0  # no place was taken


def test_a_hold_on_an_unknown_job_is_404_at_once(redis_url: str) -> None:
    """Guards against `Prefer: wait` holding a request for a job that does not exist instead
    of answering 404 (another key's job is refused by the same check, test_auth)."""
    with TestClient(create_app(make_settings(redis_url))) as c:
        started = time.monotonic()
        r = c.get("/v1/jobs/0123456789abcdef0123456789abcdef", headers={"Prefer": "wait=5"})
        assert r.status_code == 404 and time.monotonic() - started < 2


def _digest(name: str) -> str:
    from bailan.queues import key_digest

    return key_digest(name)


def test_a_hold_that_loses_redis_answers_with_the_accepted_job(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against a submit whose hold meets a Redis error answering 503 after the job was
    accepted: a client without an Idempotency-Key would submit it again. The hold's reads
    fail here (its event-loop client points at a closed port); the submit's own writes do not."""
    import redis.asyncio

    from tests.test_api import closed_port, override_job_access

    app = create_app(make_settings(redis_url, events_poll_interval_s=60))
    override_job_access(app, lambda: redis.asyncio.Redis(port=closed_port(), socket_connect_timeout=0.5))
    with TestClient(app) as c:
        r = c.post("/v1/jobs", json={"prompt": "x"}, headers={"Prefer": "wait=5"})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert "preference-applied" not in r.headers
    assert redis_conn.exists(Keys.job(r.json()["id"]))
    assert redis_conn.zcard(Keys.streams(_digest("anonymous"))) == 0  # its place was given back


def test_clients_that_leave_a_held_call_give_back_their_places(redis_url: str, redis_conn: redis.Redis,
                                                              tmp_path: Path) -> None:
    """Guards against held calls whose client went away keeping their API key's stream
    places: an OpenAI-style generation renewed its place for the whole of
    BAILAN_OPENAI_TIMEOUT_S (300 s) after its client had gone, and an event stream's
    cancelled cleanup left its place taken for the 60 s lease. The real server (uvicorn)
    and real disconnects: each client gives up after one second."""
    api = ApiProcess(redis_url, tmp_path / "api.log", BAILAN_QUEUE_NAME="leavers",
                     BAILAN_EVENTS_POLL_INTERVAL_S="0.2")
    places = Keys.streams(key_digest("anonymous"))
    before = redis_conn.zcard(places)
    impatient = httpx.Timeout(5, read=1)
    base = f"http://127.0.0.1:{api.port}"

    def follow(url: str) -> None:
        with httpx.stream("GET", url, timeout=impatient) as r:
            for _ in r.iter_lines():  # the first view at once, then silence: a queued job
                pass

    try:
        calls = [
            lambda: httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"}, timeout=impatient),
            lambda: httpx.post(f"{base}/v1/jobs", json={"prompt": "x"}, headers={"Prefer": "wait=60"},
                               timeout=impatient),
            lambda: follow(f"{base}/v1/jobs/{job_id}/events"),
        ]
        job_id = api.http.post("/v1/jobs", json={"prompt": "x"}).json()["id"]  # stays queued: no worker
        for call in calls:
            with pytest.raises(httpx.ReadTimeout):
                call()
        wait_for(lambda: redis_conn.zcard(places) == before, 5, "every place to be given back")
    finally:
        api.close()


def test_an_openai_call_that_loses_redis_after_accepting_says_not_to_retry(redis_url: str,
                                                                           redis_conn: redis.Redis) -> None:
    """Guards against an OpenAI-style generation whose wait met a Redis error answering the
    generic 503 with `x-should-retry: true`: OpenAI's SDKs retried it, and each retry queued
    the job again. The wait's reads fail here (its event-loop client points at a closed port)."""
    import redis.asyncio

    from app.deps import get_async_redis
    from tests.test_api import QUEUE, closed_port

    app = create_app(make_settings(redis_url, events_poll_interval_s=60))
    app.dependency_overrides[get_async_redis] = lambda: redis.asyncio.Redis(port=closed_port(),
                                                                             socket_connect_timeout=0.5)
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["x-should-retry"] == "false", (r.status_code, r.headers)
    job_id = r.headers["x-bailan-job-id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    assert "do not resubmit" in r.json()["error"]["message"]
    assert redis_conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [job_id.encode()]  # queued once, still there
    assert redis_conn.zcard(Keys.streams(_digest("anonymous"))) == 0


def test_an_openai_call_whose_answer_fails_after_accepting_says_not_to_retry(redis_url: str,
                                                                           redis_conn: redis.Redis) -> None:
    """Guards against an OpenAI-style generation that failed after its job was queued (here
    the finished image cannot be read) answering the app's generic 500, neither in OpenAI's
    shape nor with `x-should-retry: false`: OpenAI's SDKs retried it, and each retry queued
    the job again (one call, three jobs)."""
    from app.deps import get_blobs
    from bailan.blobs import DirBlobStore

    class UnreadableBlobs(DirBlobStore):
        def get(self, key: str) -> bytes | None:
            raise OSError("injected: the blob store's disk failed")

    settings = make_settings(redis_url, events_poll_interval_s=60)
    app = create_app(settings)
    app.dependency_overrides[get_blobs] = lambda: UnreadableBlobs(settings.blob_dir)
    with TestClient(app, raise_server_exceptions=False) as c:
        taker, done = finish_the_next_job(redis_conn)
        r = c.post("/v1/images/generations", json={"prompt": "x"})
        taker.join()
        done[0].join()
    assert r.status_code == 500 and r.headers["x-should-retry"] == "false", (r.status_code, r.headers)
    job_id = r.headers["x-bailan-job-id"]
    error = r.json()["error"]
    assert error["type"] == "server_error" and job_id in error["message"] and "do not resubmit" in error["message"]
    assert [k.decode() for k in redis_conn.scan_iter(Keys.job("*"))] == [Keys.job(job_id)]  # one job
    assert redis_conn.zcard(Keys.streams(_digest("anonymous"))) == 0


def test_openai_urls_start_with_the_public_url(redis_url: str, redis_conn: redis.Redis) -> None:
    """Guards against an OpenAI-style `url` answer built from the address the request came
    to: behind a proxy it named the API's internal address, not BAILAN_PUBLIC_URL, where
    clients reach it."""
    public = "https://bailan.example.com/api"
    with TestClient(create_app(make_settings(redis_url, events_poll_interval_s=60, public_url=public))) as c:
        taker, done = finish_the_next_job(redis_conn)
        r = c.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
        taker.join()
        done[0].join()
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [{"url": f"{public}/v1/jobs/{r.headers['x-bailan-job-id']}/images/0"}]


def test_a_stream_whose_client_left_before_it_began_gives_back_its_place(redis_conn: redis.Redis) -> None:
    """Guards against a stream place kept for its whole 60 s lease: a client that left before
    the stream's first step (an EventSource reconnecting on a flaky link) had Starlette cancel
    the stream's body unstarted, so the body's `finally` that gave the place back never ran,
    and a key's places ran out. The response gives it back, however it ends. Driven as an
    ASGI 2.3 server (uvicorn's) drives it: the disconnect is there at once."""
    import anyio

    from app import limits
    from app.hold import PlacedStream
    from bailan.keys import Principal

    principal = Principal("leaver")
    places = Keys.streams(key_digest("leaver"))
    assert limits.open_stream(redis_conn, "leaver", "s1", 4)
    started: list[bool] = []

    async def body() -> Any:
        started.append(True)
        yield "event: job\ndata: {}\n\n"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await anyio.sleep(0.05)  # the wire is slow: the disconnect wins

    async def serve() -> None:
        response = PlacedStream(body(), redis_conn, principal, "s1")
        await response({"type": "http", "asgi": {"spec_version": "2.3"}, "method": "GET"}, receive, send)

    anyio.run(serve)
    assert not started  # the body never ran: only the response could give the place back
    assert redis_conn.zcard(places) == 0
