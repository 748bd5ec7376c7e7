"""Throughput and latency in one process: stock diffusers vs Bailan's engine.

One device, one model, one run:

  (a) stock `StableDiffusionPipeline.__call__`, one request at a time (a naive service);
  (b) stock pipeline, all N requests in one static batch (the stock code's ceiling);
  then Bailan's engine (previews every 5 steps, as the service does by default):
  (d) one request alone; (c1) N concurrent requests at once; (c2) N staggered
      arrivals with mixed step counts; (e) = (c1) with a preview every step.

On CUDA the engine runs twice: first with CUDA graphs around the eager UNet
("graphs"), then as the worker runs it by default ("compiled": torch.compile'd
UNet and VAE decoder inside the graphs), with the cold compile timed, and the
compiled images compared with the eager ones. `--levers` also times one engine
step at 2 and 32 UNet rows for each lever (attention kernels, fused QKV,
channels_last) on its own.

Each request is one image: its own prompt and seed, guidance 7.5, DPM-Solver++ 2M,
VAE decode and uint8 output included; latency is submit -> image on the host.

    python bench/throughput.py --device cpu               # built-in model (or the tiny pipeline)
    python bench/throughput.py --device cuda --n 16       # SD1.5 architecture, random weights, built in code
    python bench/throughput.py --device cuda --arch sdxl --n 8   # SDXL base architecture at 1024x1024

On CUDA the default model is an SD1.5-architecture pipeline with random weights,
built directly on the GPU (nothing is downloaded; see ../shared/ANCHORS.md):
compute is the same as the real SD1.5's, so the timings are. `--save-model DIR`
writes it with save_pretrained for the whole-service benchmark (bench/service.py).
`--arch sdxl` builds SDXL base's architecture the same way (stock
`StableDiffusionXLPipeline` against the engine's SDXL runner, at 1024x1024).
`--json PATH` is rewritten after each mode, so a run cut short keeps what it measured.
`--trace FILE` gives each engine row `trace`: the engine's own timeline of it
(worker.trace: its steps' host time, what lay between them, its decodes), as
bench/service.py's rows have it for the service's worker, so the two compare
step for step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from worker.engine import Engine, GenerationJob, RunnerOptions
from worker.loader import LoadedModel, from_pipeline, read_pipeline
from worker.imaging import encode_preview
from worker import trace
from world.tiny import TINY_WORDS, build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "models" / "bailan-shapes"
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
SCHEDULER = "dpmpp_2m"
SERVICE_PREVIEW_EVERY = 5  # the service's default


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        fg, bg = COLOURS[i % len(COLOURS)], COLOURS[(i * 3 + 1) % len(COLOURS)]
        size = ("small", "large", "big", "tiny")[i % 4]
        out.append(f"a {size} {fg} {SHAPES[i % len(SHAPES)]} on a {bg} background")
    return out


# ---- models -----------------------------------------------------------------------


def sd_vae(sample_size: int, scaling_factor: float, **extra: Any) -> Any:
    """Stable Diffusion's published VAE configuration (SD 1.x and SDXL share it but for scaling)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )


def build_sd15_random(device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD1.5's published configurations with random weights, built on `device`.

    Weight matrices are scaled by 0.5 so fp16 activations stay finite. The tokenizer
    is word-level (no CLIP vocabulary without a download); the text encoder keeps
    CLIP's 49,408-entry embedding table, of which it uses the first few ids.
    """
    from diffusers import UNet2DConditionModel

    from world.sd_components import assemble_pipeline, clip_text_encoder, sd_noise_scheduler
    from world.wordtok import build_word_tokenizer

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=77)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = sd_vae(512, 0.18215)
        text_encoder = clip_text_encoder(
            tokenizer, hidden=768, intermediate=3072, layers=12, heads=12, vocab_size=49408, hidden_act="quick_gelu"
        )
    with torch.no_grad():
        for module in (unet, vae):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.mul_(0.5)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, sd_noise_scheduler())
    pipe.to(device=device, dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe


def build_sdxl_random(device: torch.device, dtype: torch.dtype) -> Any:
    """SDXL base's published configurations (UNet, both text encoders, VAE) with random
    weights, built on `device`: the compute of SDXL at no download. Scaled as build_sd15_random."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from world.sd_components import clip_text_encoder, sd_noise_scheduler
    from world.wordtok import build_word_tokenizer

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=77)
    tokenizer_2 = build_word_tokenizer(TINY_WORDS, model_max_length=77)

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = sd_vae(1024, 0.13025, force_upcast=True)
        # SDXL's: CLIP ViT-L's text tower, then OpenCLIP bigG's with its projection.
        text_encoder = clip_text_encoder(tokenizer, hidden=768, intermediate=3072, layers=12, heads=12,
                                         vocab_size=49408, hidden_act="quick_gelu")
        text_encoder_2 = clip_text_encoder(tokenizer_2, hidden=1280, intermediate=5120, layers=32, heads=20,
                                           vocab_size=49408, hidden_act="gelu", projection_dim=1280,
                                           model_class=CLIPTextModelWithProjection)
    with torch.no_grad():
        for module in (unet, vae):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.mul_(0.5)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=sd_noise_scheduler(), force_zeros_for_empty_prompt=True,
    )
    # The VAE stays in dtype: the stock pipeline upcasts it around its decode (force_upcast),
    # and only when it finds it in float16; the engine's SDXL runner upcasts it for good.
    pipe.to(device=device, dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    return pipe


def build_pipeline(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[StableDiffusionPipeline, str, Path]:
    """The pipeline, its name for the report, and its directory (for latent_rgb.json)."""
    path = Path(args.model) if args.model else BUILTIN
    if args.model or (device.type == "cpu" and (BUILTIN / "model_index.json").is_file()):
        pipe = read_pipeline(path, dtype)
        name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        return pipe.to(device), name, path
    if device.type == "cuda" and args.arch == "sdxl":
        return build_sdxl_random(device, dtype), "sdxl-architecture-random (built in code)", Path("sdxl-random")
    if device.type == "cuda":
        return build_sd15_random(device, dtype), "sd15-architecture-random (built in code)", Path("sd15-random")
    return build_tiny_pipeline().to(device=device, dtype=dtype), "tiny random pipeline (world/tiny.py)", Path("tiny")


# ---- measuring ------------------------------------------------------------------------


class Meter:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        # Process-wide high-water mark (KiB on Linux); it never goes down.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def summary(name: str, latencies: list[float], makespan: float, images: int, peak: float, **extra: Any) -> dict:
    lat = sorted(latencies)
    return {
        "mode": name,
        "images": images,
        "makespan_s": round(makespan, 4),
        "images_per_s": round(images / makespan, 3),
        "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
        "latency_p95_s": round(float(np.percentile(lat, 95)), 4),
        "latency_max_s": round(lat[-1], 4),
        "peak_mem_gib": round(peak, 3),
        **extra,
    }


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    return list((np.nan_to_num(images) * 255).round().clip(0, 255).astype(np.uint8))


class Stock:
    """The stock pipeline, as a naive service would call it."""

    def __init__(self, pipe: StableDiffusionPipeline, args: argparse.Namespace, meter: Meter) -> None:
        self.pipe, self.args, self.meter = pipe, args, meter
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
        pipe.set_progress_bar_config(disable=True)
        self.images: list[np.ndarray] = []

    def __call__(self, texts: list[str], seeds: list[int], steps: int) -> list[np.ndarray]:
        out = self.pipe(
            texts,
            height=self.args.height,
            width=self.args.width,
            num_inference_steps=steps,
            guidance_scale=self.args.guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        ).images
        return to_uint8(out)

    def one_at_a_time(self, texts: list[str], steps: int) -> dict:
        self.meter.reset_peak()
        latencies = []
        start = self.meter.now()
        for i, text in enumerate(texts):
            t0 = self.meter.now()
            self([text], [i], steps)
            latencies.append(self.meter.now() - t0)
        makespan = self.meter.now() - start
        return summary("a_stock_one_at_a_time", latencies, makespan, len(texts), self.meter.peak_gib())

    def static_batch(self, texts: list[str], steps: int) -> dict:
        self.meter.reset_peak()
        start = self.meter.now()
        self.images = self(texts, list(range(len(texts))), steps)
        makespan = self.meter.now() - start
        return summary("b_stock_static_batch", [makespan] * len(texts), makespan, len(texts), self.meter.peak_gib())


class EngineBench:
    """One engine on the main thread, fed from another thread, as the worker's slots feed it."""

    def __init__(self, engine: Engine, args: argparse.Namespace, meter: Meter) -> None:
        self.engine, self.args, self.meter = engine, args, meter
        if args.trace is not None and engine.trace is None:
            engine.trace = trace.Trace(args.trace, "in-process")
        self.previews = ThreadPoolExecutor(2, thread_name_prefix="preview")
        self.preview_count = 0
        self.images: dict[int, np.ndarray] = {}

    def _on_preview(self, job: GenerationJob, step: int, rgb: np.ndarray) -> None:
        # What the worker does: hand the array to a thread that scales and encodes it.
        self.preview_count += 1
        self.previews.submit(encode_preview, rgb)

    def job(self, i: int, text: str, steps: int, preview_every: int) -> GenerationJob:
        return GenerationJob(
            id=f"bench-{i}",
            prompt=text,
            width=self.args.width,
            height=self.args.height,
            steps=steps,
            guidance_scale=self.args.guidance,
            seed=i,
            scheduler=SCHEDULER,
            preview_every=preview_every,
            on_preview=self._on_preview,
        )

    def run(
        self, name: str, texts: list[str], steps: list[int], interval: float = 0.0,
        preview_every: int = SERVICE_PREVIEW_EVERY,
    ) -> dict:
        engine = self.engine
        stop = threading.Event()
        self.preview_count = 0
        self.meter.reset_peak()
        submitted: list[float] = [0.0] * len(texts)
        finished: list[float] = [0.0] * len(texts)
        futures: list[Future] = []
        jobs: list[GenerationJob] = []

        def done_at(i: int) -> Callable[[Future], None]:
            # Called in the engine thread once the images are on the host.
            return lambda _f: finished.__setitem__(i, time.perf_counter())

        def feed() -> None:
            for i, (text, n_steps) in enumerate(zip(texts, steps)):
                if interval:
                    delay = start + i * interval - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                job = self.job(i, text, n_steps, preview_every)
                submitted[i] = time.perf_counter()
                future = engine.submit(job)
                future.add_done_callback(done_at(i))
                futures.append(future)
                jobs.append(job)
            wait(futures)
            stop.set()

        self.meter.sync()
        since = time.time()
        start = time.perf_counter()
        iterations = engine.iterations
        feeder = threading.Thread(target=feed, name="bench-clients", daemon=True)
        feeder.start()
        # The engine runs on the main thread, as in the worker (CPU kernels run 2x slower
        # from a secondary thread).
        engine.run(stop)
        feeder.join()
        for future in futures:
            future.result()  # raise if a job failed
        self.images = {i: job.images[0] for i, job in enumerate(jobs)}
        makespan = max(finished) - start
        latencies = [f - s for f, s in zip(finished, submitted)]
        extra: dict[str, Any] = {"engine_iterations": engine.iterations - iterations, "steps": sorted(set(steps)),
                                 "preview_every": preview_every}
        if interval:
            extra["arrival_interval_s"] = round(interval, 4)
        if preview_every:
            extra["previews"] = self.preview_count
        if self.args.trace is not None and engine.trace is not None and engine.trace.on:
            # The same timeline as the service's worker writes (bench/service.py --trace): its steps
            # and what lay between them, to set beside the service's rows.
            engine.trace.flush()
            found = trace.summarise(trace.read(self.args.trace, since, time.time())).get("engine")
            if found:
                extra["trace"] = found
        return summary(name, latencies, makespan, len(texts), self.meter.peak_gib(), **extra)


@torch.inference_mode()
def step_time(engine: Engine, meter: Meter, args: argparse.Namespace, samples: int, reps: int) -> float:
    """Seconds per engine step (UNet, guidance, sampler update) with `samples` guided
    samples in the batch: the same plan run `reps` times after one warm step."""
    jobs = [GenerationJob(id=f"lever-{i}", prompt="a red circle", width=args.width, height=args.height,
                          steps=50,
                          guidance_scale=args.guidance, seed=i) for i in range(samples)]
    for job in jobs:
        engine.submit(job)
    engine.step_once()
    plan = engine.scheduler.plan()
    assert plan is not None
    engine.runner.step(plan)
    t0 = meter.now()
    for _ in range(reps):
        engine.runner.step(plan)
    elapsed = (meter.now() - t0) / reps
    for job in jobs:
        job.cancel_requested.set()
    engine.run_until_idle()
    return elapsed


# ---- the run -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--model", help="a diffusers SD or SDXL directory (default: built in, see above)")
    p.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"],
                   help="CUDA without --model: the random-weight architecture (sdxl runs at 1024x1024)")
    p.add_argument("--n", type=int, help="concurrent requests (default 16 on CUDA, 8 on CPU)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--mixed-steps", default="15,25,40", help="step counts cycled over the staggered requests")
    p.add_argument("--size", type=int, help="width = height (default 512 on CUDA, the model's native size on CPU)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--max-batch", type=int, default=0, help="engine batch in images (default: --n)")
    p.add_argument("--stagger", type=float, help="arrival interval in s (default: (c1)'s makespan / 2N)")
    p.add_argument("--stock-n", type=int, help="requests for (a) (default: --n)")
    p.add_argument("--single-reps", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="CUDA: skip the compiled engine")
    p.add_argument("--stock-only", action="store_true", help="only (a) and (b), e.g. before bench/service.py")
    p.add_argument("--levers", action="store_true", help="CUDA: time one step per lever at 2 and 32 rows")
    p.add_argument("--save-model", type=Path, help="write the model here (save_pretrained) before measuring")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--trace", type=Path, help="the engine's timeline (worker.trace) to this file: each engine row "
                   "gets `trace`, its steps and what lay between them, as bench/service.py's rows do")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    n = args.n or (16 if device.type == "cuda" else 8)
    meter = Meter(device)

    t0 = time.perf_counter()
    pipe, model_name, model_path = build_pipeline(args, device, dtype)
    build_s = time.perf_counter() - t0
    if args.save_model:
        t0 = time.perf_counter()
        pipe.save_pretrained(args.save_model, safe_serialization=True)
        print(f"saved the model to {args.save_model} in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.size:
        args.width = args.height = args.size
    elif device.type == "cuda" and not args.model:
        args.width = args.height = 1024 if args.arch == "sdxl" else 512
    else:
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        args.width = args.height = pipe.unet.config.sample_size * scale
    texts = prompts(n)
    steps = args.steps
    mixed = [int(s) for s in args.mixed_steps.split(",")]

    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["bench/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(device),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "model": model_name,
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "n": n,
            "steps": steps,
            "size": f"{args.width}x{args.height}",
            "guidance": args.guidance,
            "scheduler": SCHEDULER,
            "mixed_steps": mixed,
            "preview_every": SERVICE_PREVIEW_EVERY,
        },
        "model_build_s": round(build_s, 2),
        "modes": {},
    }
    modes = results["modes"]

    def record(row: dict) -> None:
        modes[row["mode"]] = row
        print(f"  {row['mode']:<40} {row['images_per_s']:8.3f} img/s  p50 {row['latency_p50_s']:.3f} s  "
              f"p95 {row['latency_p95_s']:.3f} s  peak {row['peak_mem_gib']:.2f} GiB", flush=True)
        dump(results, args.json)

    print(f"{model_name} on {device}/{str(dtype).removeprefix('torch.')}, {args.width}x{args.height}, "
          f"{steps} steps, guidance {args.guidance}, N={n}; built in {build_s:.1f}s", flush=True)

    # (a), (b): the stock pipeline exactly as diffusers builds it.
    stock = Stock(pipe, args, meter)
    with torch.inference_mode():
        stock(texts[:1], [0], 2)  # warm-up
        stock(texts, list(range(n)), 2)
        record(stock.one_at_a_time(texts[: args.stock_n or n], steps))
        record(stock.static_batch(texts, steps))
    stock_images = stock.images
    if args.stock_only:
        results["total_s"] = round(time.perf_counter() - t_start, 1)
        dump(results, args.json)
        print_table(results)
        return 0

    model = from_pipeline(pipe, model_path, device, dtype)
    max_batch = args.max_batch or n
    cuda = device.type == "cuda"
    label = "_graphs" if cuda else ""
    engine = Engine(model, max_batch, options=RunnerOptions())
    eager_images = run_engine(engine, args, meter, results, record, texts, steps, mixed, label, warm_label="eager")
    results["engine_vs_stock_max_abs_diff"] = image_diff(eager_images, stock_images)
    del engine
    if cuda:
        # The same requests without CUDA graphs: a captured step must compute what the direct one does.
        direct = EngineBench(Engine(model, max_batch, options=RunnerOptions(cuda_graphs=False)), args, meter)
        direct.run("no-graphs", texts, [steps] * n)
        results["graphs_vs_no_graphs_max_abs_diff"] = image_diff(eager_images, direct.images)
        direct.previews.shutdown(wait=True)
        del direct

    if cuda and not args.no_compile:
        # As the worker compiles: kept whole in the compile cache, where one is set (gpu.sh sets it,
        # so that the service's start after this run loads what this one compiled).
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        options = RunnerOptions(compile_unet=True, compile_vae=True, channels_last=True, fuse_qkv=True,
                                compile_cache=Path(cache) if cache else None)
        try:
            engine = Engine(model, max_batch, options=options)
            compiled = run_engine(engine, args, meter, results, record, texts, steps, mixed, "_compiled",
                                  warm_label="compiled")
            results["compiled_vs_eager_max_abs_diff"] = image_diff(compiled, eager_images)
            results.setdefault("levers", {})["compiled (fused QKV, channels_last)"] = {
                "2_rows_ms": round(1000 * step_time(engine, meter, args, 1, 20), 2),
                "32_rows_ms": round(1000 * step_time(engine, meter, args, 16, 10), 2),
            }
            try:
                # The step at every captured bucket (guided rows: two a sample): what padding a
                # batch up to its bucket costs, which decides how fine the buckets need to be.
                pool = engine.runner.pools[next(iter(engine.runner.pools))]
                results["compiled_step_ms_by_rows"] = {
                    rows: round(1000 * step_time(engine, meter, args, rows // 2, 10), 2)
                    for rows in sorted(pool.graphs) if rows % 2 == 0 and rows // 2 <= max_batch
                }
                print(f"  compiled step by rows (captured buckets): {results['compiled_step_ms_by_rows']}",
                      flush=True)
            except Exception as exc:  # the figures above stand
                results["compiled_step_ms_by_rows_error"] = f"{type(exc).__name__}: {exc}"[:300]
            dump(results, args.json)
            del engine
        except Exception as exc:  # report, keep the eager figures
            results["compile_error"] = f"{type(exc).__name__}: {exc}"[:1000]
            print(f"  compiled engine failed: {results['compile_error']}", flush=True)

    if cuda and args.levers:
        run_levers(model, args, meter, results)

    ratios(results)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    dump(results, args.json)
    print_table(results)
    return 0


def run_engine(engine: Engine, args: argparse.Namespace, meter: Meter, results: dict, record: Any,
               texts: list[str], steps: int, mixed: list[int], label: str, warm_label: str) -> dict[int, np.ndarray]:
    """Warm the engine up as the worker does, then (d), (c1), (c2) and (e); returns (c1)'s images."""
    n = len(texts)
    bench = EngineBench(engine, args, meter)
    t0 = meter.now()
    timings = engine.warm_up(args.width, args.height)
    warm = {k: round(v, 2) for k, v in timings.items()}
    warm["total_s"] = round(meter.now() - t0, 2)
    warm["buckets"] = list(engine.batch_buckets)
    warm["graphs"] = sorted(engine.runner.pools[next(iter(engine.runner.pools))].graphs) if engine.runner.pools else []
    results.setdefault("warm_up", {})[warm_label] = warm
    print(f"  warm-up ({warm_label}): {warm}", flush=True)
    bench.run("warm-up", texts[:2], [2, 3], preview_every=1)
    bench.run("warm-up", texts, [2] * n)
    singles = [bench.run(f"d_engine_single{label}", texts[:1], [steps]) for _ in range(args.single_reps)]
    lat = [r["latency_p50_s"] for r in singles]
    record(summary(f"d_engine_single{label}", lat, statistics.median(lat), 1,
                   max(r["peak_mem_gib"] for r in singles), reps=len(lat),
                   **({"trace": singles[-1]["trace"]} if "trace" in singles[-1] else {})))
    record(bench.run(f"c1_engine_all_at_once{label}", texts, [steps] * n))
    images = dict(bench.images)
    # Arrivals twice as fast as (c1) served them: the engine is never starved by the
    # arrival process, so (c2) against (c1) measures the batching of mixed work itself.
    c1 = results["modes"][f"c1_engine_all_at_once{label}"]
    interval = args.stagger if args.stagger is not None else c1["makespan_s"] / (2 * n)
    record(bench.run(f"c2_engine_staggered_mixed_steps{label}", texts, [mixed[i % len(mixed)] for i in range(n)],
                     interval=interval))
    record(bench.run(f"e_engine_previews_every_step{label}", texts, [steps] * n, preview_every=1))
    base = results["modes"][f"c1_engine_all_at_once{label}"]["makespan_s"]
    every = results["modes"][f"e_engine_previews_every_step{label}"]["makespan_s"]
    results.setdefault("preview_overhead_pct", {})[warm_label] = round(100 * (every - base) / base, 2)
    bench.previews.shutdown(wait=True)
    return images


def run_levers(model: LoadedModel, args: argparse.Namespace, meter: Meter, results: dict) -> None:
    """One engine step at 2 rows (one guided image) and 32 rows (16) per lever, each alone,
    eager UNet. The UNet's layout (fused QKV, NHWC) is set explicitly for each."""
    levers = results.setdefault("levers", {})
    configs = [
        ("graphs, SDPA default", False, RunnerOptions()),
        ("no graphs, SDPA default", False, RunnerOptions(cuda_graphs=False)),
        ("graphs, flash attention", False, RunnerOptions(sdpa_backend="flash")),
        ("graphs, cuDNN attention", False, RunnerOptions(sdpa_backend="cudnn")),
        ("graphs, fused QKV + channels_last", True, RunnerOptions(fuse_qkv=True, channels_last=True)),
    ]
    for name, fused_nhwc, options in configs:
        try:
            set_layout(model, fused_nhwc)
            engine = Engine(model, 16, batch_buckets=(2, 32), options=options)
            engine.warm_up(args.width, args.height)
            levers[name] = {
                "2_rows_ms": round(1000 * step_time(engine, meter, args, 1, 20), 2),
                "32_rows_ms": round(1000 * step_time(engine, meter, args, 16, 10), 2),
            }
            del engine
        except Exception as exc:
            levers[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"  lever {name}: {levers[name]}", flush=True)
        dump(results, args.json)


def set_layout(model: LoadedModel, fused_nhwc: bool) -> None:
    """Fused QKV projections and NHWC weights on or off (the runner only ever turns them on)."""
    unet = model.unet
    if fused_nhwc:
        if getattr(unet, "original_attn_processors", None) is None:
            unet.fuse_qkv_projections()
        unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    else:
        if getattr(unet, "original_attn_processors", None) is not None:
            unet.unfuse_qkv_projections()
            unet.original_attn_processors = None
        unet.to(memory_format=torch.contiguous_format)
        model.vae.to(memory_format=torch.contiguous_format)


def image_diff(a: dict[int, np.ndarray] | list[np.ndarray], b: dict[int, np.ndarray] | list[np.ndarray]) -> dict:
    """Largest and mean absolute difference (0-255) between two sets of images of the same requests."""
    pairs = [(a[i], b[i]) for i in range(min(len(a), len(b)))]
    diffs = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in pairs]
    return {"max": int(max(d.max() for d in diffs)), "mean": round(float(np.mean([d.mean() for d in diffs])), 3),
            "images": len(pairs)}


def ratios(results: dict) -> None:
    m = results["modes"]
    out = {}

    def ratio(a: str, b: str, key: str = "images_per_s") -> float | None:
        if a in m and b in m:
            return round(m[a][key] / m[b][key], 3)
        return None

    for label in ("", "_graphs", "_compiled"):
        out[f"c1{label}_over_a"] = ratio(f"c1_engine_all_at_once{label}", "a_stock_one_at_a_time")
        out[f"c1{label}_over_b"] = ratio(f"c1_engine_all_at_once{label}", "b_stock_static_batch")
        out[f"c2{label}_over_c1{label}"] = ratio(f"c2_engine_staggered_mixed_steps{label}",
                                                 f"c1_engine_all_at_once{label}")
        out[f"d{label}_over_a_latency"] = ratio(f"d_engine_single{label}", "a_stock_one_at_a_time", "latency_p50_s")
    results["ratios"] = {k: v for k, v in out.items() if v is not None}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpus = f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    return f"{platform.processor() or platform.machine()}, {cpus}"


def dump(results: dict, path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: dict) -> None:
    s = results["settings"]
    print()
    print(f"{results['machine']} | {results['model']} | {s['dtype']} {s['size']} {s['steps']} steps "
          f"guidance {s['guidance']} {s['scheduler']} N={s['n']} | torch {results['torch']}")
    print(f"{'mode':<44}{'img/s':>8}{'p50 s':>9}{'p95 s':>9}{'peak GiB':>10}")
    for row in results["modes"].values():
        print(f"{row['mode']:<44}{row['images_per_s']:>8.3f}{row['latency_p50_s']:>9.3f}"
              f"{row['latency_p95_s']:>9.3f}{row['peak_mem_gib']:>10.2f}")
    for key in ("preview_overhead_pct", "warm_up", "levers", "engine_vs_stock_max_abs_diff", "graphs_vs_no_graphs_max_abs_diff",
                "compiled_vs_eager_max_abs_diff", "compile_error", "ratios"):
        if key in results:
            print(f"{key}: {results[key]}")
    print(f"total {results['total_s']} s")


if __name__ == "__main__":
    raise SystemExit(main())
