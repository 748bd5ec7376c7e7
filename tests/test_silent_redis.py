"""A Redis that stopped answering in the middle of a request (a paused process, a network
partition): the client gets its answer after one BAILAN_REDIS_TIMEOUT_S, not after a
clean-up that waits out another. Against the real server, through tests/lost_reply.py's
proxy in `stall` mode: from the command its trigger matches on, no answer comes on any
connection."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from fastapi.testclient import TestClient

from app import limits
from app.main import create_app, make_async_redis
from app.store import records
from app.store.events import JobEvents
from tests.lost_reply import LostReply, command_with, transaction_with
from tests.test_api import make_settings
from tests.test_lost_replies import db_of, server_port

TIMEOUT_S = 1.0
# One timeout and the request's own work, with room for a loaded host; two timeouts are over it.
ONE_TIMEOUT = 1.8 * TIMEOUT_S


@contextmanager
def api_stalling(redis_url: str, trigger: Callable[[bytes], bool], **overrides: Any) -> Iterator[TestClient]:
    """A test client of an API whose Redis stops answering at `trigger`; checks that it did."""
    with LostReply(server_port(redis_url), trigger, stall=True) as proxy:
        settings = make_settings(proxy.url(db_of(redis_url)), redis_timeout_s=TIMEOUT_S, **overrides)
        with TestClient(create_app(settings)) as client:
            yield client
    assert proxy.fired.is_set(), "Redis answered throughout: the test did not test it"


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_a_submit_to_a_redis_that_stopped_answering_fails_after_one_timeout(redis_url: str) -> None:
    """Guards a 503 that took twice BAILAN_REDIS_TIMEOUT_S (2.02 s for 1.0): Redis stopped
    answering during the submit's admission, and the place's release, made before the 503,
    waited the timeout again on the same silent server. It now runs on its own thread."""
    admit_sha = hashlib.sha1(limits._ADMIT.encode()).hexdigest().encode()
    with api_stalling(redis_url, command_with(b"EVALSHA", admit_sha)) as client:
        answer, waited = timed(lambda: client.post("/v1/jobs", json={"prompt": "a red circle"}))
    assert answer.status_code == 503 and "Redis" in answer.json()["detail"]
    assert waited < ONE_TIMEOUT, f"the 503 came after {waited:.2f} s, not after one {TIMEOUT_S} s timeout"


def test_a_submit_whose_transaction_met_a_silent_redis_fails_after_one_timeout(redis_url: str) -> None:
    """Guards a 503 that took three BAILAN_REDIS_TIMEOUT_S (3.04 s for 1.0): Redis stopped
    answering once the submit's transaction was sent, and redis-py's pipeline, still
    WATCHing, sent UNWATCH on a new connection to the silent server twice (in its execute,
    then in the submit's own reset), each waiting the timeout, though a broken connection's
    WATCHes are gone with it."""
    with api_stalling(redis_url, transaction_with(b"MULTI", b"rq:job")) as client:
        answer, waited = timed(lambda: client.post("/v1/jobs", json={"prompt": "a red circle"}))
    assert answer.status_code == 503 and "Redis" in answer.json()["detail"]
    assert waited < ONE_TIMEOUT, f"the 503 came after {waited:.2f} s, not after one {TIMEOUT_S} s timeout"


def test_a_submit_cut_off_while_its_transaction_watched_fails_after_one_timeout(redis_url: str) -> None:
    """Guards a 503 after two BAILAN_REDIS_TIMEOUT_S (2.04 s for 1.0): Redis stopped answering between the
    submit's WATCH and its EXEC (here at RQ's version check, which a fresh client sends on
    its first enqueue), and redis-py's reset sent UNWATCH on the watching connection, alive
    but unanswered, waiting the timeout again."""
    with api_stalling(redis_url, command_with(b"INFO", b"server")) as client:
        answer, waited = timed(lambda: client.post("/v1/jobs", json={"prompt": "a red circle"}))
    assert answer.status_code == 503 and "Redis" in answer.json()["detail"]
    assert waited < ONE_TIMEOUT, f"the 503 came after {waited:.2f} s, not after one {TIMEOUT_S} s timeout"


def test_releases_waiting_on_a_silent_redis_are_bounded() -> None:
    """Guards threads or memory piling up while Redis is silent: past MAX_PENDING_RELEASES the
    place is left to expire by itself, and a release that fails does not stop the next."""
    releases = limits._Releases(2)
    taken, gate = threading.Event(), threading.Event()
    ran: list[str] = []

    def silent() -> None:
        taken.set()
        gate.wait(5.0)
        raise redis.TimeoutError("silent")

    assert releases.put(silent) and taken.wait(5.0)
    assert releases.put(lambda: ran.append("second"))
    assert releases.put(lambda: ran.append("third"))
    assert not releases.put(lambda: ran.append("fourth"))  # two wait behind the silent one: full
    gate.set()
    assert releases.settle(5.0)
    assert ran == ["second", "third"]


def test_a_generation_whose_submit_met_a_silent_redis_fails_after_one_timeout(redis_url: str) -> None:
    """Guards an OpenAI-style 503 after two timeouts: the call's waiting place (a stream
    place) was given back on the request's path after its submit timed out, on the same
    silent server. It is now freed off the path (limits.RELEASES)."""
    with api_stalling(redis_url, transaction_with(b"MULTI", b"rq:job")) as client:
        answer, waited = timed(lambda: client.post("/v1/images/generations", json={"prompt": "a red circle"}))
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "service_unavailable"
    assert waited < ONE_TIMEOUT, f"the 503 came after {waited:.2f} s, not after one {TIMEOUT_S} s timeout"


def test_a_waiting_submit_whose_read_back_met_a_silent_redis_answers_after_one_timeout(redis_url: str) -> None:
    """Guards a `Prefer: wait` submit answered after two timeouts: its job was queued, the
    read-back of its view timed out, and the hold then took a place on the same silent
    server, waiting out another. Accepted, it answers 202 with the view as written."""
    snapshot_sha = records._SNAPSHOT_SHA.encode()
    with api_stalling(redis_url, command_with(b"EVALSHA", snapshot_sha)) as client:
        answer, waited = timed(lambda: client.post("/v1/jobs", json={"prompt": "a red circle"},
                                                   headers={"Prefer": "wait=5"}))
    assert answer.status_code == 202 and answer.json()["status"] == "queued"
    assert "Preference-Applied" not in answer.headers
    assert waited < ONE_TIMEOUT, f"the answer came after {waited:.2f} s, not after one {TIMEOUT_S} s timeout"


def test_a_subscription_that_never_began_is_not_undone_on_a_silent_redis(redis_url: str) -> None:
    """Guards a stream or hold whose end waited out a second timeout: its SUBSCRIBE to the
    job's channel timed out (the stream goes on with its safety poll), and its UNSUBSCRIBE at
    the end, of a channel never subscribed, waited on the silent server again."""

    async def follow_and_leave() -> None:
        conn = make_async_redis(make_settings(proxy.url(db_of(redis_url)), redis_timeout_s=TIMEOUT_S))
        events = JobEvents(conn)
        try:
            async with events.follow("silent-job"):
                pass
        finally:
            await conn.aclose()

    with LostReply(server_port(redis_url), lambda sent: True, stall=True) as proxy:
        _, waited = timed(lambda: asyncio.run(follow_and_leave()))
        assert proxy.fired.is_set()
    assert waited < ONE_TIMEOUT, f"following took {waited:.2f} s, not one {TIMEOUT_S} s timeout"
