"""The RQ side of a worker process (slots) against a real Redis, without a model.

A slot is an RQ worker on a thread; its runner here is a plain function in
place of the bridge to the engine, so what is tested is RQ's bookkeeping:
which outcome each job ends in, and how a slot stops.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from bailan.jobs import RQ_FUNC
from worker.slots import CANCELED_RESULT, SlotWorker, run_job

QUEUE = "slots-test"


def make_slot(conn: redis.Redis, stop: threading.Event, runner: Any = None) -> SlotWorker:
    queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
    return SlotWorker([queue], name="slots-test.0", connection=conn, serializer=JSONSerializer, worker_ttl=20,
                      runner=runner, stop=stop)


def work_in_thread(slot: SlotWorker, errors: list[BaseException]) -> threading.Thread:
    """Run the slot's RQ work loop on a thread, as the worker process does, keeping what it raises."""

    def work() -> None:
        try:
            slot.work(logging_level="WARNING")
        except BaseException as exc:  # the test reports it; a thread would only print it
            errors.append(exc)

    thread = threading.Thread(target=work, name=slot.name, daemon=True)
    thread.start()
    return thread


def test_a_slot_ends_each_job_as_its_runner_says(redis_conn: redis.Redis) -> None:
    """Guards the outcomes a slot records through RQ's public API (it once read
    RQ's private job._result): a runner's result finishes the job (its RQ
    result stream dropped, so a finished job costs Redis a few KB: a result
    stream still kept is the failure guarded), CANCELED_RESULT makes it
    canceled (in RQ's canceled registry, expiring like any result), an exception fails it; and the process's stop
    event ends the slot's thread (it once set RQ's private _stop_requested)."""

    def runner(job_id: str) -> dict[str, Any]:
        if job_id == "broken":
            raise ValueError("the runner failed")
        return CANCELED_RESULT if job_id == "canceled" else {"images": 1}

    queue = Queue(QUEUE, connection=redis_conn, serializer=JSONSerializer)
    for job_id in ("done", "canceled", "broken"):
        queue.enqueue_call(func=RQ_FUNC, args=(job_id,), job_id=job_id, result_ttl=600, failure_ttl=600, timeout=-1)
    stop = threading.Event()
    errors: list[BaseException] = []
    thread = work_in_thread(make_slot(redis_conn, stop, runner), errors)

    ended = {JobStatus.FINISHED, JobStatus.CANCELED, JobStatus.FAILED}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses = [Job.fetch(j, connection=redis_conn, serializer=JSONSerializer).get_status() for j in ("done", "canceled", "broken")]
        if all(status in ended for status in statuses):
            break
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the slot did not stop on its stop event"
    assert errors == []

    done = Job.fetch("done", connection=redis_conn, serializer=JSONSerializer)
    assert done.get_status() == JobStatus.FINISHED
    # Its RQ result stream is dropped (the record says the same; a stream costs over 4 KB),
    # while a failed job keeps its result: the API reads the exception from it.
    assert not redis_conn.exists(Result.get_key("done")) and done.return_value() is None
    # What RQ's own success path records, in the slot's one transaction: the finished registry
    # (expiring with the result), no lease left, the worker's counts.
    assert "done" in FinishedJobRegistry(QUEUE, connection=redis_conn).get_job_ids()
    assert 0 < redis_conn.ttl(done.key) <= 600
    assert StartedJobRegistry(QUEUE, connection=redis_conn).get_job_ids() == []
    assert redis_conn.hget("rq:worker:slots-test.0", "successful_job_count") == b"1"
    assert redis_conn.exists(Result.get_key("broken"))
    canceled = Job.fetch("canceled", connection=redis_conn, serializer=JSONSerializer)
    assert canceled.get_status() == JobStatus.CANCELED
    assert "canceled" in CanceledJobRegistry(QUEUE, connection=redis_conn).get_job_ids()
    assert 0 < redis_conn.ttl(canceled.key) <= 600
    assert Job.fetch("broken", connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.FAILED


def test_a_blip_in_rqs_bookkeeping_does_not_fail_a_job_that_ended(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a job its client saw succeed (its record ends first) turning failed in
    RQ because RQ's bookkeeping after the runner raised (a Redis connection dropped mid-
    transaction): RQ then calls the failure path, which recorded the job as failed. The
    retry must also take the job's lease: RQ forgets the execution as it queues its
    delete, and a lease left behind made the reaper run the finished job again."""
    queue = Queue(QUEUE, connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue_call(func=RQ_FUNC, args=("blip",), job_id="blip", result_ttl=600, failure_ttl=600, timeout=-1)
    forget = SlotWorker.cleanup_execution
    tries: list[str] = []

    def transaction_fails_once(self: SlotWorker, job: Job, pipeline: Any) -> None:
        tries.append(job.id)
        forget(self, job, pipeline=pipeline)  # the execution is forgotten, its delete only queued
        if len(tries) == 1:
            raise redis.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(SlotWorker, "cleanup_execution", transaction_fails_once)
    stop = threading.Event()
    errors: list[BaseException] = []
    thread = work_in_thread(make_slot(redis_conn, stop, lambda job_id: {"images": 1}), errors)
    deadline = time.monotonic() + 60
    while len(tries) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=30)
    assert errors == [] and tries == ["blip", "blip"]
    assert Job.fetch("blip", connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    assert StartedJobRegistry(QUEUE, connection=redis_conn).get_job_ids() == []  # no lease left to reap


def test_a_slot_runs_outside_the_main_thread(redis_conn: redis.Redis) -> None:
    """Guards against an RQ upgrade that drops the one private hook slots
    override (_install_signal_handlers; RQ has no public switch): RQ's work loop
    would then install signal handlers from a slot thread, which raises."""
    stop = threading.Event()
    stop.set()  # nothing to dequeue: the loop starts, then ends at once
    errors: list[BaseException] = []
    thread = work_in_thread(make_slot(redis_conn, stop), errors)
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []


def test_the_entry_point_needs_a_slot() -> None:
    """Guards against RQ_FUNC run by a plain RQ worker (not a Bailan worker
    process): it must fail with a message saying so, not with an AttributeError."""
    with pytest.raises(RuntimeError, match="python -m worker"):
        run_job("some-job")


def test_rqs_own_maintenance_leaves_lapsed_leases_to_the_reaper(redis_conn: redis.Redis) -> None:
    """Guards against RQ's registry maintenance, which every slot runs when its work loop
    starts (again after a Redis outage, too) and every ten minutes, failing or requeuing
    jobs whose leases ran out behind the reaper's back: with no record written, no
    webhook, and none of the reaper's holding back after an outage, when leases lapse
    while their workers still run the jobs and renew them a second later."""
    queue = Queue(QUEUE, connection=redis_conn, serializer=JSONSerializer)
    job = queue.enqueue_call(func=RQ_FUNC, args=("lapsed",), job_id="lapsed", result_ttl=600, failure_ttl=600,
                             timeout=-1)
    # Taken by a worker whose lease lapsed a moment ago (an expired score, no sleeping).
    queue.remove(job)
    job.set_status(JobStatus.STARTED)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"lapsed:exec1": time.time() - 1})
    finished = queue.enqueue_call(func=RQ_FUNC, args=("old",), job_id="old", result_ttl=600, timeout=-1)
    queue.remove(finished)
    redis_conn.zadd(f"rq:finished:{QUEUE}", {"old": time.time() - 1})  # an expired result: RQ's to trim

    make_slot(redis_conn, threading.Event()).clean_registries()

    assert Job.fetch("lapsed", connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.STARTED
    assert redis_conn.zscore(f"rq:wip:{QUEUE}", "lapsed:exec1") is not None
    assert redis_conn.llen(queue.key) == 0
    assert redis_conn.zscore(f"rq:finished:{QUEUE}", "old") is None  # the rest of RQ's maintenance still runs


def test_a_slot_tells_the_engine_of_a_job_it_took_until_the_job_is_done(redis_conn: redis.Redis) -> None:
    """Guards the hand-over an idle engine waits for (worker.engine.Engine.expect): a slot says it
    took a job before the job's set-up, on its own thread (the engine keys by thread), and says it
    is done with it after the job ends, a job whose runner raised too; else the engine would wait
    its cap at every burst for a job that never comes."""
    calls: list[tuple[str, int]] = []

    def runner(job_id: str) -> dict[str, Any]:
        calls.append((f"run {job_id}", threading.get_ident()))
        if job_id == "broken":
            raise ValueError("the runner failed")
        return {"images": 1}

    queue = Queue(QUEUE, connection=redis_conn, serializer=JSONSerializer)
    for job_id in ("done", "broken"):
        queue.enqueue_call(func=RQ_FUNC, args=(job_id,), job_id=job_id, result_ttl=600, failure_ttl=600, timeout=-1)
    stop = threading.Event()
    slot = SlotWorker([queue], name="slots-test.0", connection=redis_conn, serializer=JSONSerializer, worker_ttl=20,
                      runner=runner, stop=stop,
                      expect=lambda: calls.append(("expect", threading.get_ident())))
    # Which job the slot still holds says which call it is: the one as a job ends, or the next take's.
    slot.unexpect = lambda: calls.append(
        (f"unexpect {slot.running_job.id if slot.running_job else ''}", threading.get_ident()))
    errors: list[BaseException] = []
    thread = work_in_thread(slot, errors)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(1 for c, _ in calls if c.startswith("run")) < 2:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=30)
    assert errors == [] and {ident for _, ident in calls} == {thread.ident}
    names = [c for c, _ in calls]
    for job_id in ("done", "broken"):
        run = names.index(f"run {job_id}")
        assert names[run - 1] == "expect" and names[run + 1] == f"unexpect {job_id}"


def runs_until_one_ran(conn: redis.Redis, then_s: float) -> tuple[list[str], list[BaseException]]:
    """A slot works its queue until its runner ran a job, and `then_s` more; the jobs it ran
    (their ids) and what its work loop raised."""
    ran: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    thread = work_in_thread(make_slot(conn, stop, lambda job_id: ran.append(job_id) or {"images": 1}), errors)
    deadline = time.monotonic() + 60
    while not ran and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(then_s)
    stop.set()
    thread.join(timeout=30)
    return ran, errors


@pytest.mark.parametrize("reached_redis", [False, True])
def test_a_job_whose_start_failed_on_redis_is_given_back_not_failed(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch, reached_redis: bool
) -> None:
    """Guards against a Redis blip in RQ's start bookkeeping (before any runner saw the job)
    failing the job: RQ's failure path ran, with no outcome in the job's record, no
    `completed` webhook, and its retry never used. The job goes back to the head of its
    queue and runs, once; also when the start reached Redis and only its reply was lost
    (RQ then shows the job started by this slot)."""
    from rq import Retry
    from rq.registry import FailedJobRegistry
    from rq.worker import BaseWorker

    queue = Queue(QUEUE, connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue_call(func=RQ_FUNC, args=("blip-start",), job_id="blip-start", result_ttl=600, failure_ttl=600,
                       timeout=-1, retry=Retry(max=1))
    prepare = BaseWorker.prepare_job_execution
    tries: list[str] = []

    def fails_once(self: SlotWorker, job: Job, *args: Any, **kwargs: Any) -> None:
        tries.append(job.id)
        if len(tries) == 1:
            if reached_redis:
                prepare(self, job, *args, **kwargs)
            raise redis.ConnectionError("Connection reset by peer")  # Redis restarting
        prepare(self, job, *args, **kwargs)

    monkeypatch.setattr(BaseWorker, "prepare_job_execution", fails_once)
    ran, errors = runs_until_one_ran(redis_conn, then_s=0.5)  # then its end in RQ
    assert errors == [] and tries == ["blip-start", "blip-start"] and ran == ["blip-start"]
    job = Job.fetch("blip-start", connection=redis_conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED
    assert job.retries_left == 1
    assert "blip-start" not in FailedJobRegistry(QUEUE, connection=redis_conn).get_job_ids()
    assert StartedJobRegistry(QUEUE, connection=redis_conn).get_job_ids() == []


def test_a_job_given_back_after_a_sweep_put_it_back_is_queued_once(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the give-back of a job whose start failed on Redis pushing a second copy:
    while the slot's start hung (cut off from Redis), a sweep found the job queued and in no
    queue, and put it back (bailan.reaper._recover_lost); the slot's give-back then pushed it
    again, and two slots ran it. Sweep ages are written, not slept."""
    from rq.worker import BaseWorker

    from bailan import reaper
    from bailan.jobs import Keys

    queue = Queue(QUEUE, connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue_call(func=RQ_FUNC, args=("twice",), job_id="twice", result_ttl=600, failure_ttl=600, timeout=-1)
    redis_conn.zadd(Keys.waiting(QUEUE), {"twice": time.time() - 100})  # as the API's submit, a while ago
    prepare = BaseWorker.prepare_job_execution
    copies: list[int] = []

    def hangs_while_a_sweep_puts_it_back(self: SlotWorker, job: Job, *args: Any, **kwargs: Any) -> None:
        if not copies:
            reaper._recover_lost(redis_conn, QUEUE, QUEUE)  # seen lost once...
            redis_conn.zadd(Keys.lost(QUEUE), {"twice": time.time() - 100})  # ...a sweep ago
            assert reaper._recover_lost(redis_conn, QUEUE, QUEUE) == ["twice"]
            copies.append(redis_conn.lrange(queue.key, 0, -1).count(b"twice"))
            raise redis.ConnectionError("Connection reset by peer")
        prepare(self, job, *args, **kwargs)

    monkeypatch.setattr(BaseWorker, "prepare_job_execution", hangs_while_a_sweep_puts_it_back)
    given_back = SlotWorker._give_back

    def counting(self: SlotWorker, job: Job, queue: Queue) -> None:
        given_back(self, job, queue)
        copies.append(redis_conn.lrange(queue.key, 0, -1).count(b"twice"))

    monkeypatch.setattr(SlotWorker, "_give_back", counting)
    ran, errors = runs_until_one_ran(redis_conn, then_s=1.0)  # time for a second copy to be taken, were there one
    assert errors == [] and copies == [1, 1] and ran == ["twice"]
    assert Job.fetch("twice", connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.FINISHED


def test_a_job_left_when_the_worker_gives_up_on_redis_is_not_failed(redis_conn: redis.Redis) -> None:
    """Guards against a job failed in RQ with nothing in its record: Redis came back just as
    the worker gave up on it (past BAILAN_REDIS_OUTAGE_LIMIT_S) and the job's runner raised
    RedisGone; RQ, reachable again, failed the job and dropped its lease, so it ended failed
    with no error code and no webhook, and the reaper never ran it again. It keeps its lease,
    which lapses with the worker, for the reaper to requeue, as a dead worker's job."""
    from rq import Retry
    from rq.registry import FailedJobRegistry

    from worker.outage import RedisGone

    queue = Queue(QUEUE, connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue_call(func=RQ_FUNC, args=("gone",), job_id="gone", result_ttl=600, failure_ttl=600,
                       timeout=-1, retry=Retry(max=1))
    stop = threading.Event()

    def runner(job_id: str) -> dict[str, Any]:
        stop.set()  # the worker winds down
        raise RedisGone("Redis unreachable for more than 300 s (BAILAN_REDIS_OUTAGE_LIMIT_S)")

    errors: list[BaseException] = []
    work_in_thread(make_slot(redis_conn, stop, runner), errors).join(timeout=30)
    job = Job.fetch("gone", connection=redis_conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STARTED and job.retries_left == 1
    assert "gone" not in FailedJobRegistry(QUEUE, connection=redis_conn).get_job_ids()
    assert StartedJobRegistry(QUEUE, connection=redis_conn).get_job_ids() == ["gone"]  # its lease, for the reaper


def test_a_shutdown_command_to_every_slot_stops_the_worker_gracefully(redis_conn: redis.Redis) -> None:
    """Guards against a forced exit from RQ's own shutdown command: RQ answers it with SIGINT
    to the process, so the command sent to each of a worker's slots (as to every worker
    `rq info` lists) made a second SIGINT, which the worker reads as "force": every running
    job was abandoned. Each command now asks for the graceful stop."""
    import signal

    from rq.command import send_shutdown_command

    interrupts: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))
    try:
        stop = threading.Event()
        slot = make_slot(redis_conn, stop)
        errors: list[BaseException] = []
        thread = work_in_thread(slot, errors)
        channel = slot.pubsub_channel_name
        deadline = time.monotonic() + 10
        while not redis_conn.pubsub_numsub(channel)[0][1] and time.monotonic() < deadline:
            time.sleep(0.05)
        send_shutdown_command(redis_conn, slot.name)
        send_shutdown_command(redis_conn, slot.name)
        thread.join(timeout=30)
        assert not thread.is_alive() and stop.is_set() and errors == []
        time.sleep(0.2)  # a signal, had one been sent, is handled by now
        assert interrupts == []
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_work_loop_restarted_after_an_outage_keeps_one_subscription(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a subscriber (and a thread) added at every restart of a slot's work loop
    after a Redis outage: RQ unsubscribes only after registering the worker's death, which the
    outage failed, so one command then reached the slot once per restart."""
    from rq.worker import BaseWorker

    from worker.outage import RedisOutage

    register_death = BaseWorker.register_death
    dequeue = SlotWorker.dequeue_job_and_maintain_ttl
    failures = {"dequeue": 1, "death": 1}

    def dequeue_once_broken(self: SlotWorker, *args: Any, **kwargs: Any) -> Any:
        if failures["dequeue"]:
            failures["dequeue"] -= 1
            raise redis.ConnectionError("Connection reset by peer")  # Redis restarting
        return dequeue(self, *args, **kwargs)

    def death_once_broken(self: BaseWorker) -> None:
        if failures["death"]:
            failures["death"] -= 1
            raise redis.ConnectionError("Connection refused")  # the teardown meets the outage too
        register_death(self)

    monkeypatch.setattr(SlotWorker, "dequeue_job_and_maintain_ttl", dequeue_once_broken)
    monkeypatch.setattr(BaseWorker, "register_death", death_once_broken)
    stop = threading.Event()
    slot = make_slot(redis_conn, stop)
    thread = threading.Thread(target=slot.serve, args=(RedisOutage(redis_conn, 60),), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while failures["dequeue"] + failures["death"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # the loop, restarted, subscribed again
        assert failures == {"dequeue": 0, "death": 0}
        assert redis_conn.pubsub_numsub(slot.pubsub_channel_name)[0][1] == 1
    finally:
        stop.set()
        thread.join(timeout=30)
