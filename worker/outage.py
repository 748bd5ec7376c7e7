"""Riding out a Redis outage: every worker thread that talks to Redis waits here.

Redis may restart (a crash, a failover, an upgrade) while a worker runs. The
slots, the bridge and the liveness thread then wait and reconnect rather than
die, each through one shared `RedisOutage`, which also bounds the wait: past
`limit_s` of continuous outage the worker gives up, and its process exits
non-zero (worker.process) so that a supervisor restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger("bailan.worker")

T = TypeVar("T")

# Errors that say Redis is unreachable or slow, not that a command was wrong.
TRANSIENT: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 2.0


class RedisGone(RuntimeError):
    """Redis stayed unreachable past the worker's limit."""


class RedisOutage:
    """One worker's view of its Redis: up, or down since when; and whether it gave up."""

    def __init__(self, connection: redis.Redis, limit_s: float) -> None:
        self.connection = connection
        self.limit_s = limit_s
        self.gave_up = threading.Event()
        self._lock = threading.Lock()
        self._down_since: float | None = None

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def _went_down(self, what: str, exc: BaseException) -> float:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("Redis unreachable (%s: %s); waiting for it to come back", what, exc)
            return time.monotonic() - self._down_since

    def _came_back(self) -> None:
        with self._lock:
            if self._down_since is not None:
                log.warning("Redis is back after %.1f s", time.monotonic() - self._down_since)
                self._down_since = None

    def _give_up(self) -> RedisGone:
        self.gave_up.set()
        return RedisGone(f"Redis unreachable for more than {self.limit_s:.0f} s (BAILAN_REDIS_OUTAGE_LIMIT_S)")

    def retry(self, what: str, call: Callable[[], T]) -> T:
        """`call()` until it gets through; raises RedisGone past the limit.

        Once the worker gave up, each call is still tried once: Redis may be back while the
        worker winds down, and a job finishing then records its outcome rather than leave
        its images made for nothing.

        `call` must build its pipeline afresh: redis-py empties a pipeline whose
        execute failed.
        """
        delay = FIRST_DELAY_S
        while True:
            try:
                result = call()
            except TRANSIENT as exc:
                if self.gave_up.is_set() or self._went_down(what, exc) > self.limit_s:
                    raise self._give_up() from exc
                time.sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)
                continue
            self._came_back()
            return result

    def wait_until_up(self, stop: threading.Event, what: str) -> bool:
        """Block until Redis answers a PING: True; False if `stop` is set or the limit passed."""
        delay = FIRST_DELAY_S
        while not stop.is_set() and not self.gave_up.is_set():
            try:
                self.connection.ping()
                self._came_back()
                return True
            except TRANSIENT as exc:
                if self._went_down(what, exc) > self.limit_s:
                    self._give_up()
                    return False
            stop.wait(delay)
            delay = min(delay * 2, MAX_DELAY_S)
        return False

    def note(self, what: str, exc: BaseException) -> None:
        """A thread that retries on its own (liveness) reports a failed round here, for the limit."""
        if self._went_down(what, exc) > self.limit_s:
            self._give_up()

    def note_ok(self) -> None:
        self._came_back()
