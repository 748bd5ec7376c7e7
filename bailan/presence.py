"""Which workers are alive, found without scanning Redis's keyspace.

A worker's presence is two writes, renewed together every presence tick: its
key (Keys.worker, its description as JSON, with a TTL of a few seconds) and
its name in the sorted set Keys.workers, scored by when that key expires.
Readers (the API's /readyz, /v1/models, submits, wait estimates; the
launcher) take the names whose score is still ahead and read their keys in one
MGET. A SCAN for `bailan:worker:*` would instead walk every key in the
database, every job record included, on every call.

A dead worker's key expires by itself; its name is dropped from the set by
the next reader once it is a minute stale. The key's TTL, kept by Redis' own
clock, is what says a worker is alive. The set's scores are on Redis' clock
too (TIME, read inside a script on both sides), so no host's clock enters
presence at all: a worker whose clock was a few seconds behind the API's was
once taken for dead, and later one more than a minute behind still was.
"""

from __future__ import annotations

from typing import Any

import redis

from bailan.jobs import Keys

# How long a stale name stays in the set before a reader drops it (seconds).
STALE_S = 60.0


# Redis' time in seconds, as a float (TIME answers seconds and microseconds as strings).
_NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
# KEYS[1] the set; ARGV: name, TTL in seconds.
_SCORE = _NOW + "redis.call('ZADD', KEYS[1], string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])\n"
# KEYS[1] the set; ARGV: how long a stale name stays. The names still within it.
_NAMES = _NOW + """local stale = string.format('%.6f', now - tonumber(ARGV[1]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. stale)
return redis.call('ZRANGEBYSCORE', KEYS[1], stale, '+inf')
"""
# Sent by SHA, as the reaper's scripts are: presence is written every tick by every worker.
_score = redis.client.Script(None, _SCORE.encode())  # type: ignore[arg-type]
_names = redis.client.Script(None, _NAMES.encode())  # type: ignore[arg-type]
# For scripts that find live workers themselves (app.store.records' snapshot): a Lua function,
# `presence_since()`, the lowest score a live worker's name may have.
LUA_PRESENCE_SINCE = f"local function presence_since()\n{_NOW}return now - {STALE_S!r}\nend\n"


def publish(pipe: Any, name: str, payload: str, ttl_s: float) -> None:
    """Queue on `pipe` the writes that say worker `name` is alive for `ttl_s` seconds."""
    pipe.set(Keys.worker(name), payload, px=max(1, int(ttl_s * 1000)))
    _score(keys=[Keys.workers()], args=[name, repr(float(ttl_s))], client=pipe)


def withdraw(conn: redis.Redis, name: str) -> None:
    """A worker's clean exit: it is gone at once, not a few seconds later."""
    pipe = conn.pipeline(transaction=False)
    pipe.delete(Keys.worker(name))
    pipe.zrem(Keys.workers(), name)
    pipe.execute()


def _live_keys(names: list[bytes | str]) -> list[str]:
    return [Keys.worker(n.decode() if isinstance(n, bytes) else n) for n in names]


def live(conn: redis.Redis) -> list[tuple[str, bytes]]:
    """(worker key, its JSON) for every worker whose presence holds: its key not expired."""
    keys = _live_keys(_names(keys=[Keys.workers()], args=[repr(STALE_S)], client=conn))
    return [(key, raw) for key, raw in zip(keys, conn.mget(keys)) if raw is not None] if keys else []


def any_live(conn: redis.Redis) -> bool:
    """Whether some worker's presence holds (the launcher's "ready" line)."""
    return bool(live(conn))
