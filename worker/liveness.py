"""Liveness: the worker's key and its running jobs' leases, renewed; abandoned jobs reaped.

A SimpleWorker sends no heartbeat while a job runs, so this thread extends
every running job's lease in RQ's started registry. A killed process stops
extending them, and the reaper (bailan.reaper.reap_abandoned, run here and in
the API) fails or requeues its jobs once the lease expires. The worker key
(bailan.presence) tells the API's /readyz and /v1/models that this
worker is alive and what it serves; it is renewed every presence interval
(1 s) with a TTL of a few seconds, so a dead worker drops out of /readyz
that fast, while job leases keep their longer heartbeat TTL (a lease that
ran out requeues a job, which must not happen on a short stall). Each tick
also sends the worker's metric counts (bailan.metrics), and the key says how
fast its engine runs and how much work it holds (`live_info`), from which the
API estimates a queued job's wait (bailan.eta).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import redis
from rq.utils import now as rq_now

from bailan import presence, webhooks
from bailan.jobs import Keys
from bailan.metrics import ADD_BATCH, BATCH_ID_TTL_S, Tally, add_batch
from bailan.reaper import reap_abandoned
from worker.outage import TRANSIENT, RedisOutage
from worker.settings import WorkerSettings
from worker.slots import SlotWorker

log = logging.getLogger("bailan.worker")


@dataclass
class Liveness:
    settings: WorkerSettings
    connection: redis.Redis
    slots: list[SlotWorker]
    # What the worker key says: the model, device, batch size and slots.
    info: dict[str, Any]
    stop: threading.Event = field(default_factory=threading.Event)
    # Counts for /metrics, sent to Redis every tick (bailan.metrics).
    tally: Tally = field(default_factory=Tally)
    # Shared with the slots and the bridge; made here when not given.
    outage: RedisOutage | None = None
    # The figures the worker key reports besides `info` (GPU memory), read every tick.
    gauges: Callable[[], dict[str, Any]] = lambda: {}
    # Fields that change while the worker runs (measured speed, backlog: bailan.eta), read at each beat.
    live_info: Callable[[], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        # Who gets the `completed` webhook of a job the sweep fails: fixed for the process.
        self.hooks = webhooks.Policy.of(self.settings)
        self.add_batch = self.connection.register_script(ADD_BATCH)
        # This run's batches of counts (bailan.metrics.add_batch), numbered in order. One whose
        # sending failed is kept, to be sent again under its number (its answer may have been
        # lost after it was added), and no new one is taken meanwhile: counts made since wait
        # in the tally, so however long Redis fails, one batch at most is in doubt.
        self.sender = f"{self.settings.name}:{uuid.uuid4().hex}"
        self.batches = 0
        self.unsent: tuple[int, dict[str, float]] | None = None
        # Its number is remembered for longer than this worker waits out an outage with it unsent.
        self.batch_ttl_s = max(BATCH_ID_TTL_S, math.ceil(2 * self.settings.redis_outage_limit_s))
        # The worker's first beat (its main thread) may meet the liveness thread's.
        self._beating = threading.Lock()

    def presence(self, pipe: Any) -> None:
        """The worker key, with a short TTL: /readyz stops counting a dead worker within it."""
        info = {**self.info, **self.gauges(), **(self.live_info() if self.live_info is not None else {})}
        presence.publish(pipe, self.settings.name, json.dumps(info), self.settings.presence_ttl_s)

    def heartbeat(self, leases: bool = True) -> None:
        """The worker key, unsent metrics and (with `leases`) every running job's lease, in one pipeline."""
        with self._beating:
            self._beat(leases)

    def _beat(self, leases: bool) -> None:
        lease = self.settings.heartbeat_ttl_s
        pipe = self.connection.pipeline()
        self.presence(pipe)
        # The model's queues take jobs from now on, and keep taking them (to wait) when
        # its workers are gone (bailan.queues); the live key clears the job view's notice.
        # It lives as long as the worker key, renewed with it every tick, so the notice
        # (waiting_for_worker) is back within seconds of the model's last worker dying.
        model = str(self.info.get("model") or "")
        if model:
            pipe.sadd(Keys.models(self.settings.queue_name), model)
            pipe.set(Keys.model_live(model), self.settings.name,
                     px=max(1, int(self.settings.presence_ttl_s * 1000)))
        if leases:
            for slot in self.slots:
                job, execution = slot.running_job, slot.execution
                if job is None or execution is None:
                    continue
                slot.heartbeat(lease + 60, pipeline=pipe)
                execution.heartbeat(job.started_job_registry, lease, pipeline=pipe)
                job.heartbeat(rq_now(), lease, pipeline=pipe, xx=True)
        if self.unsent is None:
            taken = self.tally.take()
            if taken:
                self.batches += 1
                self.unsent = (self.batches, taken)
        if self.unsent is not None:
            number, counts = self.unsent
            add_batch(self.add_batch, pipe, self.settings.queue_name, self.sender, number, counts, self.batch_ttl_s)
        pipe.execute()
        self.unsent = None

    def loop(self) -> None:
        """The liveness thread: presence every tick, leases and a reaper sweep on their intervals."""
        last_reap = 0.0
        last_leases = 0.0
        saw_outage = False
        while not self.stop.is_set():
            tick = time.monotonic()
            # Leases first and on their own: a failing sweep must never stop them.
            leases = tick - last_leases >= self.settings.heartbeat_interval_s
            try:
                self.heartbeat(leases)
                if leases:
                    last_leases = tick
                if self.outage is not None:
                    self.outage.note_ok()
            except redis.RedisError as exc:
                if self.outage is not None and isinstance(exc, TRANSIENT):
                    self.outage.note("heartbeat", exc)  # logs once per outage
                else:
                    log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
            # No sweep during an outage; the first one after it holds every sweeper back (bailan.reaper).
            outage = self.outage is not None and self.outage.down
            saw_outage = saw_outage or outage
            if not outage and time.monotonic() - last_reap >= self.settings.reap_interval_s:
                last_reap = time.monotonic()
                try:
                    lost = reap_abandoned(self.connection, self.settings.queue_name, self.settings.result_ttl_s,
                                          self.hooks, self.settings.reap_interval_s, after_outage=saw_outage)
                    saw_outage = False
                    if lost:
                        log.warning("reaped abandoned jobs: %s", lost)
                except redis.RedisError as exc:
                    log.warning("reaper: Redis unavailable: %s", exc)
                except Exception:
                    log.exception("reaper: sweep failed")
            self.stop.wait(min(self.settings.presence_interval_s, self.settings.heartbeat_interval_s,
                               self.settings.reap_interval_s))
