"""Throughput and latency: stock diffusers vs Bailan's continuous-batching engine.

One device, one model, one run:

  (a) stock `StableDiffusionPipeline.__call__`, one request at a time (a naive service);
  (b) stock pipeline, all N requests in one static batch (the stock code's ceiling);
  (c) our engine fed N concurrent requests: all at once, and with staggered
      arrivals and mixed step counts;
  (d) one request alone through the engine, and the cost of previews every step.

Each request is one image: a different prompt and seed, guidance 7.5, DPM-Solver++ 2M.
Every mode decodes with the VAE and hands back uint8 arrays, as the service does.

    python bench/throughput.py --device cpu              # built-in model (or the tiny pipeline)
    python bench/throughput.py --device cuda --n 16      # SD1.5-architecture, random weights, built in code

On CUDA the default model is an SD1.5-architecture pipeline with random weights,
built directly on the GPU (nothing is downloaded; see ../shared/ANCHORS.md):
compute is the same as the real SD1.5's, so the timings are. `--json PATH`
writes every figure; it is rewritten after each mode, so a run cut short keeps
what it measured.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: E402

from worker.imaging import encode_preview  # noqa: E402
from worker.loader import LoadedModel, from_pipeline  # noqa: E402
from worker.sampling import Engine, GenerationJob  # noqa: E402
from world.tiny import TINY_WORDS, build_tiny_pipeline  # noqa: E402

BUILTIN = REPO / "models" / "bailan-shapes"
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
SCHEDULER = "dpmpp_2m"


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        fg, bg = COLOURS[i % len(COLOURS)], COLOURS[(i * 3 + 1) % len(COLOURS)]
        size = ("small", "large", "big", "tiny")[i % 4]
        out.append(f"a {size} {fg} {SHAPES[i % len(SHAPES)]} on a {bg} background")
    return out


# ---- models -----------------------------------------------------------------------


def build_sd15_random(device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD1.5's published configurations with random weights, built on `device`.

    Weight matrices are scaled by 0.5 so fp16 activations stay finite. The tokenizer
    is word-level (no CLIP vocabulary without a download); the text encoder keeps
    CLIP's 49,408-entry embedding table, of which it uses the first few ids.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
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


def build_pipeline(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[StableDiffusionPipeline, str, Path]:
    """The pipeline, its name for the report, and its directory (for latent_rgb.json)."""
    path = Path(args.model) if args.model else BUILTIN
    if args.model or (device.type == "cpu" and (BUILTIN / "model_index.json").is_file()):
        pipe = StableDiffusionPipeline.from_pretrained(
            path, local_files_only=True, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
        name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        return pipe.to(device), name, path
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

    def static_batch(self, texts: list[str], steps: int, name: str = "b_stock_static_batch") -> dict:
        self.meter.reset_peak()
        start = self.meter.now()
        self(texts, list(range(len(texts))), steps)
        makespan = self.meter.now() - start
        return summary(name, [makespan] * len(texts), makespan, len(texts), self.meter.peak_gib())


class EngineBench:
    """Our engine on the main thread, fed from another, as the worker's slots feed it."""

    def __init__(self, model: LoadedModel, args: argparse.Namespace, meter: Meter) -> None:
        self.model, self.args, self.meter = model, args, meter
        self.previews = ThreadPoolExecutor(2, thread_name_prefix="preview")
        self.preview_count = 0

    def _on_preview(self, job: GenerationJob, step: int, rgb: np.ndarray) -> None:
        # What the runtime does: hand the array to a thread that scales and encodes it.
        self.preview_count += 1
        self.previews.submit(encode_preview, rgb)

    def job(self, i: int, text: str, steps: int, preview_every: int = 0) -> GenerationJob:
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
        self,
        name: str,
        texts: list[str],
        steps: list[int],
        interval: float = 0.0,
        preview_every: int = 0,
        max_batch: int | None = None,
    ) -> dict:
        engine = Engine(self.model, max_batch or self.args.max_batch or len(texts))
        stop = threading.Event()
        self.preview_count = 0
        self.meter.reset_peak()
        submitted: list[float] = []
        finished: list[float] = [0.0] * len(texts)
        futures: list[Future] = []

        def done_at(i: int) -> Any:
            # Called in the engine thread once the images are on the host.
            return lambda _f: finished.__setitem__(i, time.perf_counter())

        def feed() -> None:
            # Clients arrive on this thread; the engine runs on the main thread, as
            # in the worker (CPU kernels run 2x slower from a secondary thread).
            for i, (text, n_steps) in enumerate(zip(texts, steps)):
                if interval:
                    delay = start + i * interval - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                submitted.append(time.perf_counter())
                future = engine.submit(self.job(i, text, n_steps, preview_every))
                future.add_done_callback(done_at(i))
                futures.append(future)
            wait(futures)
            stop.set()

        self.meter.sync()
        start = time.perf_counter()
        feeder = threading.Thread(target=feed, name="bench-clients", daemon=True)
        feeder.start()
        engine.run(stop)
        feeder.join()
        for future in futures:
            future.result()  # raise if a job failed
        makespan = max(finished) - start
        latencies = [f - s for f, s in zip(finished, submitted)]
        extra: dict[str, Any] = {"engine_iterations": engine.iterations, "steps": sorted(set(steps))}
        if interval:
            extra["arrival_interval_s"] = round(interval, 4)
        if preview_every:
            extra["previews"] = self.preview_count
        return summary(name, latencies, makespan, len(texts), self.meter.peak_gib(), **extra)


# ---- the run -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--model", help="a diffusers SD directory (default: built in, see above)")
    p.add_argument("--n", type=int, help="concurrent requests (default 16 on CUDA, 8 on CPU)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--mixed-steps", default="15,25,40", help="step counts cycled over the staggered requests")
    p.add_argument("--size", type=int, help="width = height (default 512 on CUDA, the model's native size on CPU)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--max-batch", type=int, default=0, help="engine batch in images (default: --n)")
    p.add_argument("--stagger", type=float, help="arrival interval in s (default: half of (a)'s latency)")
    p.add_argument("--stock-n", type=int, help="requests for (a) (default: --n)")
    p.add_argument("--single-reps", type=int, default=3)
    p.add_argument("--channels-last", action="store_true", help="engine with NHWC weights (CUDA)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the UNet and measure again (CUDA)")
    p.add_argument("--time-budget", type=float, default=0, help="skip --compile if less than 120 s of this is left")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    n = args.n or (16 if device.type == "cuda" else 8)
    meter = Meter(device)

    t0 = time.perf_counter()
    pipe, model_name, model_path = build_pipeline(args, device, dtype)
    build_s = time.perf_counter() - t0
    if args.size:
        args.width = args.height = args.size
    elif device.type == "cuda" and not args.model:
        args.width = args.height = 512
    else:
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        args.width = args.height = pipe.unet.config.sample_size * scale
    texts = prompts(n)
    steps = args.steps
    mixed = [int(s) for s in args.mixed_steps.split(",")]

    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
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
            "engine_channels_last": bool(args.channels_last and device.type == "cuda"),
        },
        "model_build_s": round(build_s, 2),
        "modes": {},
    }
    modes = results["modes"]

    def record(row: dict) -> None:
        modes[row["mode"]] = row
        print(f"  {row['mode']:<34} {row['images_per_s']:8.3f} img/s  p50 {row['latency_p50_s']:.3f} s  "
              f"p95 {row['latency_p95_s']:.3f} s  peak {row['peak_mem_gib']:.2f} GiB", flush=True)
        dump(results, args.json)

    print(f"{model_name} on {device}/{str(dtype).removeprefix('torch.')}, {args.width}x{args.height}, "
          f"{steps} steps, guidance {args.guidance}, N={n}; built in {build_s:.1f}s", flush=True)

    # (a), (b): the stock pipeline exactly as diffusers builds it (no channels_last).
    stock = Stock(pipe, args, meter)
    with torch.inference_mode():
        stock(texts[:1], [0], 2)  # warm-up
        stock(texts, list(range(n)), 2)
        record(stock.one_at_a_time(texts[: args.stock_n or n], steps))
        record(stock.static_batch(texts, steps))

    if device.type == "cuda":
        # The layout trade: the same stock batch with NHWC weights and activations.
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            stock(texts, list(range(n)), 2)  # warm-up: NHWC selects other kernels
            record(stock.static_batch(texts, steps, name="b2_stock_static_batch_channels_last"))
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.contiguous_format)
    # Our loader (eval, no grad; NHWC only with --channels-last).
    model = from_pipeline(pipe, model_path, device, dtype, channels_last=args.channels_last)

    bench = EngineBench(model, args, meter)
    run_engine_modes(bench, results, record, texts, steps, mixed, modes, label="")
    images_ok(results, bench)

    if args.compile:
        left = args.time_budget - (time.perf_counter() - t_start) if args.time_budget else float("inf")
        if device.type != "cuda":
            print("--compile: CUDA only; skipped", flush=True)
        elif left < 120:
            print(f"--compile: skipped, {left:.0f} s of the time budget left", flush=True)
            results["compile"] = {"skipped": f"{left:.0f} s of the time budget left"}
        else:
            run_compiled(bench, results, record, texts, steps, meter)

    ratios(results)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    dump(results, args.json)
    print_table(results)
    bench.previews.shutdown(wait=True)
    return 0


def run_engine_modes(bench: EngineBench, results: dict, record: Any, texts: list[str], steps: int,
                     mixed: list[int], modes: dict, label: str) -> None:
    n = len(texts)
    # What the worker does at start: every bucketed batch shape once, then every path once.
    if not label:  # (under torch.compile each shape would be a compile: see run_compiled)
        t0 = bench.meter.now()
        Engine(bench.model, bench.args.max_batch or n).warm_up_shapes(bench.args.width, bench.args.height)
        results["warm_up_shapes_s"] = round(bench.meter.now() - t0, 2)
    bench.run("warm-up", texts[:2], [2, 3], preview_every=1)
    bench.run("warm-up", texts, [2] * n)
    # (d) one request alone through the engine.
    singles = [bench.run(f"d_engine_single{label}", texts[:1], [steps]) for _ in range(bench.args.single_reps)]
    lat = [r["latency_p50_s"] for r in singles]
    record(summary(f"d_engine_single{label}", lat, statistics.median(lat), 1,
                   max(r["peak_mem_gib"] for r in singles), reps=len(lat)))
    # (c1) N at once.
    record(bench.run(f"c1_engine_all_at_once{label}", texts, [steps] * n))
    if label:
        return
    # (c2) staggered arrivals, mixed step counts.
    a = modes.get("a_stock_one_at_a_time")
    interval = bench.args.stagger if bench.args.stagger is not None else (a["latency_p50_s"] / 2 if a else 0.1)
    record(bench.run("c2_engine_staggered_mixed_steps", texts, [mixed[i % len(mixed)] for i in range(n)],
                     interval=interval))
    # Stock one at a time with the same mixed steps, for (c2)'s comparison.
    # Previews every step vs none, N at once.
    record(bench.run("e_engine_all_at_once_previews_every_step", texts, [steps] * n, preview_every=1))
    base = modes["c1_engine_all_at_once"]["makespan_s"]
    with_previews = modes["e_engine_all_at_once_previews_every_step"]["makespan_s"]
    results["preview_overhead_pct"] = round(100 * (with_previews - base) / base, 2)


def run_compiled(bench: EngineBench, results: dict, record: Any, texts: list[str], steps: int, meter: Meter) -> None:
    model = bench.model
    eager = model.pipe.unet
    model.pipe.unet = torch.compile(eager)
    info: dict[str, Any] = {"mode": "torch.compile(unet), default mode"}
    try:
        t0 = meter.now()
        bench.run("compile-warm-up-1", texts[:1], [2])
        info["first_call_batch1_s"] = round(meter.now() - t0, 1)
        t0 = meter.now()
        bench.run("compile-warm-up-n", texts, [2] * len(texts))
        info["first_call_batchN_s"] = round(meter.now() - t0, 1)
        print(f"  compile warm-up: batch 1 {info['first_call_batch1_s']} s, batch {len(texts)} "
              f"{info['first_call_batchN_s']} s", flush=True)
        results["compile"] = info
        run_engine_modes(bench, results, record, texts, steps, [], results["modes"], label="_compiled")
    except Exception as exc:  # report, keep the eager figures
        info["error"] = f"{type(exc).__name__}: {exc}"[:500]
        results["compile"] = info
        print(f"  compile failed: {info['error']}", flush=True)
    finally:
        model.pipe.unet = eager


def images_ok(results: dict, bench: EngineBench) -> None:
    """The random-weight model must still give finite numbers (fp16 overflow would make NaNs)."""
    job = bench.job(0, "a red circle", 2)
    engine = Engine(bench.model, 1)
    engine.submit(job)
    engine.run_until_idle()
    image = job.future.result()[0]
    results["sample_image"] = {"shape": list(image.shape), "mean": round(float(image.mean()), 2),
                               "std": round(float(image.std()), 2)}


def ratios(results: dict) -> None:
    m = results["modes"]
    out = {}

    def ratio(a: str, b: str, key: str = "images_per_s") -> float | None:
        if a in m and b in m:
            return round(m[a][key] / m[b][key], 3)
        return None

    out["c1_over_a_throughput"] = ratio("c1_engine_all_at_once", "a_stock_one_at_a_time")
    out["c1_over_b_throughput"] = ratio("c1_engine_all_at_once", "b_stock_static_batch")
    out["c2_over_a_throughput"] = ratio("c2_engine_staggered_mixed_steps", "a_stock_one_at_a_time")
    out["d_over_a_latency"] = ratio("d_engine_single", "a_stock_one_at_a_time", "latency_p50_s")
    out["c1_compiled_over_b_throughput"] = ratio("c1_engine_all_at_once_compiled", "b_stock_static_batch")
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
    if "preview_overhead_pct" in results:
        print(f"previews every step (N at once): {results['preview_overhead_pct']:+.2f} % makespan")
    for key, value in results.get("ratios", {}).items():
        print(f"{key}: {value}")
    if "compile" in results:
        print(f"compile: {results['compile']}")
    print(f"total {results['total_s']} s")


if __name__ == "__main__":
    raise SystemExit(main())
