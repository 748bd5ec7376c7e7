"""The model runner for Stable Diffusion 1.x/2.x pipelines: it owns every tensor.

The batch scheduler (worker.batching) decides which slots take a step; this
runner turns a plan into device work. For each latent size it keeps a pool of
persistent buffers, one row per slot:

    latents        (slots + 1, C, h, w)  float32  the sampler's state
    x0             (slots + 1, C, h, w)  float32  last clean-latent estimate (DPM-Solver++ history)
    embeds         (2 (slots + 1), L, D) dtype    negative and positive prompt embeddings
    guidance       (slots + 1,)          float32
    coefficients   ((slots + 1) S, K)    float32  each slot's schedule (worker.samplers), S = max steps
    noise bank     (slots + 1, S', C, h, w)       Euler a only: each sample's per-step noise, drawn
                                                  from its seed's CPU generator at admission

The last slot is scratch: padding rows read zeros from it and write into it.
One step is then: gather the plan's rows, UNet, classifier-free guidance, the
vectorised sampler update of every sample at its own step, scatter back. It
reads only device tensors and small index vectors uploaded without waiting, so
nothing synchronises the host with the GPU, and on CUDA the whole step at each
padded batch size ("bucket") is captured once as a CUDA graph and replayed:
one launch per step instead of about a thousand. With `compile_unet`, the UNet
inside those graphs is torch.compile'd (batch dimension dynamic, so one compile
serves every bucket), and with `compile_cache` its compiled code is kept whole
on disk for the next start (worker.precompile).

Other model families (SDXL, img2img inputs) get their own runner file beside
this one with the same methods.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from worker import samplers
from worker.batching import Admission, Size, StepPlan
from worker.generation import GenerationJob, InvalidForModel
from worker.loader import LoadedModel
from worker.precompile import Precompiled, artifact_path
from worker.previews import linear_to_rgb, to_uint8_hwc

log = logging.getLogger(__name__)

# Rows of the packed index tensor uploaded before each step.
ROW_SLOT, ROW_COEF, ROW_EMBED, SAMPLE_SLOT, SAMPLE_UNCOND, SAMPLE_COND, SAMPLE_COEF, NOISE = range(8)
INDEX_ROWS = 8


@dataclass(frozen=True)
class RunnerOptions:
    """How the runner uses the device. None = decided by the device (see `resolve`)."""

    cuda_graphs: bool | None = None  # capture each bucket's step as a CUDA graph (CUDA only)
    compile_unet: bool = False  # torch.compile the UNet (the worker: on CUDA only)
    compile_vae: bool = False  # torch.compile the VAE decoder (the worker: on CUDA only)
    # Where compiled code is kept whole across starts (worker.precompile); None: plain torch.compile.
    compile_cache: Path | None = None
    channels_last: bool = False  # NHWC weights and activations
    fuse_qkv: bool = False  # one projection for attention's q, k and v
    sdpa_backend: str | None = None  # force one attention kernel: flash, efficient, cudnn, math
    # cuDNN times its convolution algorithms at each new shape (CUDA only): each bucket's first run.
    cudnn_benchmark: bool = False
    max_steps: int = 150  # rows of each slot's coefficient table: the most steps a job may take

    def resolve(self, device: torch.device) -> "RunnerOptions":
        cuda = device.type == "cuda"
        return RunnerOptions(
            cuda_graphs=cuda if self.cuda_graphs is None else (self.cuda_graphs and cuda),
            # Not gated by device here: the worker's settings are (worker.process.runner_options),
            # and the CPU path of a compiled runner is what its tests run.
            compile_unet=self.compile_unet,
            compile_vae=self.compile_vae,
            compile_cache=self.compile_cache,
            channels_last=self.channels_last and cuda,
            fuse_qkv=self.fuse_qkv,
            sdpa_backend=self.sdpa_backend if cuda else None,
            cudnn_benchmark=self.cudnn_benchmark,
            max_steps=self.max_steps,
        )


@dataclass(eq=False)
class _Pool:
    size: Size
    slots: int  # real slots; index `slots` is scratch
    latents: torch.Tensor
    x0: torch.Tensor
    embeds: torch.Tensor
    guidance: torch.Tensor
    coefficients: torch.Tensor
    # Image to image and inpainting, per slot: the picture's latent, the seed's first noise,
    # and where to paint (1; elsewhere the picture is re-imposed at each step's noise level).
    init: torch.Tensor
    noise0: torch.Tensor
    paint: torch.Tensor
    # Per-row conditioning beside `embeds`, filled like it (SDXL: the pooled text embedding).
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    # For a 9-channel inpainting UNet: its mask and masked-picture inputs (None otherwise),
    # and what a row that repaints everything shows it (the latent of an all-grey picture).
    unet_mask: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    grey: torch.Tensor | None = None
    noise_bank: torch.Tensor | None = None
    graphs: dict[int, "_Graph"] = field(default_factory=dict)
    stochastic: np.ndarray = field(init=False)  # host copy: which slots draw noise every step

    def __post_init__(self) -> None:
        self.stochastic = np.zeros(self.slots + 1, dtype=bool)

    @property
    def scratch(self) -> int:
        return self.slots


@dataclass(eq=False)
class _Graph:
    graph: torch.cuda.CUDAGraph
    index: torch.Tensor  # (INDEX_ROWS, bucket) int64, filled before each replay
    noise: torch.Tensor  # (bucket, C, h, w) float32, filled before replays that need noise


def default_batch_buckets(device: torch.device, max_batch: int, compiled: bool = False) -> tuple[int, ...]:
    """On CUDA, UNet row counts 1, 2, 4, then multiples of 4 up to 32 and of 8 above, up to
    2 x max_batch: each is a captured graph (and kernel selection) made at start-up, so
    staggered arrivals never pay for a new shape mid-request. Steps run at their bucket, so
    18 rows cost 20: with buckets 8 apart (24), H100 run 5's staggered mode kept 0.72 of the
    all-at-once rate, and its step times replayed with buckets 4 apart give 0.79
    (bench/bucket_padding.py), for three more captures at start (1.4 s each there, with
    cuDNN's algorithm timing, then on). A compiled UNet starts at 2 (batch 1 would be its
    own compile). On the CPU there is nothing to amortize."""
    if device.type != "cuda":
        return ()
    top = 2 * max_batch
    small = {2, 4} if compiled else {1, 2, 4}
    larger = [*range(8, 33, 4), *range(40, top + 8, 8)]
    return tuple(sorted({b for b in small if b < top} | {min(b, top) for b in larger}))


def default_max_batch(device: torch.device) -> int:
    """Images per UNet call when BAILAN_MAX_BATCH is 0: bounded by device memory."""
    if device.type != "cuda":
        return 8
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    if total_gib >= 30:
        return 16
    if total_gib >= 14:
        return 8
    return 2


# torch.compile's own phase timers worth a start-up log line (names as torch._dynamo.utils
# records them): what a warm start with a filled cache still spends, and on what.
COMPILE_PHASES = {
    "_compile.compile_inner": "compile_s",  # all of it, per compiled graph
    "bytecode_tracing": "tracing_s",  # dynamo reading the model's Python: never cached
    "OutputGraph.call_user_compiler": "backend_s",  # AOTAutograd and inductor, cache hits included
    "AOTAutogradCache.inductor_load": "cache_load_s",
    "async_compile.wait": "kernel_compile_s",  # Triton or C++ kernels compiled in worker processes
    "build_guards": "guards_s",
}


def compile_phases() -> dict[str, float]:
    """Seconds torch.compile has spent in this process per phase (COMPILE_PHASES), summed over
    graphs; the phases torch did not record are left out (their names are torch's internals)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {}
    return {name: round(sum(compilation_time_metrics[key]), 2)
            for key, name in COMPILE_PHASES.items() if compilation_time_metrics.get(key)}


def unet_forward(unet: Any, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction, as the compiled code calls it (module first, tensors only)."""
    return unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]


def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1], as the compiled code calls it."""
    return vae.decode(latents, return_dict=False)[0]


class SDRunner:
    """Owns the model's tensors; every method runs on the engine's thread."""

    # The UNet call of this family: (unet, sample, timestep, embeds, *self._unet_inputs(...)).
    unet_forward = staticmethod(unet_forward)

    def __init__(self, model: LoadedModel, max_batch: int, options: RunnerOptions | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.options = (options or RunnerOptions()).resolve(model.device)
        self.device = model.device
        self.pools: dict[Size, _Pool] = {}
        self._graph_pool: Any = None
        self._compiled_unet: Precompiled | None = None
        self._compiled_vae: Precompiled | None = None
        self.vae_buckets: tuple[int, ...] = ()
        # The latent size warm_up compiled and captured for (the native one); None before it.
        self.warm_size: Size | None = None
        # The compiled VAE decoder left for after the worker is ready (finish_warm_up):
        # meanwhile decodes run eagerly.
        self.vae_deferred = False
        # Held by each decode, and by finish_warm_up's runs at the larger VAE buckets, so that
        # two decodes' activations never share the device's memory at once.
        self._decode_lock = threading.Lock()
        # A 9-channel UNet (SD inpainting checkpoints) takes the mask and masked picture too.
        self.inpainting_unet = model.unet.config.in_channels == model.latent_channels * 2 + 1
        self._prepare_model()

    # ---- set-up ------------------------------------------------------------------

    def _prepare_model(self) -> None:
        opts, unet = self.options, self.model.unet
        # Both change the module in place; a second runner on the same model keeps them.
        if opts.fuse_qkv and getattr(unet, "original_attn_processors", None) is None:
            unet.fuse_qkv_projections()
        if opts.channels_last:
            unet.to(memory_format=torch.channels_last)
            self.model.vae.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            # Off by default: no H100 figure showed the timing making a step faster (README,
            # Performance), and it costs each bucket's capture at every start.
            torch.backends.cudnn.benchmark = opts.cudnn_benchmark
        if opts.compile_unet:
            import torch._inductor.config as inductor

            # 1x1 convolutions as matrix products: measured faster for SD's UNet under inductor.
            inductor.conv_1x1_as_mm = True
            self._compiled_unet = self._precompiled("unet", self.unet_forward, unet)
        if opts.compile_vae:
            self._compiled_vae = self._precompiled("vae", vae_decode, self.model.vae)
        if self.device.type == "cuda":
            top = self.max_batch
            small = [2] if opts.compile_vae else [1, 2]
            self.vae_buckets = tuple(sorted({b for b in small + [4, 8] if b < top} | {b for b in range(16, top + 16, 16) if b < top} | {top}))

    def _precompiled(self, name: str, forward: Any, module: torch.nn.Module) -> Precompiled:
        cache, path = self.options.compile_cache, None
        if cache is not None:
            try:
                path = artifact_path(cache, name, forward, module, {"sdpa_backend": self.options.sdpa_backend})
            except Exception:  # noqa: BLE001 - a start without the saved code is slower, not broken
                log.exception("%s: cannot name its compiled code's file; compiling with plain torch.compile", name)
        return Precompiled(name, forward, module, path)

    def latent_size(self, job: GenerationJob) -> Size:
        scale = self.model.vae_scale_factor
        return (job.height // scale, job.width // scale)

    def validate(self, job: GenerationJob) -> samplers.Schedule:
        multiple = self.model.vae_scale_factor
        for name, value in (("width", job.width), ("height", job.height)):
            if value % multiple:
                raise InvalidForModel(f"{name} must be a multiple of {multiple} for model {self.model.name}")
        if job.steps > self.options.max_steps:
            raise InvalidForModel(
                f"steps={job.steps} exceeds this worker's limit of {self.options.max_steps} (BAILAN_MAX_STEPS)"
            )
        if job.num_images > self.max_batch:
            raise InvalidForModel(f"num_images {job.num_images} exceeds this worker's batch of {self.max_batch}")
        for name, array in (("init_image", job.init_image), ("mask", job.mask)):
            if array is not None and array.shape[:2] != (job.height, job.width):
                raise InvalidForModel(f"{name} is {array.shape[1]}x{array.shape[0]}, the job {job.width}x{job.height}")
        try:
            schedule = samplers.schedule(job.scheduler, self.model.scheduler_config, job.steps, job.start_step)
        except samplers.UnsupportedSchedule as exc:
            raise InvalidForModel(str(exc)) from exc
        if schedule.steps != job.steps:  # the batch scheduler counts job.steps
            raise InvalidForModel(f"scheduler {job.scheduler} makes {schedule.steps} steps of the {job.steps} asked for")
        return schedule

    def _pool(self, size: Size) -> _Pool:
        pool = self.pools.get(size)
        if pool is not None:
            return pool
        model, n = self.model, self.max_batch + 1
        h, w = size
        # What the UNet's cross-attention reads: one encoder's hidden size (SD), or both side by side (SDXL).
        width = model.unet.config.cross_attention_dim
        if not isinstance(width, int):
            width = model.pipe.text_encoder.config.hidden_size
        length = model.pipe.tokenizer.model_max_length
        pool = _Pool(
            size=size,
            slots=self.max_batch,
            latents=torch.zeros((n, model.latent_channels, h, w), device=self.device),
            x0=torch.zeros((n, model.latent_channels, h, w), device=self.device),
            embeds=torch.zeros((2 * n, length, width), device=self.device, dtype=model.dtype),
            guidance=torch.ones(n, device=self.device),
            coefficients=torch.zeros((n * self.options.max_steps, samplers.NUM_COEFFICIENTS), device=self.device),
            init=torch.zeros((n, model.latent_channels, h, w), device=self.device),
            noise0=torch.zeros((n, model.latent_channels, h, w), device=self.device),
            paint=torch.ones((n, 1, h, w), device=self.device),
        )
        if self.inpainting_unet:
            pool.unet_mask = torch.ones((n, 1, h, w), device=self.device)
            # Text-to-image and unmasked rows repaint everything: diffusers' inpaint pipeline then
            # encodes a picture masked out throughout, i.e. mid-grey. A zero latent is another
            # picture, one such a UNet was not trained to see.
            scale = model.vae_scale_factor
            pool.grey = self._encode_picture(np.zeros((h * scale, w * scale, 3), np.uint8),
                                             keep=np.zeros((h * scale, w * scale), bool))
            pool.masked = pool.grey.expand(n, -1, -1, -1).clone()
        self._extend_pool(pool)
        self.pools[size] = pool
        return pool

    def forget(self, size: Size) -> None:
        """Free the buffers (and captured graphs) of a latent size no job uses now."""
        self.pools.pop(size, None)

    # ---- what a model family adds (worker.runners.sdxl) ------------------------------------

    def _extend_pool(self, pool: _Pool) -> None:
        """Buffers a family's UNet needs beside the shared ones; SD needs none."""

    def encode(self, texts: list[str], negative: list[bool]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
        """Per-text conditioning rows ("embeds", and whatever `_extend_pool` made room for)
        and each text's unknown words; `negative` marks the negative prompts."""
        embeds, unknown = encode_prompts(self.model, texts)
        return {"embeds": embeds}, unknown

    def _unet_inputs(self, pool: _Pool, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The UNet's inputs beyond the text embeddings (unet_forward's last arguments), for batch rows `rows`."""
        return ()

    # ---- admission -------------------------------------------------------------------

    def start(self, admission: Admission) -> None:
        """Set up the slots of newly admitted jobs: prompts, seeded noise, schedules.
        One text-encoder call and one upload per buffer for all of them."""
        pool = self._pool(admission.size)
        texts = [t for job in admission.jobs for t in job.texts()]
        negative = [job.guided and i == 0 for job in admission.jobs for i in range(len(job.texts()))]
        conditioning, unknown = self.encode(texts, negative)
        slots: list[int] = []
        uncond_rows: list[int] = []
        cond_rows: list[int] = []
        guidance: list[float] = []
        latents: list[torch.Tensor] = []
        tables: list[np.ndarray] = []
        noise: list[tuple[int, int, torch.Tensor]] = []
        pictures: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        row = 0
        shape = (1, self.model.latent_channels, *admission.size)
        for job, job_slots in zip(admission.jobs, admission.slots):
            sched = self.validate(job)
            n_texts = len(job.texts())
            job.unknown_words = unknown[row + n_texts - 1]
            picture = mask = masked = None
            if job.init_image is not None:
                picture = self._encode_picture(job.init_image)
                if job.mask is not None:
                    mask = self._latent_mask(job.mask, admission.size)
                    if self.inpainting_unet:
                        # diffusers' inpainting input: the picture where the mask keeps it, grey elsewhere.
                        masked = self._encode_picture(job.init_image, keep=job.mask < 0.5)
            for index, slot in enumerate(job_slots):
                if job.guided:
                    uncond_rows.append(row)
                    cond_rows.append(row + 1)
                else:
                    uncond_rows.append(-1)
                    cond_rows.append(row)
                slots.append(slot)
                guidance.append(job.guidance_scale if job.guided else 1.0)
                # CPU generators: the same seed gives the same image on any device, and
                # the stock pipeline's image for one-image jobs.
                generator = torch.Generator("cpu").manual_seed(job.seed + index)
                first = randn_tensor(shape, generator=generator, dtype=torch.float32)
                if picture is None or (mask is not None and sched.start == 0):
                    # Text to image; and inpainting at full strength, which diffusers' inpaint
                    # pipeline also starts from pure noise.
                    latents.append(first * sched.init_noise_sigma)
                else:
                    # As diffusers' img2img: the picture's latent noised to the start step.
                    latents.append(sched.start_a * picture.cpu() + sched.start_b * first)
                if picture is not None:
                    pictures.append((slot, picture, first, mask, masked))
                if sched.stochastic:
                    draws = [randn_tensor(shape, generator=generator, dtype=torch.float32)
                             for _ in range(sched.steps - sched.start)]
                    noise.append((slot, sched.start, torch.cat(draws)))
                tables.append(sched.coefficients)
            row += n_texts
        index = self._ints(slots)
        guided = [i for i, r in enumerate(uncond_rows) if r >= 0]
        for name, rows in conditioning.items():
            buffer = pool.embeds if name == "embeds" else pool.extra[name]
            buffer.index_copy_(0, self._ints([2 * s + 1 for s in slots]), rows.index_select(0, self._ints(cond_rows)))
            if guided:
                buffer.index_copy_(
                    0,
                    self._ints([2 * slots[i] for i in guided]),
                    rows.index_select(0, self._ints([uncond_rows[i] for i in guided])),
                )
        pool.guidance.index_copy_(0, index, _upload(torch.tensor(guidance, dtype=torch.float32), self.device))
        pool.latents.index_copy_(0, index, _upload(torch.cat(latents), self.device))
        pool.x0.index_fill_(0, index, 0.0)
        steps = self.options.max_steps
        rows = self._ints(np.concatenate([slot * steps + np.arange(len(t)) for slot, t in zip(slots, tables)]))
        table = torch.from_numpy(np.concatenate(tables).astype(np.float32))
        pool.coefficients.index_copy_(0, rows, _upload(table, self.device))
        pool.stochastic[slots] = False
        for slot, start, draws in noise:
            bank = self._noise_bank(pool, start + len(draws))
            bank[slot, start : start + len(draws)] = _upload(draws, self.device)
            pool.stochastic[slot] = True
        self._set_pictures(pool, slots, pictures)

    def _set_pictures(
        self,
        pool: _Pool,
        slots: list[int],
        pictures: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    ) -> None:
        """Reset every admitted slot's picture buffers, then fill those of image-to-image jobs."""
        index = self._ints(slots)
        pool.init.index_fill_(0, index, 0.0)
        pool.noise0.index_fill_(0, index, 0.0)
        pool.paint.index_fill_(0, index, 1.0)
        if pool.unet_mask is not None and pool.masked is not None and pool.grey is not None:
            pool.unet_mask.index_fill_(0, index, 1.0)
            pool.masked.index_copy_(0, index, pool.grey.expand(len(slots), -1, -1, -1))
        for slot, picture, first, mask, masked in pictures:
            if mask is None:
                continue
            if pool.unet_mask is not None and pool.masked is not None and masked is not None:
                # An inpainting UNet sees the mask and the picture outside it, and paints all.
                pool.unet_mask[slot] = mask[0]
                pool.masked[slot] = masked[0]
            else:
                pool.init[slot] = picture[0]
                pool.noise0[slot] = _upload(first, self.device)[0]
                pool.paint[slot] = mask[0]

    @torch.inference_mode()
    def _encode_picture(self, image: np.ndarray, keep: np.ndarray | None = None) -> torch.Tensor:
        """A picture's latent in the sampler's space (the VAE's mode, times its scaling factor);
        with `keep`, the picture is mid-grey where `keep` is False."""
        vae = self.model.vae
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        if keep is not None:
            pixels = pixels * torch.from_numpy(np.asarray(keep, dtype=np.float32))[None, None]
        pixels = _upload(pixels, self.device).to(vae.dtype)
        latent = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        return latent.float()

    def _latent_mask(self, mask: np.ndarray, size: Size) -> torch.Tensor:
        """(H, W) float, 1 = repaint -> (1, 1, h, w) at latent resolution, binarised as diffusers does."""
        full = torch.from_numpy((np.asarray(mask) >= 0.5).astype(np.float32))[None, None]
        return _upload(torch.nn.functional.interpolate(full, size=size, mode="nearest"), self.device)

    def _ints(self, values: list[int] | np.ndarray) -> torch.Tensor:
        return _upload(torch.from_numpy(np.asarray(values, dtype=np.int64)), self.device)

    def _noise_bank(self, pool: _Pool, steps: int) -> torch.Tensor:
        bank = pool.noise_bank
        if bank is None or bank.shape[1] < steps:
            # Grown rarely (a longer Euler a job than any before); read outside the graphs.
            grown = torch.zeros((pool.slots + 1, steps, *pool.latents.shape[1:]), device=self.device)
            if bank is not None:
                grown[:, : bank.shape[1]] = bank
            pool.noise_bank = bank = grown
        return bank

    # ---- one step ----------------------------------------------------------------------

    def step(self, plan: StepPlan) -> None:
        """Advance the plan's samples one step each; nothing waits for the device."""
        pool = self._pool(plan.size)
        graph = pool.graphs.get(plan.bucket)
        width = plan.bucket  # >= rows >= samples; padding reads and writes the scratch slot
        stochastic = bool(pool.stochastic[plan.slots].any())
        packed = torch.from_numpy(_pack(plan, pool, width, self.options.max_steps, stochastic))
        if graph is not None:
            graph.index.copy_(_pinned(packed, self.device), non_blocking=True)
            if stochastic:
                _gather_noise(pool, graph.index[NOISE], out=graph.noise)
            graph.graph.replay()
            return
        index = _upload(packed, self.device)
        noise = _gather_noise(pool, index[NOISE]) if stochastic else None
        # No graph: the compiled UNet where warm-up compiled it (CUDA graphs turned off), the
        # eager one at any other size (compiling there would hold up every job meanwhile).
        warmed = self._compiled_unet is not None and plan.size == self.warm_size
        with self._sdpa():
            self._body(pool, index, noise, self._compiled_unet if warmed else self._eager_unet())

    def _eager_unet(self) -> Any:
        return functools.partial(self.unet_forward, self.model.unet)

    def _body(self, pool: _Pool, index: torch.Tensor, noise: torch.Tensor | None, unet: Any) -> None:
        """The step itself, from device tensors only (so it can be captured as a graph).
        `unet` is called with the sample, timestep, embeddings and `_unet_inputs`."""
        model = self.model
        coef_rows = pool.coefficients.index_select(0, index[ROW_COEF])
        x = pool.latents.index_select(0, index[ROW_SLOT])
        x_in = (x * coef_rows[:, samplers.C_IN].view(-1, 1, 1, 1)).to(model.dtype)
        if pool.unet_mask is not None and pool.masked is not None:
            rows = index[ROW_SLOT]
            x_in = torch.cat([x_in, pool.unet_mask.index_select(0, rows).to(model.dtype),
                              pool.masked.index_select(0, rows).to(model.dtype)], dim=1)
        if self.options.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        t = coef_rows[:, samplers.T]
        embeds = pool.embeds.index_select(0, index[ROW_EMBED])
        out = unet(x_in, t, embeds, *self._unet_inputs(pool, index[ROW_EMBED])).float()
        uncond = out.index_select(0, index[SAMPLE_UNCOND])
        cond = out.index_select(0, index[SAMPLE_COND])
        slots = index[SAMPLE_SLOT]
        scale = pool.guidance.index_select(0, slots).view(-1, 1, 1, 1)
        # Unguided samples point both at their one row with scale 1: cond + 1 * 0.
        m = uncond + scale * (cond - uncond)
        coefficients = pool.coefficients.index_select(0, index[SAMPLE_COEF])
        x_next, x0 = samplers.update(
            pool.latents.index_select(0, slots), m, pool.x0.index_select(0, slots), noise, coefficients
        )
        # Inpainting: outside the mask the picture comes back, noised to the next step's level
        # (paint is 1 everywhere else, which leaves x_next as it is).
        col = coefficients.view(-1, samplers.NUM_COEFFICIENTS, 1, 1, 1)
        known = col[:, samplers.KA] * pool.init.index_select(0, slots) + col[:, samplers.KB] * pool.noise0.index_select(
            0, slots
        )
        paint = pool.paint.index_select(0, slots)
        x_next = paint * x_next + (1 - paint) * known
        pool.latents.index_copy_(0, slots, x_next)
        pool.x0.index_copy_(0, slots, x0)

    # ---- previews and images --------------------------------------------------------------

    def cheap_previews(self, plan: StepPlan) -> tuple[torch.Tensor, Any] | None:
        """(k, h, w, 3) uint8 of the plan's due previews, from the model's preview decoder
        or the linear latent->RGB map, and the CUDA event after which the host copy is
        complete (None on the CPU)."""
        if not len(plan.previews):
            return None
        latents = self._preview_latents(plan, plan.previews)
        decoder = self.model.preview_decoder
        if decoder is not None:
            rgb = decoder(latents.float())
        else:
            rgb = linear_to_rgb(latents, self.model.latent_rgb, self.model.latent_rgb_bias)
        rgb = to_uint8_hwc(rgb)
        if self.device.type != "cuda":
            return rgb, None
        # One copy to pinned memory that nothing waits for: handed over once done (usually a
        # step later), so the GPU never idles on a preview.
        host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(rgb, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def decode_previews(self, plan: StepPlan) -> list[np.ndarray]:
        """Full VAE decodes of the plan's due full-decode previews."""
        return self.decode(self._preview_latents(plan, plan.full_previews))

    def _preview_latents(self, plan: StepPlan, positions: np.ndarray) -> torch.Tensor:
        """What each due preview shows, as latents: the model's clean-picture estimate x0
        from this step, or the sampler's state x_t brought back to unit variance
        (Euler-family latents carry sigma-scaled noise, which would blow previews out)."""
        pool = self.pools[plan.size]
        slots = plan.slots[positions]
        index = self._ints(np.stack([slots, slots * self.options.max_steps + plan.steps[positions]]))
        scale = pool.coefficients.index_select(0, index[1])[:, samplers.PREVIEW].view(-1, 1, 1, 1)
        xt = pool.latents.index_select(0, index[0]) * scale
        wants_x0 = plan.preview_x0[positions]
        if not wants_x0.any():
            return xt
        x0 = pool.x0.index_select(0, index[0])
        if wants_x0.all():
            return x0
        return torch.where(self._ints(wants_x0.astype(np.int64)).bool().view(-1, 1, 1, 1), x0, xt)

    def final_latents(self, size: Size, slots: list[int]) -> torch.Tensor:
        return self.pools[size].latents.index_select(0, self._ints(slots))

    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Latents -> uint8 (h, w, 3) images on the host; padded to a warmed batch size."""
        model = self.model
        # The VAE's own dtype: a family may keep it in float32 (SDXL's overflows in float16).
        batch = latents.to(model.vae.dtype) / model.vae.config.scaling_factor
        count = batch.shape[0]
        target = next((b for b in self.vae_buckets if b >= count), count)
        if target > count:
            batch = torch.cat([batch, batch[-1:].expand(target - count, -1, -1, -1)])
        if self.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        # `is not None`, never `or`: truth-testing a module asks it for its length. Compiled only
        # at the size warmed up, as the UNet's graphs: another size would compile mid-request,
        # holding up every job on the worker for as long (tens of seconds on a GPU).
        compiled = (self._compiled_vae is not None and not self.vae_deferred
                    and self.warm_size in (None, tuple(batch.shape[-2:])))
        with self._decode_lock:
            images = (self._compiled_vae(batch) if compiled else vae_decode(model.vae, batch))[:count]
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return list(images.permute(0, 2, 3, 1).cpu().numpy())

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- start-up ---------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self, size: Size, buckets: tuple[int, ...], defer_vae_compile: bool = False) -> dict[str, float]:
        """Before the worker says it is ready: compile, select kernels and capture a CUDA
        graph of the step at every bucket of the native size, and decode at every VAE
        bucket. Returns seconds spent per phase.

        With `defer_vae_compile`, a VAE decoder whose compiled code is not saved (a first
        start: tens of seconds of compiling) is warmed eagerly instead, and compiled by
        `finish_warm_up` once the worker serves; saved code is loaded here, in seconds."""
        timings: dict[str, float] = {}
        self.warm_size = size
        self.vae_deferred = defer_vae_compile and self._compiled_vae is not None and not self._compiled_vae.will_load
        pool = self._pool(size)
        unet = self._compiled_unet if self._compiled_unet is not None else self._eager_unet()
        started = time.perf_counter()
        later: list[float] = []
        for bucket in buckets:
            if bucket > 2 * self.max_batch:
                continue
            began = time.perf_counter()
            index = _scratch_index(pool, bucket, self.options.max_steps)
            noise = torch.zeros((bucket, *pool.latents.shape[1:]), device=self.device)
            if self.options.cuda_graphs:
                graph = self._try_capture(pool, index, noise, unet, bucket)
                if graph is None:
                    break
                pool.graphs[bucket] = graph
            else:
                with self._sdpa():
                    self._body(pool, index, noise, unet)
            if "first_bucket_s" in timings:
                later.append(time.perf_counter() - began)
            timings.setdefault("first_bucket_s", time.perf_counter() - started)
        self._sync()
        timings["unet_buckets_s"] = time.perf_counter() - started
        if later:
            # What each further bucket adds to a start (its kernels chosen, its graph captured):
            # the first one's includes the compile.
            timings["later_bucket_s_each"] = sum(later) / len(later)
        started = time.perf_counter()
        for count in self.vae_buckets:
            self.decode(torch.zeros((count, *pool.latents.shape[1:]), device=self.device))
        self._sync()
        timings["vae_buckets_s"] = time.perf_counter() - started
        if self._compiled_unet is not None or self._compiled_vae is not None:
            timings.update(compile_phases())
        return {**timings, **self._precompiled_timings()}

    @torch.inference_mode()
    def finish_warm_up(self, stop: threading.Event | None = None) -> dict[str, float]:
        """The VAE decoder's compile that warm_up deferred: at every VAE bucket, then decodes
        use it. Safe beside the engine's thread: until it is done, that thread decodes eagerly
        and never calls the compiled decoder. Returns seconds spent; {} when nothing was
        deferred, or `stop` was set before it was done (decodes then stay eager)."""
        compiled = self._compiled_vae
        if not self.vae_deferred or compiled is None or self.warm_size is None:
            return {}
        started = time.perf_counter()
        channels = self.model.latent_channels
        # Not a batch of 1 on the CPU, which has no VAE buckets: that code would not be saved.
        for i, count in enumerate(self.vae_buckets or (2,)):
            if stop is not None and stop.is_set():
                return {}
            batch = torch.zeros((count, channels, *self.warm_size), device=self.device, dtype=self.model.vae.dtype)
            if self.options.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            # The first, smallest run compiles (tens of seconds): decodes must not wait for it.
            with self._decode_lock if i else contextlib.nullcontext():
                compiled(batch)
                self._sync()
        self.vae_deferred = False
        return {"vae_compile_s": time.perf_counter() - started, **self._precompiled_timings()}

    def _precompiled_timings(self) -> dict[str, float]:
        """Whether this start loaded the compiled code whole (worker.precompile) or made it, and in how long."""
        timings = {}
        for compiled in (self._compiled_unet, self._compiled_vae):
            if compiled is not None and compiled.source in ("loaded", "compiled"):
                timings[f"{compiled.name}_{'load' if compiled.source == 'loaded' else 'aot_compile'}_s"] = compiled.seconds
        return timings

    def _try_capture(self, pool: _Pool, index: torch.Tensor, noise: torch.Tensor, unet: Any,
                     bucket: int) -> _Graph | None:
        """The step at `bucket` rows as a CUDA graph; None where it cannot be captured (the
        model then runs eagerly)."""
        try:
            return self._capture(pool, index, noise, unet)
        except Exception as exc:
            self._sync()
            if isinstance(unet, Precompiled) and unet.ahead_of_time:
                # Code saved ahead of time is new in torch; plain torch.compile's is known to be
                # captured, and losing the graphs would cost far more than the start-up it saves.
                unet.fall_back(f"capturing the step at {bucket} rows failed ({type(exc).__name__}: {exc})")
                return self._try_capture(pool, index, noise, unet, bucket)
            log.exception("capturing the step at %d rows failed; running it eagerly", bucket)
            return None

    def _capture(self, pool: _Pool, index: torch.Tensor, noise: torch.Tensor, unet: Any) -> _Graph:
        # Warm-up on a side stream first (compilation, cuDNN benchmarking and lazy
        # initialisation must not happen inside the capture), as torch.cuda.graphs advises.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._sdpa():
            for _ in range(2):
                self._body(pool, index, noise, unet)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            # Graphs replay one at a time on one stream, so they can share one memory pool.
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool), self._sdpa():
            self._body(pool, index, noise, unet)
        return _Graph(graph, index, noise)

    def _sdpa(self) -> contextlib.AbstractContextManager[Any]:
        if not self.options.sdpa_backend:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[self.options.sdpa_backend]
        return sdpa_kernel([backend])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---- helpers ----------------------------------------------------------------------------------


def _pack(plan: StepPlan, pool: _Pool, width: int, max_steps: int, stochastic: bool) -> np.ndarray:
    """The plan as one (INDEX_ROWS, width) int64 array: which slot, coefficient row and
    embedding each UNet row reads, and where each sample's outputs and state live.
    Padding points at the scratch slot."""
    scratch = pool.scratch
    n = len(plan)
    guided = plan.guided
    per_sample = 1 + guided.astype(np.int64)
    first = np.cumsum(per_sample) - per_sample  # each sample's first UNet row
    rows = int(per_sample.sum())
    index = np.empty((INDEX_ROWS, width), dtype=np.int64)
    coef = plan.slots * max_steps + plan.steps
    index[ROW_SLOT, :rows] = np.repeat(plan.slots, per_sample)
    index[ROW_COEF, :rows] = np.repeat(coef, per_sample)
    embed = np.repeat(2 * plan.slots + 1, per_sample)
    embed[first[guided]] -= 1  # a guided sample's first row is its negative prompt
    index[ROW_EMBED, :rows] = embed
    index[[ROW_SLOT, ROW_EMBED], rows:] = [[scratch], [2 * scratch + 1]]
    index[ROW_COEF, rows:] = scratch * max_steps
    index[SAMPLE_SLOT, :n] = plan.slots
    index[SAMPLE_UNCOND, :n] = first
    index[SAMPLE_COND, :n] = first + guided
    index[SAMPLE_COEF, :n] = coef
    index[SAMPLE_SLOT, n:] = scratch
    index[[SAMPLE_UNCOND, SAMPLE_COND], n:] = width - 1
    index[SAMPLE_COEF, n:] = scratch * max_steps
    index[NOISE] = -1
    if stochastic:
        assert pool.noise_bank is not None
        draws = pool.noise_bank.shape[1]
        index[NOISE, :n] = np.where(pool.stochastic[plan.slots], plan.slots * draws + plan.steps, -1)
    return index


def _scratch_index(pool: _Pool, width: int, max_steps: int) -> torch.Tensor:
    scratch = pool.scratch
    row = [scratch, scratch * max_steps, 2 * scratch + 1, scratch, width - 1, width - 1, scratch * max_steps, -1]
    return torch.tensor(row, device=pool.latents.device).view(INDEX_ROWS, 1).repeat(1, width).contiguous()


def _gather_noise(pool: _Pool, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's noise for its step from the bank (zeros for samples that draw none)."""
    bank = pool.noise_bank
    assert bank is not None
    flat = bank.view(-1, *bank.shape[2:])
    # -1 (no noise) reads the scratch slot's first draw, which is always zero.
    safe = torch.where(index >= 0, index, pool.scratch * bank.shape[1])
    if out is None:
        return flat.index_select(0, safe)
    return torch.index_select(flat, 0, safe, out=out)


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.pin_memory() if device.type == "cuda" else tensor


def _upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without waiting for the GPU's queue (a plain
    `.to("cuda")` from pageable memory synchronizes). PyTorch's pinned-memory cache
    keeps the staging buffer until the copy has run."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def encode_prompts(model: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, list[list[str]]]:
    """Text embeddings for `texts`, and the words of each that the vocabulary lacks."""
    input_ids, unknown = token_ids(model.pipe.tokenizer, texts, model.device)
    embeds = model.pipe.text_encoder(input_ids, return_dict=False)[0]
    return embeds.to(model.dtype), unknown


def token_ids(tokenizer: Any, texts: list[str], device: torch.device) -> tuple[torch.Tensor, list[list[str]]]:
    """`texts` as padded token ids on `device`, and the words of each that the vocabulary lacks.

    Word-level vocabularies (the built-in model) map unknown words to [UNK];
    they are dropped, not fed to the encoder, and reported to the client.
    CLIP's byte-level BPE has no unknown words (its unk token is its end token).
    """
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
    return _upload(torch.tensor(ids_batch), device), unknown
