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
clock, is what says a worker is alive: the set's scores come from the
workers' clocks, so readers list every name scored within that minute and
keep those whose key still exists. A worker whose clock is a few seconds
behind the API's is then still seen (it was taken for dead at 4 s of skew).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from bailan.jobs import Keys

# How long a stale name stays in the set before a reader drops it (seconds).
STALE_S = 60.0


def publish(pipe: Any, name: str, payload: str, ttl_s: float) -> None:
    """Queue on `pipe` the writes that say worker `name` is alive for `ttl_s` seconds."""
    pipe.set(Keys.worker(name), payload, px=max(1, int(ttl_s * 1000)))
    pipe.zadd(Keys.workers(), {name: time.time() + ttl_s})


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
    stale = time.time() - STALE_S
    pipe = conn.pipeline(transaction=False)
    pipe.zremrangebyscore(Keys.workers(), "-inf", stale)
    pipe.zrangebyscore(Keys.workers(), stale, "+inf")
    _, names = pipe.execute()
    keys = _live_keys(names)
    return [(key, raw) for key, raw in zip(keys, conn.mget(keys)) if raw is not None] if keys else []


def any_live(conn: redis.Redis) -> bool:
    """Whether some worker's presence holds (the launcher's "ready" line)."""
    return bool(live(conn))
