"""The polled status path, GET /v1/jobs/{id}: one Redis round trip whatever the job's state,
concurrent reads sharing one pipeline, links resolved once, and request metrics that cannot
grow without bound. Against a real Redis; the round trips are counted on the client's
connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from fastapi.testclient import TestClient
from starlette.routing import NoMatchFound

from app.main import create_app
from app.store import records
from app.views import Links
from bailan.jobs import Keys
from tests.test_api import make_settings, override_job_access, publish_worker, start_job, submit


class CountingConnection(redis.asyncio.Connection):
    """A real connection that counts its writes once connected: one per round trip (a pipeline
    is one write); the handshake of a new connection is not counted."""

    writes = 0
    commands: list[bytes] = []
    _ready = False

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health=check_health)
        self._ready = True

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._ready:
            await super().send_packed_command(command, check_health)
            return
        CountingConnection.writes += 1
        chunks = [command] if isinstance(command, (bytes, bytearray, memoryview)) else list(command)
        CountingConnection.commands.extend(bytes(chunk) for chunk in chunks)
        await super().send_packed_command(command, check_health)

    @classmethod
    def reset(cls) -> None:
        cls.writes = 0
        cls.commands = []


def counting_client(redis_url: str) -> redis.asyncio.Redis:
    pool = redis.asyncio.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    return redis.asyncio.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


@pytest.fixture
def client(redis_url: str, redis_conn: redis.Redis) -> Iterator[TestClient]:
    """The API, with the job routes' event-loop client counting its round trips."""
    app = create_app(make_settings(redis_url))
    override_job_access(app, lambda: counting_client(redis_url))
    with TestClient(app) as c:
        yield c


def test_a_queued_job_is_read_in_one_round_trip_with_its_wait(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: a queued job's view costing five round trips (the snapshot, then the live workers
    in two, then the key queues and their lengths for eta_s) on the path every client polls."""
    publish_worker(redis_conn, samples_per_s=5.0, step_s=0.25, backlog=15)
    submit(client, steps=10)
    second = submit(client, steps=10)
    CountingConnection.reset()
    view = client.get(f"/v1/jobs/{second['id']}").json()
    assert CountingConnection.writes == 1
    assert b"EVALSHA" in CountingConnection.commands[0]
    # (15 backlog + 1 job ahead x 10 steps) / 5 samples/s, then 10 steps x 0.25 s.
    assert view["queue_position"] == 2 and view["eta_s"] == pytest.approx(7.5)


def test_a_running_job_is_read_in_one_round_trip(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: the running job's view (what most polls read) reading Redis more than once."""
    job = submit(client, steps=10)
    start_job(redis_conn, job["id"])
    redis_conn.zadd(Keys.previews(job["id"]), {"5": 4102444800})
    CountingConnection.reset()
    view = client.get(f"/v1/jobs/{job['id']}").json()
    assert CountingConnection.writes == 1
    assert view["status"] == "running" and [p["step"] for p in view["previews"]] == [5]
    assert view["previews"][0]["url"] == f"/v1/jobs/{job['id']}/previews/5"


def test_concurrent_reads_share_one_pipeline(client: TestClient, redis_url: str) -> None:
    """Guards: each concurrent status read paying its own round trip (a pooled connection, a write
    and a read each), the largest cost of the status path under polling load; and a batch
    handing one job's state to another job's reader."""
    jobs = [submit(client, prompt=f"job {i}")["id"] for i in range(12)]

    async def read_all() -> list[records.JobSnapshot | None]:
        conn = counting_client(redis_url)
        try:
            CountingConnection.reset()
            return await asyncio.gather(*(records.snapshot_async(conn, job) for job in [*jobs, "0" * 32]))
        finally:
            await conn.aclose()

    snaps = asyncio.run(read_all())
    assert CountingConnection.writes == 1
    assert [s.job_id if s else None for s in snaps] == [*jobs, None]
    assert [s.params.prompt for s in snaps[:-1] if s and s.params] == [f"job {i}" for i in range(12)]


def test_a_reader_that_goes_away_leaves_the_batch_whole(client: TestClient, redis_url: str) -> None:
    """Guards: one client disconnecting mid-read (its task cancelled) failing the reads it was
    batched with."""
    jobs = [submit(client)["id"] for _ in range(3)]

    async def read() -> tuple[bool, list[records.JobSnapshot | None]]:
        conn = counting_client(redis_url)
        try:
            tasks = [asyncio.create_task(records.snapshot_async(conn, job)) for job in jobs]
            await asyncio.sleep(0)  # all three queued in one batch
            tasks[1].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            return isinstance(done[1], asyncio.CancelledError), [d for i, d in enumerate(done) if i != 1]
        finally:
            await conn.aclose()

    cancelled, rest = asyncio.run(read())
    assert cancelled
    assert [s.job_id for s in rest if s] == [jobs[0], jobs[2]]


def test_a_client_that_outlives_its_event_loop_still_reads(client: TestClient, redis_url: str) -> None:
    """Guards: a read left pending when its event loop ended (its flush cancelled before it ran)
    leaving the batch with no flush to come, so that every later read on that client hung."""
    job = submit(client)["id"]
    conn = redis.asyncio.Redis.from_url(redis_url)

    async def abandoned() -> None:
        await asyncio.sleep(0)
        # Left running as the loop ends: the read starts while asyncio.run cancels what is left,
        # so its flush is cancelled before it starts.
        asyncio.create_task(records.snapshot_async(conn, job))

    async def later() -> records.JobSnapshot | None:
        try:
            return await asyncio.wait_for(records.snapshot_async(conn, job), 10)
        finally:
            await conn.aclose()

    asyncio.run(abandoned())
    snap = asyncio.run(later())
    assert snap is not None and snap.job_id == job


def test_a_script_redis_lost_is_loaded_again(
    client: TestClient, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: every status read failing after Redis restarts without its scripts (NOSCRIPT)."""
    import hashlib

    job = submit(client)["id"]
    original = records._SNAPSHOT

    def never_sent(tag: str) -> None:
        """A script this server has never been sent: what a restarted one answers for ours."""
        source = f"{original}\n-- {tag} {job}"
        monkeypatch.setattr(records, "_SNAPSHOT", source)
        monkeypatch.setattr(records, "_SNAPSHOT_SHA", hashlib.sha1(source.encode()).hexdigest())

    async def read() -> records.JobSnapshot | None:
        conn = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await records.snapshot_async(conn, job)
        finally:
            await conn.aclose()

    never_sent("batched")
    snap = asyncio.run(read())
    assert snap is not None and snap.job_id == job
    never_sent("blocking")
    with redis.Redis.from_url(redis_url) as conn:
        snap = records.snapshot(conn, job)
    assert snap is not None and snap.job_id == job


def test_links_are_the_routers_paths(client: TestClient) -> None:
    """Guards: links resolved once per route (views.Links) differing from what the router writes,
    and values the router would refuse slipping through."""
    app = client.app
    links = Links(app.url_path_for)  # type: ignore[attr-defined]
    job = "0123456789abcdef" * 2
    for name, params in [("get_job", {"job_id": job}), ("preview", {"job_id": job, "step": 0}),
                         ("preview", {"job_id": job, "step": 25}), ("image", {"job_id": job, "index": 3})]:
        for _ in range(2):  # resolved, then from the template
            assert links(name, **params) == str(app.url_path_for(name, **params))  # type: ignore[attr-defined]
    # Values outside the plain cases go to the router, which writes or refuses them as it does.
    assert links("preview", job_id=job, step=-1) == str(app.url_path_for("preview", job_id=job, step=-1))  # type: ignore[attr-defined]
    assert links("preview", job_id=job, step="7") == str(app.url_path_for("preview", job_id=job, step="7"))  # type: ignore[attr-defined]
    with pytest.raises(AssertionError):
        links("get_job", job_id="a/b")
    with pytest.raises(NoMatchFound):
        links("no_such_route", job_id=job)


def test_unknown_methods_count_as_other(client: TestClient) -> None:
    """Guards: a client growing the request metrics without bound by sending made-up methods."""
    for method in ("BREW", "WHEN", "GET"):
        client.request(method, "/healthz")
    text = client.get("/metrics").text
    assert 'method="other",route="/healthz",status="405"' in text
    assert "BREW" not in text and "WHEN" not in text


def test_a_kept_view_is_never_stale_nor_shown_to_another_key(client: TestClient, redis_conn: redis.Redis) -> None:
    """Guards: the views kept per API process (views.RenderedViews) serving a job as it was before
    it changed, or serving a kept view to an API key that does not own the job."""
    from app.auth import authenticate
    from bailan.jobs import RecordField
    from bailan.keys import ANONYMOUS, Principal

    job = submit(client, steps=10)["id"]
    start_job(redis_conn, job)
    assert client.get(f"/v1/jobs/{job}").json()["progress"]["step"] == 0
    assert client.get(f"/v1/jobs/{job}").json()["progress"]["step"] == 0  # served as kept
    redis_conn.hset(Keys.job(job), RecordField.step, "3")
    assert client.get(f"/v1/jobs/{job}").json()["progress"]["step"] == 3
    redis_conn.zadd(Keys.previews(job), {"3": 4102444800})
    assert [p["step"] for p in client.get(f"/v1/jobs/{job}").json()["previews"]] == [3]

    app = client.app
    app.dependency_overrides[authenticate] = lambda: Principal("someone-else")  # type: ignore[attr-defined]
    response = client.get(f"/v1/jobs/{job}")
    assert response.status_code == 404 and job in response.json()["detail"]
    app.dependency_overrides[authenticate] = lambda: Principal(ANONYMOUS)  # type: ignore[attr-defined]
    assert client.get(f"/v1/jobs/{job}").json()["previews"][0]["step"] == 3
