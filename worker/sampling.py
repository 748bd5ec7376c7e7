"""The sampling engine: every job on this worker, denoised through one UNet call per step.

This is Bailan's one sampling loop. For each job:

    encode prompt (and negative prompt) -> seeded initial latents
    per step: UNet with classifier-free guidance -> scheduler step -> progress, preview, cancel check
    VAE decode -> images

What makes it an engine rather than a pipeline is that the loop runs over
*samples* (one per requested image) from many jobs at once, as LLM servers do
with tokens ("continuous" or iteration-level batching):

* a job joins the running batch at the next step and leaves as soon as it is
  done or canceled;
* every sample carries its own timestep, scheduler state, seed, prompt
  embeddings and guidance scale, so the UNet sees a batch of unrelated rows;
  the per-sample scheduler step then runs on each sample's slice;
* guidance-free samples (guidance <= 1) contribute one row, guided ones two.

A sample's result does not depend on its batch-mates (tested), so batching is
invisible to clients except in throughput.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from worker.loader import LoadedModel

log = logging.getLogger(__name__)

# Scheduler names clients may ask for -> the diffusers class and the overrides
# applied on top of the model's own scheduler config.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)


class JobCanceled(Exception):
    """The client canceled the job; it stopped at a step boundary."""


class InvalidForModel(ValueError):
    """The request is well-formed but this model cannot serve it (e.g. a size it cannot divide)."""


def _noop(*_: Any) -> None:
    return None


@dataclass(eq=False)
class GenerationJob:
    """One client job as the engine sees it. Image i is sampled from seed + i."""

    id: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str = "dpmpp_2m"
    negative_prompt: str = ""
    num_images: int = 1
    preview_every: int = 0
    preview_full_decode: bool = False
    # Called from the engine loop: keep them cheap and non-blocking.
    on_progress: Callable[["GenerationJob", int], None] = _noop
    on_preview: Callable[["GenerationJob", int, np.ndarray], None] = _noop
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    unknown_words: list[str] = field(default_factory=list)
    images: list[np.ndarray | None] = field(default_factory=list)
    # The denoised latents of each image, before decoding (kept for tests and benchmarks).
    latents: list[torch.Tensor | None] = field(default_factory=list)
    step: int = 0


@dataclass(eq=False)
class _Sample:
    job: GenerationJob
    index: int
    scheduler: SchedulerMixin
    timesteps: torch.Tensor
    latents: torch.Tensor  # (1, C, h, w) float32, in the scheduler's space
    generator: torch.Generator
    cond: torch.Tensor  # (1, L, D) text embeddings
    uncond: torch.Tensor | None  # None when guidance is off
    step: int = 0

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)


class Engine:
    """Owns the model. `submit` from any thread; `run` (or `step_once`) on one."""

    def __init__(self, model: LoadedModel, max_batch: int, batch_buckets: tuple[int, ...] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.max_batch = max_batch
        # UNet rows and VAE images are padded up to one of these batch sizes, so the
        # GPU sees few distinct shapes (see default_batch_buckets); () pads nothing.
        self.batch_buckets = default_batch_buckets(model, max_batch) if batch_buckets is None else batch_buckets
        self._incoming: queue.SimpleQueue[GenerationJob] = queue.SimpleQueue()
        self._waiting: deque[GenerationJob] = deque()
        self._active: list[_Sample] = []
        self._wake = threading.Event()
        self._last_group: tuple[int, int] | None = None
        # Previews not yet handed over: (job, step, uint8 (h, w, 3), CUDA copy-done event or None).
        self._pending_previews: list[tuple[GenerationJob, int, torch.Tensor, Any]] = []
        self.iterations = 0

    # ---- public API -------------------------------------------------------

    def submit(self, job: GenerationJob) -> Future:
        self.validate(job)
        job.images = [None] * job.num_images
        job.latents = [None] * job.num_images
        self._incoming.put(job)
        self._wake.set()
        return job.future

    def validate(self, job: GenerationJob) -> None:
        multiple = self.model.vae_scale_factor
        for name, value in (("width", job.width), ("height", job.height)):
            if value % multiple:
                raise InvalidForModel(f"{name} must be a multiple of {multiple} for model {self.model.name}")
        if job.scheduler not in SCHEDULERS:
            raise InvalidForModel(f"unknown scheduler {job.scheduler!r}; choose from {sorted(SCHEDULERS)}")
        cls, overrides = SCHEDULERS[job.scheduler]
        try:
            # Some schedulers refuse some step counts (DDIM: more than the training steps).
            cls.from_config(self.model.scheduler_config, **overrides).set_timesteps(job.steps)
        except ValueError as exc:
            raise InvalidForModel(f"steps={job.steps} with scheduler {job.scheduler}: {exc}") from exc
        if job.num_images > self.max_batch:
            raise InvalidForModel(f"num_images {job.num_images} exceeds this worker's batch of {self.max_batch}")

    @property
    def busy(self) -> bool:
        return bool(self._active or self._waiting or not self._incoming.empty())

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

    def fail_all(self, exc: BaseException) -> None:
        """Fail every admitted, waiting and incoming job."""
        jobs = [s.job for s in self._active] + list(self._waiting)
        while True:
            try:
                jobs.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        self._waiting.clear()
        self._pending_previews.clear()
        self._fail(jobs, exc)
        self._free_memory()

    def has_room(self) -> bool:
        """Whether a new job could start now (read from other threads: approximate)."""
        waiting = sum(job.num_images for job in list(self._waiting))
        return len(self._active) + waiting + self._incoming.qsize() < self.max_batch

    def run_until_idle(self) -> None:
        while self.step_once():
            pass

    @torch.inference_mode()
    def step_once(self) -> bool:
        """Admit waiting jobs, drop canceled ones, advance one group one step."""
        self._admit()
        self._drop_canceled()
        if not self._active:
            self._deliver_previews(block=True)
            return bool(self._waiting)
        group = self._pick_group()
        self._advance(group)
        self.iterations += 1
        return True

    # ---- the loop's parts ---------------------------------------------------

    def _admit(self) -> None:
        while True:
            try:
                self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        used = len(self._active)
        admitted: list[GenerationJob] = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancel_requested.is_set():
                self._waiting.popleft()
                job.future.set_exception(JobCanceled())
                continue
            if used + job.num_images > self.max_batch:
                break
            self._waiting.popleft()
            admitted.append(job)
            used += job.num_images
        if not admitted:
            return
        # One text-encoder call for every job admitted now (a burst of N jobs would
        # otherwise cost N calls before the first step); alone if that fails.
        texts = [_texts(job) for job in admitted]
        try:
            embeds, unknown = encode_prompts(self.model, [t for group in texts for t in group])
        except Exception:
            embeds, unknown = None, []
        row = 0
        for job, group in zip(admitted, texts):
            encoded = None
            if embeds is not None:
                encoded = (embeds[row : row + len(group)], unknown[row : row + len(group)])
            row += len(group)
            try:
                samples = self._start(job, encoded)
            except Exception as exc:  # a bad job must not take the engine down
                log.exception("job %s failed to start", job.id)
                job.future.set_exception(exc)
                continue
            self._active.extend(samples)

    def _start(
        self, job: GenerationJob, encoded: tuple[torch.Tensor, list[list[str]]] | None = None
    ) -> list[_Sample]:
        model = self.model
        guided = job.guidance_scale > 1.0
        embeds, unknown = encoded if encoded is not None else encode_prompts(model, _texts(job))
        job.unknown_words = unknown[-1]
        uncond, cond = (embeds[0:1], embeds[1:2]) if guided else (None, embeds[0:1])
        cls, overrides = SCHEDULERS[job.scheduler]
        shape = (1, model.latent_channels, job.height // model.vae_scale_factor, job.width // model.vae_scale_factor)
        samples = []
        for index in range(job.num_images):
            scheduler = cls.from_config(model.scheduler_config, **overrides)
            # Timesteps (and the sigmas of Euler-family schedulers) stay on the CPU: reading
            # one per step must not wait for the GPU, which would stall the launch queue.
            scheduler.set_timesteps(job.steps, device="cpu")
            # CPU generators: the same seed gives the same image on any device.
            generator = torch.Generator("cpu").manual_seed(job.seed + index)
            latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
            latents = _to_device(latents, model.device) * scheduler.init_noise_sigma
            samples.append(_Sample(job, index, scheduler, scheduler.timesteps, latents, generator, cond, uncond))
        return samples

    def _drop_canceled(self) -> None:
        canceled = {id(s.job): s.job for s in self._active if s.job.cancel_requested.is_set()}
        if not canceled:
            return
        self._active = [s for s in self._active if id(s.job) not in canceled]
        for job in canceled.values():
            job.future.set_exception(JobCanceled())

    def _pick_group(self) -> list[_Sample]:
        """Samples of one latent size go through the UNet together; sizes take turns."""
        sizes: dict[tuple[int, int], list[_Sample]] = {}
        for sample in self._active:
            sizes.setdefault(tuple(sample.latents.shape[-2:]), []).append(sample)
        keys = sorted(sizes)
        if self._last_group in keys and len(keys) > 1:
            key = keys[(keys.index(self._last_group) + 1) % len(keys)]
        else:
            key = keys[0]
        self._last_group = key
        return sizes[key]

    def _advance(self, group: list[_Sample]) -> None:
        try:
            self._denoise(group)
        except Exception as exc:
            self._fail([s.job for s in group], exc)
            return
        # Jobs failed by an out-of-memory split are gone from the batch.
        group = [s for s in group if not s.job.future.done()]
        jobs = {id(s.job): s.job for s in group}.values()
        for job in jobs:
            job.step = max(s.step for s in group if s.job is job)
            job.on_progress(job, job.step)
        self._previews(group)
        finished = [s for s in group if s.done]
        if finished:
            self._finish(finished)

    def _denoise(self, group: list[_Sample]) -> None:
        """One step for `group`. Out of memory halves the batch rather than failing
        everyone; a single sample that still does not fit fails its own job."""
        try:
            noise = self._unet(group)
        except OOM_ERRORS:
            self._free_memory()
            if len(group) == 1:
                raise
            half = len(group) // 2
            for part in (group[:half], group[half:]):
                alive = [s for s in part if not s.job.future.done()]
                if not alive:
                    continue
                try:
                    self._denoise(alive)
                except OOM_ERRORS as exc:
                    self._fail([s.job for s in alive], exc)
            return
        row = 0
        cohorts: dict[tuple[Any, ...], list[tuple[_Sample, torch.Tensor]]] = {}
        for sample in group:
            if sample.guided:
                uncond, cond = noise[row : row + 1], noise[row + 1 : row + 2]
                eps = uncond + sample.job.guidance_scale * (cond - uncond)
            else:
                eps = noise[row : row + 1]
            row += sample.rows
            cohorts.setdefault(_cohort_key(sample), []).append((sample, eps))
        for key, members in cohorts.items():
            if key[0] is None or len(members) == 1:
                for sample, eps in members:
                    t = sample.timesteps[sample.step]
                    sample.latents = sample.scheduler.step(
                        eps, t, sample.latents, generator=sample.generator, return_dict=False
                    )[0]
                    sample.step += 1
            else:
                _dpm_step_together(members)

    def _unet(self, group: list[_Sample]) -> torch.Tensor:
        model = self.model
        inputs, timesteps, embeds = [], [], []
        for sample in group:
            t = sample.timesteps[sample.step]
            x = sample.scheduler.scale_model_input(sample.latents, t)
            if sample.guided:
                inputs += [x, x]
                embeds += [sample.uncond, sample.cond]
                timesteps += [float(t), float(t)]
            else:
                inputs.append(x)
                embeds.append(sample.cond)
                timesteps.append(float(t))
        rows = len(inputs)
        pad = self._bucket(rows) - rows
        if pad:  # repeat the last row; its extra outputs are dropped
            inputs += [inputs[-1]] * pad
            embeds += [embeds[-1]] * pad
            timesteps += [timesteps[-1]] * pad
        latent_in = torch.cat(inputs).to(model.dtype)
        if model.channels_last:
            latent_in = latent_in.contiguous(memory_format=torch.channels_last)
        t_in = _to_device(torch.tensor(timesteps, dtype=torch.float32), model.device)
        out = model.unet(latent_in, t_in, encoder_hidden_states=torch.cat(embeds), return_dict=False)[0]
        return out[:rows].float()

    def _bucket(self, n: int) -> int:
        for size in self.batch_buckets:
            if size >= n:
                return size
        return n

    @torch.inference_mode()
    def warm_up_shapes(self, width: int | None = None, height: int | None = None) -> None:
        """Run the UNet at every bucketed row count and the VAE at every bucketed image
        count once, so kernel selection (cuDNN plans, autotuning, torch.compile) happens
        at start-up rather than when traffic first produces that batch size."""
        model = self.model
        h = (height or model.native_height) // model.vae_scale_factor
        w = (width or model.native_width) // model.vae_scale_factor
        embed = encode_prompts(model, [""])[0]
        rows = [b for b in self.batch_buckets if b <= 2 * self.max_batch] or [1, 2 * self.max_batch]
        for n in rows:
            x = torch.zeros((n, model.latent_channels, h, w), device=model.device, dtype=model.dtype)
            if model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t = torch.full((n,), 500.0, device=model.device)
            model.unet(x, t, encoder_hidden_states=embed.expand(n, -1, -1), return_dict=False)
        for n in [b for b in rows if b <= self.max_batch]:
            self._decode([torch.zeros((n, model.latent_channels, h, w), device=model.device)])

    def _previews(self, group: list[_Sample]) -> None:
        due = [
            s
            for s in group
            if s.index == 0 and s.job.preview_every and not s.done and not s.step % s.job.preview_every
        ]
        cheap = [s for s in due if not s.job.preview_full_decode]
        if cheap:
            try:
                # All of this step's cheap previews in one map and, on CUDA, one copy to the
                # host that nothing waits for: they are handed over once it is done (usually
                # a step later), so the GPU never idles on a preview.
                scales = [_sigma_scale(s) for s in cheap]
                latents = torch.cat([s.latents if k == 1.0 else s.latents / k for s, k in zip(cheap, scales)])
                rgb = _latents_to_rgb(self.model, latents)
                event = None
                if self.model.device.type == "cuda":
                    host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
                    host.copy_(rgb, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    rgb = host
                for i, sample in enumerate(cheap):
                    self._pending_previews.append((sample.job, sample.step, rgb[i], event))
            except Exception:  # a preview is never worth failing a job for
                log.exception("previews at step %d failed", cheap[0].step)
        for sample in due:
            if not sample.job.preview_full_decode:
                continue
            job = sample.job
            try:
                rgb = self._decode([sample.latents / _sigma_scale(sample)])[0]
                job.on_preview(job, sample.step, rgb)
            except Exception:  # a preview is never worth failing a job for
                log.exception("preview of job %s at step %d failed", job.id, sample.step)
        self._deliver_previews(block=False)

    def _deliver_previews(self, block: bool) -> None:
        """Hand over the CUDA previews whose copies are done, in order (all of them if `block`)."""
        while self._pending_previews:
            job, step, host, event = self._pending_previews[0]
            if event is not None:
                if not block and not event.query():
                    return
                event.synchronize()
            self._pending_previews.pop(0)
            if job.future.done():  # canceled or failed meanwhile
                continue
            try:
                job.on_preview(job, step, host.numpy())
            except Exception:
                log.exception("preview of job %s at step %d failed", job.id, step)

    def _finish(self, finished: list[_Sample]) -> None:
        done_ids = {id(s) for s in finished}
        self._active = [s for s in self._active if id(s) not in done_ids]
        pending = [s for s in finished if not s.job.future.done()]
        try:
            images = self._decode([s.latents for s in pending])
        except OOM_ERRORS:
            self._free_memory()
            images = []
            for sample in pending:
                try:
                    images.extend(self._decode([sample.latents]))
                except Exception as exc:  # this image alone failed (OOM or worse)
                    self._free_memory()
                    self._fail([sample.job], exc)
                    images.append(None)
        except Exception as exc:
            self._fail([s.job for s in pending], exc)
            return
        self._deliver_previews(block=True)  # the decode synchronized: all copies are done
        for sample, image in zip(pending, images):
            job = sample.job
            if image is None or job.future.done():
                continue
            job.images[sample.index] = image
            job.latents[sample.index] = sample.latents
            if all(img is not None for img in job.images):
                job.future.set_result(job.images)

    def _decode(self, latents: list[torch.Tensor]) -> list[np.ndarray]:
        model = self.model
        batch = torch.cat(latents).to(model.dtype) / model.vae.config.scaling_factor
        count = batch.shape[0]
        if self._bucket(count) > count:
            batch = torch.cat([batch, batch[-1:].expand(self._bucket(count) - count, -1, -1, -1)])
        images = model.vae.decode(batch, return_dict=False)[0][:count]
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return list(images.permute(0, 2, 3, 1).cpu().numpy())

    def _fail(self, jobs: list[GenerationJob], exc: BaseException) -> None:
        ids = {id(j) for j in jobs}
        self._active = [s for s in self._active if id(s.job) not in ids]
        for job in {id(j): j for j in jobs}.values():
            if not job.future.done():
                log.error("job %s failed: %s", job.id, exc)
                job.future.set_exception(exc)

    def _free_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()


def _cohort_key(sample: _Sample) -> tuple[Any, ...]:
    """Samples with equal keys are in the same scheduler state up to their tensors, so
    one scheduler step on their concatenation does the work of one step each. Only
    deterministic DPM-Solver++ qualifies; (None, id) keeps a sample to itself."""
    scheduler = sample.scheduler
    if type(scheduler) is not DPMSolverMultistepScheduler or scheduler.config.algorithm_type != "dpmsolver++":
        return (None, id(sample))
    return (
        sample.job.scheduler,
        tuple(sample.latents.shape),
        len(sample.timesteps),
        sample.step,
        scheduler.step_index,
        scheduler.lower_order_nums,
        scheduler.begin_index,
    )


def _dpm_step_together(members: list[tuple[_Sample, torch.Tensor]]) -> None:
    """One DPM-Solver++ step for samples of one cohort (see _cohort_key): the first
    one's scheduler steps the concatenated batch, then every sample takes back its
    slice of the new latents and of the solver's history. Elementwise arithmetic
    on the concatenation gives each sample exactly what its own step would."""
    samples = [sample for sample, _ in members]
    lead = samples[0].scheduler
    lead.model_outputs = [
        None if out is None else torch.cat([s.scheduler.model_outputs[i] for s in samples])
        for i, out in enumerate(lead.model_outputs)
    ]
    latents = lead.step(
        torch.cat([eps for _, eps in members]),
        samples[0].timesteps[samples[0].step],
        torch.cat([s.latents for s in samples]),
        return_dict=False,
    )[0]
    history = lead.model_outputs
    for j, sample in enumerate(samples):
        scheduler = sample.scheduler
        scheduler.model_outputs = [None if out is None else out[j : j + 1] for out in history]
        scheduler._step_index = lead.step_index
        scheduler.lower_order_nums = lead.lower_order_nums
        sample.latents = latents[j : j + 1]
        sample.step += 1


def _texts(job: GenerationJob) -> list[str]:
    """The prompts a job's samples are conditioned on: negative then positive when guided."""
    return [job.negative_prompt, job.prompt] if job.guidance_scale > 1.0 else [job.prompt]


def _sigma_scale(sample: _Sample) -> float:
    """Euler-family latents carry sigma-scaled noise; bring them back to unit
    variance so previews are not blown out early on."""
    if sample.scheduler.init_noise_sigma <= 1.0 or sample.done:
        return 1.0
    sigma = float(sample.scheduler.sigmas[sample.step])
    return (sigma**2 + 1) ** 0.5


def _latents_to_rgb(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) -> (n, h, w, 3) uint8, on the latents' device."""
    rgb = torch.einsum("nchw,cr->nhwr", latents.float(), model.latent_rgb) + model.latent_rgb_bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without waiting for the GPU's queue (a plain
    `.to("cuda")` from pageable memory synchronizes)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def encode_prompts(model: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, list[list[str]]]:
    """Text embeddings for `texts`, and the words of each that the vocabulary lacks.

    Word-level vocabularies (the built-in model) map unknown words to [UNK];
    they are dropped, not fed to the encoder, and reported to the client.
    CLIP's byte-level BPE has no unknown words (its unk token is its end token).
    """
    tokenizer = model.pipe.tokenizer
    max_len = tokenizer.model_max_length
    unk = tokenizer.unk_token_id
    droppable = unk is not None and unk not in {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    ids_batch: list[list[int]] = []
    unknown: list[list[str]] = []
    for text in texts:
        if droppable:
            enc = tokenizer(text, truncation=True, max_length=max_len, return_offsets_mapping=True)
            ids = enc["input_ids"]
            unknown.append([text[a:b] for i, (a, b) in zip(ids, enc["offset_mapping"]) if i == unk])
            ids = [i for i in ids if i != unk]
        else:
            ids = tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
            unknown.append([])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids_batch.append(ids + [pad] * (max_len - len(ids)))
    input_ids = _to_device(torch.tensor(ids_batch), model.device)
    embeds = model.pipe.text_encoder(input_ids, return_dict=False)[0]
    return embeds.to(model.dtype), unknown


def default_batch_buckets(model: LoadedModel, max_batch: int) -> tuple[int, ...]:
    """On CUDA, 1, 2, 4, 8 and then multiples of 8 up to 2 x max_batch rows: each new
    batch size costs kernel selection (and a recompile under torch.compile), which
    staggered arrivals would otherwise pay mid-request; padding wastes < 1/2 of a
    small batch and < 1/5 of a large one. On the CPU there is nothing to amortize."""
    if model.device.type != "cuda":
        return ()
    top = 2 * max_batch
    return tuple(sorted({b for b in (1, 2, 4) if b < top} | {min(b, top) for b in range(8, top + 8, 8)}))


def default_max_batch(model: LoadedModel) -> int:
    """Images per UNet call when BAILAN_MAX_BATCH is 0: bounded by device memory."""
    if model.device.type != "cuda":
        return 8
    total_gib = torch.cuda.get_device_properties(model.device).total_memory / 2**30
    if total_gib >= 60:
        return 32
    if total_gib >= 30:
        return 16
    if total_gib >= 14:
        return 8
    return 2

