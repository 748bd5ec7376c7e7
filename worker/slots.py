"""RQ's side of a worker process: slots, and the entry point RQ calls.

RQ stays the queue of record: it owns job status, the registries, failures and
retries. But an RQ worker runs one job at a time, and batching needs many jobs
in flight in one process that owns the model. So a worker process runs
`max_batch` slots, each an in-process RQ worker on its own thread
(`SlotWorker`, a `SimpleWorker`: no fork per job, because CUDA cannot be
re-initialised in a forked child and reloading the model per job costs
seconds). A slot dequeues a job, hands it to its runner (the bridge to the
engine, worker.bridge) and blocks until the engine is done with it, then lets
RQ record the outcome as usual.

Slots use RQ's public API, but for one hook that has no public equivalent
(`_install_signal_handlers`); importing this module fails if RQ drops it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import redis
import rq
from rq import Queue, SimpleWorker
from rq.job import Job
from rq import worker_registration
from rq.command import parse_payload
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    StartedJobRegistry,
)
from rq.timeouts import BaseDeathPenalty

from bailan import events
from bailan.jobs import JobState
from bailan.logs import job_context
from bailan.queues import fair_order, mark_served
from bailan.reaper import end_in_rq, put_back
from worker.outage import RedisGone, RedisOutage
from worker.trace import Trace, wall

log = logging.getLogger("bailan.worker")

# A work loop that ends this many times in a row, each within QUICK_END_S of
# starting, while Redis answers, is broken rather than unlucky: the slot stops.
QUICK_ENDS = 5
QUICK_END_S = 2.0

# What a runner returns for a job the client canceled; its slot records it as
# RQ's canceled status instead of finished.
CANCELED_RESULT: dict[str, Any] = {"canceled": True}
# What a runner returns for a job that was taken from it while it ran: its lease ran out
# (Redis unreachable from this host alone) and a reaper requeued or failed it. Its slot
# leaves the job's RQ state to whoever holds it now.
SUPERSEDED_RESULT: dict[str, Any] = {"superseded": True}

# How long an idle slot blocks in RQ's dequeue before it looks for new key
# queues (bailan.queues): a key's very first job waits at most this long.
FAIR_REFRESH_S = 1

# Runs one job by id on the calling slot's thread and returns RQ's result.
JobRunner = Callable[[str], dict[str, Any]]

# RQ's work loop installs SIGINT/SIGTERM handlers through this hook, which only
# the main thread may do, so slots override it. RQ has no public switch for it:
# fail here, at start-up, rather than with a ValueError in every slot thread.
if not callable(getattr(SimpleWorker, "_install_signal_handlers", None)):
    raise ImportError(
        f"rq {rq.__version__} has no Worker._install_signal_handlers hook, which Bailan's slots override; "
        "install the rq version pyproject.toml names"
    )

# The slot running a job on the current thread. RQ calls the entry point by
# name with the job's arguments alone; each slot sets this in its own thread's
# context around a job, so run_job reaches the slot that dequeued the job
# without a process-wide global.
_running_slot: ContextVar[SlotWorker] = ContextVar("bailan_running_slot")


def running_slot() -> SlotWorker | None:
    """The slot running a job on the calling thread; None outside one (a bridge run directly)."""
    return _running_slot.get(None)


def run_job(job_id: str) -> dict[str, Any]:
    """RQ's entry point (bailan.jobs.RQ_FUNC), called on the slot thread that dequeued the job."""
    slot = _running_slot.get(None)
    if slot is None:
        raise RuntimeError("run_job needs a Bailan worker process (python -m worker)")
    return slot.run(job_id)


class NoDeathPenalty(BaseDeathPenalty):
    """RQ's timeouts use SIGALRM, which only the main thread can receive; a job's
    duration is bounded by its step count instead."""

    def setup_death_penalty(self) -> None:
        return None

    def cancel_death_penalty(self) -> None:
        return None


class SlotWorker(SimpleWorker):
    """An RQ worker that runs in a thread of the engine's process.

    `runner` runs each job (the bridge's `run`); `stop` is the process's
    shutdown event; `has_room` says whether the engine can start another job,
    and `wait_for_room` blocks until it can (or a timeout passes);
    `lease_s` is the lease a running job holds in RQ's started registry. They
    default so that RQ's own constructor calls (e.g. `Worker.all`) still work.
    """

    death_penalty_class = NoDeathPenalty
    # RQ's dequeue retries a lost connection with backoff up to this many seconds
    # (60 by default): short, so a slot is back within seconds of its Redis.
    max_connection_wait_time = 2.0

    def __init__(
        self,
        *args: Any,
        runner: JobRunner | None = None,
        stop: threading.Event | None = None,
        has_room: Callable[[], bool] | None = None,
        wait_for_room: Callable[[float], bool] | None = None,
        expect: Callable[[], None] | None = None,
        unexpect: Callable[[], None] | None = None,
        lease_s: int = 30,
        trace: Trace | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # A line per job this slot ended succeeded (worker.trace): when RQ gave it the job, and
        # when RQ's end was written, which the bridge's own line cannot see.
        self.trace = trace if trace is not None else Trace(None)
        self.runner = runner
        self.stop = stop if stop is not None else threading.Event()
        self.has_room = has_room
        self.wait_for_room = wait_for_room
        # Told on this thread when it takes a job and when that job is handed over or dropped
        # (worker.engine.Engine.expect): an idle engine then starts a burst in one step.
        self.expect = expect
        self.unexpect = unexpect
        self.lease_s = lease_s
        self.running_job: Job | None = None
        # The runner's own answer for the running job, so the outcome never has
        # to be read back from RQ's private copy of the return value.
        self.job_was_canceled = False
        # Whether the runner returned for the running job: its outcome is then in the job's record,
        # which clients already read (bailan.jobs.public_state), whatever RQ's bookkeeping does.
        self.job_returned = False
        # Whether RQ's start bookkeeping for the running job failed on Redis, before any runner saw it.
        self.start_failed = False
        self.job_was_superseded = False
        # Whether the running job left the runner with the worker going (Redis gone past the
        # outage limit, a forced stop): no outcome of the job's, so none to record in RQ.
        self.job_abandoned = False
        self._last_wait_beat = 0.0
        self.outage: RedisOutage | None = None
        # The queues the process was given are the base queues (the plain one, then
        # the model's); each API key's queue hangs off one of them (bailan.queues).
        self.base_queue_names = [q.name for q in self.queues]
        self._queues_by_name: dict[str, Queue] = {q.name: q for q in self.queues}

    def serve(self, outage: RedisOutage) -> None:
        """The slot thread: RQ's work loop, started again whenever it ends before a stop.

        RQ's loop quits on a Redis timeout and on any error outside its
        dequeue (a heartbeat, its job bookkeeping) when Redis restarts; the
        slot waits for Redis and starts it again, so an outage costs no
        capacity. Returns on a stop, when Redis stays away past the outage
        limit, or when the loop keeps ending at once while Redis is up.
        """
        self.outage = outage
        quick_ends = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.work(logging_level="WARNING")
            except Exception as exc:  # RQ's teardown meets the outage too
                log.warning("slot %s: work loop failed: %s", self.name, exc)
            if self.stop.is_set():
                self._drop_subscription(unsubscribe=False)
                return
            log.warning("slot %s: work loop ended; waiting for Redis to restart it", self.name)
            if not outage.wait_until_up(self.stop, f"slot {self.name}"):
                self._drop_subscription(unsubscribe=False)
                return
            self._drop_subscription(unsubscribe=True)  # Redis answers: the old channel goes at once
            quick_ends = quick_ends + 1 if time.monotonic() - started < QUICK_END_S else 0
            if quick_ends >= QUICK_ENDS:
                log.error("slot %s: work loop ended %d times in a row at once; giving up", self.name, quick_ends)
                return
            try:
                # RQ refuses to start a worker whose name is registered and not dead.
                self.register_death()
            except redis.RedisError:
                continue

    def _drop_subscription(self, unsubscribe: bool) -> None:
        """End the loop's subscription to its command channel, if its teardown did not. RQ
        unsubscribes after registering the worker's death, which an outage fails: each restart
        of the loop then added a subscriber (and a thread), and one command reached the slot
        as many times. `unsubscribe`: Redis answers, so the channel may go at once; else only
        the thread is stopped (no call that would wait out the outage's retries)."""
        thread, pubsub = self.pubsub_thread, self.pubsub
        self.pubsub_thread = self.pubsub = None
        if thread is None or pubsub is None:
            return
        # Stopped, its loop ends at its next wake-up and closes the connection itself (closed
        # under it, the read in progress would fail), and does not subscribe again after an
        # outage. The UNSUBSCRIBE wakes it at once.
        thread.stop()
        if unsubscribe and thread.is_alive() and pubsub.subscribed:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.unsubscribe()

    def handle_payload(self, message: Any) -> None:
        # RQ answers `shutdown` with a SIGINT to the process. Sent to each of a worker's slots
        # (as an operator sends it to every worker `rq info` lists), the second SIGINT forced
        # an exit that abandoned every running job. A shutdown is the worker's graceful stop,
        # however often it comes: the running jobs finish first.
        if parse_payload(message).get("command") == "shutdown":
            log.info("slot %s: shutdown command: the worker finishes its running jobs and stops", self.name)
            self.stop.set()
            return
        super().handle_payload(message)

    def heartbeat(self, *args: Any, **kwargs: Any) -> None:
        # RQ's dequeue retries a lost connection for ever, calling this first on
        # every try: past the outage limit, leave it (and the work loop) here.
        if kwargs.get("pipeline") is None and self.outage is not None and self.outage.gave_up.is_set():
            raise RedisGone(f"slot {self.name}: Redis unreachable past the outage limit")
        super().heartbeat(*args, **kwargs)

    def clean_registries(self) -> None:
        """RQ's registry maintenance (at a work loop's start, then every ten minutes) but for
        its expiry of started jobs: that is the reaper's (bailan.reaper), which writes the
        record and the webhook and holds back after an outage, when leases lapsed while
        their workers still ran the jobs. RQ's would fail or requeue them behind its back."""
        for queue in self.queues:
            if not queue.acquire_maintenance_lock():
                continue  # another worker is at it
            try:
                for registry in (FinishedJobRegistry, FailedJobRegistry, DeferredJobRegistry):
                    registry(queue.name, connection=queue.connection, job_class=queue.job_class,
                             serializer=queue.serializer).cleanup()
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
            finally:
                queue.release_maintenance_lock()
        self.last_cleaned_at = rq.utils.now()

    def _install_signal_handlers(self) -> None:
        # The main thread owns signals and sets `stop` itself (worker.process).
        return None

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.lease_s

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        try:
            super().prepare_job_execution(job, remove_from_intermediate_queue)
        except redis.RedisError:
            self.start_failed = True  # the job never ran: handle_job_failure gives it back
            raise

    def run(self, job_id: str) -> dict[str, Any]:
        """Hand the job to the runner; called by run_job while RQ performs it."""
        if self.runner is None:
            raise RuntimeError(f"slot {self.name} has no runner")
        try:
            result = self.runner(job_id)
        except (RedisGone, SystemExit, KeyboardInterrupt):
            self.job_abandoned = True
            raise
        self.job_was_canceled = result == CANCELED_RESULT
        self.job_was_superseded = result == SUPERSEDED_RESULT
        self.job_returned = True
        return result

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        # RQ's loop only leaves a blocking dequeue through a signal handler that
        # raises in the main thread; a slot polls the stop event instead, and
        # returning None ends RQ's work loop.
        while not self.stop.is_set():
            if self.has_room is not None and not self.has_room():
                # Taking a job the engine cannot start yet would show it as running
                # while it waits here, and keep it from idle workers elsewhere.
                if time.monotonic() - self._last_wait_beat > 10:
                    self._last_wait_beat = time.monotonic()
                    self.heartbeat()
                if self.wait_for_room is not None:
                    self.wait_for_room(0.5)
                else:
                    time.sleep(0.05)
                continue
            self._listen_fairly()
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=FAIR_REFRESH_S)
            if result is not None:
                try:
                    mark_served(self.connection, self.base_queue_names[-1], result[1].name)
                except redis.RedisError:
                    pass  # the next turn starts from an older cursor: still every queue in turn
                return result
        return None

    def _listen_fairly(self) -> None:
        """Listen on every API key's queue, this turn's first (round robin, bailan.queues).

        RQ pops from the first non-empty queue of `_ordered_queues`, its
        round-robin strategy's private list; that list is set here, as that
        strategy does, but from the queues in Redis and the cursor every slot
        of every worker shares.
        """
        try:
            names = fair_order(self.connection, self.base_queue_names)
        except redis.RedisError:
            return  # keep the last order; RQ's dequeue meets the outage and retries
        queues = []
        for name in names:
            queue = self._queues_by_name.get(name)
            if queue is None:
                queue = Queue(name, connection=self.connection, serializer=self.serializer)
                self._queues_by_name[name] = queue
            queues.append(queue)
        # self.queues too, so RQ's maintenance cleans every key queue's registries.
        self.queues = queues
        self._ordered_queues = list(queues)

    def execute_job(self, job: Job, queue: Queue) -> None:
        dequeued = time.perf_counter()
        self.running_job = job
        self.job_was_canceled = self.job_was_superseded = self.job_returned = self.start_failed = False
        self.job_abandoned = False
        token = _running_slot.set(self)
        if self.expect is not None:
            self.expect()
        try:
            with job_context(job.id):
                super().execute_job(job, queue)
            if self.job_returned and not (self.job_was_canceled or self.job_was_superseded):
                self.trace.add("slot", job=job.id, dequeued=wall(dequeued), rq_ended=wall(time.perf_counter()))
        finally:
            if self.unexpect is not None:
                self.unexpect()  # handed over long since, or never to be (a job RQ failed first)
            _running_slot.reset(token)
            self.running_job = None

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry) -> None:
        if self.job_was_superseded:
            # Requeued (and maybe running elsewhere) or failed by a reaper: not ours to end. But
            # this attempt's lease goes: left to lapse, it would have the reaper requeue or fail
            # the job again, under whoever holds it now.
            self._drop_lease(job)
            return
        # One transaction where RQ's own success path WATCHes the job's dependents, reads them and
        # writes a result stream: Bailan jobs have no dependents, and the stream would hold only
        # {"images": n}, which the record says too, at over 4 KB a job. Each round trip delays the
        # slot's next job, and a burst that ended at one step queues them all on one interpreter.
        ttl = job.get_result_ttl(self.default_result_ttl)
        # RQ's cleanup_execution forgets the execution while it queues its delete: should the
        # transaction fail, the retry (handle_job_failure) must still find it, or the job's
        # lease stays behind and the reaper later runs the finished job again.
        execution = self.execution
        try:
            self._end_in_rq(job, ttl)
        except BaseException:
            self.execution = execution
            raise

    def _end_in_rq(self, job: Job, ttl: int) -> None:
        """The job's finished (or canceled) status, registry, worker counts and lease, at once."""
        with self.connection.pipeline() as pipe:
            if not self.job_was_canceled:
                self.increment_successful_job_count(pipeline=pipe)
                if job.started_at is not None and job.ended_at is not None:
                    self.increment_total_working_time(job.ended_at - job.started_at, pipe)
            end_in_rq(job, JobState.canceled if self.job_was_canceled else JobState.succeeded, ttl, pipe)
            self.cleanup_execution(job, pipeline=pipe)
            # Event streams: the status the API reads now says the job ended.
            events.notify(pipe, job.id)
            pipe.execute()

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "") -> None:
        if self.job_abandoned:
            # The worker is going, not the job failing: failed in RQ (Redis back just as the
            # worker gave up on it), it ended with no error and no outcome in its record, its
            # images made and lost. Left alone, its lease lapses and the reaper requeues it, as
            # a dead worker's.
            log.warning("slot %s: leaving job %s to the reaper: the worker is stopping under it", self.name, job.id)
            return
        if self.start_failed:
            # Redis failed RQ's start bookkeeping (a restart, a dropped connection): the job never
            # ran, so it is not failed (with no outcome in its record) but given back. Should Redis
            # still be away, this raises and the reaper gives it back once the lease lapses.
            log.warning("slot %s: starting job %s failed on Redis; giving it back to its queue", self.name, job.id)
            self._give_back(job, queue)
            return
        if self.job_returned:
            # The runner ended the job and its record says how; what failed is RQ's bookkeeping
            # after it (a Redis blip mid-pipeline). Failing it would turn a job its client saw
            # succeed into a failure: end it in RQ as the runner said, once more. Should Redis
            # still be away, this raises, the slot waits for it, and the reaper ends the job as
            # recorded once its lease runs out.
            log.warning("slot %s: ending job %s in RQ failed (%s); trying again", self.name, job.id,
                        exc_string.strip().splitlines()[-1] if exc_string.strip() else "?")
            self.handle_job_success(job, queue, started_job_registry)
            return
        # A job that raised would raise again: retries are kept for jobs whose
        # worker died under them (see bailan.reaper.reap_abandoned).
        job.retries_left = 0
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string)
        self._notify_final(job)

    def _give_back(self, job: Job, queue: Queue) -> None:
        """Put a job this slot took and never ran back at the head of its queue, as a sweep puts
        back a lost one (bailan.reaper.put_back: once, and not if RQ shows it in other hands),
        then drop this slot's lease. In that order: should Redis fail in between, the lease
        that lapses is a queued job's, which the reaper drops."""
        put_back(self.connection, queue.name, job.id, by=self.name)
        self._drop_lease(job)

    def _drop_lease(self, job: Job) -> None:
        """This attempt's lease and execution record, removed. RQ forgets the execution as it
        queues its delete: should the write fail, a retry (the reaper's too) must still find it."""
        execution = self.execution
        try:
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe)
                pipe.execute()
        except BaseException:
            self.execution = execution
            raise

    def _notify_final(self, job: Job) -> None:
        """Tell event streams the job ended, once RQ's status says so (the API reads that status)."""
        try:
            events.notify(self.connection, job.id)
        except redis.RedisError:
            pass  # streams see the final status on their safety poll
