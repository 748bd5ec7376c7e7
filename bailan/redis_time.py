"""Expiry scores kept on Redis' own clock.

Sorted sets scored by when something expires (the live workers, a job's
previews) are written by one host and read by another. Scored and compared
on each host's own clock, they were only as right as the hosts' clocks agreed:
a worker whose clock lagged its API's by more than the window was taken for
dead, or its previews for expired as soon as they were stored. Both sides read
Redis' TIME inside a script instead, so no host's clock enters them.
"""

from __future__ import annotations

from typing import Any

# `now`: Redis' time in seconds, as a float (TIME answers seconds and microseconds as strings).
LUA_NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
# A Lua function, redis_now(), for scripts that compare with such scores themselves.
LUA_REDIS_NOW = f"local function redis_now()\n{LUA_NOW}return now\nend\n"
# KEYS[1] the set; ARGV: member, seconds from now.
_SCORE = LUA_NOW + "redis.call('ZADD', KEYS[1], string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])\n"


def add_expiring(pipe: Any, key: str, member: str, ttl_s: float) -> None:
    """Queue on `pipe` (or run on a client): `member` in the sorted set `key`, scored by Redis'
    time `ttl_s` seconds from now."""
    pipe.eval(_SCORE, 1, key, member, repr(float(ttl_s)))
