"""Liveness: the worker's key and its running jobs' leases, renewed; abandoned jobs reaped.

A SimpleWorker sends no heartbeat while a job runs, so this thread extends
every running job's lease in RQ's started registry. A killed process stops
extending them, and the reaper (bailan.reaper.reap_abandoned, run here and in
the API) fails or requeues its jobs once the lease expires. The worker key
(bailan.jobs.Keys.worker) tells the API's /readyz and /v1/models that this
worker is alive and what it serves, and, refreshed at every beat, how fast its
engine runs and how much work it holds (`live_info`), from which the API
estimates a queued job's wait (bailan.eta).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import redis
from rq.utils import now as rq_now

from bailan.jobs import Keys
from bailan import webhooks
from bailan.reaper import reap_abandoned
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
    # Fields that change while the worker runs (measured speed, backlog: bailan.eta), read at each beat.
    live_info: Callable[[], dict[str, Any]] | None = None

    def heartbeat(self) -> None:
        """The worker key and every running job's lease, renewed in one round trip."""
        lease = self.settings.heartbeat_ttl_s
        pipe = self.connection.pipeline()
        info = {**self.info, **self.live_info()} if self.live_info is not None else self.info
        pipe.set(Keys.worker(self.settings.name), json.dumps(info), ex=lease)
        # The model's queues take jobs from now on, and keep taking them (to wait) when
        # its workers are gone (bailan.queues); the live key clears the job view's notice.
        model = str(self.info.get("model") or "")
        if model:
            pipe.sadd(Keys.models(self.settings.queue_name), model)
            pipe.set(Keys.model_live(model), self.settings.name, ex=lease)
        for slot in self.slots:
            job, execution = slot.running_job, slot.execution
            if job is None or execution is None:
                continue
            slot.heartbeat(lease + 60, pipeline=pipe)
            execution.heartbeat(job.started_job_registry, lease, pipeline=pipe)
            job.heartbeat(rq_now(), lease, pipeline=pipe, xx=True)
        pipe.execute()

    def loop(self) -> None:
        """The liveness thread: heartbeats, and a reaper sweep every reap interval."""
        last_reap = 0.0
        while not self.stop.is_set():
            # Leases first and on their own: a failing sweep must never stop them.
            try:
                self.heartbeat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
            if time.monotonic() - last_reap >= self.settings.reap_interval_s:
                last_reap = time.monotonic()
                try:
                    lost = reap_abandoned(self.connection, self.settings.queue_name, self.settings.result_ttl_s,
                                          webhooks.Policy.of(self.settings))
                    if lost:
                        log.warning("reaped abandoned jobs: %s", lost)
                except redis.RedisError as exc:
                    log.warning("reaper: Redis unavailable: %s", exc)
                except Exception:
                    log.exception("reaper: sweep failed")
            self.stop.wait(min(self.settings.heartbeat_interval_s, self.settings.reap_interval_s))
