"""How one GPU process serves many RQ jobs at once.

RQ stays the queue of record: it owns job status, the registries, failures and
retries. But an RQ worker runs one job at a time, and batching needs many jobs
in flight in one process that owns the model. So a worker process runs:

* `max_batch` *slot* threads, each an in-process RQ worker (`SlotWorker`, a
  `SimpleWorker`: no fork per job, because CUDA cannot be re-initialised in a
  forked child and reloading the model per job costs seconds). A slot dequeues
  a job, hands it to the engine and blocks until the engine is done with it,
  then lets RQ record the outcome as usual;
* the engine loop (worker.sampling.Engine), on the main thread, that owns the GPU and steps every
  admitted job through one UNet call per step;
* an I/O thread that writes progress and reads cancel requests, and a small
  pool that encodes and stores previews, so Redis round trips and image
  encoding never sit between two denoising steps;
* a heartbeat thread: SimpleWorker sends no heartbeat while a job runs, so this
  thread extends every running job's lease in RQ's started registry. A killed
  process stops extending them, and the reaper (bailan.jobs.reap_abandoned,
  run here and in the API) fails or requeues its jobs once the lease expires.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable

import numpy as np
import redis
import rq
import torch
from PIL import Image
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.utils import now as rq_now

from bailan.jobs import (
    ErrorCode,
    JobParams,
    Keys,
    PREVIEW_FORMAT,
    RecordField,
    decode_record,
    dumps,
    now,
    reap_abandoned,
)
from worker.loader import LoadedModel, load_model, pick_device, pick_dtype
from worker.sampling import OOM_ERRORS, Engine, GenerationJob, InvalidForModel, JobCanceled, default_max_batch
from worker.settings import WorkerSettings

log = logging.getLogger("bailan.worker")

# What a runner returns for a job the client canceled; its slot records it as
# RQ's canceled status instead of finished.
CANCELED_RESULT: dict[str, Any] = {"canceled": True}

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
    shutdown event; `has_room` says whether the engine can start another job;
    `lease_s` is the lease a running job holds in RQ's started registry. They
    default so that RQ's own constructor calls (e.g. `Worker.all`) still work.
    """

    death_penalty_class = NoDeathPenalty

    def __init__(
        self,
        *args: Any,
        runner: JobRunner | None = None,
        stop: threading.Event | None = None,
        has_room: Callable[[], bool] | None = None,
        lease_s: int = 30,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.runner = runner
        self.stop = stop if stop is not None else threading.Event()
        self.has_room = has_room
        self.lease_s = lease_s
        self.running_job: Job | None = None
        # The runner's own answer for the running job, so the outcome never has
        # to be read back from RQ's private copy of the return value.
        self.job_was_canceled = False
        self._last_wait_beat = 0.0

    def _install_signal_handlers(self) -> None:
        # The main thread owns signals and sets `stop` itself (worker.process).
        return None

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.lease_s

    def run(self, job_id: str) -> dict[str, Any]:
        """Hand the job to the runner; called by run_job while RQ performs it."""
        if self.runner is None:
            raise RuntimeError(f"slot {self.name} has no runner")
        result = self.runner(job_id)
        self.job_was_canceled = result == CANCELED_RESULT
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
                time.sleep(0.05)
                continue
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=2)
            if result is not None:
                return result
        return None

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.running_job = job
        self.job_was_canceled = False
        token = _running_slot.set(self)
        try:
            super().execute_job(job, queue)
        finally:
            _running_slot.reset(token)
            self.running_job = None

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry) -> None:
        if not self.job_was_canceled:
            return super().handle_job_success(job, queue, started_job_registry)
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.CANCELED, pipeline=pipe)
            self.cleanup_execution(job, pipeline=pipe)
            CanceledJobRegistry(job.origin, self.connection, serializer=self.serializer).add(job, pipeline=pipe)
            # RQ keeps canceled jobs for ever; Bailan keeps them as long as any result.
            job.cleanup(job.get_result_ttl(self.default_result_ttl), pipeline=pipe, remove_from_queue=False)
            pipe.execute()

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "") -> None:
        # A job that raised would raise again: retries are kept for jobs whose
        # worker died under them (see bailan.jobs.reap_abandoned).
        job.retries_left = 0
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string)


@dataclass(eq=False)
class _InFlight:
    job: GenerationJob
    written_step: int = -1
    unknown_written: bool = False


@dataclass
class Runtime:
    settings: WorkerSettings
    model: LoadedModel
    engine: Engine
    connection: redis.Redis
    in_flight: dict[str, _InFlight] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.previews = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bailan-preview")
        self.lock = threading.Lock()

    # ---- one job, on a slot thread --------------------------------------------

    def run(self, job_id: str) -> dict[str, Any]:
        key = Keys.job(job_id)
        record = decode_record(self.connection.hgetall(key))
        if not record.get(RecordField.params):
            raise RuntimeError(f"job {job_id} has no record (expired before it ran?)")
        if record.get(RecordField.cancel_requested):
            self._finish_record(job_id, {})
            return CANCELED_RESULT
        params = JobParams.model_validate_json(record[RecordField.params])
        job = GenerationJob(
            id=job_id,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=params.width or self.model.native_width,
            height=params.height or self.model.native_height,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            seed=params.seed,
            scheduler=params.scheduler.value,
            num_images=params.num_images,
            preview_every=params.preview_every,
            preview_full_decode=params.preview_full_decode,
            on_preview=self._on_preview,
        )
        pipe = self.connection.pipeline()
        # A retried job starts afresh: no error, end time or previews of the attempt before.
        pipe.hdel(key, RecordField.error_code, RecordField.error_message, RecordField.finished_at)
        pipe.delete(Keys.previews(job_id))
        pipe.hset(
            key,
            mapping={
                RecordField.started_at: now(),
                RecordField.step: 0,
                RecordField.total_steps: job.steps,
                RecordField.width: job.width,
                RecordField.height: job.height,
                RecordField.model: self.model.name,
                RecordField.worker: self.settings.name,
            },
        )
        pipe.execute()
        try:
            future = self.engine.submit(job)
        except InvalidForModel as exc:
            self._finish_record(job_id, {RecordField.error_code: ErrorCode.invalid_for_model.value,
                                         RecordField.error_message: str(exc)})
            raise
        with self.lock:
            self.in_flight[job_id] = _InFlight(job)
        try:
            images = future.result()
        except JobCanceled:
            self._finish_record(job_id, {RecordField.step: job.step,
                                         RecordField.unknown_words: dumps(job.unknown_words)})
            return CANCELED_RESULT
        except OOM_ERRORS as exc:
            self._finish_record(job_id, {RecordField.error_code: ErrorCode.out_of_memory.value,
                                         RecordField.error_message: f"out of GPU memory: {exc}".strip()[:500]})
            raise
        except Exception as exc:
            self._finish_record(job_id, {RecordField.error_code: ErrorCode.internal.value,
                                         RecordField.error_message: f"{type(exc).__name__}: {exc}"[:500]})
            raise
        finally:
            with self.lock:
                self.in_flight.pop(job_id, None)
        self._store_images(job, params.output_format.value, images)
        return {"images": len(images)}

    def _store_images(self, job: GenerationJob, fmt: str, images: list[np.ndarray]) -> None:
        ttl = self.settings.result_ttl_s
        pipe = self.connection.pipeline()
        for index, array in enumerate(images):
            pipe.set(Keys.image(job.id, index), encode_image(array, fmt), ex=ttl)
        self._finish_record(
            job.id,
            {
                RecordField.step: job.steps,
                RecordField.images: dumps([{"index": i, "seed": job.seed + i} for i in range(len(images))]),
                RecordField.unknown_words: dumps(job.unknown_words),
            },
            pipe,
        )

    def _finish_record(self, job_id: str, fields: dict[str, Any], pipe: Any = None) -> None:
        pipe = pipe if pipe is not None else self.connection.pipeline()
        key = Keys.job(job_id)
        pipe.hset(key, mapping={**fields, RecordField.finished_at: now()})
        ttl = self.settings.result_ttl_s
        pipe.expire(key, ttl)
        pipe.expire(Keys.previews(job_id), ttl)
        pipe.execute()

    # ---- engine callbacks and the I/O thread ------------------------------------

    def _on_preview(self, job: GenerationJob, step: int, rgb: np.ndarray) -> None:
        self.previews.submit(self._store_preview, job.id, step, rgb)

    def _store_preview(self, job_id: str, step: int, rgb: np.ndarray) -> None:
        try:
            image = Image.fromarray(rgb)
            side = self.settings.preview_max_side
            scale = side / max(image.size)
            if scale > 1:
                # Latent-resolution previews are tiny; upscale in whole pixels so they stay crisp.
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
            elif scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            data = encode_image(np.asarray(image), PREVIEW_FORMAT, quality=80)
            ttl = self.settings.preview_ttl_s
            pipe = self.connection.pipeline()
            pipe.set(Keys.preview(job_id, step), data, ex=ttl)
            pipe.zadd(Keys.previews(job_id), {str(step): step})
            pipe.expire(Keys.previews(job_id), max(ttl, self.settings.result_ttl_s))
            pipe.execute()
        except Exception:
            log.exception("storing preview %s/%d failed", job_id, step)

    def io_loop(self) -> None:
        """Progress out, cancel requests in; every 50 ms rather than every step."""
        while not self.stop.is_set():
            try:
                self.sync_jobs()
            except redis.RedisError as exc:
                log.warning("progress/cancel sync failed: %s", exc)
            except Exception:  # this thread must outlive any one bad round
                log.exception("progress/cancel sync failed")
            self.stop.wait(0.05)

    def sync_jobs(self) -> None:
        with self.lock:
            flights = list(self.in_flight.items())
        if not flights:
            return
        # One round trip: this tick's progress out, every cancel flag in (read last).
        pipe = self.connection.pipeline()
        for job_id, flight in flights:
            step = flight.job.step
            if step != flight.written_step:
                pipe.hset(Keys.job(job_id), RecordField.step, step)
                flight.written_step = step
            if flight.job.unknown_words and not flight.unknown_written:
                pipe.hset(Keys.job(job_id), RecordField.unknown_words, dumps(flight.job.unknown_words))
                flight.unknown_written = True
        writes = len(pipe)
        for job_id, _ in flights:
            pipe.hget(Keys.job(job_id), RecordField.cancel_requested)
        for (_, flight), canceled in zip(flights, pipe.execute()[writes:]):
            if canceled:
                flight.job.cancel_requested.set()

    # ---- liveness ---------------------------------------------------------------

    def heartbeat(self, slots: list[SlotWorker]) -> None:
        lease = self.settings.heartbeat_ttl_s
        pipe = self.connection.pipeline()
        info = {**self.model.info(), "worker": self.settings.name, "max_batch": self.engine.max_batch,
                "slots": len(slots)}
        pipe.set(Keys.worker(self.settings.name), json.dumps(info), ex=lease)
        for slot in slots:
            job, execution = slot.running_job, slot.execution
            if job is None or execution is None:
                continue
            slot.heartbeat(lease + 60, pipeline=pipe)
            execution.heartbeat(job.started_job_registry, lease, pipeline=pipe)
            job.heartbeat(rq_now(), lease, pipeline=pipe, xx=True)
        pipe.execute()

    def liveness_loop(self, slots: list[SlotWorker]) -> None:
        last_reap = 0.0
        while not self.stop.is_set():
            # Leases first and on their own: a failing sweep must never stop them.
            try:
                self.heartbeat(slots)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
            if time.monotonic() - last_reap >= self.settings.reap_interval_s:
                last_reap = time.monotonic()
                try:
                    lost = reap_abandoned(self.connection, self.settings.queue_name, self.settings.result_ttl_s)
                    if lost:
                        log.warning("reaped abandoned jobs: %s", lost)
                except redis.RedisError as exc:
                    log.warning("reaper: Redis unavailable: %s", exc)
                except Exception:
                    log.exception("reaper: sweep failed")
            self.stop.wait(min(self.settings.heartbeat_interval_s, self.settings.reap_interval_s))


def encode_image(array: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=4)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def serve(settings: WorkerSettings) -> int:
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    started = time.perf_counter()
    model = load_model(settings.model, device, dtype, compile_unet=settings.compile)
    engine = Engine(model, settings.max_batch or default_max_batch(model))
    warm_up(engine, settings.compile)
    log.info("model %s loaded on %s/%s in %.1fs; batch %d", model.name, device, dtype, time.perf_counter() - started,
             engine.max_batch)
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
    early_stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: early_stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: early_stop.set())
    if not wait_for_redis(connection, settings.redis_url, early_stop):
        return 0
    runtime = Runtime(settings, model, engine, connection)
    stopping = threading.Event()
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    slots = [
        SlotWorker(
            [queue],
            name=f"{settings.name}.{i}",
            connection=connection,
            serializer=JSONSerializer,
            # The dequeue blocks for worker_ttl - 15 s; keep it short so shutdown is prompt.
            worker_ttl=20,
            lease_s=settings.heartbeat_ttl_s,
            runner=runtime.run,
            stop=stopping,
            has_room=engine.has_room,
        )
        for i in range(engine.max_batch)
    ]
    engine_stop = threading.Event()
    threads = [
        threading.Thread(target=runtime.io_loop, name="bailan-io", daemon=True),
        threading.Thread(target=runtime.liveness_loop, args=(slots,), name="bailan-liveness", daemon=True),
    ]
    slot_threads = [
        threading.Thread(target=slot.work, kwargs={"logging_level": "WARNING"}, name=slot.name, daemon=True)
        for slot in slots
    ]

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            # Second signal: leave now; the reaper requeues what was running.
            log.warning("forced shutdown")
            raise SystemExit(1)
        log.info("shutting down: finishing running jobs (signal again to force)")
        # Every slot polls this event and stops dequeuing.
        stopping.set()

    # Handlers first: once the worker key is up, /readyz says 200, and a SIGTERM
    # from then on must be a graceful stop.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    for thread in threads:
        thread.start()
    try:
        runtime.heartbeat(slots)
    except redis.RedisError as exc:  # the liveness thread retries
        log.warning("first heartbeat failed: %s", exc)
    for thread in slot_threads:
        thread.start()
    print(f"worker {settings.name} ready: model {model.name} on {device}, batch {engine.max_batch}", flush=True)

    def supervise() -> None:
        idle_since: float | None = None
        while any(t.is_alive() for t in slot_threads):
            for thread in slot_threads:
                thread.join(0.2)
            if not stopping.is_set():
                continue
            # Idle slots leave their dequeue within seconds, except while Redis is
            # unreachable (RQ retries forever): with no job in flight there is
            # nothing to finish, so stop waiting for them.
            if runtime.in_flight or engine.busy:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 5:
                break
        engine_stop.set()

    threading.Thread(target=supervise, name="bailan-supervisor", daemon=True).start()
    # The engine runs on the main thread: PyTorch's CPU kernels measured 2.2x
    # slower when launched from a secondary thread (OpenMP thread teams), and
    # signal handlers still run between two steps.
    engine.run(engine_stop)
    runtime.stop.set()
    runtime.previews.shutdown(wait=True)
    try:
        connection.delete(Keys.worker(settings.name))
    except redis.RedisError:
        pass
    return 0


def wait_for_redis(connection: redis.Redis, url: str, stopping: threading.Event) -> bool:
    """Block until Redis answers (a worker may start before its Redis); False if told to stop."""
    delay = 0.5
    while not stopping.is_set():
        try:
            connection.ping()
            return True
        except redis.RedisError as exc:
            log.warning("waiting for Redis at %s: %s", url, exc)
            stopping.wait(delay)
            delay = min(delay * 2, 10.0)
    return False


def warm_up(engine: Engine, compile_unet: bool = False) -> None:
    """One short job through every path (kernels, autotuning, torch.compile) before taking work."""
    model = engine.model
    job = GenerationJob(id="warm-up", prompt="warm up", width=model.native_width, height=model.native_height,
                        steps=2, guidance_scale=2.0, seed=0, preview_every=1)
    engine.submit(job)
    engine.run_until_idle()
    job.future.result()
    if model.device.type == "cuda":
        # Every padded batch size once, so cuDNN picks kernels now and not under
        # traffic. Compiled UNets would compile once per size (about a minute
        # each), so those warm up on demand instead.
        if not compile_unet:
            engine.warm_up_shapes()
        torch.cuda.synchronize()
