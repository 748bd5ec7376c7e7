"""A fair share per API key, enforced in Redis: submit rate, queued jobs, open event streams.

Each check is one Lua script, so it is atomic across every API process: two
submits can never both see room for one more job. Admission also *reserves*
the job's place (Keys.reservations) until the submit's MULTI enqueues it and
drops the reservation in the same transaction; a reservation left by an API
process that died in between expires after RESERVATION_S.
"""

from __future__ import annotations

import contextlib
import math
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from bailan.jobs import Keys
from bailan.queues import RQ_QUEUE_PREFIX, key_digest

# Longer than any submit takes between admission and its MULTI.
RESERVATION_S = 30
# An event stream's place counts this long unless its stream renews it (it
# does every STREAM_RENEW_S), so a crashed API process frees its places.
STREAM_LEASE_S = 60
STREAM_RENEW_S = 20

# Releases queued after Redis gave no answer, at most; past it a place expires by itself.
MAX_PENDING_RELEASES = 64

_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Rate:
    """At most `count` submits in any `period_s` window (a burst of `count`, then count/period_s)."""

    count: int
    period_s: float

    @property
    def interval_s(self) -> float:
        return self.period_s / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s:g}s"


def parse_rate(text: str) -> Rate | None:
    """'120/minute', '10/second', '1000/hour', '5/10 minutes'; 'none' or 'off' for no limit."""
    if text.strip().lower() in ("", "none", "off", "unlimited"):
        return None
    match = _RATE.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a rate: write COUNT/PERIOD, e.g. 120/minute, 10/second, 5/10minutes, or 'none'"
        )
    count, multiple, unit = int(match[1]), int(match[2] or 1), match[3].lower()
    if count < 1 or multiple < 1:
        raise ValueError(f"{text!r}: the count and the period must be at least 1")
    return Rate(count, multiple * _PERIODS[unit])


# KEYS: rate state, reservations, key-queue set, own queue list, base queue list.
# ARGV: rate interval s (0 = none), rate period s, per-key cap, total cap,
#       reservation member, own queue name.
# A call that finds its member holding a place already is one sent again by the client after
# its answer was lost: it answers as the first did, without charging the rate again.
# Returns {verdict, number}: {"ok", depth}, {"rate", seconds to wait},
# {"key", own depth}, {"total", depth}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
-- Sent again (its first answer lost): admitted already, so neither charged nor capped again.
local held = redis.call('ZSCORE', KEYS[2], ARGV[5]) ~= false
local interval = held and 0 or tonumber(ARGV[1])
local tat = now
if interval > 0 then
  tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
  local wait = tat + interval - tonumber(ARGV[2]) - now
  if wait > 0 then return {'rate', tostring(wait)} end
end
local reserved = redis.call('ZRANGE', KEYS[2], 0, -1)
local prefix = ARGV[6] .. '\\n'
local own = redis.call('LLEN', KEYS[4])
for _, member in ipairs(reserved) do
  if string.sub(member, 1, #prefix) == prefix then own = own + 1 end
end
if not held and own >= tonumber(ARGV[3]) then return {'key', tostring(own)} end
local total = redis.call('LLEN', KEYS[5]) + #reserved - (held and 1 or 0)
for _, name in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  total = total + redis.call('LLEN', '""" + RQ_QUEUE_PREFIX + """' .. name)
end
if held then return {'ok', tostring(total)} end
if total >= tonumber(ARGV[4]) then return {'total', tostring(total)} end
if interval > 0 then
  redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil((tat + interval - now) * 1000) + 1000)
end
redis.call('ZADD', KEYS[2], now + """ + str(RESERVATION_S) + """, ARGV[5])
return {'ok', tostring(total)}
"""

# A submit that failed after admission, before its transaction ran: its place back, and its
# submit back to the key's rate (the theoretical arrival time one interval earlier, never
# before now), so a retry of a submit that made nothing is not refused for it. Only while it
# holds its place: one whose place already lapsed (a submit stalled RESERVATION_S) keeps its
# submit counted, as does a second sending of this call.
# KEYS: rate state, reservations. ARGV: reservation member, rate interval s (0 = none).
_RELEASE = """
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
local interval = tonumber(ARGV[2])
-- Nothing removed: released already (this call sent again after its answer was lost).
if interval <= 0 or removed == 0 then return 0 end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local back = math.max(tat - interval, now)
if tat <= now then return 0 end
if back <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], tostring(back), 'PX', math.ceil((back - now) * 1000) + 1000)
end
return 1
"""

# KEYS: the key's open streams. ARGV: cap, stream id, lease s. 1 = opened, 0 = at the cap.
_OPEN_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], ARGV[2])
-- Held already: this call sent again after its answer was lost, not a stream over the cap.
if not held and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]) + 60)
return 1
"""

_RENEW_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + 60)
return 1
"""


class Refused(Exception):
    """A submit over a limit: `reason` is 'rate', 'key' or 'total'; `number` the wait (s) or the depth."""

    def __init__(self, reason: str, number: float) -> None:
        super().__init__(reason, number)
        self.reason = reason
        self.number = number

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.number))


class _Releases:
    """Gives places back after Redis gave no answer, off the request's path. On a server that
    stopped answering, a release made before the 503 would wait BAILAN_REDIS_TIMEOUT_S again,
    doubling the client's wait; made here it waits alone. One thread, started on first use."""

    def __init__(self, limit: int) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue(limit)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, release: Callable[[], None]) -> bool:
        """Queue `release`; False where MAX_PENDING_RELEASES wait already (Redis has been silent
        that long: the place expires by itself, RESERVATION_S or STREAM_LEASE_S)."""
        try:
            self._queue.put_nowait(release)
        except queue.Full:
            return False
        with self._lock:
            if self._thread is None:
                # A daemon: pending releases must not hold up the process's exit on a silent Redis.
                self._thread = threading.Thread(target=self._run, name="bailan-release", daemon=True)
                self._thread.start()
        return True

    def settle(self, timeout_s: float) -> bool:
        """Whether every queued release has run within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            release = self._queue.get()
            try:
                release()
            except Exception:  # noqa: BLE001 - a release is best effort; its place expires anyway
                pass
            finally:
                self._queue.task_done()


RELEASES = _Releases(MAX_PENDING_RELEASES)


@dataclass(frozen=True)
class Admission:
    """A place held for one job until the submit's MULTI releases it (`release_in`)."""

    base: str
    member: str
    depth: int  # jobs queued (or being queued) across every key before this one
    rate_key: str = ""
    interval_s: float = 0.0  # the key's rate interval; 0 = no rate

    def release_in(self, pipe: redis.client.Pipeline) -> None:
        pipe.zrem(Keys.reservations(self.base), self.member)

    def release(self, conn: redis.Redis, refund: bool = True, later: bool = False) -> None:
        """For a submit that failed after admission: give the place back now, not after
        RESERVATION_S, and with `refund` its submit back to the key's rate. No refund where
        the job may have been queued after all (a transaction whose reply was lost). With
        `later`, after Redis gave no answer in time (a timeout, where a broken connection's
        error comes at once): on RELEASES' thread, so the 503 need not wait another timeout."""
        if later:
            RELEASES.put(lambda: self.release(conn, refund))
            return
        try:
            conn.register_script(_RELEASE)(keys=[self.rate_key, Keys.reservations(self.base)],
                                           args=[self.member, repr(self.interval_s) if refund else "0"])
        except redis.RedisError:
            pass  # the place expires by itself; the submit stays counted


def admit(
    conn: redis.Redis,
    base: str,
    key_name: str,
    queue_name: str,
    job_id: str,
    rate: Rate | None,
    max_queued_per_key: int,
    max_queue_depth: int,
) -> Admission:
    """Check the key's rate and both queue caps, and hold a place for `job_id`; raises Refused."""
    member = f"{queue_name}\n{job_id}"
    keys = [
        Keys.rate(key_digest(key_name)),
        Keys.reservations(base),
        Keys.key_queues(base),
        RQ_QUEUE_PREFIX + queue_name,
        RQ_QUEUE_PREFIX + base,
    ]
    args = [
        repr(rate.interval_s) if rate else "0",
        repr(rate.period_s) if rate else "0",
        max_queued_per_key,
        max_queue_depth,
        member,
        queue_name,
    ]
    # EVALSHA, falling back to EVAL once per server: the script's body is not resent each time.
    try:
        verdict, number = conn.register_script(_ADMIT)(keys=keys, args=args)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # No answer (a timeout, which the client does not resend): the script may have run, and
        # its place would stay held, its submit counted against the key's rate, for
        # RESERVATION_S, refusing the client's retry at a cap. Given back: at once after a broken
        # connection, on RELEASES' thread after a timeout; where the script never ran, the
        # release finds no place and gives nothing.
        Admission(base, member, 0, keys[0], rate.interval_s if rate else 0.0).release(
            conn, later=isinstance(exc, redis.TimeoutError))
        raise
    verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
    value = float(number)
    if verdict != "ok":
        raise Refused(verdict, value)
    return Admission(base, member, int(value), keys[0], rate.interval_s if rate else 0.0)


def open_stream(conn: redis.Redis, key_name: str, stream_id: str, cap: int) -> bool:
    """Count a new event stream against its key's cap; False when the key is at it."""
    script = conn.register_script(_OPEN_STREAM)
    try:
        return bool(script(keys=[Keys.streams(key_digest(key_name))], args=[cap, stream_id, STREAM_LEASE_S]))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # No answer: the place may be held for its lease (STREAM_LEASE_S) by a stream that never
        # opened, counting against the key's cap. Closed: at once after a broken connection, on
        # RELEASES' thread after a timeout; where it was never taken, a no-op.
        if isinstance(exc, redis.TimeoutError):
            RELEASES.put(lambda: close_stream(conn, key_name, stream_id))
        else:
            with contextlib.suppress(redis.RedisError):
                close_stream(conn, key_name, stream_id)
        raise


def renew_stream(conn: redis.Redis, key_name: str, stream_id: str) -> None:
    conn.register_script(_RENEW_STREAM)(keys=[Keys.streams(key_digest(key_name))], args=[stream_id, STREAM_LEASE_S])


def close_stream(conn: redis.Redis, key_name: str, stream_id: str) -> None:
    conn.zrem(Keys.streams(key_digest(key_name)), stream_id)
