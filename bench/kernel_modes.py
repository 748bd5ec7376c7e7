"""What inductor's modes give one SD1.5 UNet call at a batch's rows, and what each costs.

The UNet is laid out as the worker lays it out when it compiles (fused QKV,
channels_last, 1x1 convolutions as matrix products) and called at `--rows`
rows (32: a batch of 16 guided images), inside a captured CUDA graph as the
engine calls it. Each mode runs in its own process with its own empty
TORCHINDUCTOR_CACHE_DIR, so its compile is cold and no mode reuses another's
kernels. Per mode: the first call's seconds (the compile, autotuning
included), the captured call's milliseconds, and the largest difference from
the eager UNet's output on the same inputs.

Modes: `eager` (no compile), `default` (torch.compile, batch static),
`default-dynamic` (batch dimension dynamic, as the worker compiles), `regional`
(each transformer and ResNet block compiled alone, the rest eager: a block
shape that repeats compiles once, which may cut the compile's time), `max-autotune`
(mode max-autotune-no-cudagraphs: Triton GEMM/convolution templates timed
against cuBLAS/cuDNN; the CUDA graph is the engine's own), `max-autotune-cdt`
(that plus coordinate-descent tuning of the generated kernels). Each may end in
`+cudnn-benchmark`: cuDNN then times its convolution algorithms at the first
call and keeps the fastest (the worker's BAILAN_CUDNN_BENCHMARK); without it,
its heuristics pick, as the worker does by default. Modes run in
the order given until `--budget-s` is spent; one that outruns what is left is
reported as not finished, with the seconds it was given.

    python bench/kernel_modes.py --modes eager,default,max-autotune --budget-s 300 --json out.json
    python bench/kernel_modes.py --rows 2 --modes eager,eager+cudnn-benchmark --budget-s 60
    .venv/bin/python bench/kernel_modes.py --small --modes eager,default   # a CPU dry run, small channels
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODES = ("eager", "default", "default-dynamic", "regional", "max-autotune", "max-autotune-cdt")
# What `regional` compiles, each block alone: nearly all of the UNet's work, in repeated shapes.
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
CUDNN_BENCHMARK = "+cudnn-benchmark"


def known(mode: str) -> bool:
    return mode.removesuffix(CUDNN_BENCHMARK) in MODES


def build_unet(small: bool, device: Any, dtype: Any) -> Any:
    """SD1.5's UNet with random weights (bench/throughput.py's), or its small-channel shape."""
    import torch

    if small:
        from bench.compile_warm import sd15_shaped_unet

        unet = sd15_shaped_unet()
    else:
        from bench.throughput import build_sd15_random

        unet = build_sd15_random(device, dtype).unet
    unet.fuse_qkv_projections()
    return unet.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def child(mode: str, rows: int, small: bool, reps: int) -> dict[str, Any]:
    """One mode in this process: compile, capture, time; the figures as a dict."""
    import torch
    import torch._inductor.config as inductor

    from worker.runners.sd import unet_forward

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name, mode = mode, mode.removesuffix(CUDNN_BENCHMARK)
    torch.backends.cudnn.benchmark = name.endswith(CUDNN_BENCHMARK)
    dtype = torch.float16 if cuda else torch.float32
    unet = build_unet(small, device, dtype)
    inductor.conv_1x1_as_mm = True  # as the worker compiles (worker/runners/sd.py)
    side, text, width = (8, 7, 32) if small else (64, 77, 768)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(rows, 4, side, side, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
        t = torch.linspace(999, 1, rows).to(device)
        embeds = torch.randn(rows, text, width, generator=gen).to(device, dtype)
        reference = unet_forward(unet, x, t, embeds).float()

    if mode == "eager":
        fn = unet_forward
    elif mode == "regional":
        # Each block compiled on its own: blocks of one shape (SD1.5 repeats each transformer
        # block's shape five times) share one compile; what lies between them runs eagerly.
        # One compile per distinct shape of a block class: more than dynamo's default 8.
        torch._dynamo.config.recompile_limit = 64
        for module in unet.modules():
            if type(module).__name__ in REGIONAL_BLOCKS:
                module.compile(fullgraph=True, dynamic=False)
        fn = unet_forward
    else:
        compile_mode = None
        if mode.startswith("max-autotune"):
            compile_mode = "max-autotune-no-cudagraphs"  # the engine captures its own graphs
        if mode == "max-autotune-cdt":
            # The recipe of PyTorch's "Accelerating generative AI" SDXL post.
            inductor.coordinate_descent_tuning = True
            inductor.coordinate_descent_check_all_directions = True
            inductor.epilogue_fusion = False
        dynamic = None if mode == "default-dynamic" else False
        fn = torch.compile(unet_forward, mode=compile_mode, fullgraph=True, dynamic=dynamic)
        if mode == "default-dynamic":
            for tensor in (x, t, embeds):
                torch._dynamo.mark_dynamic(tensor, 0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = fn(unet, x, t, embeds)
        sync()
        first_s = time.perf_counter() - t0
        diff = (out.float() - reference).abs().max().item()
        if cuda:
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                for _ in range(2):
                    fn(unet, x, t, embeds)
            torch.cuda.current_stream().wait_stream(side_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(unet, x, t, embeds)
            call = graph.replay
        else:
            def call() -> None:
                fn(unet, x, t, embeds)
        call()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(5):
                call()
            sync()
            times.append((time.perf_counter() - t0) / 5)
    return {
        "mode": name, "rows": rows, "first_call_s": round(first_s, 2), "call_ms": round(1000 * statistics.median(times), 2),
        "max_abs_diff_vs_eager": round(diff, 5), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


def write(path: Path | None, rows: int, results: list[dict[str, Any]]) -> None:
    """The results so far, after every mode: a run stopped later keeps them."""
    if path is not None:
        path.write_text(json.dumps({"rows": rows, "results": results}, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="eager,default,max-autotune",
                   help=f"comma-separated, of {', '.join(MODES)}, each with {CUDNN_BENCHMARK} or not")
    p.add_argument("--rows", type=int, default=32, help="UNet rows per call (guided images x 2)")
    p.add_argument("--reps", type=int, default=10, help="timed blocks of 5 calls; the median block counts")
    p.add_argument("--budget-s", type=float, default=600, help="seconds for all modes together")
    p.add_argument("--small", action="store_true", help="the small-channel SD1.5 shape (a CPU dry run)")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.rows, args.small, args.reps)), flush=True)
        return 0

    modes = args.modes.split(",")
    unknown = {mode for mode in modes if not known(mode)}
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}; known: {', '.join(MODES)}, each with "
                f"{CUDNN_BENCHMARK} or not")
    deadline = time.monotonic() + args.budget_s
    results: list[dict[str, Any]] = []
    for mode in modes:
        left = deadline - time.monotonic()
        if left < 10:
            results.append({"mode": mode, "skipped": "no budget left"})
            print(f"  {mode:<34} skipped: no budget left", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix=f"kernel-modes-{mode}-", ignore_cleanup_errors=True) as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": f"{cache}/triton",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            cmd = [sys.executable, __file__, "--child", mode, "--rows", str(args.rows), "--reps", str(args.reps)]
            cmd += ["--small"] if args.small else []
            t0 = time.monotonic()
            # A session of its own: on a timeout its compile workers go too (left, they kept
            # writing into the cache folder as it was removed).
            child_process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             start_new_session=True)
            try:
                stdout, stderr = child_process.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(child_process.pid, signal.SIGKILL)
                child_process.communicate()
                results.append({"mode": mode, "not_finished_within_s": round(left, 1)})
                print(f"  {mode:<34} not finished within {left:.0f} s", flush=True)
                write(args.json, args.rows, results)
                continue
            done = subprocess.CompletedProcess(cmd, child_process.returncode, stdout, stderr)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                results.append({"mode": mode, "error": (done.stderr or done.stdout)[-800:]})
                print(f"  {mode:<34} failed: {(done.stderr or done.stdout)[-800:]}", flush=True)
                write(args.json, args.rows, results)
                continue
            row = json.loads(lines[-1].removeprefix("RESULT "))
            row["process_s"] = round(time.monotonic() - t0, 1)
            results.append(row)
            print(f"  {mode:<34} first call {row['first_call_s']:7.1f} s   call {row['call_ms']:8.2f} ms at "
                  f"{row['rows']} rows   max |diff| vs eager {row['max_abs_diff_vs_eager']}   "
                  f"(process {row['process_s']} s, {row['device']})", flush=True)
        write(args.json, args.rows, results)
    base = next((r["call_ms"] for r in results if r.get("mode") == "default" and "call_ms" in r), None)
    if base:
        for r in results:
            if "call_ms" in r:
                r["speed_vs_default"] = round(base / r["call_ms"], 3)
        print("speed against default compile:", {r["mode"]: r["speed_vs_default"] for r in results if "speed_vs_default" in r})
    write(args.json, args.rows, results)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
