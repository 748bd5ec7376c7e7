"""The API's sweep for jobs whose worker died (see bailan.jobs.reap_abandoned).

It runs in the API too so that a kill -9'ed worker's jobs fail even when no
other worker is alive to notice.
"""

from __future__ import annotations

import logging
import threading

import redis

from bailan.jobs import reap_abandoned

log = logging.getLogger("bailan.api.reaper")


class Reaper:
    def __init__(self, conn: redis.Redis, queue_name: str, interval_s: float, keep_s: int = 86400) -> None:
        self.conn = conn
        self.keep_s = keep_s
        self.queue_name = queue_name
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[str]:
        """One pass; never raises, because a Redis outage must not kill the loop."""
        try:
            reaped = reap_abandoned(self.conn, self.queue_name, self.keep_s)
        except redis.RedisError as exc:
            log.warning("reaper: Redis unavailable (%s); retrying in %.0f s", exc, self.interval_s)
            return []
        except Exception:
            log.exception("reaper: sweep failed")
            return []
        if reaped:
            log.warning("reaper: jobs of dead workers requeued or failed: %s", ", ".join(reaped))
        return reaped

    def _run(self) -> None:
        while True:
            self.sweep()
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        # A thread, not an asyncio task: the Redis client blocks.
        self._thread = threading.Thread(target=self._run, name="bailan-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
