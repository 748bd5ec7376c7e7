"""The worker's timeline (worker.trace): what a traced worker writes, read back and summed up,
through a real slot, bridge and engine, against a real Redis and a real (tiny) model."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from bailan.jobs import RQ_FUNC
from tests.test_bridge import slot_serving, submit
from tests.test_e2e import wait_for
from worker import trace
from worker.bridge import JobBridge
from worker.engine import Engine
from worker.loader import load_model
from worker.settings import WorkerSettings
from worker.trace import Trace


def test_a_traced_worker_writes_each_step_and_each_jobs_hand_overs_in_order(
    tiny_model_dir: Path, tmp_path: Path, redis_conn: redis.Redis, redis_url: str
) -> None:
    """Guards the trace that bench/service.py lays out (BAILAN_TRACE_FILE): a step line per
    engine step with its rows, admissions, finished samples and decode time, and a line per
    succeeded job from its slot and its bridge whose stamps follow the job's path (RQ's
    dequeue, the bridge, the engine, the store, RQ's end), so the summary places each job."""
    path = tmp_path / "trace.jsonl"
    traced = Trace(path, "traced-worker")
    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    settings = WorkerSettings(model=tiny_model_dir, redis_url=redis_url, blob_dir=tmp_path / "blobs",
                              trace_file=path)
    engine = Engine(model, 2)
    engine.trace = traced
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    loop.start()
    bridge = JobBridge(settings, model, engine, redis_conn, trace=traced)
    queue = Queue("traced", connection=redis_conn, serializer=JSONSerializer)
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    for job_id in ids:
        submit(redis_conn, job_id, steps=3, preview_every=0)
        queue.enqueue_call(func=RQ_FUNC, args=(job_id,), job_id=job_id, result_ttl=600, failure_ttl=600, timeout=-1)
    since = time.time()

    def statuses() -> list[JobStatus]:
        return [Job.fetch(i, connection=redis_conn, serializer=JSONSerializer).get_status() for i in ids]

    try:
        with slot_serving(queue, "traced.0", bridge.run, redis_conn, trace=traced) as errors:
            wait_for(lambda: all(s in (JobStatus.FINISHED, JobStatus.FAILED) for s in statuses()), 120,
                     "both jobs to end in RQ")
    finally:
        stop.set()
        bridge.close()
        loop.join(timeout=10)
    assert statuses() == [JobStatus.FINISHED] * 2
    assert errors == []
    traced.flush()
    lines = trace.read(path, since, time.time())
    steps = [line for line in lines if line["event"] == "step"]
    # One slot: each job alone, three steps each, decoded at its last.
    assert len(steps) == 6 and [s["finished"] for s in steps] == [0, 0, 1] * 2
    assert [s["active_after"] for s in steps] == [1, 1, 0] * 2  # the engine empty after each job
    assert sum(s["admitted"] for s in steps) == 2 and all(s["rows"] >= s["samples"] == 1 for s in steps)
    assert all(s["t1"] > s["t0"] for s in steps)
    assert {line["worker"] for line in lines} == {"traced-worker"}
    assert all(s["decode_s"] > 0 for s in steps if s["finished"])
    summary = trace.summarise(lines)
    assert summary["engine"]["steps"] == 6 and summary["engine"]["decodes"] == 2
    assert summary["engine"]["admitting_steps"] == 2
    assert summary["jobs"]["count"] == 2
    stamps = ("dequeued", "taken", "submitted", "admitted", "done", "stored", "rq_ended")
    for job_id in ids:
        merged: dict[str, float] = {}
        for line in lines:
            if line.get("job") == job_id:
                merged.update(line)
        times = [merged[k] for k in stamps]
        assert times == sorted(times), (job_id, merged)
        # The job's own steps ran between its admission and its end.
        assert any(merged["admitted"] <= s["t0"] and s["t1"] <= merged["done"] + 1e-3 for s in steps)


def test_a_trace_that_cannot_be_written_stops_and_its_thread_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the bridge's I/O thread (which flushes the trace) against a trace file it cannot
    write: the error is logged once and tracing stops, instead of raising out of every tick
    or holding every line in memory for ever."""
    traced = Trace(tmp_path / "missing-dir" / "trace.jsonl")
    traced.add("step", t0=1.0)
    with caplog.at_level(logging.ERROR, logger="worker.trace"):
        traced.flush()
        traced.flush()
    assert not traced.on
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1
    traced.add("step", t0=2.0)
    assert traced._lines == []


def test_reading_a_trace_keeps_its_window_and_skips_a_line_cut_short(tmp_path: Path) -> None:
    """Guards bench/service.py's reading of a trace the worker is still appending to: a line
    cut short by a write under way is skipped, not fatal, and each kind of line is placed in
    the mode's window by its own stamp."""
    path = tmp_path / "trace.jsonl"
    lines = [{"event": "step", "t0": 5.0, "t1": 5.1}, {"event": "job", "job": "a", "taken": 6.0},
             {"event": "slot", "job": "a", "dequeued": 5.9, "rq_ended": 9.0}, {"event": "step", "t0": 50.0, "t1": 51.0}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"event": "step", "t0": 7')
    assert trace.read(path, 4.0, 10.0) == lines[:3]
    assert trace.read(path, 5.95, 60.0) == [lines[1], lines[3]]


def test_a_summary_splits_the_time_between_steps() -> None:
    """Guards the trace summary's sums: the engine's time between steps split into gathering a
    burst, admitting its jobs and the rest, and a gap with no samples in hand counted as
    waiting for work but for the admission that ends it; the first step placed after the
    first hand-over; a job's hand-overs as the differences of its stamps."""

    def step(t0: float, t1: float, gather: float = 0.0, admit: float = 0.0, admitted: int = 0,
             finished: int = 0, decode: float = 0.0, active_after: int = 2) -> dict[str, object]:
        return {"event": "step", "t0": t0, "t1": t1, "gather_s": gather, "admit_s": admit, "admitted": admitted,
                "rows": 4, "bucket": 4, "samples": 2, "finished": finished, "decode_s": decode,
                "active_after": active_after}

    items = [
        step(10.0, 11.0, gather=0.05, admit=0.1, admitted=1),
        step(11.5, 12.0, gather=0.1, admit=0.2, admitted=1),
        step(12.0, 13.0, finished=2, decode=0.25, active_after=0),
        # Nothing in hand for 2 s (no job came): waiting, not a gap of the engine's own.
        step(15.0, 15.5, admit=0.3, admitted=1),
        {"event": "job", "job": "a", "taken": 9.5, "submitted": 9.6, "admitted": 10.0, "done": 13.0, "stored": 13.2},
        {"event": "slot", "job": "a", "dequeued": 9.4, "rq_ended": 13.3},
        {"event": "job", "job": "b", "taken": 9.8, "submitted": 9.9, "admitted": 11.5, "done": 13.0, "stored": 13.4},
        {"event": "slot", "job": "b", "dequeued": 9.7, "rq_ended": 13.6},
    ]
    summary = trace.summarise(items)
    engine = summary["engine"]
    assert engine["steps"] == 4 and engine["steps_s"] == 3.0 and engine["decodes"] == 1
    # The 2 s with nothing in hand: 0.3 s admitting the job that came (the engine's), 1.7 s waiting.
    assert engine["idle_s"] == 1.7 and engine["between_steps_s"] == 0.8 and engine["largest_gap_s"] == 0.5
    # The first step's gather and admission came before any gap: not counted in one.
    assert engine["between_gather_s"] == 0.1 and engine["between_admit_s"] == 0.5
    assert engine["between_other_s"] == 0.2
    assert engine["first_step_after_s"] == 0.5 and engine["admitting_steps"] == 3
    jobs = summary["jobs"]
    assert jobs["count"] == 2 and jobs["taken_over_s"] == 0.3 and jobs["stored_over_s"] == 0.2
    assert jobs["submitted_to_admitted_s"] == {"p50": 1.6, "max": 1.6}
    assert jobs["stored_to_rq_ended_s"]["max"] == 0.2


def test_a_summary_keeps_workers_sharing_a_trace_file_apart() -> None:
    """Guards the summary of a file several workers append to (BAILAN_WORKERS > 1): their
    steps interleave in time, and gaps taken across workers came out negative."""

    def step(worker: str, t0: float, t1: float) -> dict[str, object]:
        return {"event": "step", "worker": worker, "t0": t0, "t1": t1, "gather_s": 0.0, "admit_s": 0.0,
                "admitted": 0, "rows": 2, "bucket": 2, "samples": 1, "finished": 0, "decode_s": 0.0,
                "active_after": 1}

    engine = trace.summarise([step("a", 0.0, 1.0), step("b", 0.5, 1.5), step("a", 1.1, 2.0), step("b", 1.7, 2.5)])["engine"]
    assert engine["workers"] == 2 and engine["steps"] == 4
    assert engine["between_steps_s"] == 0.3 and engine["largest_gap_s"] == 0.2
