"""The bridge from RQ jobs to the engine: one job's record in, its results out.

A slot (worker.slots) calls `JobBridge.run` with a job id. The bridge reads the
job's record from Redis, submits a GenerationJob to the engine and waits for
it, then stores the images and the record's final fields. While jobs run, the
I/O thread (`io_loop`) writes their progress and reads cancel requests, and a
one-thread pool encodes and stores previews, so Redis round trips and image
encoding never sit between two denoising steps. Image and preview bytes go to
the blob store (bailan.blobs); Redis gets only the record.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import redis
from PIL import Image

from bailan import events, webhooks
from bailan.blobs import BlobStore, image_key, open_store, preview_key
from bailan.webhooks import WebhookEvent
from bailan.jobs import ErrorCode, JobParams, Keys, RecordField, decode_record, dumps, now
from bailan.metrics import Tally
from worker.imaging import encode_image, encode_preview, parameters_text
from worker.loader import LoadedModel
from worker.engine import OOM_ERRORS, Engine, GenerationJob, InvalidForModel, JobCanceled
from worker.generation import InvalidInput
from worker.outage import TRANSIENT, RedisGone, RedisOutage
from worker.settings import WorkerSettings
from worker.slots import CANCELED_RESULT, SUPERSEDED_RESULT, running_slot
from worker.trace import Trace, wall

T = TypeVar("T")

log = logging.getLogger("bailan.worker")


class ExceedsDeviceLimits(Exception):
    """A job over this worker's caps on size or steps (bailan.caps)."""


class EndedCanceled(Exception):
    """The job's record shows it ended canceled already: only RQ has yet to hear it."""


class Superseded(Exception):
    """The job's record no longer shows this attempt (a reaper requeued or failed it while
    this worker could not reach Redis): its outcome is not written."""


# The longest a job's end waits for its previews still being stored (seconds).
PREVIEW_DRAIN_S = 10.0


def _run_of(started_at: str) -> str:
    """A run's name in its webhook ids: its start, in milliseconds (webhooks.message_id)."""
    return str(round(float(started_at) * 1000))


@dataclass(eq=False)
class _InFlight:
    """A running job and what the I/O thread last wrote of it."""

    job: GenerationJob
    written_step: int = -1
    unknown_written: bool = False


@dataclass
class JobBridge:
    settings: WorkerSettings
    model: LoadedModel
    engine: Engine
    connection: redis.Redis
    in_flight: dict[str, _InFlight] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    # Image bytes go here, not into Redis (bailan.blobs); default: settings.blob_dir.
    blobs: BlobStore | None = None
    # Shared with the slots and the liveness thread (worker.process); made here when not given.
    outage: RedisOutage | None = None
    tally: Tally = field(default_factory=Tally)
    # A line per succeeded job (worker.trace); off unless the worker process gives one.
    trace: Trace = field(default_factory=lambda: Trace(None))

    def __post_init__(self) -> None:
        if self.outage is None:
            self.outage = RedisOutage(self.connection, self.settings.redis_outage_limit_s)
        if self.blobs is None:
            self.blobs = open_store(self.settings.blob_dir)
        # What this worker takes on its device (bailan.caps), published with its presence too.
        self.caps = self.settings.device_caps(self.model.device.type)
        self.previews = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bailan-preview")
        self.lock = threading.Lock()
        self.hooks = webhooks.Policy.of(self.settings)
        # Params of the jobs between their start and their end that asked for webhooks.
        self.hooked: dict[str, JobParams] = {}
        # Previews handed to the pool and not yet stored, by job: a job's end waits for them.
        self.storing: dict[str, list[Future]] = {}
        # Jobs between a slot's handing them over and their outcome stored (images encoded,
        # record written): a shutdown waits for them, not only for the engine.
        self.running: set[str] = set()
        # The started_at each running job's record got from this attempt: its end is written
        # only while the record still shows it (a reaper's requeue or failure changes it).
        self.attempts: dict[str, str] = {}

    # ---- one job, on a slot thread --------------------------------------------

    def run(self, job_id: str) -> dict[str, Any]:
        """Run one job to its end; RQ's result, or CANCELED_RESULT. Raises when the job failed.

        Every Redis call here waits out an outage (worker.outage): a job whose
        images are made is never lost to a Redis restart.
        """
        labels = {"model": self.model.name}
        # The slot runs this in the job's logging context (bailan.logs): these lines carry its id.
        log.info("job started")
        started = time.perf_counter()
        with self.lock:
            self.running.add(job_id)
        try:
            result = self._run(job_id, started)
        except RedisGone:
            raise  # not an outcome: the process exits and the reaper requeues the job
        except Superseded as exc:
            return self._superseded(exc)
        except EndedCanceled:
            log.info("job already ended canceled by the API; ending it in RQ alone")
            return CANCELED_RESULT
        except Exception as exc:
            code = getattr(exc, "bailan_error_code", None)
            if code is None:
                # Raised where no outcome was recorded (a full disk, a bug): without this the job
                # ended in RQ alone, its view with no end time or error and no webhook sent.
                try:
                    self._failed(job_id, exc, ErrorCode.internal, f"{type(exc).__name__}: {exc}")
                except Superseded as gone:  # not this worker's to fail, in the record or in RQ
                    return self._superseded(gone)
                code = ErrorCode.internal.value
            self.tally.inc("bailan_jobs_finished_total", {**labels, "status": "failed", "error": code})
            log.warning("job failed (%s) after %.2f s: %s", code, time.perf_counter() - started, exc)
            raise
        finally:
            with self.lock:  # normally gone already (_finish_record); not so after a Redis error
                self.running.discard(job_id)
                self.hooked.pop(job_id, None)
                self.storing.pop(job_id, None)
                self.attempts.pop(job_id, None)
        if result == CANCELED_RESULT:
            self.tally.inc("bailan_jobs_finished_total", {**labels, "status": "canceled"})
            log.info("job canceled after %.2f s", time.perf_counter() - started)
        else:
            self.tally.inc("bailan_jobs_finished_total", {**labels, "status": "succeeded"})
            self.tally.inc("bailan_images_total", labels, result["images"])
            log.info("job succeeded in %.2f s (%d images)", time.perf_counter() - started, result["images"])
        return result

    @staticmethod
    def _superseded(exc: Superseded) -> dict[str, Any]:
        log.warning("job taken from this worker while it ran (%s); its outcome is dropped", exc)
        return SUPERSEDED_RESULT

    def _redis(self, what: str, call: Callable[[], T]) -> T:
        assert self.outage is not None
        return self.outage.retry(what, call)

    def _run(self, job_id: str, taken: float) -> dict[str, Any]:
        """The job's run (`run`'s body); `taken`: time.perf_counter() when its slot handed it here."""
        key = Keys.job(job_id)
        record = decode_record(self._redis("reading a job record", lambda: self.connection.hgetall(key)))
        if not record.get(RecordField.params):
            gone = RuntimeError(f"job {job_id} has no record (expired before it ran?)")
            gone.bailan_error_code = ErrorCode.internal.value  # type: ignore[attr-defined]  # none to write to
            raise gone
        params = JobParams.model_validate_json(record[RecordField.params])
        if params.webhook_url is not None:
            with self.lock:
                self.hooked[job_id] = params
        if record.get(RecordField.cancel_requested):
            if record.get(RecordField.finished_at):
                # The API ended it canceled already, and pushed it back only because that end's
                # reply was lost (app.store.records.cancel): ending it again would send a second
                # `completed` webhook under the same id, and count it twice.
                raise EndedCanceled
            self._finish_record(job_id, {})
            return CANCELED_RESULT
        try:
            created = float(record.get(RecordField.created_at) or "nan")
        except ValueError:
            created = float("nan")
        # Never below 0: the submit's stamp is another host's clock, and a negative observation
        # would lower the histogram's sum, which Prometheus reads as a counter reset.
        self.tally.observe("bailan_job_wait_seconds", max(0.0, now() - created), {"model": self.model.name})
        width = params.width or self.model.native_width
        height = params.height or self.model.native_height
        refusal = self.caps.refusal(width, height, params.steps)
        if refusal is not None:
            # Another kind of worker may share the queue; the API refuses such a job only when no
            # live worker would take it, so this one fails it rather than spending minutes a step.
            message = (f"{refusal[1]}, the most this worker ({self.model.device.type}) takes; "
                       f"ask for less {refusal[0]}")
            raise self._failed(job_id, ExceedsDeviceLimits(message), ErrorCode.exceeds_device_limits, message)
        try:
            init_image, mask = self._inputs(job_id, params, width, height)
        except InvalidInput as exc:
            raise self._failed(job_id, exc, ErrorCode.invalid_for_model, str(exc))
        job = GenerationJob(
            id=job_id,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=width,
            height=height,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            seed=params.seed,
            scheduler=params.scheduler.value,
            num_images=params.num_images,
            preview_every=params.preview_every,
            preview_kind=params.preview_kind.value,
            preview_full_decode=params.preview_full_decode,
            init_image=init_image,
            mask=mask,
            strength=params.strength,
            on_preview=self._on_preview,
        )
        started = now()
        # The slot that took the job from RQ (None when the bridge runs a job directly, as its
        # tests do): the start is written only while RQ still shows the job started by it.
        slot = running_slot()
        owner = slot.name if slot is not None else None

        def write_start() -> list[Any]:
            with self.connection.pipeline(transaction=True) as pipe:
                if owner is not None:
                    # A fence, as at the end (_finish_record): cut off from Redis for longer than
                    # its lease since RQ started the job, this worker may find it requeued, run by
                    # another, or failed by a reaper, and must not start it again over that.
                    rq_key = f"rq:job:{job_id}"
                    pipe.watch(rq_key)
                    status, worker = (v.decode() if v is not None else None
                                      for v in pipe.hmget(rq_key, "status", "worker_name"))
                    if status != "started" or worker != owner:
                        raise Superseded(f"RQ shows it {status} by {worker or 'no worker'}, "
                                         f"no longer started by slot {owner}")
                    ours = pipe.hget(key, RecordField.started_at)  # after WATCH: answered at once
                else:
                    ours = self.connection.hget(key, RecordField.started_at)
                if ours is not None and ours.decode() == repr(started):
                    # This very write, applied before its answer was lost (a retry through an
                    # outage): sent again, it would queue the `started` webhook a second time.
                    return []
                pipe.multi()
                # A retried job starts afresh: no error, end time, images or previews of the attempt before.
                pipe.hdel(key, RecordField.error_code, RecordField.error_message, RecordField.finished_at,
                          RecordField.images)
                pipe.delete(Keys.previews(job_id))
                pipe.hset(
                    key,
                    mapping={
                        RecordField.started_at: started,
                        RecordField.step: 0,
                        RecordField.total_steps: job.run_steps,
                        RecordField.width: job.width,
                        RecordField.height: job.height,
                        RecordField.model: self.model.name,
                        RecordField.worker: self.settings.name,
                    },
                )
                webhooks.enqueue(self.connection, pipe, self.hooks, job_id, WebhookEvent.started, params,
                                 attempt=_run_of(repr(started)))
                return pipe.execute()

        def mark_started() -> list[Any]:
            while True:
                try:
                    return write_start()
                except redis.WatchError:
                    continue  # RQ's job changed meanwhile (its heartbeat): read it again

        try:
            self._redis("marking a job started", mark_started)  # job.run_steps refuses a strength too low
            with self.lock:
                self.attempts[job_id] = repr(started)  # as redis-py writes a float
            future = self.engine.submit(job)
        except InvalidForModel as exc:
            raise self._failed(job_id, exc, ErrorCode.invalid_for_model, str(exc))
        with self.lock:
            self.in_flight[job_id] = _InFlight(job)
        try:
            images = future.result()
        except JobCanceled:
            self._finish_record(job_id, {RecordField.step: job.step,
                                         RecordField.unknown_words: dumps(job.unknown_words)})
            return CANCELED_RESULT
        except OOM_ERRORS as exc:
            raise self._failed(job_id, exc, ErrorCode.out_of_memory, f"out of GPU memory: {exc}".strip())
        except Exception as exc:
            raise self._failed(job_id, exc, ErrorCode.internal, f"{type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                self.in_flight.pop(job_id, None)
        self._store_images(job, params.output_format.value, images)
        self._observe_phases(job, taken)
        return {"images": len(images)}

    def _observe_phases(self, job: GenerationJob, taken: float) -> None:
        """Where a succeeded job's time on this worker went: its start (record read, marked
        started), waiting in the engine for a slot (and for the jobs taken with it), its
        prompt encoded, steps and decode, then its images encoded and stored."""
        stored = time.perf_counter()
        if not 0 < taken <= job.submitted_at <= job.admitted_at <= job.done_at <= stored:
            return  # a phase's stamp is missing: never a made-up figure
        for phase, seconds in (("start", job.submitted_at - taken), ("admit", job.admitted_at - job.submitted_at),
                               ("denoise", job.done_at - job.admitted_at), ("store", stored - job.done_at)):
            self.tally.observe("bailan_job_phase_seconds", seconds, {"model": self.model.name, "phase": phase})
        self.trace.add("job", job=job.id, taken=wall(taken), submitted=wall(job.submitted_at),
                       admitted=wall(job.admitted_at), done=wall(job.done_at), stored=wall(stored))

    def _inputs(
        self, job_id: str, params: JobParams, width: int, height: int
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The job's init image (uint8 RGB) and mask (float, 1 = repaint), at the job's size."""
        if params.init_image is None:
            return None, None
        names = ["init_image"] + (["mask_image"] if params.mask_image is not None else [])
        found = self._redis("reading input images",
                            lambda: self.connection.mget([Keys.input_image(job_id, name) for name in names]))
        if any(data is None for data in found):
            raise InvalidInput("the job's input image expired before it ran")
        image = Image.open(io.BytesIO(found[0])).convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        mask = None
        if len(found) > 1:
            gray = Image.open(io.BytesIO(found[1])).convert("L")
            if gray.size != (width, height):
                gray = gray.resize((width, height), Image.BILINEAR)
            mask = np.asarray(gray, dtype=np.float32) / 255.0
        return np.asarray(image), mask

    def _parameters(self, job: GenerationJob, index: int) -> str:
        # The scale the picture was made with: at <= 1 no guidance runs, which is scale 1 (the
        # conditional prediction alone) where other tools apply a scale below 1 as written.
        scale = job.guidance_scale if job.guided else 1.0
        return parameters_text(job.prompt, job.negative_prompt, job.steps, job.scheduler, scale,
                               job.seed + index, job.width, job.height, self.model.name, self.model.hash)

    def _store_images(self, job: GenerationJob, fmt: str, images: list[np.ndarray]) -> None:
        ttl = self.settings.result_ttl_s
        assert self.blobs is not None
        # Blobs first (files: a Redis outage retries only the record's writes): once the record
        # says finished, a client may fetch them at once.
        for index, array in enumerate(images):
            data = encode_image(array, fmt, parameters=self._parameters(job, index))
            self.blobs.put(image_key(job.id, index), data, ttl)
        fields = {
            RecordField.step: job.run_steps,
            RecordField.images: dumps([{"index": i, "seed": job.seed + i} for i in range(len(images))]),
            RecordField.unknown_words: dumps(job.unknown_words),
        }
        self._finish_record(job.id, fields)

    def _failed(self, job_id: str, exc: BaseException, code: ErrorCode, message: str) -> BaseException:
        """Record the job's failure and tag `exc` with its code (run counts it); returns `exc` to raise."""
        self._finish_record(job_id, {RecordField.error_code: code.value, RecordField.error_message: message[:500]})
        exc.bailan_error_code = code.value  # type: ignore[attr-defined]
        return exc

    def _finish_record(self, job_id: str, fields: dict[str, Any]) -> None:
        key = Keys.job(job_id)
        ttl = self.settings.result_ttl_s
        with self.lock:
            storing = self.storing.pop(job_id, [])
        # A preview stored after the end would outlive it (its write renews the list's TTL)
        # and come after the client saw the job end; the pool is one thread, so this is brief.
        _, late = futures.wait(storing, timeout=PREVIEW_DRAIN_S)
        for future in late:
            future.cancel()  # too late to be shown; one already running may still land
        with self.lock:
            # After the drain: the previews stored just now still send their webhooks.
            params = self.hooked.pop(job_id, None)
            attempt = self.attempts.pop(job_id, None)
        finished = now()

        def write() -> list[Any]:
            # Built afresh on every try: redis-py empties a pipeline whose execute failed.
            with self.connection.pipeline(transaction=True) as pipe:
                if attempt is not None:
                    # A fence: the record must still show this attempt, unended, when the end
                    # is written; WATCH makes a change between this read and EXEC refuse it.
                    pipe.watch(key)
                    started, ended = pipe.hmget(key, RecordField.started_at, RecordField.finished_at)
                    ours = started is not None and started.decode() == attempt
                    if ours and ended is not None and ended.decode() == repr(finished):
                        return []  # this very write, applied before its reply was lost: done
                    if not ours or ended is not None:
                        raise Superseded(f"its record was {'ended' if ended is not None else 'restarted'} "
                                         "by another process")
                elif self.connection.hget(key, RecordField.finished_at) == repr(finished).encode():
                    # An end before any start (refused, canceled while queued): no attempt fences
                    # it, so this write applied before its answer was lost shows itself here.
                    return []
                pipe.multi()
                pipe.hset(key, mapping={**fields, RecordField.finished_at: finished})
                pipe.expire(key, ttl)
                # Every preview was stored before now, so none outlives this.
                pipe.expire(Keys.previews(job_id), self.settings.preview_ttl_s)
                # The client's input images (megabytes, possibly) are spent once the job has ended.
                pipe.delete(*Keys.input_images(job_id))
                events.notify(pipe, job_id)  # event streams: look again
                # The one place a job the worker ran ends: its `completed` webhook goes with the end.
                webhooks.enqueue(self.connection, pipe, self.hooks, job_id, WebhookEvent.completed, params)
                return pipe.execute()

        def write_fenced() -> list[Any]:
            while True:
                try:
                    return write()
                except redis.WatchError:
                    continue  # the record changed meanwhile (a progress write, a cancel): read it again

        self._redis("storing a job's outcome", write_fenced)

    def backlog(self) -> int:
        """Sample-steps still to run of the jobs this worker holds (for the wait estimate, bailan.eta)."""
        with self.lock:
            jobs = [flight.job for flight in self.in_flight.values()]
        return sum(max(job.run_steps - job.step, 0) * job.num_images for job in jobs)

    # ---- engine callbacks and the I/O thread ------------------------------------

    def _on_preview(self, job: GenerationJob, step: int, rgb: np.ndarray) -> None:
        # Called on the engine's thread: hand off at once, encode elsewhere.
        stored = self.previews.submit(self._store_preview, job.id, step, rgb)
        with self.lock:
            pending = [f for f in self.storing.get(job.id, []) if not f.done()]
            self.storing[job.id] = [*pending, stored]

    def _store_preview(self, job_id: str, step: int, rgb: np.ndarray) -> None:
        try:
            data = encode_preview(rgb, self.settings.preview_max_side)
            ttl = self.settings.preview_ttl_s
            assert self.blobs is not None
            self.blobs.put(preview_key(job_id, step), data, ttl)
            pipe = webhooks.transaction(self.connection)
            # Scored by expiry: the API lists the steps whose blobs are still there without looking.
            pipe.zadd(Keys.previews(job_id), {str(step): now() + ttl})
            pipe.expire(Keys.previews(job_id), max(ttl, self.settings.result_ttl_s))
            events.notify(pipe, job_id)  # event streams: look again
            with self.lock:
                params = self.hooked.get(job_id)  # gone once the job ended: no preview news after it
                attempt = self.attempts.get(job_id)
            webhooks.enqueue(self.connection, pipe, self.hooks, job_id, WebhookEvent.preview, params, step,
                             attempt=_run_of(attempt) if attempt else None)
            pipe.execute()
        except TRANSIENT as exc:
            # A preview lost to a Redis outage is only a preview: the next one replaces it.
            assert self.outage is not None
            self.outage.note("storing a preview", exc)
        except Exception:
            log.exception("storing preview %s/%d failed", job_id, step, extra={"job_id": job_id})

    def io_loop(self) -> None:
        """Progress out, cancel requests in; every 50 ms rather than every step."""
        while not self.stop.is_set():
            try:
                if self.sync_jobs() and self.outage is not None and self.outage.down:
                    self.outage.note_ok()
            except TRANSIENT as exc:
                assert self.outage is not None
                self.outage.note("progress/cancel sync", exc)  # logged once per outage, not every 50 ms
            except redis.RedisError as exc:
                log.warning("progress/cancel sync failed: %s", exc)
            except Exception:  # this thread must outlive any one bad round
                log.exception("progress/cancel sync failed")
            self.trace.flush()
            self.stop.wait(0.05)

    def sync_jobs(self) -> bool:
        """One tick of the I/O thread: every running job's new step out, its cancel flag in.
        True when it reached Redis (there were jobs to sync)."""
        with self.lock:
            flights = list(self.in_flight.items())
        if not flights:
            return False
        # One round trip: this tick's progress out, every cancel flag in (read last).
        pipe = self.connection.pipeline()
        sent: list[tuple[_InFlight, int, bool]] = []
        for job_id, flight in flights:
            step = flight.job.step
            if step != flight.written_step:
                pipe.hset(Keys.job(job_id), RecordField.step, step)
                events.notify(pipe, job_id)  # event streams: look again
            words = bool(flight.job.unknown_words) and not flight.unknown_written
            if words:
                pipe.hset(Keys.job(job_id), RecordField.unknown_words, dumps(flight.job.unknown_words))
            sent.append((flight, step, words))
        writes = len(pipe)
        for job_id, _ in flights:
            pipe.hget(Keys.job(job_id), RecordField.cancel_requested)
        answers = pipe.execute()
        # Marked written once Redis took them: after an error the next tick sends them again.
        for flight, step, words in sent:
            flight.written_step = step
            flight.unknown_written = flight.unknown_written or words
        for (_, flight), canceled in zip(flights, answers[writes:]):
            if canceled:
                flight.job.cancel_requested.set()
        return True

    def close(self) -> None:
        """Stop the I/O thread and wait for the previews still being stored."""
        self.stop.set()
        self.previews.shutdown(wait=True)
        self.trace.flush()
