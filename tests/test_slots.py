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
from rq.registry import CanceledJobRegistry
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
    assert redis_conn.exists(Result.get_key("broken"))
    canceled = Job.fetch("canceled", connection=redis_conn, serializer=JSONSerializer)
    assert canceled.get_status() == JobStatus.CANCELED
    assert "canceled" in CanceledJobRegistry(QUEUE, connection=redis_conn).get_job_ids()
    assert 0 < redis_conn.ttl(canceled.key) <= 600
    assert Job.fetch("broken", connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.FAILED


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
