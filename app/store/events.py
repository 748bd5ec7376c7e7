"""Job change notifications for the event streams: one pub/sub connection per API process.

Workers (and the API itself, on cancel) publish to a job's channel whenever
what a client sees of it may have changed (bailan.events). Every event stream
of this process that follows a job waits on an asyncio.Event; the dispatcher
task reads the one shared subscription and sets the events of that job's
streams. A channel is subscribed while at least one stream follows its job.

A lost notification (Redis restarted, the subscription not yet confirmed)
costs a stream at most its safety poll (BAILAN_EVENTS_POLL_INTERVAL_S); while
the subscription is broken every stream is woken to re-read on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import redis
import redis.asyncio

from bailan.jobs import Keys

log = logging.getLogger("bailan.api")

READ_TIMEOUT_S = 1.0
RETRY_S = 1.0


class JobEvents:
    """The process's subscription and the streams waiting on it."""

    def __init__(self, conn: redis.asyncio.Redis) -> None:
        self.conn = conn
        self.pubsub = conn.pubsub(ignore_subscribe_messages=True)
        self.waiters: dict[str, set[asyncio.Event]] = {}
        # Channels whose SUBSCRIBE was sent: only these are unsubscribed.
        self.subscribed: set[str] = set()
        self._has_channels = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bailan-job-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever `job_id` may have changed, for as long as the block runs."""
        channel = Keys.job_events(job_id)
        event = asyncio.Event()
        waiters = self.waiters.setdefault(channel, set())
        first = not waiters
        waiters.add(event)
        try:
            if first:
                try:
                    await self.pubsub.subscribe(channel)
                    self.subscribed.add(channel)
                    self._has_channels.set()
                except redis.RedisError as exc:
                    # The stream still works on its safety poll; the dispatcher reconnects.
                    log.warning("cannot subscribe to %s: %s", channel, exc)
                except BaseException:
                    # Cancelled (the client left) after SUBSCRIBE may have reached Redis: undone below.
                    self.subscribed.add(channel)
                    raise
            yield event
        finally:
            waiters.discard(event)
            if not waiters:
                del self.waiters[channel]
                # Not where the SUBSCRIBE failed: there is nothing to undo, and on a Redis that
                # stopped answering, the UNSUBSCRIBE waited out another timeout before the answer.
                # Shielded: a stream whose client left is cancelled, and an unshielded await
                # here would be too, leaving the channel subscribed for the process's life.
                if channel in self.subscribed:
                    self.subscribed.discard(channel)
                    with anyio.CancelScope(shield=True), contextlib.suppress(redis.RedisError):
                        await self.pubsub.unsubscribe(channel)

    def _wake_all(self) -> None:
        for waiters in self.waiters.values():
            for event in waiters:
                event.set()

    async def _run(self) -> None:
        while True:
            if not self.pubsub.subscribed:
                self._has_channels.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._has_channels.wait(), READ_TIMEOUT_S)
                continue
            try:
                message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_TIMEOUT_S)
            except (redis.RedisError, OSError) as exc:
                log.warning("job events subscription lost (%s); streams poll until it is back", exc)
                self._wake_all()
                await asyncio.sleep(RETRY_S)
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            for event in self.waiters.get(channel, ()):
                event.set()
