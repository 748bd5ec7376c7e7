"""The sampling engine: every job on this worker, denoised through one UNet call per step.

For each job the work is Stable Diffusion's:

    encode prompt (and negative prompt) -> seeded initial latents
    per step: UNet with classifier-free guidance -> sampler update -> progress, preview, cancel check
    VAE decode -> images

What makes it an engine rather than a pipeline is that the loop runs over
*samples* (one per requested image) from many jobs at once, as LLM servers do
with tokens ("continuous" or iteration-level batching): a job joins the running
batch at the next step and leaves as soon as it is done or canceled; every
sample carries its own timestep, schedule, seed, prompt and guidance scale.

The work is split as vLLM splits it:

* `worker.batching.BatchScheduler` decides (admission, cancel, grouping by
  size, padding to warmed batch shapes) and never touches a tensor;
* the model runner (`worker.runners`: `sd.SDRunner`, `sdxl.SDXLRunner`) owns the tensors and runs a plan on the device
  (on CUDA, each padded batch shape's step is one captured graph);
* `Engine.step_once` reads as plan -> run -> update.

A sample's result does not depend on its batch-mates (tested), so batching is
invisible to clients except in throughput.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from bailan.metrics import Tally
from worker.batching import Admission, BatchScheduler, StepPlan
from worker.generation import GenerationJob, InvalidForModel, JobCanceled
from worker.loader import LoadedModel
from worker.rates import StepMeter
from worker.runners import make_runner
from worker.runners.sd import RunnerOptions, default_batch_buckets
from worker.trace import Trace, wall

log = logging.getLogger(__name__)

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)
# Steps launched ahead of the device: enough to keep the GPU fed while the host
# prepares the next step, few enough that progress, previews and cancel stay current.
MAX_STEPS_IN_FLIGHT = 2
# Latent sizes whose buffers (a few MB to hundreds, with the Euler a noise bank) stay allocated
# while no job uses them: any multiple of 8 is a size, and keeping every one seen would grow
# device memory until jobs ran out of it. The native size, warmed up at start, always stays.
KEEP_IDLE_SIZES = 2
# The longest an idle engine's first step waits for jobs that its RQ slots have taken but not
# handed over yet (`expect`). Each slot's set-up is a few Redis round trips, one thread at a time
# under the GIL: on the H100, a burst of 16 clients' jobs reached the engine over ~40 ms, so it
# started them over several steps, and they finished over ~250 ms, in several decodes.
GATHER_S = 0.05

__all__ = ["Engine", "GenerationJob", "InvalidForModel", "JobCanceled", "OOM_ERRORS", "RunnerOptions"]


class Engine:
    """Owns the model. `submit` from any thread; `run` (or `step_once`) on one."""

    def __init__(
        self,
        model: LoadedModel,
        max_batch: int,
        batch_buckets: tuple[int, ...] | None = None,
        options: RunnerOptions | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self.runner = make_runner(model, max_batch, options)
        if batch_buckets is None:
            batch_buckets = default_batch_buckets(model.device, max_batch, self.runner.options.compile_unet)
        self.scheduler = BatchScheduler(max_batch, batch_buckets)
        # The latent size warm-up prepares and whose buffers always stay (_forget_idle_sizes).
        self.native_size = (model.native_height // model.vae_scale_factor,
                            model.native_width // model.vae_scale_factor)
        self._wake = threading.Event()
        # Threads (RQ slots) that took a job and will submit it shortly (`expect`).
        self._expected: set[int] = set()
        self._expected_lock = threading.Lock()
        self.gather_s = GATHER_S
        # Notified whenever samples leave the batch, so RQ slots waiting for room take
        # the next job at once rather than on a polling tick.
        self._room = threading.Condition()
        # Launched steps whose device work may still run: (event or None, [(job, step)]).
        self._in_flight: deque[tuple[Any, list[tuple[GenerationJob, int]]]] = deque()
        # Previews not yet handed over: (job, step, uint8 (h, w, 3), CUDA copy-done event or None).
        self._pending_previews: deque[tuple[GenerationJob, int, torch.Tensor, Any]] = deque()
        self.iterations = 0
        # Step figures for /metrics (bailan.metrics); the worker process sets it.
        self.tally: Tally | None = None
        # A line per step (worker.trace), when the worker process sets one.
        self.trace: Trace | None = None
        # Seconds of the current step spent decoding finished samples (for the trace).
        self._decode_s = 0.0
        # Measured speed, published with the heartbeat for the API's wait estimate (bailan.eta).
        self.meter = StepMeter()

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return self.scheduler.buckets

    # ---- public API -------------------------------------------------------

    def submit(self, job: GenerationJob) -> Future:
        job.submitted_at = time.perf_counter()
        try:
            self.validate(job)
            job.images = [None] * job.num_images
            job.latents = [None] * job.num_images
            self.scheduler.submit(job, self.runner.latent_size(job))
        finally:
            self._arrived()  # a refused job is not coming either
        return job.future

    def expect(self) -> None:
        """The calling thread took a job that it will `submit` shortly, or give up on
        (`unexpect`): an idle engine's first step waits for it (at most `gather_s`), so a
        burst of jobs starts, steps and finishes together."""
        with self._expected_lock:
            self._expected.add(threading.get_ident())

    def unexpect(self) -> None:
        """The calling thread's job will not come (or came already)."""
        self._arrived()

    def _arrived(self) -> None:
        with self._expected_lock:
            self._expected.discard(threading.get_ident())
        self._wake.set()

    def _gather(self, deadline: float) -> None:
        """Before an idle engine's first step: wait for the jobs slots are handing over (until
        `deadline`, time.monotonic())."""
        while True:
            self._wake.clear()  # before the check: a submit after it sets it again
            with self._expected_lock:
                expected = bool(self._expected)
            left = deadline - time.monotonic()
            if not expected or left <= 0:
                return
            self._wake.wait(left)

    def validate(self, job: GenerationJob) -> None:
        """Raise InvalidForModel for a job this model and worker cannot run."""
        self.runner.validate(job)

    @property
    def busy(self) -> bool:
        return self.scheduler.busy or bool(self._in_flight)

    def has_room(self) -> bool:
        """Whether a new job could start now (read from other threads: approximate)."""
        return self.scheduler.has_room()

    def wait_for_room(self, timeout: float) -> bool:
        """Block until a new job could start, or `timeout` passes; returns has_room()."""
        with self._room:
            return self._room.wait_for(self.has_room, timeout)

    def _room_freed(self) -> None:
        with self._room:
            self._room.notify_all()

    def run(self, stop: threading.Event) -> None:
        """The engine loop (the worker runs it on its main thread). Returns when `stop` is set and nothing is in flight."""
        while True:
            try:
                worked = self.step_once()
            except Exception as exc:
                # Whatever broke, no job may wait on this engine for ever: fail
                # everything in flight and keep serving (the next step starts clean).
                log.exception("engine step failed; failing the jobs in flight")
                self.fail_all(exc)
                worked = True
            if not worked:
                if stop.is_set():
                    return
                self._wake.wait(0.05)
                self._wake.clear()

    def run_until_idle(self) -> None:
        while self.step_once():
            pass

    def fail_all(self, exc: BaseException) -> None:
        """Fail every admitted, waiting and incoming job."""
        jobs = self.scheduler.active_jobs() + self.scheduler.drain()
        self.scheduler.remove(jobs)
        self._pending_previews.clear()
        self._in_flight.clear()
        self._fail(jobs, exc)
        self.runner.free_memory()

    @torch.inference_mode()
    def step_once(self) -> bool:
        """Admit and drop jobs, then one step for one group: plan -> run -> update."""
        # Only a step with jobs waiting may gather or admit: the common step pays one check.
        idle = self.scheduler.waiting and not self.scheduler.active_samples()
        deadline = time.monotonic() + self.gather_s
        gather_s = admit_s = 0.0
        admitted = 0
        while True:
            began = time.perf_counter()
            if idle and self._expected and self.scheduler.waiting:
                self._gather(deadline)
            gathered = time.perf_counter()
            admissions = self.scheduler.admit()
            for admission in admissions:
                self._start(admission)
                admitted += len(admission.jobs)
            gather_s += gathered - began
            admit_s += time.perf_counter() - gathered
            # An idle engine's burst: jobs handed over while these prompts were encoded (tens of
            # ms for a burst), or still being handed over, join this first step too, within the
            # gather's cap. Left for the next step, a burst ends over two steps and two decodes.
            if not (idle and admissions and (self.scheduler.waiting or self._expected)
                    and time.monotonic() < deadline):
                break
        canceled = self.scheduler.canceled()
        for job in canceled:
            job.future.set_exception(JobCanceled())
        if canceled or self.scheduler.left_unadmitted():
            self._room_freed()
        plan = self.scheduler.plan()
        if plan is None:
            self._settle(0)
            self._deliver_previews(block=True)
            self._forget_idle_sizes()
            return self.scheduler.waiting
        started = time.perf_counter()
        self._decode_s = 0.0
        ran = self._run(plan)
        samples = sum(len(part) for part in ran)
        finished = 0
        for i, part in enumerate(ran):
            if i:
                # An earlier part's end (its decode, out of memory) may have failed a job with
                # samples in this part too, freeing their slots: they must not finish again.
                part = self.scheduler.restrict(part, np.ones(len(part), dtype=bool))
                if part is None:
                    continue
            finished += self._update(part)
        self.meter.record(time.perf_counter() - started, samples)
        if self.trace is not None and self.trace.on:
            # t0 is the step's start after its admissions: gather_s and admit_s came before it.
            self.trace.add("step", t0=wall(started), t1=wall(time.perf_counter()),
                           gather_s=round(gather_s, 6), admit_s=round(admit_s, 6),
                           admitted=admitted, rows=sum(part.rows for part in ran),
                           bucket=max((part.bucket for part in ran), default=0), samples=samples,
                           finished=finished, decode_s=round(self._decode_s, 6),
                           active_after=self.scheduler.active_samples())
        self.iterations += 1
        self._forget_idle_sizes()
        if self.tally is not None:
            # Host time: on CUDA it includes waiting for the device once steps queue up (_settle).
            self.tally.observe("bailan_step_seconds", time.perf_counter() - started)
            self.tally.inc("bailan_steps_total")
            for part in ran:
                self.tally.observe("bailan_batch_rows", part.rows)
        return True

    @torch.inference_mode()
    def warm_up(self, width: int | None = None, height: int | None = None,
                defer_vae_compile: bool = False) -> dict[str, float]:
        """Compile, select kernels and capture the step at every bucket of one size (the
        model's native size by default) before the worker takes traffic. With
        `defer_vae_compile`, a first compile of the VAE decoder waits for finish_warm_up."""
        model = self.model
        size = ((height or model.native_height) // model.vae_scale_factor,
                (width or model.native_width) // model.vae_scale_factor)
        return self.runner.warm_up(size, self.batch_buckets, defer_vae_compile)

    def finish_warm_up(self, stop: threading.Event | None = None) -> dict[str, float]:
        """What warm_up deferred (the VAE decoder's first compile); any thread may run it
        while the engine serves. `stop` set: it gives up between two of its runs."""
        return self.runner.finish_warm_up(stop)

    # ---- the loop's parts ---------------------------------------------------

    def _start(self, admission: Admission) -> None:
        # Before the prompts are encoded: `admit` is the wait, `denoise` all the work.
        self._admitted(admission.jobs)
        try:
            self.runner.start(admission)
            return
        except Exception as exc:
            # One call set up every admitted job; find the bad one(s) by starting each alone.
            if len(admission.jobs) == 1:
                self._fail_to_start(admission.jobs[0], exc)
                return
        for job, slots in zip(admission.jobs, admission.slots):
            try:
                self.runner.start(Admission(admission.size, [job], [slots]))
            except Exception as exc:  # a bad job must not take the engine down
                self._fail_to_start(job, exc)

    @staticmethod
    def _admitted(jobs: list[GenerationJob]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.admitted_at = now

    def _forget_idle_sizes(self) -> None:
        """Free the oldest idle sizes' buffers beyond KEEP_IDLE_SIZES (the native size kept)."""
        idle = [size for size in self.scheduler.idle_sizes() if size != self.native_size]
        if len(idle) <= KEEP_IDLE_SIZES:
            return
        self._settle(0)  # no step queued on the device may still use the buffers (or graphs) freed
        for size in idle[: len(idle) - KEEP_IDLE_SIZES]:
            self.scheduler.forget(size)
            self.runner.forget(size)
        self.runner.free_memory()

    def _fail_to_start(self, job: GenerationJob, exc: BaseException) -> None:
        log.error("job %s failed to start: %s", job.id, exc, exc_info=exc)
        self._fail([job], exc)

    def _run(self, plan: StepPlan) -> list[StepPlan]:
        """Run a plan on the device. Out of memory halves it rather than failing everyone;
        a single sample that still does not fit fails its own job. Returns what ran."""
        try:
            self.runner.step(plan)
            return [plan]
        except OOM_ERRORS as exc:
            self.runner.free_memory()
            if len(plan) == 1:
                job = self.scheduler.job_of(plan.size, int(plan.slots[0]))
                self._fail([job] if job is not None else [], exc)
                return []
        if self.tally is not None:
            self.tally.inc("bailan_oom_splits_total")
        ran: list[StepPlan] = []
        for part in self.scheduler.split(plan):
            alive = self.scheduler.restrict(part, np.ones(len(part), dtype=bool))
            if alive is not None:
                ran.extend(self._run(alive))
        # A job failed in a later part may have samples in a part that already ran; their
        # slots are free now, and counting them as stepped would finish a job that is gone.
        kept = (self.scheduler.restrict(part, np.ones(len(part), dtype=bool)) for part in ran)
        return [part for part in kept if part is not None]

    def _update(self, plan: StepPlan) -> int:
        """Count the step, report progress and previews, finish what is done; returns how
        many samples this step finished."""
        finished = self.scheduler.advance(plan)
        pool = self.scheduler.pools[plan.size]
        leads = plan.slots[pool.image[plan.slots] == 0]
        progress = [(pool.jobs[s], int(pool.step[s] - pool.first[s])) for s in leads]
        event = None
        if self.model.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._in_flight.append((event, [(job, step) for job, step in progress if job is not None]))
        self._previews(plan)
        self._settle(MAX_STEPS_IN_FLIGHT)
        if finished:
            self._finish(plan, finished)
        return len(finished)

    def _settle(self, keep: int) -> None:
        """Report progress of steps the device has finished; wait while more than `keep` are queued."""
        while self._in_flight:
            event, progress = self._in_flight[0]
            if event is not None and len(self._in_flight) <= keep and not event.query():
                return
            if event is not None:
                event.synchronize()
            self._in_flight.popleft()
            for job, step in progress:
                if job.future.done():
                    continue
                job.step = step
                job.on_progress(job, step)

    def _previews(self, plan: StepPlan) -> None:
        pool = self.scheduler.pools[plan.size]
        if len(plan.previews):
            try:
                found = self.runner.cheap_previews(plan)
                if found is not None:
                    rgb, event = found
                    for i, position in enumerate(plan.previews):
                        job = pool.jobs[plan.slots[position]]
                        if job is not None:
                            step = int(plan.steps[position] - plan.first[position]) + 1
                            self._pending_previews.append((job, step, rgb[i], event))
            except Exception:  # a preview is never worth failing a job for
                log.exception("previews failed")
        if len(plan.full_previews):
            try:
                images = self.runner.decode_previews(plan)
                for position, rgb in zip(plan.full_previews, images):
                    job = pool.jobs[plan.slots[position]]
                    if job is not None:
                        job.on_preview(job, int(plan.steps[position] - plan.first[position]) + 1, rgb)
            except Exception:  # a preview is never worth failing a job for
                log.exception("full-decode previews failed")
        self._deliver_previews(block=False)

    def _deliver_previews(self, block: bool) -> None:
        """Hand over the previews whose copies are done, in order (all of them if `block`)."""
        while self._pending_previews:
            job, step, host, event = self._pending_previews[0]
            if event is not None:
                if not block and not event.query():
                    return
                event.synchronize()
            self._pending_previews.popleft()
            if job.future.done():  # canceled or failed meanwhile
                continue
            try:
                job.on_preview(job, step, host.numpy())
            except Exception:
                log.exception("preview of job %s at step %d failed", job.id, step)

    def _finish(self, plan: StepPlan, finished: list[tuple[GenerationJob, int, int]]) -> None:
        """Decode the samples whose last step this was and hand finished jobs their images."""
        finished = [(job, image, slot) for job, image, slot in finished if not job.future.done()]
        slots = [slot for _, _, slot in finished]
        pool = self.scheduler.pools[plan.size]
        decoding = time.perf_counter()
        try:
            latents = self.runner.final_latents(plan.size, slots)
            try:
                images: list[np.ndarray | None] = list(self.runner.decode(latents))
            except OOM_ERRORS:
                self.runner.free_memory()
                images = []
                for i, (job, _, _) in enumerate(finished):
                    try:
                        images.extend(self.runner.decode(latents[i : i + 1]))
                    except Exception as exc:  # this image alone failed (OOM or worse)
                        self.runner.free_memory()
                        self._fail([job], exc)
                        images.append(None)
        except Exception as exc:
            pool.release(slots)
            self._fail([job for job, _, _ in finished], exc)
            return
        finally:
            self._decode_s += time.perf_counter() - decoding
        pool.release(slots)
        self._room_freed()
        try:
            self._settle(0)  # the decode synchronized: every step before it is done
            self._deliver_previews(block=True)
            for i, ((job, image_index, _), image) in enumerate(zip(finished, images)):
                if image is None or job.future.done():
                    continue
                job.images[image_index] = job.compose(image)
                job.latents[image_index] = latents[i : i + 1]
                if all(img is not None for img in job.images):
                    job.done_at = time.perf_counter()
                    job.future.set_result(job.images)
        except BaseException as exc:
            # Their slots are free, so fail_all (run's answer to this) no longer sees these jobs:
            # failed here, or they would wait for ever.
            for job, _, _ in finished:
                if not job.future.done():
                    job.future.set_exception(exc)
            raise

    def _fail(self, jobs: list[GenerationJob], exc: BaseException) -> None:
        self.scheduler.remove(jobs)
        self._room_freed()
        for job in {id(j): j for j in jobs}.values():
            if not job.future.done():
                log.error("job %s failed: %s", job.id, exc)
                job.future.set_exception(exc)
