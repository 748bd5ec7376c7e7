"""`Prefer: wait=N` (RFC 7240): a request held until its job ends, instead of polling.

A client that sends `Prefer: wait=30` with `POST /v1/jobs` or `GET /v1/jobs/{id}`
gets its answer when the job has ended, or after 30 seconds, whichever comes
first (as Replicate's API does for predictions). One request replaces a poll
loop, and the service is told of the end by the worker's notification
(bailan.events), not by the next poll: where the API shares cores with a
worker, hard polling takes the worker's CPU (README, "Polling against event
streams").

A held request takes one of its API key's event-stream places
(BAILAN_MAX_STREAMS_PER_KEY) while it waits; with none free it is answered at
once, without `Preference-Applied`, as RFC 7240 lets a server ignore a
preference. A preference this server cannot read is ignored the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app import limits
from app.deps import JobAccess
from app.settings import ApiSettings
from app.store import records
from app.store.events import JobEvents
from bailan.jobs import TERMINAL_STATES
from bailan.keys import Principal

# delta-seconds (RFC 7240 via RFC 9110): a few ASCII digits; more than six would be days.
_SECONDS = re.compile(r"[0-9]{1,6}")

# Proxies drop idle connections after about a minute; streams send a comment line this often,
# so a wait re-reads its job at least as often (a lost notification costs no more than that).
KEEPALIVE_S = 15.0

PREFER_DESCRIPTION = (
    "`wait=N` (RFC 7240): hold the answer until the job has ended or N seconds have passed "
    "(at most BAILAN_MAX_WAIT_S); the response then carries `Preference-Applied: wait=N`. "
    "Other preferences are ignored."
)


def prefer_wait(header: str | None, cap_s: float) -> int | None:
    """Seconds `Prefer: wait=N` asks to be held, at most `cap_s`; None when it asks for no wait,
    or for one this server does not grant (RFC 7240: an unreadable preference is ignored)."""
    if not header or cap_s < 1:
        return None
    for preference in header.split(","):
        token = preference.split(";", 1)[0].strip()
        name, _, value = token.partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not _SECONDS.fullmatch(value):  # ASCII digits only: str.isdigit takes "²", which int() refuses
            return None
        seconds = min(int(value), int(cap_s))
        return seconds if seconds > 0 else None
    return None


async def give_back_place(conn: redis.Redis, principal: Principal, stream_id: str, silent: bool = False) -> None:
    """Free a stream's or hold's place among its key's (BAILAN_MAX_STREAMS_PER_KEY), also
    from a stream whose client went away: Starlette then cancels the stream, and an await
    in its `finally` would be cancelled at once, leaving the place taken until its lease
    (limits.STREAM_LEASE_S) ran out. `silent`: Redis just timed out on this request; freed
    off its path (limits.RELEASES), or its answer waited a second timeout."""
    if silent:
        limits.RELEASES.put(lambda: limits.close_stream(conn, principal.name, stream_id))
        return
    with anyio.CancelScope(shield=True), contextlib.suppress(redis.RedisError):
        await run_in_threadpool(limits.close_stream, conn, principal.name, stream_id)


class PlacedStream(StreamingResponse):
    """An event stream holding one of its API key's stream places, given back when the
    response ends, however it ends. The body's own `finally` is not enough: a client gone
    before the body's first step has Starlette cancel the body unstarted, so its `finally`
    never runs, and the place stayed taken until its lease (limits.STREAM_LEASE_S) ran out:
    a reconnecting EventSource on a flaky link used up its key's places."""

    def __init__(self, content: Any, conn: redis.Redis, principal: Principal, stream_id: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.place = (conn, principal, stream_id)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await give_back_place(*self.place)


async def snapshots(
    events: JobEvents,
    settings: ApiSettings,
    conn: redis.Redis,
    aconn: Any,
    principal: Principal,
    stream_id: str,
    job_id: str,
    deadline: float = math.inf,
    base: str | None = None,
) -> AsyncIterator[records.JobSnapshot | None]:
    """The job's snapshot now and whenever a worker says it changed (or at the safety poll,
    at least every KEEPALIVE_S), until it ends, expires (None), or `deadline` (monotonic)
    passes: then the last one yielded is not final. `stream_id` is the caller's place among
    its key's streams, renewed here while it waits. With `base` (the queue name), a queued
    job's snapshot carries its wait inputs (a view's eta_s)."""
    async with events.follow(job_id) as changed:
        # Subscribed first, read second: an end between the two is not missed.
        last_renewed = time.monotonic()
        while True:
            snap = await records.snapshot_async(aconn, job_id, base)
            yield snap
            remaining = deadline - time.monotonic()
            if snap is None or snap.state in TERMINAL_STATES or remaining <= 0:
                return
            wait = min(settings.events_poll_interval_s, KEEPALIVE_S, remaining)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)
            changed.clear()
            if time.monotonic() - last_renewed >= limits.STREAM_RENEW_S:
                await run_in_threadpool(limits.renew_stream, conn, principal.name, stream_id)
                last_renewed = time.monotonic()


async def until_ended(request: Request, access: JobAccess, principal: Principal, job_id: str, seconds: float) -> bool:
    """Hold until the job ends (or is gone), the client goes away, or `seconds` pass. False
    when nothing was held: the API key's stream places were all taken, or Redis failed (the
    caller answers with what it has, not a 503 after the job was accepted)."""
    conn, settings = access.redis, access.settings
    hold_id = uuid.uuid4().hex
    try:
        opened = await run_in_threadpool(limits.open_stream, conn, principal.name, hold_id,
                                         settings.max_streams_per_key)
    except redis.RedisError:
        return False
    if not opened:
        return False
    silent = False
    try:
        deadline = time.monotonic() + seconds
        async for _ in snapshots(request.app.state.job_events, settings, conn, access.aredis, principal, hold_id,
                                 job_id, deadline):
            # Woken at every change and safety poll: a client gone meanwhile frees its place.
            if await request.is_disconnected():
                break
        return True
    except redis.RedisError as exc:
        silent = isinstance(exc, redis.TimeoutError)
        return False
    finally:
        await give_back_place(conn, principal, hold_id, silent)
